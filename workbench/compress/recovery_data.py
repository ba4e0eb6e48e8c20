"""What the `recover` step distils on: chats the unpruned model answered itself, plus the
shipped calibration text.

Distillation only needs inputs the teacher has an opinion on; the teacher's own greedy replies
to varied chat prompts put the student in exactly the situation it is used in (a chat turn,
then a reply that must start and stop), which plain prose does not. Calibration text keeps
the general next-token distribution in view. The replies are generated once and cached on
disk, keyed by the teacher's weights, the prompts and the reply length, so reruns are cheap.

data/recovery/prompts.txt: one prompt a line, `#` comments; `[short] ` marks a question asked
with the facts task's short-answer system prompt. None of them is a facts question.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from workbench.data import SHORT_ANSWER_PROMPT
from workbench.paths import DATA_DIR

PROMPTS = DATA_DIR / "recovery" / "prompts.txt"
SHORT = "[short] "


def load_prompts(path: str | Path | None = None) -> list[list[dict]]:
    """The prompts as chat message lists (a system message first for `[short]` lines)."""
    path = Path(path) if path else PROMPTS
    if not path.is_file():
        raise FileNotFoundError(f"recovery prompts file {path} does not exist")
    chats = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(SHORT):
            chats.append(
                [{"role": "system", "content": SHORT_ANSWER_PROMPT}, {"role": "user", "content": line[len(SHORT) :]}]
            )
        else:
            chats.append([{"role": "user", "content": line}])
    if not chats:
        raise ValueError(f"{path} holds no prompts")
    return chats


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights: a cache made by another teacher is never reused."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().float().flatten()
        digest.update(name.encode())
        digest.update(repr((tuple(tensor.shape), round(float(t.sum()), 3), round(float(t.abs().sum()), 3))).encode())
    return digest.hexdigest()[:16]


def greedy_replies(model, tokenizer, texts: list[str], max_tokens: int) -> list[str]:
    """The model's greedy continuation of each rendered prompt, one padded batch (special
    tokens dropped, text otherwise as generated)."""
    device = model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues from each row's right end
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=max_tokens,
                pad_token_id=pad,
                temperature=None,
                top_p=None,
                top_k=None,
            )
    finally:
        tokenizer.padding_side = side
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


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
    key = hashlib.sha256(
        json.dumps([fingerprint(teacher), chats, max_tokens, tokenizer.chat_template]).encode()
    ).hexdigest()[:16]
    cached = cache_dir / f"teacher-replies-{key}.json" if cache_dir else None
    if cached is not None and cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    from tqdm.auto import tqdm

    # Replies so far are kept after every batch, so an interrupted run resumes where it stopped.
    partial = cached.with_suffix(".partial.json") if cached is not None else None
    replies: list[str] = (
        json.loads(partial.read_text(encoding="utf-8")) if partial is not None and partial.is_file() else []
    )
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(len(replies), len(chats), batch), desc="teacher replies", disable=not progress):
        texts = [
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in chats[start : start + batch]
        ]
        replies += [r.strip() for r in greedy_replies(teacher, tokenizer, texts, max_tokens)]
        if partial is not None:
            partial.write_text(json.dumps(replies, ensure_ascii=False), encoding="utf-8")
    if cached is not None:
        cached.write_text(json.dumps(replies, indent=1, ensure_ascii=False), encoding="utf-8")
        assert partial is not None  # set whenever `cached` is
        partial.unlink(missing_ok=True)
    return replies


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
    """Random windows of `seq_len` tokens: from the chat stream, or (with probability
    `calibration_share`) from the calibration stream. Random offsets, seeded, so many
    steps see many different windows of a small corpus."""

    def __init__(
        self, chats: torch.Tensor, calibration: torch.Tensor, seq_len: int, calibration_share: float, seed: int
    ):
        self.streams = [s for s in (chats, calibration) if len(s) > 1]
        if not self.streams:
            raise ValueError("recover: no training text (no prompts and no calibration text)")
        self.chats, self.calibration = chats, calibration
        self.seq_len, self.share = seq_len, calibration_share
        self.generator = torch.Generator().manual_seed(seed)

    def _window(self, stream: torch.Tensor) -> torch.Tensor:
        length = min(self.seq_len, len(stream))
        start = int(torch.randint(0, len(stream) - length + 1, (1,), generator=self.generator))
        return stream[start : start + length]

    def batch(self, size: int) -> torch.Tensor:
        rows = []
        for _ in range(size):
            use_calibration = float(torch.rand((), generator=self.generator)) < self.share
            stream = self.calibration if use_calibration and len(self.calibration) > 1 else self.chats
            if len(stream) <= 1:
                stream = self.calibration
            rows.append(self._window(stream))
        length = min(len(r) for r in rows)
        return torch.stack([r[:length] for r in rows])
