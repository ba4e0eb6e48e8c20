"""The calibration data a compression step fits on: one object, whatever the user named.

Every step that reads calibration text (prune_heads' importance and compensation, recover's
windows, the calibrated quantizers) takes a spec from its config (`calibration:`) or from
`python -m workbench.compress --calibration`, and calls `resolve`. A spec is a path (a .txt
file, a .jsonl of texts or chats, a folder of them; read and checked by workbench.data) or a
built-in name:

- `reference`: data/calibration.txt, the CPython Language Reference (what every step read
  before calibration was a choice; the shipped pruned-25 adapter was fitted after it);
- `mix` (the default): that text, the original model's own greedy replies to chat prompts of
  data/recovery/prompts.txt, its sampled continuations of the openings of
  data/recovery/openings.txt (stories, letters, news, recipes...), and everyday sentences,
  interleaved so that the first n texts a step reads are already mixed. Fitting on one kind of
  text fits that kind (pruned-25 lost 7% perplexity on the reference text's source and 61% on
  fiction); the model's own replies need no dataset and are the situation it is used in, and its
  sampled text reaches the parts of its distribution that neither a reference manual nor an
  assistant's replies do.

Specs joined by `+` (`mix+data/recovery/fiction.txt`) are read as one set, their texts
interleaved: the mix with text of the user's own kind beside it, not instead of it.

The replies come from the model as it is when the mix is first resolved for a session: the
pipeline resolves every step's calibration before its first step runs, so a step after
pruning still reads the original model's text. They are generated once and cached on disk by
model fingerprint, beside the `recover` step's teacher replies.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from pathlib import Path

from workbench.compress import recovery_data as rd
from workbench.data import (
    CALIBRATION_BUILTINS,
    DEFAULT_CALIBRATION,
    Document,
    calibration_parts,
    calibration_texts,
    read_calibration,
)
from workbench.paths import DATA_DIR, cache_root

MIX_REPLY_TOKENS = 128
"""Tokens of each self-generated reply (recover's default `reply_tokens`)."""
MIX_PROMPT_STRIDE = 4
"""Every 4th prompt of data/recovery/prompts.txt (39 of 154, spread over the file's kinds of
request): the replies are generated once per model, and a quarter of the prompts is a quarter of
the time recover's teacher replies take (all 154: about 6 minutes on a quiet 2-core CPU)."""

MIX_SAMPLE_TOKENS = 256
"""Tokens of each sampled continuation: one per opening (32 texts, about 1.5 minutes on a quiet
2-core CPU for the embedded model; the first 32 of the recover step's samples with its seed 0)."""

SPEECH_SENTENCES = DATA_DIR / "speech_sentences.txt"
SENTENCES_PER_DOCUMENT = 8


@dataclass
class Calibration:
    """Calibration texts with the name they were asked for by and a digest of their content."""

    name: str
    """"reference", "mix", or the user's path as given"""
    texts: list[str]
    sha256: str
    """of the texts, joined by form feeds: two runs fitted on the same digest saw the same text"""
    sources: dict[str, int] | None = None
    """texts of each kind (a mix) or of each joined spec (`mix+path`)"""

    @classmethod
    def of(cls, name: str, texts: list[str], sources: dict[str, int] | None = None) -> Calibration:
        return cls(name, texts, hashlib.sha256("\f".join(texts).encode()).hexdigest(), sources)

    @property
    def digest(self) -> str:
        """The short form recorded beside a saved adapter (recovery.json's prune `calibration`)."""
        return self.sha256[:16]

    def record(self, used: int | None = None) -> dict:
        """What a report says of it; `used`: how many of the texts the step read (the first ones)."""
        record: dict = {
            "name": self.name,
            "texts": len(self.texts),
            "chars": sum(len(t) for t in self.texts),
            "sha256": self.sha256,
        }
        if used is not None:
            record["texts_used"] = min(used, len(self.texts))
        if self.sources:
            record["sources"] = dict(self.sources)
        return record


_RESOLVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resolve(session, spec: str | None, *, model=None) -> Calibration:
    """The calibration data `spec` names (None: the default, `mix`), once per session and spec:
    a later step reads what the first resolution built, from the model as it was then. `model`:
    whose replies a mix holds when it is built now (default the session's model as it is; the
    recover step passes its teacher, the model as loaded)."""
    name = spec or DEFAULT_CALIBRATION
    per_session = _RESOLVED.setdefault(session, {})
    if name not in per_session:
        per_session[name] = _build(session, name, model)
    return per_session[name]


def _build(session, name: str, model) -> Calibration:
    parts = calibration_parts(name)
    if len(parts) > 1:
        joined = [resolve(session, part, model=model) for part in parts]
        return Calibration.of(name, interleave(*(c.texts for c in joined)), {c.name: len(c.texts) for c in joined})
    if name == "reference":
        return Calibration.of(name, calibration_texts())
    if name == "mix":
        return mix(session.model if model is None else model, session.tokenizer)
    assert name not in CALIBRATION_BUILTINS, name
    return Calibration.of(name, [render(session.tokenizer, doc) for doc in read_calibration(name)])


def render(tokenizer, document: Document) -> str:
    """A document as text: a chat in the tokenizer's chat template, plain text as it is."""
    if isinstance(document, str):
        return document
    return tokenizer.apply_chat_template(document, tokenize=False)


def interleave(*sources: list[str]) -> list[str]:
    """Round-robin over the sources until all are spent, so any prefix is mixed."""
    out: list[str] = []
    for i in range(max(len(s) for s in sources)):
        out += [s[i] for s in sources if i < len(s)]
    return out


def everyday_sentences() -> list[str]:
    lines = [
        line.strip()
        for line in SPEECH_SENTENCES.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return [" ".join(lines[i : i + SENTENCES_PER_DOCUMENT]) for i in range(0, len(lines), SENTENCES_PER_DOCUMENT)]


def self_generated_chats(model, tokenizer, *, cache_dir: Path | None = None, progress: bool = True) -> list[str]:
    """The model's greedy replies to the recovery prompts, each whole chat rendered in its
    chat template: text in the model's own distribution and in the form it is used in."""
    chats = rd.load_prompts()[::MIX_PROMPT_STRIDE]
    replies = rd.teacher_replies(
        model,
        tokenizer,
        chats,
        max_tokens=MIX_REPLY_TOKENS,
        cache_dir=cache_dir or cache_root() / "recovery",
        progress=progress,
    )
    return [render(tokenizer, [*chat, {"role": "assistant", "content": reply}]) for chat, reply in zip(chats, replies)]


def self_generated_text(model, tokenizer, *, cache_dir: Path | None = None, progress: bool = True) -> list[str]:
    """One sampled continuation by the model of each opening of data/recovery/openings.txt."""
    return rd.teacher_samples(
        model,
        tokenizer,
        rd.load_openings(),
        per_opening=1,
        max_tokens=MIX_SAMPLE_TOKENS,
        seed=0,
        cache_dir=cache_dir or cache_root() / "recovery",
        progress=progress,
    )


def mix(model, tokenizer, *, cache_dir: Path | None = None) -> Calibration:
    reference = calibration_texts()
    chats = self_generated_chats(model, tokenizer, cache_dir=cache_dir)
    samples = self_generated_text(model, tokenizer, cache_dir=cache_dir)
    sentences = everyday_sentences()
    texts = interleave(reference, chats, samples, sentences)
    return Calibration.of(
        "mix",
        texts,
        {
            "reference": len(reference),
            "self_generated_chats": len(chats),
            "self_generated_text": len(samples),
            "everyday": len(sentences),
        },
    )
