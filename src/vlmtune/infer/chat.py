"""A multi-turn conversation with the model: messages-format history, images/videos attached to user turns,
answers streamed as text. The KV cache of earlier turns is kept: a turn prefills only its new tokens
(`generation/conversation.py`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vlmtune.generation.conversation import ConversationCache
from vlmtune.generation.generate import GREEDY, stream
from vlmtune.generation.sampling import SamplingOptions

from .load import stop_token_ids


class TextStream:
    """Turns a growing list of token ids into newly printable text (a character split across tokens is
    held back until complete)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted :], len(text)
        return new

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)


class ChatSession:
    """`ask()` appends a user turn, generates the answer from the whole conversation, and keeps it as the
    assistant turn for the next question. `reset()` starts over (keeping the system prompt).
    `reuse_cache=False` prefills the whole conversation every turn (the answers are the same)."""

    def __init__(
        self,
        model,
        processor,
        *,
        system: str | None = None,
        max_new_tokens: int = 512,
        sampling: SamplingOptions = GREEDY,
        eos_token_ids: list[int] | None = None,
        generator: torch.Generator | None = None,
        reuse_cache: bool = True,
    ):
        self.model = model
        self.processor = processor
        self.system = system
        self.eos_token_ids = (
            eos_token_ids
            if eos_token_ids is not None
            else stop_token_ids(processor.tokenizer, getattr(model, "source_dir", None))
        )
        self.options = dict(max_new_tokens=max_new_tokens, sampling=sampling)
        self.generator = generator
        self.conversation = ConversationCache(
            image_token_id=processor.image_token_id, video_token_id=processor.video_token_id
        ) if reuse_cache else None  # fmt: skip
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list[str] = []
        self.videos: list[str] = []
        if self.conversation is not None:
            self.conversation.reset()

    def sample(self) -> dict:
        out = {"messages": list(self.messages)}
        if self.images:
            out["images"] = list(self.images)
        if self.videos:
            out["videos"] = list(self.videos)
        return out

    def ask(
        self,
        text: str,
        *,
        images: list[str] = (),
        videos: list[str] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> str:
        """The answer to `text` (media placeholders go before the text); `on_text` receives it piece by piece."""
        content = "<image>" * len(images) + "<video>" * len(videos) + text
        self.messages.append({"role": "user", "content": content})
        self.images.extend(images)
        self.videos.extend(videos)
        try:
            encoded = self.processor.encode(self.sample(), add_generation_prompt=True)
        except Exception:
            self.messages.pop()  # keep the conversation usable after a bad image path
            del self.images[len(self.images) - len(images) :]
            del self.videos[len(self.videos) - len(videos) :]
            raise
        out = TextStream(self.processor.tokenizer)
        stop = set(self.eos_token_ids)
        chosen = []
        for step in self._stream(encoded, stop):
            token = int(step.tokens[0])
            chosen.append(token)
            if token in stop:
                break
            piece = out.push(token)
            if piece and on_text is not None:
                on_text(piece)
        if self.conversation is not None:  # every chosen token but the last went through the model
            self.conversation.record(self._prefilled + chosen[:-1])
        answer = out.text()
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def _stream(self, encoded: dict, stop: set[int]):
        """Generation steps for the encoded conversation, continuing the cache of the earlier turns."""
        options = dict(eos_token_ids=stop, generator=self.generator, **self.options)
        if self.conversation is None:
            return stream(self.model, encoded, **options)
        batch, history = self.conversation.split(encoded)
        self._prefilled = batch["input_ids"].tolist()
        return stream(self.model, batch, cache=self.conversation.cache, history=history, **options)
