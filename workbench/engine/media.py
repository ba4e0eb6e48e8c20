"""Image and audio parts of a request, turned into what the language model takes.

Speech joins the dialogue as text: an `input_audio` part is transcribed (Whisper through
faster-whisper) and its transcript takes the part's place in the message. Images take one
of two paths, decided by the loaded model:
- a vision-language model sees them through its own processor and chat template (`native`);
- a text-only model sees them through the modular adapter (ViT-Tiny + MLP projector), whose
  outputs are spliced into the input embeddings where the prompt holds the image.
A model with neither refuses images with a message saying what would make it see.

A `Media` is built once per session; each request gets its own `MediaReader`, so requests
planned on several threads never share state. All the work (decoding, transcribing,
encoding) happens while the request is planned, so every bad input fails before generation.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from workbench.config import MediaConfig
from workbench.engine.request import AudioPart, ImagePart, TextPart
from workbench.errors import UnsupportedInputError

if TYPE_CHECKING:  # modalities/ loads PIL, soundfile and ViT code: imported where a request first needs it
    from workbench.modalities.speech import Transcript


class Media:
    """What a session can see and hear besides text."""

    def __init__(
        self,
        *,
        adapter=None,
        native=None,
        embed_tokens: torch.nn.Module | None = None,
        speech: Callable[[], Any] | None = None,
        speech_name: str | None = None,
        limits: MediaConfig | None = None,
        no_vision_reason: str = "",
        no_speech_reason: str = "",
    ):
        if adapter is not None and embed_tokens is None:
            raise ValueError("the vision adapter needs the language model's input embeddings")
        self.adapter = adapter
        """VisionAdapter for a text-only model (modular path), or None."""
        self.native = native
        """NativeVision for a vision-language model, or None."""
        self.embed_tokens = embed_tokens
        self._speech_factory = speech
        self._speech = None
        self._speech_lock = threading.Lock()
        self._heard: dict[str, Transcript] = {}
        """Transcripts by audio payload: a chat re-sends its earlier recordings every turn."""
        self.speech_name = speech_name
        self.limits = limits or MediaConfig()
        """The config's media section: size and length limits, remote images, speech language."""
        self.no_vision_reason = no_vision_reason
        self.no_speech_reason = no_speech_reason

    @property
    def vision(self) -> str | None:
        """'native', 'adapter' or None: how this session sees images."""
        return "native" if self.native is not None else "adapter" if self.adapter is not None else None

    @property
    def hears(self) -> bool:
        return self._speech_factory is not None

    def recognizer(self):
        """The speech recognizer, loaded on first use (most chats never send audio)."""
        if self._speech_factory is None:
            raise UnsupportedInputError(f"this session has no speech input: {self.no_speech_reason}")
        with self._speech_lock:
            if self._speech is None:
                self._speech = self._speech_factory()
        return self._speech

    def describe(self) -> str:
        """What this session sees and hears, in one line for people (the UI, the status page)."""
        if self.native is not None:
            sees = "images through the model's own vision encoder and processor"
        elif self.adapter is not None:
            sees = f"images through the modular ViT-Tiny adapter, trained only on {self.adapter.config.training_data}"
        else:
            sees = f"no images ({self.no_vision_reason})"
        hears = (
            f"speech through Whisper {self.speech_name}, transcribed into the chat"
            if self.hears
            else f"no speech ({self.no_speech_reason})"
        )
        return f"sees {sees}; hears {hears}"

    def reader(self) -> MediaReader:
        return MediaReader(self)


@dataclass
class MediaReader:
    """The media of one request: resolved parts, what was seen and heard, time spent."""

    media: Media
    records: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def resolve_parts(self, parts: list, images: list) -> str:
        """The message's text with each audio part replaced by its transcript; decoded images
        are appended to `images` in order."""
        pieces: list[str] = []
        for part in parts:
            if isinstance(part, TextPart):
                pieces.append(part.text)
            elif isinstance(part, ImagePart):
                images.append(self._image(part))
            elif isinstance(part, AudioPart):
                heard = self._hear(part)
                if pieces and heard and not pieces[-1][-1:].isspace():
                    heard = " " + heard
                pieces.append(heard)
        return "".join(pieces)

    def _image(self, part: ImagePart):
        from workbench.modalities.images import load_image

        if self.media.vision is None:
            raise UnsupportedInputError(f"the loaded model has no image input: {self.media.no_vision_reason}")
        started = time.perf_counter()
        limits = self.media.limits
        image = load_image(
            part.image_url.url,
            allow_remote=limits.allow_remote_images,
            max_bytes=limits.max_image_bytes,
            max_pixels=limits.max_image_pixels,
        )
        elapsed = time.perf_counter() - started
        self.seconds += elapsed
        self.records.append(
            {
                "kind": "image",
                "width": image.width,
                "height": image.height,
                "path": self.media.vision,
                "decode_s": elapsed,
            }
        )
        return image

    def _hear(self, part: AudioPart) -> str:
        from workbench.modalities.audio import audio_from_part

        started = time.perf_counter()
        recognizer = self.media.recognizer()
        key = hashlib.sha256(part.input_audio.data.encode()).hexdigest()
        transcript = self.media._heard.get(key)
        if transcript is None:
            audio = audio_from_part(part.input_audio, max_seconds=self.media.limits.max_audio_seconds)
            transcript = recognizer.transcribe(audio, language=self.media.limits.speech_language)
            if len(self.media._heard) >= 64:
                self.media._heard.pop(next(iter(self.media._heard)))
            self.media._heard[key] = transcript
        self.seconds += time.perf_counter() - started
        self.records.append(
            {
                "kind": "audio",
                "transcript": transcript.text,
                "language": transcript.language,
                "language_probability": transcript.language_probability,
                "audio_s": transcript.audio_seconds,
                "transcribe_s": transcript.transcribe_seconds,
                "real_time_factor": transcript.real_time_factor,
                "model": transcript.model,
            }
        )
        return transcript.text.strip()

    def render(self, tokenizer, plain: list[dict], images: list[list], template_kwargs: dict):
        """(text, ids, prefill inputs, solo) for messages holding images."""
        started = time.perf_counter()
        flat = [image for per_message in images for image in per_message]
        if self.media.native is not None:
            messages = [
                {**entry, "content": [{"type": "image"}] * len(seen) + [{"type": "text", "text": entry["content"]}]}
                for entry, seen in zip(plain, images, strict=True)
            ]
            prompt = self.media.native.render(messages, flat, template_kwargs.get("enable_thinking"))
            text, ids, inputs, solo = prompt.text, prompt.ids, prompt.inputs, True
        else:
            from workbench.modalities.adapter import build_inputs, with_images

            messages = [
                {**entry, "content": with_images(entry["content"], len(seen))}
                for entry, seen in zip(plain, images, strict=True)
            ]
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **template_kwargs
            )
            assert self.media.embed_tokens is not None  # Media requires it with an adapter
            with torch.inference_mode():
                embeds = self.media.adapter.encode(flat)
                ids, inputs_embeds = build_inputs(tokenizer, self.media.embed_tokens, text, list(embeds))
            inputs, solo = {"inputs_embeds": inputs_embeds}, False
        self.seconds += time.perf_counter() - started
        return text, ids, inputs, solo
