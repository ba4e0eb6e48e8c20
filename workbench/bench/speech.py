"""Speech bench: word error rate, speed and language detection of the shipped Whisper models.

There is no recorded speech in the repository and no network, so the clips are
synthesised with espeak-ng from known sentences (data/speech_sentences.txt), varying the
voice variant and speed so that not every clip sounds alike. espeak-ng's robotic voice is
harder than a person at a microphone for tiny models, so the WERs here are a pessimistic,
reproducible yardstick for comparing models and settings, not a claim about real speech.
A few German, French, Spanish and Italian clips check the multilingual model's language detection
(espeak-ng's European voices are far better than its Mandarin, which base hears as Thai).

Words are compared after lower-casing, dropping punctuation and spelling out digits, since
Whisper writes "forty five dollars" as "$45" and that is not a recognition error.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

SENTENCES = Path(__file__).resolve().parents[2] / "data" / "speech_sentences.txt"

VARIANTS = ("", "+f3", "+m3", "+f2", "+m7")
"""espeak-ng voice variants cycled over the clips (male and female timbres)."""
SPEEDS = (160, 140, 180, 150)
"""Words per minute, cycled (espeak-ng's default is 175)."""

OTHER_LANGUAGES = {
    "de": [
        "Guten Morgen, wie geht es dir heute?",
        "Ich möchte einen Kaffee und ein Stück Kuchen bestellen.",
        "Der Zug nach Berlin fährt in zehn Minuten ab.",
        "Kannst du mir bitte das Salz geben?",
        "Wir gehen am Wochenende in den Bergen wandern.",
    ],
    "fr": [
        "Bonjour, je voudrais réserver une table pour deux personnes.",
        "Il fait très beau aujourd'hui, allons nous promener.",
        "Où se trouve la gare la plus proche, s'il vous plaît?",
        "Mon frère habite à Paris depuis trois ans.",
        "Nous avons acheté du pain et du fromage au marché.",
    ],
    "es": [
        "Buenos días, ¿dónde está la estación de autobuses?",
        "Me gustaría pedir una paella y un vaso de agua.",
        "Mañana vamos a la playa con nuestros amigos.",
        "La biblioteca cierra a las ocho de la tarde.",
        "Mi hermana estudia medicina en la universidad.",
    ],
    "it": [
        "Buongiorno, vorrei un caffè, per favore.",
        "Il treno per Roma parte alle dieci.",
        "Domani andiamo al mare con i bambini.",
        "Quanto costa questo libro?",
        "La cena è pronta, venite a tavola.",
    ],
}
OTHER_SPEEDS = (150, 165)
"""The other languages get espeak-ng's plain voices: its variants make French unrecognisable."""


class SpeechBenchError(RuntimeError):
    """The bench cannot run here; the message says what to install."""


@dataclass(frozen=True)
class Clip:
    id: str
    language: str
    text: str
    voice: str
    speed: int
    path: str
    audio_seconds: float


@dataclass(frozen=True)
class Result:
    model: str
    clip: str
    language: str
    detected_language: str
    language_probability: float
    reference: str
    transcript: str
    wer: float
    audio_seconds: float
    transcribe_seconds: float
    real_time_factor: float


def espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise SpeechBenchError(
            "the speech bench synthesises its clips with espeak-ng, which is not installed: "
            "`apt-get install espeak-ng` (Debian/Ubuntu), `brew install espeak-ng` (macOS)"
        )
    return path


def load_sentences(path: Path = SENTENCES) -> list[str]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def synthesise(text: str, path: Path, *, voice: str = "en-us", speed: int = 160) -> Path:
    """One espeak-ng clip as a WAV file (22.05 kHz mono, as espeak-ng writes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [espeak(), "-v", voice, "-s", str(speed), "-w", str(path), text],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0 or not path.is_file():
        raise SpeechBenchError(f"espeak-ng -v {voice} failed: {done.stderr.strip() or done.returncode}")
    return path


def make_clips(
    out_dir: Path, *, clips: int = 40, voice: str = "en-us", other_per_language: int = 4, progress: bool = True
) -> list[Clip]:
    """`clips` English clips (the sentence list in order, repeated if asked for more) plus
    `other_per_language` clips in each of OTHER_LANGUAGES."""
    import soundfile

    sentences = load_sentences()
    plan = [
        (
            f"en-{i:02d}",
            "en",
            sentences[i % len(sentences)],
            voice + VARIANTS[i % len(VARIANTS)],
            SPEEDS[i % len(SPEEDS)],
        )
        for i in range(clips)
    ]
    for lang, texts in OTHER_LANGUAGES.items():
        plan += [
            (f"{lang}-{i:02d}", lang, text, lang, OTHER_SPEEDS[i % len(OTHER_SPEEDS)])
            for i, text in enumerate(texts[:other_per_language])
        ]
    made = []
    for clip_id, lang, text, clip_voice, speed in tqdm(plan, desc="espeak-ng clips", disable=not progress):
        path = synthesise(text, out_dir / f"{clip_id}.wav", voice=clip_voice, speed=speed)
        made.append(Clip(clip_id, lang, text, clip_voice, speed, str(path), soundfile.info(str(path)).duration))
    return made


_ONES = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
)
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000 ("forty five"), as the sentences spell them."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
    rest = n % 1000
    return number_words(n // 1000) + " thousand" + ("" if rest == 0 else " " + number_words(rest))


def _spell(match: re.Match) -> str:
    text = match.group(0)
    if ":" in text:  # clock times: 4:00 -> four o'clock, 4:30 -> four thirty
        hours, minutes = (int(x) for x in text.split(":"))
        return number_words(hours) + (" o'clock" if minutes == 0 else " " + number_words(minutes))
    value = int(text.replace(",", ""))
    return number_words(value) if value < 1_000_000 else text


def normalise(text: str, *, english: bool = True) -> str:
    """Lower case, no punctuation, digits spelled out (English), one space between words."""
    text = text.lower().replace("’", "'")
    if english:
        text = re.sub(r"\$(\d[\d,]*)", r"\1 dollars", text)
        text = text.replace("%", " percent")
        text = re.sub(r"\d{1,2}:\d{2}|\d{1,3}(?:,\d{3})+|\d+", _spell, text)
        text = re.sub(r"(\d)\s*°\s*c\b", r"\1 degrees celsius", text)
    text = re.sub(r"[^\w\s']|_", " ", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)  # quotes, not apostrophes inside words
    return " ".join(text.split())


def run_speech(
    models: list[str], clips: list[Clip], *, beam_size: int | None = None, threads: int = 2, progress: bool = True
) -> tuple[list[Result], dict]:
    """Each model transcribes every clip it can (English-only models skip the other languages),
    with no language given, as a chat request arrives. Returns (results, info per model)."""
    import jiwer

    from workbench.modalities.audio import load_audio
    from workbench.modalities.speech import BEAM_SIZE, SpeechRecognizer

    audio = {c.id: load_audio(c.path, max_seconds=120) for c in clips}
    results, info = [], {}
    for name in models:
        start = time.perf_counter()
        recognizer = SpeechRecognizer(name, threads=threads, beam_size=beam_size or BEAM_SIZE)
        recognizer.load()
        load_s = time.perf_counter() - start
        own = [c for c in clips if recognizer.multilingual or c.language == "en"]
        warm = time.perf_counter()
        recognizer.transcribe(audio[own[0].id])  # first call sets up CTranslate2's buffers; not timed below
        info[name] = {
            "load_s": load_s,
            "warmup_s": time.perf_counter() - warm,
            "multilingual": recognizer.multilingual,
            "beam_size": recognizer.beam_size,
            "threads": threads,
            "clips": len(own),
        }
        for clip in tqdm(own, desc=f"transcribing with {name}", disable=not progress):
            t = recognizer.transcribe(audio[clip.id])
            english = clip.language == "en"
            ref, hyp = normalise(clip.text, english=english), normalise(t.text, english=english)
            results.append(
                Result(
                    model=name,
                    clip=clip.id,
                    language=clip.language,
                    detected_language=t.language,
                    language_probability=t.language_probability,
                    reference=clip.text,
                    transcript=t.text,
                    wer=jiwer.wer(ref, hyp) if hyp else 1.0,
                    audio_seconds=t.audio_seconds,
                    transcribe_seconds=t.transcribe_seconds,
                    real_time_factor=t.real_time_factor,
                )
            )
    return results, info


def summarise(results: list[Result], info: dict) -> list[dict]:
    """One row per model: corpus WER over the English clips (errors / reference words, not a
    mean of per-clip rates), RTF median and total, language detection per language."""
    import jiwer

    rows = []
    for name, model_info in info.items():
        mine = [r for r in results if r.model == name]
        english = [r for r in mine if r.language == "en"]
        row = {"model": name, **model_info, "english_clips": len(english)}
        if english:
            refs = [normalise(r.reference) for r in english]
            hyps = [normalise(r.transcript) for r in english]
            measures = jiwer.process_words(refs, hyps)
            row["wer"] = measures.wer
            row["reference_words"] = sum(len(r.split()) for r in refs)
            row["word_errors"] = measures.substitutions + measures.deletions + measures.insertions
            row["clips_perfect"] = sum(r.wer == 0 for r in english)
        # speed over the English clips, which every model runs, so rows compare; a misheard
        # language can send Whisper into a slow repetition loop, reported per language below
        timed = english or mine
        row["rtf_median"] = statistics.median(r.real_time_factor for r in timed)
        row["rtf_total"] = sum(r.transcribe_seconds for r in timed) / sum(r.audio_seconds for r in timed)
        row["audio_seconds"] = sum(r.audio_seconds for r in mine)
        row["transcribe_seconds"] = sum(r.transcribe_seconds for r in mine)
        languages = {}
        for lang in dict.fromkeys(r.language for r in mine):
            these = [r for r in mine if r.language == lang]
            detected: dict[str | None, int] = {}
            for r in these:
                detected[r.detected_language] = detected.get(r.detected_language, 0) + 1
            languages[lang] = {
                "clips": len(these),
                "correct": sum(r.detected_language == lang for r in these),
                "detected": detected,
                "wer": statistics.mean(r.wer for r in these),
                "rtf_total": sum(r.transcribe_seconds for r in these) / sum(r.audio_seconds for r in these),
            }
        row["languages"] = languages
        rows.append(row)
    return rows


def _detection(row: dict, lang: str) -> str:
    if lang not in row["languages"]:
        return "–"
    if not row["multilingual"]:
        return "n/a (English only)"
    d = row["languages"][lang]
    wrong = {k: v for k, v in d["detected"].items() if k != lang}
    extra = f" (else: {', '.join(f'{k} x{v}' for k, v in wrong.items())})" if wrong else ""
    return f"{d['correct']}/{d['clips']}{extra}"


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def to_markdown(rows: list[dict], results: list[Result], meta: dict) -> str:
    load = meta["load_average"]
    others = [lang for lang in OTHER_LANGUAGES if any(lang in r["languages"] for r in rows)]
    lines = [
        (
            f"Speech bench on {meta['machine']}: {meta['english_clips']} English espeak-ng clips "
            f"({meta['english_audio_seconds']:.0f} s of audio, voice {meta['voice']} with variants, "
            f"{min(SPEEDS)}–{max(SPEEDS)} wpm), {meta['other_clips']} German/French/Spanish/Italian clips for language "
            f"detection; faster-whisper {meta['faster_whisper']}, CTranslate2 {meta['ctranslate2']}, int8, "
            f"{meta['threads']} threads, beam {meta['beam_size']}, no language given; "
            f"1-minute load average {load[0]} before, {load[-1]} after"
        ),
        "",
        _row(
            [
                "model",
                "WER (English)",
                "clips without error",
                "RTF median",
                "RTF total",
                "load s",
                "warm-up s",
                "English detected",
                *(f"{lang} detected" for lang in others),
            ]
        ),
        _row(["---"] * (8 + len(others))),
    ]
    for r in rows:
        wer = f"{r['wer']:.1%} ({r['word_errors']}/{r['reference_words']} words)" if "wer" in r else "–"
        perfect = f"{r['clips_perfect']}/{r['english_clips']}" if "wer" in r else "–"
        lines.append(
            _row(
                [
                    r["model"],
                    wer,
                    perfect,
                    f"{r['rtf_median']:.3f}",
                    f"{r['rtf_total']:.3f}",
                    f"{r['load_s']:.2f}",
                    f"{r['warmup_s']:.2f}",
                    _detection(r, "en"),
                    *(_detection(r, lang) for lang in others),
                ]
            )
        )
    lines += [
        "",
        (
            "WER: word errors over all English reference words after lower-casing, removing punctuation and "
            "spelling out digits. RTF: transcription seconds / audio seconds (below 1: faster than real time) "
            "over the English clips; the other languages' RTF is in speech.json. Load: constructing and loading the model (the first load of base also "
            "joins its two parts into the cache). English-only models cannot detect languages and skip the other clips."
        ),
        "",
        "| model | clip | voice | wpm | audio s | RTF | WER | language (p) | transcript |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    voices = meta.get("clip_voices", {})
    for res in results:
        v = voices.get(res.clip, {})
        lines.append(
            f"| {res.model} | {res.clip} | {v.get('voice', '')} | {v.get('speed', '')} | {res.audio_seconds:.1f} "
            f"| {res.real_time_factor:.3f} | {res.wer:.0%} | {res.detected_language} ({res.language_probability:.2f}) "
            f"| {res.transcript.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def to_html(rows: list[dict], meta: dict) -> str:
    from plotly.subplots import make_subplots

    names = [r["model"] for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("word error rate, English clips", "real-time factor (median)"))
    fig.add_bar(
        x=names,
        y=[r.get("wer", 0) for r in rows],
        row=1,
        col=1,
        name="WER",
        text=[f"{r.get('wer', 0):.1%}" for r in rows],
    )
    fig.add_bar(
        x=names,
        y=[r["rtf_median"] for r in rows],
        row=1,
        col=2,
        name="RTF",
        text=[f"{r['rtf_median']:.3f}" for r in rows],
    )
    fig.update_yaxes(tickformat=".0%", row=1, col=1)
    fig.update_layout(title=f"Speech bench, {meta['machine']}", showlegend=False, height=420)
    return fig.to_html(include_plotlyjs="cdn", full_html=True)


def write_results(out_dir: Path, rows: list[dict], results: list[Result], meta: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "speech.json").write_text(
        json.dumps(
            {"meta": meta, "summary": rows, "results": [asdict(r) for r in results]}, indent=2, ensure_ascii=False
        )
    )
    (out_dir / "speech.md").write_text(to_markdown(rows, results, meta))
    (out_dir / "speech.html").write_text(to_html(rows, meta))
    return out_dir


def run(
    models: list[str],
    out: Path,
    *,
    clips: int = 40,
    voice: str = "en-us",
    other_per_language: int = 4,
    beam_size: int | None = None,
    threads: int = 2,
    progress: bool = True,
) -> tuple[list[dict], list[Result], dict]:
    """The whole bench: clips under out/clips, results in out/speech.{json,md,html}."""
    import ctranslate2
    import faster_whisper

    from workbench.modalities.speech import BEAM_SIZE

    if clips < 1:
        raise SpeechBenchError("--clips must be at least 1")
    espeak()
    made = make_clips(out / "clips", clips=clips, voice=voice, other_per_language=other_per_language, progress=progress)
    load_before = os.getloadavg()[0]
    results, info = run_speech(models, made, beam_size=beam_size, threads=threads, progress=progress)
    load_after = os.getloadavg()[0]
    english = [c for c in made if c.language == "en"]
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "models": models,
        "voice": voice,
        "threads": threads,
        "beam_size": beam_size or BEAM_SIZE,
        "english_clips": len(english),
        "english_audio_seconds": sum(c.audio_seconds for c in english),
        "other_clips": len(made) - len(english),
        "faster_whisper": faster_whisper.__version__,
        "ctranslate2": ctranslate2.__version__,
        "espeak_ng": subprocess.run(
            [espeak(), "--version"], check=False, capture_output=True, text=True
        ).stdout.strip(),
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "clip_voices": {c.id: {"voice": c.voice, "speed": c.speed, "text": c.text} for c in made},
    }
    rows = summarise(results, info)
    write_results(out, rows, results, meta)
    return rows, results, meta
