"""What the `recover` step distils on: chats the unpruned model answered itself, text it wrote
itself by sampling continuations of varied openings, and the step's calibration text.

Distillation only needs inputs the teacher has an opinion on; the teacher's own greedy replies
to varied chat prompts put the student in exactly the situation it is used in (a chat turn,
then a reply that must start and stop), which plain prose does not. Calibration text keeps
the general next-token distribution in view. The replies are generated once and cached on
disk, keyed by the teacher's weights, the prompts and the reply length, so reruns are cheap.

Greedy replies are the teacher's mode and one register (a helpful assistant); a student fitted
on them and on one calibration text matched the teacher there and drifted elsewhere (the first
pruned-25 adapter: 1.07x perplexity on the reference text, 1.61x on fiction). Sampled
continuations (temperature 1, top-p 0.95) of openings of many kinds (data/recovery/openings.txt:
stories, letters, news, recipes, speeches...) are text from the whole of the teacher's
distribution, still without a dataset.

data/recovery/prompts.txt: one prompt a line, `#` comments; `[short] ` marks a question asked
with the facts task's short-answer system prompt. None of them is a facts question.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from workbench.data import SHORT_ANSWER_PROMPT
from workbench.models.memory import drop_if_mapped, weight_file_spans
from workbench.paths import DATA_DIR

PROMPTS = DATA_DIR / "recovery" / "prompts.txt"
OPENINGS = DATA_DIR / "recovery" / "openings.txt"
SHORT = "[short] "
SAMPLE_TEMPERATURE = 1.0
SAMPLE_TOP_P = 0.95
"""Sampling of the teacher's continuations: its own distribution, less the tail of rare tokens
a 135M model strays into at top-p 1 (runs of one repeated token, mixed scripts)."""


def _lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"recovery {what} file {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{path} holds no {what}")
    return lines


def load_prompts(path: str | Path | None = None) -> list[list[dict]]:
    """The prompts as chat message lists (a system message first for `[short]` lines)."""
    chats = []
    for line in _lines(Path(path) if path else PROMPTS, "prompts"):
        if line.startswith(SHORT):
            chats.append(
                [{"role": "system", "content": SHORT_ANSWER_PROMPT}, {"role": "user", "content": line[len(SHORT) :]}]
            )
        else:
            chats.append([{"role": "user", "content": line}])
    return chats


def load_openings(path: str | Path | None = None) -> list[str]:
    """The openings the teacher continues by sampling, one a line (data/recovery/openings.txt)."""
    return _lines(Path(path) if path else OPENINGS, "openings")


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights: a cache made by another teacher is never reused. Reading every
    weight pages a mapped checkpoint in whole, so each one's pages are given back once hashed, and
    a tensor is summed 4M values at a time: whole, an int8 lm_head's float32 copy and its absolute
    values raised a quantized load's peak by 225 MB."""
    digest = hashlib.sha256()
    spans = weight_file_spans()
    for name, tensor in sorted(model.state_dict().items()):
        total = absolute = 0.0
        for chunk in tensor.detach().flatten().split(1 << 22):
            t = chunk.float()
            total, absolute = total + float(t.sum()), absolute + float(t.abs().sum())
        digest.update(name.encode())
        digest.update(repr((tuple(tensor.shape), round(total, 3), round(absolute, 3))).encode())
        drop_if_mapped(tensor, spans)
    return digest.hexdigest()[:16]


def _continuations(model, tokenizer, texts: list[str], max_tokens: int, **decoding) -> list[str]:
    """The model's continuation of each text under `decoding` (generate's options), one
    left-padded batch (special tokens dropped, text otherwise as generated)."""
    device = model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues from each row's right end
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_tokens, pad_token_id=pad, **decoding)
    finally:
        tokenizer.padding_side = side
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def greedy_replies(model, tokenizer, texts: list[str], max_tokens: int) -> list[str]:
    """The model's greedy continuation of each rendered prompt, one padded batch."""
    return _continuations(
        model, tokenizer, texts, max_tokens, do_sample=False, temperature=None, top_p=None, top_k=None
    )


def sampled_continuations(model, tokenizer, texts: list[str], max_tokens: int, seed: int) -> list[str]:
    """Each text followed by the model's sampled continuation (SAMPLE_TEMPERATURE, SAMPLE_TOP_P),
    one padded batch, seeded: the same seed, weights and kernels give the same text."""
    torch.manual_seed(seed)
    continuations = _continuations(
        model, tokenizer, texts, max_tokens, do_sample=True, temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P, top_k=0
    )
    return [f"{text} {continuation.strip()}" for text, continuation in zip(texts, continuations)]


