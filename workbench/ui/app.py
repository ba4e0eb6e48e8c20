"""The page: a streaming multimodal chat, generation settings, a model panel that loads
and compresses configs, and a compare tab that answers one prompt with the original and
the compressed model side by side. Everything goes through the one engine.

Generation and model swaps share one queue slot (`concurrency_id="model"`): a swap never
pulls a model out from under a running reply, and CPU timings are not skewed by a
second generation. Errors a user can cause (an empty message, a broken upload, an image
for a text-only model, a bad config) become a visible message; the typed message and the
editor text stay where they were.
"""

from __future__ import annotations

import time

import gradio as gr
import plotly.graph_objects as go
import yaml
from pydantic import ValidationError

from workbench.compress.report import BENCH_PROMPT
from workbench.engine import RequestError
from workbench.inspect import figures
from workbench.inspect.divergence import divergence_map
from workbench.session import Session
from workbench.ui import media
from workbench.ui.chat import (
    Settings,
    history_to_messages,
    stats_markdown,
    stream_messages,
    user_message,
)
from workbench.ui.model_thread import ModelThread
from workbench.ui.models import CONFIG_DIR, ModelSlots, config_files, parse_yaml

GENERATING = "_generating…_"
CHART_TOKENS = 512
"""tokens of the exchange the compare tab's layer chart reads (a few seconds on a CPU)"""
WAITING = "_Stats for the last reply appear here._"


def current_yaml(session: Session) -> str:
    """The loaded model's config as the editor shows it when it came from no config file."""
    data = session.config.model_dump(mode="json", include={"model", "compression"})
    return "# the loaded model; edit, then Apply\n" + yaml.safe_dump(data, sort_keys=False)


def layer_chart(sessions: dict[str, Session], asked: list[dict], reply) -> go.Figure | None:
    """Where the two models part on this exchange (the prompt and the original's reply, as the
    chat template lays them out), layer by layer; None, with a warning, when they cannot be
    compared layer by layer."""
    original, compressed = sessions["original"], sessions["compressed"]
    messages = [*asked, {"role": "assistant", "content": str(reply)}]
    tokenizer = original.tokenizer
    if getattr(tokenizer, "chat_template", None):
        text = str(tokenizer.apply_chat_template(messages, tokenize=False))
    else:
        text = "\n".join(m["content"] for m in messages)
    try:
        layer_map = divergence_map(original, compressed, text, max_tokens=CHART_TOKENS)
    except ValueError as exc:
        gr.Warning(f"No layer chart: {exc}")
        return None
    out = layer_map.output
    return figures.divergence_layers(
        layer_map,
        title=f"On this exchange ({out['tokens']} tokens): output KL {out['kl_mean']:.3g} nats/token, "
        f"top-1 agreement {out['top1_agreement']:.0%}",
    )


def _refuse(exc: Exception) -> gr.Error:
    return gr.Error(str(exc), duration=None, title="Not sent")


