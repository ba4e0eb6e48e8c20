"""The page: a streaming multimodal chat, generation settings, a model panel that loads
and compresses configs, and a compare tab that answers one prompt with the original and
the compressed model side by side. Everything goes through the one engine.

Conversations live in the user's browser, not on the server (conversations.py,
conversation_panel.py): a system prompt per conversation, a list to switch, rename and delete
them, regenerate, edit-and-resend and undo from the chat's own buttons, export as JSON or
Markdown and import back.

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
from workbench.ui import conversations, media
from workbench.ui.chat import (
    EMPTY_REPLY,
    Settings,
    history_to_messages,
    stats_markdown,
    stream_messages,
    structured_output,
    throttled,
    user_message,
    user_turns,
)
from workbench.ui.conversation_panel import STORAGE_KEY, WAITING, Panel, answerer, browser_secret, reply_record
from workbench.ui.model_thread import ModelThread
from workbench.ui.models import CONFIG_DIR, ModelSlots, config_files, parse_yaml

GENERATING = "_generating…_"
CHART_TOKENS = 512
"""tokens of the exchange the compare tab's layer chart reads (a few seconds on a CPU)"""


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
    panel = Panel()
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
        system=None,
        conversation_id=None,
        structured=False,
        schema="",
    ):
        """One turn; besides the chat, the exchange as the conversation store will keep it
        (a State: each update is cheap, and a stopped reply still leaves what it wrote)."""
        message = message or {}
        text = (message.get("text") or "").strip()
        files = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
        if not text and not files:
            raise gr.Error("Type a message (or attach an image or a recording) first.", title="Nothing to send")
        try:
            answer_format = structured_output(structured, schema)
        except ValueError as exc:
            raise gr.Error(str(exc), title="Structured output") from None
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
            answer_format,
        )
        session, who = runner.call(lambda: slots.chat_session(which))  # may load the original
        system = (system or "").strip()
        try:
            asked = [{"role": "system", "content": system}] if system else []
            messages = [*asked, *history_to_messages(history), {"role": "user", "content": media.content(text, files)}]
            request = settings.request(messages)
            # Planning runs the model too (images through the adapter, speech through Whisper):
            # on the model thread, like the decoding, so no other thread wakes a kernel pool.
            events = runner.call(lambda: session.engine.stream(request))
        except (media.MediaError, RequestError, ValidationError) as exc:
            raise _refuse(exc) from None
        shown = [*history, user_message(text, files)]
        model = answerer(session, who)
        conversation_id = conversation_id or conversations.new_id()  # a fresh chat is kept from its first reply
        user = conversations.user_turn(text, files)
        turn = conversations.exchange(
            conversation_id, user_turns(history), system, user, reply_record("", "", None, model)
        )
        yield shown, None, GENERATING, turn, conversation_id
        for replies, stats in throttled(stream_messages(runner.iterate(events), time.perf_counter())):
            *thought, answer = (str(m.content) for m in replies)
            if stats is not None and answer == EMPTY_REPLY:
                answer = ""
            turn = turn | {"reply": reply_record(answer, "".join(thought), stats, model)}
            yield (
                shown + replies,
                None,
                stats_markdown(stats, session, who) if stats else GENERATING,
                turn,
                conversation_id,
            )

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
                events = runner.call(lambda: session.engine.stream(request))  # noqa: B023 - called at once
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
            "the Model panel and compare it with the original side by side. Your conversations stay in "
            "this browser: switch, rename, export or import them below the chat."
        )
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tab("Chat"):
                    system = gr.Textbox(
                        "",
                        label="System prompt",
                        placeholder="Optional: how the model should behave in this conversation",
                        lines=1,
                        max_lines=6,
                        elem_id="system",
                    )
                    chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chatbot", buttons=["copy"], editable="user")
                    box = gr.MultimodalTextbox(
                        placeholder="Type a message, attach an image, or record your voice…",
                        sources=["upload", "microphone"],
                        file_types=["image", "audio"],
                        file_count="multiple",
                        show_label=False,
                        elem_id="message",
                    )
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", size="sm")
                    stats = gr.Markdown(WAITING, elem_id="stats")
                    with gr.Accordion("Conversations (kept in this browser)", open=True, elem_id="conversations"):
                        picker = gr.Radio([], label="Switch to", elem_id="conversation-list")
                        with gr.Row(equal_height=True):
                            name = gr.Textbox(label="Name", max_lines=1, scale=3, elem_id="conversation-name")
                            rename = gr.Button("Rename", size="sm", scale=1, elem_id="rename-chat")
                        with gr.Row():
                            new_chat = gr.Button("New chat", size="sm", elem_id="new-chat")
                            delete = gr.Button("Delete", size="sm", elem_id="delete-chat")
                            export_json = gr.DownloadButton(
                                "Export JSON", size="sm", interactive=False, elem_id="export-json"
                            )
                            export_md = gr.DownloadButton(
                                "Export Markdown", size="sm", interactive=False, elem_id="export-markdown"
                            )
                            import_json = gr.UploadButton(
                                "Import JSON", file_types=[".json"], size="sm", elem_id="import-json"
                            )
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
                    with gr.Accordion("Structured output", open=False):
                        structured = gr.Checkbox(
                            False,
                            label="Answer in JSON (enforced token by token)",
                            elem_id="structured",
                        )
                        schema = gr.Code(
                            "",
                            language="json",
                            label="JSON schema (empty: any JSON object)",
                            lines=4,
                            elem_id="schema",
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

        # The conversations: the browser's store, read on load; the page's own copy of it,
        # which every handler reads and writes (one at a time: concurrency_id), and the
        # browser's kept in step. States, which Gradio's client skips: /chat's API is as it was.
        saved = gr.BrowserState(conversations.new_store(), storage_key=STORAGE_KEY, secret=browser_secret())
        store = gr.State(conversations.new_store())
        shown = gr.State(None)  # the id of the conversation in the chat (None: a fresh one)
        exchange = gr.State(None)  # the turn in progress, as the store will keep it
        again = gr.State(None)  # the message a regenerate or an edit sends again
        view = [saved, store, picker, name, export_json, export_md, shown]
        page = [*view, chatbot, system, stats]
        private: dict = {"api_visibility": "private"}
        keeping: dict = {"concurrency_id": "conversations", "concurrency_limit": 1, **private}
        app.load(panel.show, saved, page, **keeping)

        settings = [thinking, temperature, top_p, max_tokens, seed]
        penalties = [min_p, repetition_penalty, frequency_penalty, presence_penalty]
        asked = [chatbot, *settings, which, *penalties, system, shown, structured, schema]
        streaming: dict = {
            "concurrency_id": "model",
            "show_progress": "hidden",  # the answer streaming in is the progress; no overlay on the box
        }
        chat_event = box.submit(
            respond, [box, *asked], [chatbot, box, stats, exchange, shown], api_name="chat", **streaming
        )
        # Regenerate (the retry button under the last reply) and edit-and-resend (a user
        # message's edit button) take the turn back, store included, and send it again.
        resent = [chatbot, again, stats, exchange, shown]
        retry_event = chatbot.retry(
            panel.regenerate, [store, shown, chatbot], [*view, chatbot, again], **keeping
        ).success(respond, [again, *asked], resent, **streaming, **private)
        edit_event = chatbot.edit(panel.edit, [store, shown, chatbot], [*view, chatbot, again], **keeping).success(
            respond, [again, *asked], resent, **streaming, **private
        )
        chatbot.undo(panel.undo, [store, shown, chatbot], [*view, chatbot, box], **keeping)
        replies = [chat_event, retry_event, edit_event]
        for event in replies:  # .then also runs after Stop: a stopped reply is kept as far as it went
            event.then(panel.remember, [store, shown, exchange], [*view, exchange], **keeping).then(
                slots.describe, None, models, **private
            )
        stop.click(lambda: "_Stopped._", None, stats, cancels=replies, api_name="stop", queue=False)
        # Leaving a conversation stops its reply (kept as far as it went, as with Stop).
        leaving: dict = {"cancels": replies, **keeping}
        new_chat.click(panel.new_chat, store, page, **leaving)
        chatbot.clear(panel.new_chat, store, page, **leaving)  # the chat's own bin: a fresh chat, the old one kept
        picker.input(panel.switch, [store, picker], page, **leaving)
        delete.click(panel.delete, [store, shown], page, **leaving)
        import_json.upload(panel.import_file, [store, import_json], page, **leaving)
        rename.click(panel.rename, [store, shown, name], view, **keeping)
        name.submit(panel.rename, [store, shown, name], view, **keeping)
        system.blur(panel.set_system, [store, shown, system], view, **keeping)
        compare_event = run_compare.click(
            compare,
            [prompt, *settings, *penalties],
            [left, left_stats, right, right_stats, layer_plot],
            api_name="compare",
            concurrency_id="model",
        )
        compare_event.then(slots.describe, None, models, api_visibility="private")
        stop_compare.click(None, None, None, cancels=[compare_event], api_visibility="private")
        config.change(show_config, config, editor, api_visibility="private")
        apply.click(apply_config, [editor, config], [models, which], api_name="apply_config", concurrency_id="model")
    return app
