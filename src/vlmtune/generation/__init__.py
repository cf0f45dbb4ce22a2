"""Generation with a KV cache (used by inference and by the trainer's generation metrics): the cache,
sampling, the decode loop, and answers scored against references."""
