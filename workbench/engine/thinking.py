"""The one place where reasoning is split from the answer, as text streams in.

Rules (the same for every front end, so the UI's thought bubble, the server's
`reasoning_content` and the notebooks agree):
- Text inside `<think>…</think>` is reasoning; everything else is answer.
- The stream starts in reasoning when the prompt already opened the block (templates
  such as DeepSeek-R1's end the generation prompt with `<think>`).
- Text before an open tag is answer; several think blocks are allowed.
- A missing close tag leaves the rest of the reply as reasoning.
- Tags never reach the answer: a stray close tag in the answer, or a nested open tag in
  reasoning, is dropped. This holds with thinking off too, when a model emits tags anyway.
- Whitespace right after a tag that switches channel, and at the very start of the reply,
  is dropped (models write `</think>\\n\\n` before the answer).
- A tag split across tokens is recognised: a tail that could still become a tag is held
  back until the next chunk decides it, or until `flush`.
"""

from __future__ import annotations

from typing import Literal

Channel = Literal["reasoning", "text"]

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"


class ThinkingParser:
    def __init__(self, *, start_in_reasoning: bool = False, open_tag: str = OPEN_TAG, close_tag: str = CLOSE_TAG):
        self.open_tag = open_tag
        self.close_tag = close_tag
        self.channel: Channel = "reasoning" if start_in_reasoning else "text"
        self._pending = ""
        self._skip_space = True

    def feed(self, text: str) -> list[tuple[Channel, str]]:
        self._pending += text
        out: list[tuple[Channel, str]] = []
        while self._pending:
            tag_at, tag = self._first_tag()
            if tag is None:
                keep = self._partial_tag_length()
                self._emit(out, self._pending[: len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep :]
                break
            self._emit(out, self._pending[:tag_at])
            self._pending = self._pending[tag_at + len(tag) :]
            if tag == self.open_tag and self.channel == "text":
                self.channel, self._skip_space = "reasoning", True
            elif tag == self.close_tag and self.channel == "reasoning":
                self.channel, self._skip_space = "text", True
        return out

    def flush(self) -> list[tuple[Channel, str]]:
        """End of stream: whatever was held back is plain text of the current channel."""
        out: list[tuple[Channel, str]] = []
        self._emit(out, self._pending)
        self._pending = ""
        return out

    def _first_tag(self) -> tuple[int, str | None]:
        found = [(self._pending.find(tag), tag) for tag in (self.open_tag, self.close_tag)]
        found = [(at, tag) for at, tag in found if at >= 0]
        if not found:
            return -1, None
        return min(found)

    def _partial_tag_length(self) -> int:
        """Length of the longest tail of the buffer that is a proper prefix of a tag."""
        longest = 0
        for tag in (self.open_tag, self.close_tag):
            for n in range(min(len(tag) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(tag[:n]):
                    longest = n
                    break
        return longest

    def _emit(self, out: list[tuple[Channel, str]], text: str) -> None:
        if not text:
            return
        if self._skip_space:
            text = text.lstrip()
            if not text:
                return
            self._skip_space = False
        if out and out[-1][0] == self.channel:
            out[-1] = (self.channel, out[-1][1] + text)
        else:
            out.append((self.channel, text))


def split_thinking(text: str, *, start_in_reasoning: bool = False) -> tuple[str, str]:
    """Whole-text form of the parser: (reasoning, answer)."""
    parser = ThinkingParser(start_in_reasoning=start_in_reasoning)
    parts = parser.feed(text) + parser.flush()
    reasoning = "".join(t for channel, t in parts if channel == "reasoning")
    answer = "".join(t for channel, t in parts if channel == "text")
    return reasoning, answer
