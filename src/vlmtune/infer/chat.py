"""A multi-turn conversation with the model: messages-format history, images/videos attached to user turns,
answers streamed as text."""

from __future__ import annotations

from collections.abc import Callable

import torch

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
    assistant turn for the next question. `reset()` starts over (keeping the system prompt)."""

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
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list[str] = []
        self.videos: list[str] = []

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
        for step in stream(self.model, encoded, eos_token_ids=stop, generator=self.generator, **self.options):
            token = int(step.tokens[0])
            if token in stop:
                break
            piece = out.push(token)
            if piece and on_text is not None:
                on_text(piece)
        answer = out.text()
        self.messages.append({"role": "assistant", "content": answer})
        return answer
