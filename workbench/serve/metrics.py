"""Prometheus metrics and the recent-requests log behind /metrics and the status page."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from workbench.engine.events import Stats


@dataclass
class RequestRecord:
    at: float
    stream: bool
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    outcome: str = ""


@dataclass
class ServerMetrics:
    """One registry per app, so several servers in one process (tests) never share counts."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    recent: deque[RequestRecord] = field(default_factory=lambda: deque(maxlen=25))

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("workbench_requests", "Chat completion requests by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("workbench_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("workbench_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "workbench_time_to_first_token_seconds",
            "Time from request to first token, queueing included",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.in_flight = Gauge("workbench_requests_in_flight", "Chat completions being served or queued", registry=r)
        self.active = 0
        self.transcriptions = Counter(
            "workbench_transcriptions", "Transcription requests by HTTP status", ["status"], registry=r
        )
        self.transcribed_audio = Counter(
            "workbench_transcribed_audio_seconds", "Seconds of audio transcribed", registry=r
        )
        self.transcription_time = Histogram(
            "workbench_transcription_seconds",
            "Wall time of a transcription: decoding the upload and Whisper",
            buckets=(0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )

    def started(self) -> None:
        self.active += 1
        self.in_flight.set(self.active)

    def ended(self) -> None:
        self.active -= 1
        self.in_flight.set(self.active)

    def finished(self, *, stream: bool, stats: Stats | None, status: int = 200, outcome: str = "") -> None:
        self.requests.labels(status=str(status)).inc()
        record = RequestRecord(at=time.time(), stream=stream, status=status, outcome=outcome)
        if stats is not None:
            self.prompt_tokens.inc(stats.prompt_tokens)
            self.completion_tokens.inc(stats.completion_tokens)
            self.ttft.observe(stats.ttft_s)
            record.prompt_tokens = stats.prompt_tokens
            record.completion_tokens = stats.completion_tokens
            record.ttft_ms = stats.ttft_s * 1000
            record.tokens_per_s = stats.decode_tokens_per_s
            record.outcome = outcome or stats.finish_reason
        self.recent.appendleft(record)

    def transcribed(self, *, status: int, audio_s: float | None = None, wall_s: float | None = None) -> None:
        """One answered transcription request; `audio_s` and `wall_s` when Whisper ran."""
        self.transcriptions.labels(status=str(status)).inc()
        if audio_s is not None:
            self.transcribed_audio.inc(audio_s)
        if wall_s is not None:
            self.transcription_time.observe(wall_s)
