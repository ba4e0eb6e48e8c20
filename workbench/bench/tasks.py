"""Answer-accuracy tasks that run over any OpenAI-compatible endpoint.

The same questions go to a local config served by this workbench and to a cloud model, so
their accuracies compare directly. Every question has one short checkable answer and is
asked greedily (temperature 0) with a small reply budget; the checker is deliberately
plain so a reader can predict its verdict:

- a text answer is correct when it (or an accepted alias) occurs as whole words in the
  reply, after lower-casing, stripping accents and punctuation;
- a number answer is correct when, once the numbers already in the question are set
  aside, the reply's numbers (digits or English number words) are exactly that number:
  "17 + 25 = 42" is right, "42 or 43" is wrong.

A reply that names several candidates including the right one still counts (the checker
cannot tell a hedge from an explanation); replies are capped at `max_tokens` to keep that
small. Multimodal tasks are registered but have no items until images and audio can be
sent (issue 8): their results say so instead of carrying a number.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cache

import httpx
from tqdm.auto import tqdm

from workbench.bench.serve import event_chunks
from workbench.data import SHORT_ANSWER_PROMPT
from workbench.paths import DATA_DIR


@dataclass(frozen=True)
class Item:
    question: str
    answer: str
    aliases: tuple[str, ...] = ()
    parts: tuple[dict, ...] = ()
    """Content parts sent before the question: an image_url or an input_audio part."""
    spoken: bool = False
    """The question is in the audio part only; its text is not sent."""
    options: tuple[str, ...] = ()
    """The choices a question offers ("left or right?"): a reply naming more than one is wrong."""


class TaskUnavailable(RuntimeError):
    """A task cannot be built on this machine (e.g. no espeak-ng to speak its questions)."""


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    modality: str
    """text | image | audio: what the request carries besides text."""
    provenance: str
    items: Callable[[], list[Item]] | None = None
    """None while the task cannot run yet; `unavailable` then says why."""
    unavailable: str = ""
    system: str | None = SHORT_ANSWER_PROMPT
    """The system message sent with every question; None sends none (the model's default)."""


@dataclass
class Answer:
    question: str
    expected: str
    reply: str = ""
    correct: bool = False
    error: str = ""
    reasoning: str = ""
    """The reasoning_content streamed before the answer (thinking runs only)."""
    first_answer_s: float | None = None
    """Seconds from sending the request to the first answer (content) text; thinking runs only."""


@dataclass
class TaskResult:
    task: str
    asked: int = 0
    correct: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    thinking: bool | None = None
    """None: the request left enable_thinking to the target's default; else what it asked."""
    unavailable: str = ""
    answers: list[Answer] = field(default_factory=list)

    @property
    def first_answer_s(self) -> float | None:
        """Median seconds to the first answer text over the answered questions (thinking runs)."""
        times = sorted(a.first_answer_s for a in self.answers if a.first_answer_s is not None)
        return times[len(times) // 2] if times else None

    @property
    def accuracy(self) -> float | None:
        answered = self.asked - self.failed
        return self.correct / answered if answered else None

    def cell(self) -> str:
        """How the result reads in a table: a percentage, or why there is none."""
        if self.unavailable:
            return self.unavailable
        if self.asked and self.failed == self.asked:
            return f"error: {self.answers[0].error}"
        text = f"{self.accuracy:.0%} ({self.correct}/{self.asked - self.failed})"
        return text + (f", {self.failed} failed" if self.failed else "")

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy, "first_answer_s": self.first_answer_s}


# --- the checker ------------------------------------------------------------------------

_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")
_UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_SCALES = {"hundred": 100, "thousand": 1000}


def normalise(text: str) -> str:
    """Lower case, accents stripped ("Brasília" -> "brasilia"), punctuation to spaces."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def _word_numbers(words: list[str]) -> list[float]:
    """English number words up to the thousands: "twenty four" -> 24, "a hundred" -> 100."""
    out, value, pending = [], 0, False
    for word in [*words, ""]:
        if word in _UNITS:
            if pending and value % 100 not in (0, *_TENS.values()):  # "one two" is two numbers
                out.append(value)
                value = 0
            value, pending = value + _UNITS.index(word), True
        elif word in _TENS:
            if pending and value % 100:  # "five twenty" is two numbers
                out.append(value)
                value = 0
            value, pending = value + _TENS[word], True
        elif word in _SCALES:
            value, pending = (value or 1) * _SCALES[word], True
        elif pending:
            out.append(value)
            value, pending = 0, False
    return [float(v) for v in out]


def numbers_in(text: str) -> set[float]:
    plain = unicodedata.normalize("NFKD", text).lower()
    digits = {float(m.replace(",", "")) for m in _NUMBER.findall(plain)}
    return digits | set(_word_numbers(re.sub(r"[^a-z]+", " ", plain).split()))


def is_correct(item: Item, reply: str) -> bool:
    expected = [item.answer, *item.aliases]
    if _NUMBER.fullmatch(item.answer):
        target = float(item.answer.replace(",", ""))
        given = numbers_in(item.question) - {target}
        return numbers_in(reply) - given == {target}
    words = f" {normalise(reply)} "
    if any(f" {normalise(o)} " in words for o in item.options if o not in expected):
        return False  # "left or right" hedges; echoing the question is not an answer
    return any(f" {normalise(e)} " in words for e in expected)


# --- the question sets ------------------------------------------------------------------


@cache
def _facts() -> tuple[Item, ...]:
    path = DATA_DIR / "facts.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run from a checkout of the workbench repository")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return tuple(Item(r["question"], r["answer"], tuple(r.get("aliases", ()))) for r in rows)


def draw_operands(rng: random.Random) -> tuple[str, int, int]:
    """One arithmetic question's operator ("+", "-" or "x") and operands: two two-digit numbers,
    or a two-digit number times 3..12; a difference is never negative. The thinking adapter's
    training problems (workbench/reasoning/problems.py) are drawn the same way."""
    op = rng.choice("+-x")
    a, b = rng.randint(11, 99), rng.randint(11, 99)
    if op == "x":
        b = rng.randint(3, 12)
    if op == "-" and a < b:
        a, b = b, a
    return op, a, b


def arithmetic_items(count: int = 20, seed: int = 9) -> list[Item]:
    """Two-digit sums, differences and small products; a fixed seed makes the set the same
    everywhere. No answer equals an operand, so an echoed question is never right."""
    rng = random.Random(seed)
    items: list[Item] = []
    while len(items) < count:
        op, a, b = draw_operands(rng)
        answer = {"+": a + b, "-": a - b, "x": a * b}[op]
        if answer in (a, b):
            continue
        symbol = "\u00d7" if op == "x" else op
        items.append(Item(f"What is {a} {symbol} {b}?", str(answer)))
    return items


def image_items(count: int = 40, seed: int = 2026) -> list[Item]:
    """Questions about generated pictures, each sent as a PNG data: URL before the question."""
    import base64
    import io

    from workbench.modalities import shapes

    items = []
    for shown in shapes.generate(count, seed):
        buffer = io.BytesIO()
        shown.image.save(buffer, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        options = tuple(p for p in shapes.POSITIONS if re.search(rf"\b{p}\b", shown.question.lower()))
        part = {"type": "image_url", "image_url": {"url": url}}
        items.append(Item(shown.question, shown.answer, parts=(part,), options=options))
    return items


def spoken_items(questions, voice: str = "en-us") -> list[Item]:
    """Each question spoken by espeak-ng, sent as a WAV input_audio part with no text."""
    import base64
    import tempfile
    from pathlib import Path

    from workbench.bench.speech import SpeechBenchError, synthesise

    items = []
    with tempfile.TemporaryDirectory() as folder:
        for i, item in enumerate(questions):
            try:
                wav = synthesise(item.question, Path(folder) / f"q{i}.wav", voice=voice).read_bytes()
            except SpeechBenchError as exc:
                raise TaskUnavailable(f"n/a ({exc})") from None
            part = {
                "type": "input_audio",
                "input_audio": {"data": base64.b64encode(wav).decode("ascii"), "format": "wav"},
            }
            items.append(Item(item.question, item.answer, item.aliases, (part,), spoken=True))
    return items


TASKS: dict[str, Task] = {
    "facts": Task(
        "facts",
        "facts (capitals, units, science)",
        "text",
        "data/facts.jsonl: 32 questions written for this repository from common knowledge",
        items=lambda: list(_facts()),
    ),
    "arithmetic": Task(
        "arithmetic",
        "arithmetic (two-digit + - \u00d7)",
        "text",
        "generated in code (workbench/bench/tasks.py, seed 9): 20 questions",
        items=arithmetic_items,
    ),
    "image_qa": Task(
        "image_qa",
        "image questions (generated shapes)",
        "image",
        "workbench/modalities/shapes.py, seed 2026 (never used in training): 40 pictures, 8 of each question "
        "type (colour, shape, count, position, text), asked with no system prompt, as the adapter was trained",
        items=image_items,
        system=None,
    ),
    "speech": Task(
        "speech",
        "spoken facts (espeak-ng)",
        "audio",
        "the 32 `facts` questions spoken by espeak-ng (en-us, 160 wpm) and sent as input_audio WAV parts only, "
        "no text: speech recognition and answering together",
        items=lambda: spoken_items(_facts()),
    ),
}


def resolve_tasks(names: str) -> list[Task]:
    """`facts,arithmetic` -> the tasks; `all` -> every registered task (unavailable ones too)."""
    if names.strip() == "all":
        return list(TASKS.values())
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in TASKS]
    if unknown or not chosen:
        raise ValueError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(TASKS)}, or all")
    return [TASKS[n] for n in chosen]


# --- asking an endpoint -----------------------------------------------------------------


async def _stream(client: httpx.AsyncClient, url: str, body: dict, headers: dict, answer: Answer) -> dict:
    """Read a streamed reply into `answer` (content, reasoning, time to the first content
    text); return the usage of its final chunk."""
    start = time.perf_counter()
    usage: dict = {}
    async with client.stream(
        "POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}}, headers=headers
    ) as response:
        if response.status_code != 200:
            answer.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
            return {}
        async for chunk in event_chunks(response):
            if "error" in chunk:
                answer.error = f"stream error: {chunk['error'].get('message', chunk['error'])}"
                return {}
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                answer.reasoning += delta.get("reasoning_content") or ""
                if delta.get("content"):
                    if answer.first_answer_s is None:
                        answer.first_answer_s = time.perf_counter() - start
                    answer.reply += delta["content"]
    return usage


async def _ask(
    client: httpx.AsyncClient, endpoint, item: Item, max_tokens: int, system: str | None, thinking: bool | None = None
) -> tuple[Answer, dict]:
    question: str | list[dict] = item.question
    if item.parts:
        question = [*item.parts, *([] if item.spoken else [{"type": "text", "text": item.question}])]
    body = {
        "model": endpoint.model,
        "messages": [
            *([{"role": "system", "content": system}] if system else []),
            {"role": "user", "content": question},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    answer = Answer(item.question, item.answer)
    if thinking is not None:  # streamed, to time the first answer token after the reasoning
        try:
            usage = await _stream(
                client,
                endpoint.base_url + "/chat/completions",
                {**body, "enable_thinking": thinking, "return_reasoning": True},
                endpoint.headers(),
                answer,
            )
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            answer.error = f"{type(exc).__name__}: {exc}"
            return answer, {}
        answer.correct = not answer.error and is_correct(item, answer.reply)
        return answer, usage
    try:
        response = await client.post(endpoint.base_url + "/chat/completions", json=body, headers=endpoint.headers())
    except httpx.HTTPError as exc:
        answer.error = f"{type(exc).__name__}: {exc}"
        return answer, {}
    if response.status_code != 200:
        answer.error = f"HTTP {response.status_code}: {response.text[:200]}"
        return answer, {}
    data = response.json()
    answer.reply = data["choices"][0]["message"].get("content") or ""
    answer.correct = is_correct(item, answer.reply)
    return answer, data.get("usage") or {}


async def _ask_all(
    endpoint,
    items: list[Item],
    max_tokens: int,
    concurrency: int,
    progress,
    system: str | None,
    thinking: bool | None = None,
) -> list[tuple[Answer, dict]]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:

        async def one(item: Item):
            async with gate:
                result = await _ask(client, endpoint, item, max_tokens, system, thinking)
            progress.update()
            return result

        return await asyncio.gather(*(one(item) for item in items))


def mode_name(thinking: bool | None) -> str:
    return "on" if thinking else "off"


def run_task(
    endpoint,
    task: Task,
    *,
    limit: int | None = None,
    max_tokens: int = 16,
    concurrency: int = 4,
    thinking: bool | None = None,
) -> TaskResult:
    """Ask every question of `task` (the first `limit`) at `endpoint`, `concurrency` at a time.
    `thinking` sends `enable_thinking` and streams each reply, to count the reasoning and time
    the first answer token; None sends neither (the target's default, one plain response)."""
    if task.items is None:
        return TaskResult(task.name, unavailable=task.unavailable, thinking=thinking)
    try:
        items = task.items()[:limit]
    except TaskUnavailable as exc:
        return TaskResult(task.name, unavailable=str(exc), thinking=thinking)
    result = TaskResult(task.name, asked=len(items), thinking=thinking)
    mode = "" if thinking is None else f", thinking {mode_name(thinking)}"
    with tqdm(total=len(items), desc=f"{task.name} @ {endpoint.model}{mode}", leave=False) as progress:
        pairs = asyncio.run(_ask_all(endpoint, items, max_tokens, concurrency, progress, task.system, thinking))
    for answer, usage in pairs:
        result.answers.append(answer)
        result.correct += answer.correct
        result.failed += bool(answer.error)
        result.prompt_tokens += usage.get("prompt_tokens", 0)
        result.completion_tokens += usage.get("completion_tokens", 0)
        result.reasoning_tokens += (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return result
