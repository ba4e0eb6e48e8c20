"""Spoken test clips and how near a transcript came: what the server's speech tests share.

espeak-ng speaks the sentence; CI installs it (.ci/run), so there a missing espeak-ng is a
failure, and elsewhere the test is skipped saying what to install. Whisper's exact words
depend on the CPU's int8 kernels, so tests bound the word error rate instead of asserting
the words."""

import os
from pathlib import Path

import pytest


def spoken_wav(text: str, path: Path) -> Path:
    """A WAV of `text` spoken by espeak-ng, written at `path`."""
    from workbench.bench.speech import espeak, synthesise

    try:
        espeak()
    except Exception as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"espeak-ng is needed to speak the test sentence: {exc}")
    return synthesise(text, path)


def word_error_rate(reference: str, heard: str) -> float:
    """jiwer's WER after the speech bench's normalisation (British and American colour alike)."""
    import jiwer

    from workbench.bench.speech import normalise

    return jiwer.wer(normalise(reference).replace("colour", "color"), normalise(heard).replace("colour", "color"))
