"""The text the workbench ships for calibration and held-out evaluation (see data/README.md),
and the short-answer system prompt its answer checks ask under.

Calibration text (`calibration_texts`) is what compression is fitted on. The held-out texts
(`HELD_OUT`, `held_out_texts`) are never used for calibration or training: "reference" is
technical prose from the same source as the calibration text (`evaluation_texts`), "prose" is
narrative prose of another kind altogether (`prose_texts`), so a compressed model can be judged
on text unlike what it was fitted on. Every file holds documents separated by a line holding
only a form feed."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from workbench.paths import DATA_DIR, resolve_path

SHORT_ANSWER_PROMPT = "Answer with only the answer: a word, a name or a number. No explanation."
"""The system prompt of the bench's answer tasks (workbench.bench.tasks), so that its checker
can read a reply; the recover step's `[short]` prompts and the thinking examples ask under it too."""


@cache
def _documents(name: str) -> tuple[str, ...]:
    path = DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run from a checkout of the workbench repository")
    return tuple(doc.strip() for doc in path.read_text(encoding="utf-8").split("\n\f\n") if doc.strip())


def calibration_texts() -> list[str]:
    return list(_documents("calibration.txt"))


def evaluation_texts() -> list[str]:
    return list(_documents("evaluation.txt"))


HELD_OUT = {"reference": "evaluation.txt", "prose": "prose.txt"}
"""Each held-out text by name -> its file under data/:
- reference: data/evaluation.txt, 39 Python Language Reference topics, the calibration text's source;
- prose: data/prose.txt, 40 chapter openings of public-domain fiction (Austen, Melville, Natsume
  in translation), made by scripts/make_prose_data.py."""


def held_out_texts(name: str) -> list[str]:
    """The documents of one held-out text (a key of HELD_OUT)."""
    if name not in HELD_OUT:
        raise ValueError(f"unknown held-out text {name!r}: known are {', '.join(sorted(HELD_OUT))}")
    return list(_documents(HELD_OUT[name]))


def prose_texts() -> list[str]:
    return held_out_texts("prose")


# --- calibration data a user chooses ---------------------------------------------------------

CALIBRATION_BUILTINS = {
    "reference": "data/calibration.txt: 40 CPython Language Reference topics (technical prose)",
    "mix": "the reference text, the original model's own replies to data/recovery/prompts.txt and sampled "
    "continuations of data/recovery/openings.txt, and everyday sentences (data/speech_sentences.txt), interleaved",
}
"""The calibration data a step may name instead of a path (workbench.compress.calibration builds them)."""

DEFAULT_CALIBRATION = "mix"
"""What a step reads when its config names no calibration: not one source, so importance,
compensation and calibrated quantizers are fitted on more than one kind of text."""

Document = str | list[dict[str, object]]
"""A calibration document: plain text, or a chat (OpenAI-style messages) that the tokenizer's
chat template renders (workbench.compress.calibration), which this floor cannot do."""

CALIBRATION_FORMATS = ".txt (documents separated by blank lines or form feeds), .jsonl ({'text': ...} or {'messages': [...]} a line), or a folder of them"


def split_documents(text: str) -> list[str]:
    """Documents of a plain-text file: separated by lines holding only a form feed when the file
    has any (the shipped files' format), else by blank lines."""
    if "\f" in text:
        parts = text.split("\f")
    else:
        parts = []
        block: list[str] = []
        for line in text.splitlines():
            if line.strip():
                block.append(line)
            elif block:
                parts.append("\n".join(block))
                block = []
        if block:
            parts.append("\n".join(block))
    return [p.strip() for p in parts if p.strip()]


def _jsonl_documents(path: Path) -> list[Document]:
    documents: list[Document] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"calibration file {path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict) or not ({"text", "messages"} & set(record)):
            raise ValueError(f'{where}: expected an object with "text" or "messages", got {line[:80]!r}')
        if "text" in record:
            if not isinstance(record["text"], str):
                raise ValueError(f'{where}: "text" must be a string')
            if record["text"].strip():
                documents.append(record["text"].strip())
            continue
        messages = record["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages)
        ):
            raise ValueError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
        documents.append(messages)
    return documents