def build_app(
    session: Session | ModelSlots, *, label: str | None = None, runner: ModelThread | None = None
) -> gr.Blocks:
    """`runner` does every piece of model work (model_thread.py): pass one whose `run()` the
    thread that loaded the model calls, as `python -m workbench.ui` does; by default the page
    starts a model thread of its own."""
    slots = session if isinstance(session, ModelSlots) else ModelSlots(session, label)
    runner = runner or ModelThread()
    first_loaded = slots.compressed or slots.original
    assert first_loaded is not None  # ModelSlots always holds one model
    first = first_loaded.session
    gen = first.engine.defaults  # the config's generation section over the model's own defaults
    configs = config_files()
    start_config = label if label in configs else None
    start_text = None if start_config else current_yaml(first)

    def respond(
        message,
        history,
        thinking,
        temperature,
        top_p,
        max_tokens,
        seed,
        which,
        min_p=0.0,
        repetition_penalty=1.0,
        frequency_penalty=0.0,
        presence_penalty=0.0,
    ):
        message = message or {}
        text = (message.get("text") or "").strip()
        files = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
        if not text and not files:
            raise gr.Error("Type a message (or attach an image or a recording) first.", title="Nothing to send")
        settings = Settings(
            thinking,
            temperature,
            top_p,
            max_tokens,
            seed,
            min_p,
            repetition_penalty,
            frequency_penalty,
            presence_penalty,
        )
        session, who = runner.call(lambda: slots.chat_session(which))  # may load the original
        try:
            messages = [*history_to_messages(history), {"role": "user", "content": media.content(text, files)}]
            events = session.engine.stream(settings.request(messages))
        except (media.MediaError, RequestError, ValidationError) as exc:
            raise _refuse(exc) from None
        shown = [*history, user_message(text, files)]
        yield shown, None, GENERATING
        for replies, stats in stream_messages(runner.iterate(events), time.perf_counter()):
            yield shown + replies, None, stats_markdown(stats, session, who) if stats else GENERATING

    def compare(
        prompt,
        thinking,
        temperature,
        top_p,
        max_tokens,
        seed,
        min_p=0.0,
        repetition_penalty=1.0,
        frequency_penalty=0.0,
        presence_penalty=0.0,
    ):
        if not (prompt or "").strip():
            raise gr.Error("Type a prompt to compare first.", title="Nothing to compare")
        if slots.compressed is None:
            raise gr.Error(
                "No compressed model is loaded: pick a config with compression steps in the Model panel "
                "(e.g. int8.yaml) and apply it, then compare.",
                title="Nothing to compare",
            )
        settings = Settings(
            thinking,
            temperature,
            top_p,
            max_tokens,
            seed,
            min_p,
            repetition_penalty,
            frequency_penalty,
            presence_penalty,
        )
        request = settings.request([{"role": "user", "content": prompt.strip()}])
        asked = [{"role": "user", "content": prompt.strip()}]
        out = {"original": (asked, WAITING), "compressed": (asked, WAITING)}
        sessions = {}
        # One after the other: two models decoding at once on a CPU would slow each other
        # and make the timings meaningless.
        for which in ("original", "compressed"):
            session, who = runner.call(lambda: slots.chat_session(which))  # noqa: B023 - called at once
            sessions[which] = session
            try:
                events = session.engine.stream(request)
            except RequestError as exc:
                raise _refuse(exc) from None
            for replies, stats in stream_messages(runner.iterate(events), time.perf_counter()):
                out[which] = (asked + replies, stats_markdown(stats, session, who) if stats else GENERATING)
                yield *out["original"], *out["compressed"], None
        reply = out["original"][0][-1].content
        yield *out["original"], *out["compressed"], runner.call(lambda: layer_chart(sessions, asked, reply))

    def show_config(name):
        return (CONFIG_DIR / name).read_text(encoding="utf-8") if name else ""

    def apply_config(text, name, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - how Gradio finds the bar
        """Load the editor's config as the compressed model; a bad one leaves a visible
        reason in the panel, and the chat keeps answering."""
        edited = not name or text.strip() != show_config(name).strip()
        label = "edited steps" if edited else name
        progress(0, desc=f"loading {label}")
        try:
            config = parse_yaml(text, origin=label)
            runner.call(lambda: slots.apply(config, label))
            status = slots.describe()
        except Exception as exc:  # noqa: BLE001 - any failure to load is the user's to see, not a crash
            # A config refused before loading leaves the previous compressed model in place;
            # one that failed while loading leaves the original alone. The panel says which.
            gr.Warning(f"{label} did not load: {exc}")
            status = f"⚠️ **{label} did not load**: {exc}\n\n{slots.describe()}"
        return status, "compressed" if slots.compressed else "original"

    with gr.Blocks(title="workbench chat") as app:
        gr.Markdown(
            "## workbench chat\nText, images and voice in; the answer streams out, with the model's "
            "thinking in a collapsible message when the Thinking switch is on. Compress the model in "
            "the Model panel and compare it with the original side by side."
        )
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tab("Chat"):
                    chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chatbot", buttons=["copy"])
                    box = gr.MultimodalTextbox(
                        placeholder="Type a message, attach an image, or record your voice…",
                        sources=["upload", "microphone"],
                        file_types=["image", "audio"],
                        file_count="multiple",
                        show_label=False,
                        elem_id="message",
                    )
                    with gr.Row():
                        stop = gr.Button("Stop", variant="stop", elem_id="stop", size="sm")
                        clear = gr.Button("Clear chat", size="sm")
                    stats = gr.Markdown(WAITING, elem_id="stats")
                with gr.Tab("Compare"):
                    prompt = gr.Textbox(BENCH_PROMPT, label="Prompt for both models", lines=2)
                    with gr.Row():
                        run_compare = gr.Button("Compare", variant="primary", size="sm")
                        stop_compare = gr.Button("Stop", variant="stop", size="sm")
                    with gr.Row():
                        with gr.Column():
                            left = gr.Chatbot(label="Original", height=320)
                            left_stats = gr.Markdown(WAITING)
                        with gr.Column():
                            right = gr.Chatbot(label="Compressed", height=320)
                            right_stats = gr.Markdown(WAITING)
                    layer_plot = gr.Plot(label="Where the models part on this exchange, layer by layer")
            with gr.Column(scale=2):
                with gr.Accordion("Generation settings", open=True):
                    thinking = gr.Checkbox(value=gen.enable_thinking, label="Thinking (show the model's reasoning)")
                    temperature = gr.Slider(
                        *Settings.slider_range("temperature"),
                        value=gen.temperature,
                        step=0.05,
                        label="Temperature (0 = greedy)",
                        elem_id="temperature",
                    )
                    top_p = gr.Slider(0.05, 1.0, value=gen.top_p, step=0.05, label="Top-p")
                    max_tokens = gr.Slider(
                        1, 2048, value=min(gen.max_tokens, 2048), step=1, label="Max tokens", elem_id="max_tokens"
                    )
                    seed = gr.Number(
                        value=-1 if gen.seed is None else gen.seed, precision=0, minimum=-1, label="Seed (-1 = random)"
                    )
                    with gr.Accordion("Repetition and filtering", open=False):
                        min_p = gr.Slider(
                            *Settings.slider_range("min_p"),
                            value=gen.min_p,
                            step=0.01,
                            label="Min-p (0 = off)",
                            elem_id="min_p",
                        )
                        repetition_penalty = gr.Slider(
                            0.5,
                            2.0,
                            value=gen.repetition_penalty,
                            step=0.05,
                            elem_id="repetition_penalty",
                            label="Repetition penalty (1 = off; prompt and reply tokens)",
                        )
                        frequency_penalty = gr.Slider(
                            *Settings.slider_range("frequency_penalty"),
                            value=gen.frequency_penalty,
                            step=0.1,
                            elem_id="frequency_penalty",
                            label="Frequency penalty (0 = off; per repeat in the reply)",
                        )
                        presence_penalty = gr.Slider(
                            *Settings.slider_range("presence_penalty"),
                            value=gen.presence_penalty,
                            step=0.1,
                            elem_id="presence_penalty",
                            label="Presence penalty (0 = off; once a token is in the reply)",
                        )
                with gr.Accordion("Model", open=True):
                    models = gr.Markdown(slots.describe(), elem_id="models")
                    which = gr.Radio(
                        ["compressed", "original"],
                        value="compressed" if slots.compressed else "original",
                        label="Chat with",
                    )
                    config = gr.Dropdown(configs, value=start_config, label="Config (configs/)", elem_id="config")
                    editor = gr.Code(
                        start_text or show_config(start_config),
                        language="yaml",
                        label="Model and compression steps (edit freely, then apply)",
                        lines=8,
                    )
                    apply = gr.Button("Apply", variant="primary", elem_id="apply")

        settings = [thinking, temperature, top_p, max_tokens, seed]
        penalties = [min_p, repetition_penalty, frequency_penalty, presence_penalty]
        chat_event = box.submit(
            respond,
            [box, chatbot, *settings, which, *penalties],
            [chatbot, box, stats],
            api_name="chat",
            concurrency_id="model",
            show_progress="hidden",  # the answer streaming in is the progress; no overlay on the box
        )
        chat_event.then(slots.describe, None, models, api_visibility="private")
        compare_event = run_compare.click(
            compare,
            [prompt, *settings, *penalties],
            [left, left_stats, right, right_stats, layer_plot],
            api_name="compare",
            concurrency_id="model",
        )
        compare_event.then(slots.describe, None, models, api_visibility="private")
        stop.click(lambda: "_Stopped._", None, stats, cancels=[chat_event], api_name="stop", queue=False)
        stop_compare.click(None, None, None, cancels=[compare_event], api_visibility="private")
        clear.click(lambda: ([], WAITING), None, [chatbot, stats], api_visibility="private")
        config.change(show_config, config, editor, api_visibility="private")
        apply.click(apply_config, [editor, config], [models, which], api_name="apply_config", concurrency_id="model")
    return app