def _cached_batches(
    cache_dir: Path | None,
    name: str,
    key: list,
    items: list,
    batch: int,
    make: Callable[[int, list], list[str]],
    progress: bool,
) -> list[str]:
    """`make(start, items[start : start + batch])` over all items, batch by batch, kept in
    `cache_dir` as NAME-KEY.json (KEY: a hash of `key`, which must name everything that shapes
    the text). What was made so far is saved after every batch, so an interrupted run resumes
    where it stopped."""
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    cached = cache_dir / f"{name}-{digest}.json" if cache_dir else None
    if cached is not None and cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    from tqdm.auto import tqdm

    partial = cached.with_suffix(".partial.json") if cached is not None else None
    made: list[str] = (
        json.loads(partial.read_text(encoding="utf-8")) if partial is not None and partial.is_file() else []
    )
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(len(made), len(items), batch), desc=name.replace("-", " "), disable=not progress):
        made += make(start, items[start : start + batch])
        if partial is not None:
            partial.write_text(json.dumps(made, ensure_ascii=False), encoding="utf-8")
    if cached is not None:
        cached.write_text(json.dumps(made, indent=1, ensure_ascii=False), encoding="utf-8")
        assert partial is not None  # set whenever `cached` is
        partial.unlink(missing_ok=True)
    return made


def teacher_replies(
    teacher,
    tokenizer,
    chats: list[list[dict]],
    *,
    max_tokens: int,
    cache_dir: Path | None,
    batch: int = 8,
    progress: bool = True,
) -> list[str]:
    """The teacher's greedy reply to every chat, read from `cache_dir` when it was made before."""

    def reply(start: int, chunk: list) -> list[str]:
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chunk]
        return [r.strip() for r in greedy_replies(teacher, tokenizer, texts, max_tokens)]

    key = [fingerprint(teacher), chats, max_tokens, tokenizer.chat_template]
    return _cached_batches(cache_dir, "teacher-replies", key, chats, batch, reply, progress)


def teacher_samples(
    teacher,
    tokenizer,
    openings: list[str],
    *,
    per_opening: int,
    max_tokens: int,
    seed: int,
    cache_dir: Path | None,
    batch: int = 16,
    progress: bool = True,
) -> list[str]:
    """`per_opening` sampled continuations of every opening by the teacher, read from `cache_dir`
    when they were made before (and resumed from the batches saved so far)."""

    def sample(start: int, chunk: list) -> list[str]:
        return sampled_continuations(teacher, tokenizer, chunk, max_tokens, seed + start)

    key = [fingerprint(teacher), openings, per_opening, max_tokens, seed, SAMPLE_TEMPERATURE, SAMPLE_TOP_P]
    texts = [opening for _ in range(per_opening) for opening in openings]
    return _cached_batches(cache_dir, "teacher-samples", key, texts, batch, sample, progress)


def chat_stream(tokenizer, chats: list[list[dict]], replies: list[str]) -> torch.Tensor:
    """Every finished conversation in the chat template, one token stream."""
    ids: list[int] = []
    for chat, reply in zip(chats, replies):
        text = tokenizer.apply_chat_template([*chat, {"role": "assistant", "content": reply}], tokenize=False)
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def text_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]


class Mixture:
    """Random windows of `seq_len` tokens: from the calibration stream with probability
    `calibration_share`, from the teacher's samples with probability `sample_share`, else from
    the chat stream (an empty stream's draws go to the first that is not: chats, calibration,
    samples). Random offsets, seeded, so many steps see many different windows of a small corpus."""

    def __init__(
        self,
        chats: torch.Tensor,
        calibration: torch.Tensor,
        seq_len: int,
        calibration_share: float,
        seed: int,
        samples: torch.Tensor | None = None,
        sample_share: float = 0.0,
    ):
        samples = samples if samples is not None else torch.zeros(0, dtype=torch.long)
        self.streams = [s for s in (chats, calibration, samples) if len(s) > 1]
        if not self.streams:
            raise ValueError("recover: no training text (no prompts, no samples and no calibration text)")
        self.chats, self.calibration, self.samples = chats, calibration, samples
        self.seq_len, self.share, self.sample_share = seq_len, calibration_share, sample_share
        self.generator = torch.Generator().manual_seed(seed)

    def _window(self, stream: torch.Tensor) -> torch.Tensor:
        length = min(self.seq_len, len(stream))
        start = int(torch.randint(0, len(stream) - length + 1, (1,), generator=self.generator))
        return stream[start : start + length]

    def batch(self, size: int) -> torch.Tensor:
        rows = []
        for _ in range(size):
            draw = float(torch.rand((), generator=self.generator))
            if draw < self.share:
                stream = self.calibration
            elif draw < self.share + self.sample_share:
                stream = self.samples
            else:
                stream = self.chats
            if len(stream) <= 1:
                stream = self.streams[0]
            rows.append(self._window(stream))
        length = min(len(r) for r in rows)
        return torch.stack([r[:length] for r in rows])