def _file_documents(path: Path) -> list[Document]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            return list(split_documents(path.read_text(encoding="utf-8")))
        if suffix == ".jsonl":
            return _jsonl_documents(path)
    except UnicodeDecodeError:
        raise ValueError(f"calibration file {path} is not UTF-8 text") from None
    raise ValueError(
        f"calibration file {path}: unknown format {suffix or '(no extension)'}; give {CALIBRATION_FORMATS}"
    )


def _held_out_paths() -> set[Path]:
    return {(DATA_DIR / name).resolve() for name in HELD_OUT.values()} | {(DATA_DIR / "facts.jsonl").resolve()}


def _check_not_held_out(spec: str, files: list[Path], documents: list[Document]) -> None:
    """Held-out text is what compression is judged on; fitting on it makes every figure a lie."""
    held = _held_out_paths()
    for file in files:
        if file.resolve() in held:
            raise ValueError(
                f"calibration {spec!r}: {file.name} is held-out evaluation text (data/README.md); "
                "compression must never be fitted on what it is judged on: give other text"
            )
    heads = {doc[:200]: name for name, file in HELD_OUT.items() for doc in _documents(file) if len(doc) >= 200}
    for doc in documents:
        text = doc if isinstance(doc, str) else "\n".join(str(m.get("content", "")) for m in doc)
        for head, name in heads.items():
            if head in text:
                raise ValueError(
                    f"calibration {spec!r} contains a document of the held-out {name} text "
                    f"({HELD_OUT[name]}, starting {head[:40]!r}); compression must never be fitted on what it is "
                    "judged on: remove it"
                )


def read_calibration(spec: str) -> list[Document]:
    """The documents of a user's calibration path (file or folder), checked: it exists, it is in
    a known format, it holds at least one document, and none of it is held-out text. A built-in
    name (CALIBRATION_BUILTINS) is not read here: building it needs a model."""
    path = resolve_path(spec)
    if not path.exists():
        builtins = ", ".join(CALIBRATION_BUILTINS)
        raise ValueError(f"calibration {spec!r}: no such file or folder, and not a built-in name ({builtins})")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".txt", ".jsonl"))
        if not files:
            raise ValueError(f"calibration folder {spec!r} holds no .txt or .jsonl files")
    else:
        files = [path]
    documents = [doc for file in files for doc in _file_documents(file)]
    if not documents:
        raise ValueError(f"calibration {spec!r} holds no text (empty, or only blank lines)")
    _check_not_held_out(spec, files, documents)
    return documents


CALIBRATION_JOIN = "+"
"""Joins calibration specs into one interleaved set: `mix+data/recovery/fiction.txt` is the mix
with the user's text beside it (a path that exists is read as one path, `+` and all)."""


def calibration_parts(spec: str) -> list[str]:
    """The specs a calibration value joins (one for a plain name or path), each a built-in name
    or a path that exists; the error names the part that is neither."""
    if spec in CALIBRATION_BUILTINS or resolve_path(spec).exists() or CALIBRATION_JOIN not in spec:
        return [spec]
    parts = [part.strip() for part in spec.split(CALIBRATION_JOIN)]
    if not all(parts):
        raise ValueError(f"calibration {spec!r}: an empty part between {CALIBRATION_JOIN!r}; give name+path+...")
    if len(set(parts)) < len(parts):
        raise ValueError(f"calibration {spec!r} names a part twice")
    return parts


def check_calibration(spec: str | None) -> str | None:
    """A config's calibration value, checked when the config is read (a built-in name, a
    readable path, or several joined by `+`); the error names the problem."""
    if spec is None:
        return spec
    for part in calibration_parts(spec):
        if part not in CALIBRATION_BUILTINS:
            read_calibration(part)
    return spec
