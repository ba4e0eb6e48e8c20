"""quality and compare benches: the answer checker, targets from the command line, and the
comparison table over real HTTP (tiny models served by this workbench, a scripted foreign
endpoint whose right answers are known, endpoints that refuse or reject)."""

import json
import os
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from workbench.bench.__main__ import main
from workbench.bench.targets import parse_endpoint, parse_targets
from workbench.bench.tasks import (
    TASKS,
    Item,
    _facts,
    arithmetic_items,
    is_correct,
    resolve_tasks,
)
from workbench.serve.live import free_port

# --- the checker --------------------------------------------------------------------------


@pytest.mark.parametrize("reply", ["Paris", "paris.", "The capital of France is Paris!", "PARIS"])
def test_checker_accepts_the_answer_in_a_reply(reply):
    assert is_correct(Item("What is the capital of France?", "Paris"), reply)


@pytest.mark.parametrize("reply", ["", "Lyon", "Parisian", "I don't know", "Comparison"])
def test_checker_rejects_replies_without_the_answer_as_whole_words(reply):
    assert not is_correct(Item("What is the capital of France?", "Paris"), reply)


def test_checker_accepts_aliases_and_ignores_accents():
    assert is_correct(Item("Capital of Brazil?", "Brasilia"), "Brasília")
    assert is_correct(Item("Gas?", "carbon dioxide", ("CO2",)), "It is CO2.")
    assert is_correct(Item("Gas?", "carbon dioxide", ("CO2",)), "Carbon-dioxide")
    assert not is_correct(Item("Gas?", "carbon dioxide", ("CO2",)), "carbon monoxide")


@pytest.mark.parametrize(
    "reply, ok",
    [
        ("42", True),
        ("17 + 25 = 42", True),
        ("The answer is forty-two.", True),
        ("42.0", True),
        ("42 or 43", False),
        ("17", False),
        ("", False),
        ("4", False),
        ("420", False),
        ("Forty", False),
    ],
)
def test_checker_for_numbers_wants_exactly_the_answer_besides_the_question_numbers(reply, ok):
    assert is_correct(Item("What is 17 + 25?", "42"), reply) is ok


def test_checker_reads_thousands_separators_and_number_words():
    item = Item("How many metres are in 1 kilometre?", "1000")
    assert is_correct(item, "1,000 metres")
    assert is_correct(item, "One thousand.")
    assert is_correct(item, "There are 1000 metres in 1 kilometre")
    assert not is_correct(item, "100")


def test_every_shipped_question_accepts_its_own_answer_and_rejects_an_empty_reply():
    for task in (t for t in TASKS.values() if t.items is not None):
        items = task.items()
        assert items, task.name
        for item in items:
            assert is_correct(item, item.answer), item
            assert not is_correct(item, ""), item
            assert not is_correct(item, item.question), item  # echoing the question is never right


def test_arithmetic_set_is_the_same_every_time():
    assert arithmetic_items() == arithmetic_items()
    assert len(arithmetic_items()) == 20


def test_image_questions_are_generated_pictures_sent_as_data_urls():
    from workbench.bench.tasks import image_items
    from workbench.modalities.images import load_image

    items = image_items()
    assert items == image_items() and len(items) == 40
    kinds = {}
    for item in items:
        (part,) = item.parts
        image = load_image(part["image_url"]["url"])  # a PNG data: URL the server accepts
        assert image.size == (128, 128) and item.answer and not item.spoken
        kinds[item.question] = item.answer
    assert len(kinds) > 10  # varied questions, not one repeated


def test_spoken_facts_are_wav_parts_without_text(monkeypatch):
    from workbench.bench.tasks import TaskUnavailable, run_task, spoken_items

    try:
        items = spoken_items(_facts()[:2])
    except TaskUnavailable as exc:
        if os.environ.get("CI"):
            raise  # CI installs espeak-ng
        pytest.skip(str(exc))
    assert all(item.spoken and item.parts[0]["input_audio"]["format"] == "wav" for item in items)
    monkeypatch.setenv("PATH", "/nonexistent")  # no espeak-ng: the task says so instead of failing
    result = run_task(None, TASKS["speech"])
    assert result.unavailable.startswith("n/a (") and "espeak-ng" in result.unavailable
    assert [t.name for t in resolve_tasks("all")] == list(TASKS)


# --- targets from the command line ---------------------------------------------------------


def test_endpoint_syntax_is_parsed_with_prices_and_context(monkeypatch):
    monkeypatch.setenv("MY_KEY", "k")
    t = parse_endpoint(
        "cloud=https://api.example.com/v1/,model=m-1,key_env=MY_KEY,price_in=0.15,price_out=0.6,context=128000"
    )
    assert (t.name, t.base_url, t.model, t.key_env, t.price_in, t.price_out, t.context) == (
        "cloud",
        "https://api.example.com/v1",
        "m-1",
        "MY_KEY",
        0.15,
        0.6,
        128000,
    )
    assert not t.local


def test_configs_are_named_by_file_stem_or_given_name():
    targets = parse_targets("configs/int8.yaml,mine=tiny:llama,tiny:qwen3", None)
    assert [(t.name, t.config) for t in targets] == [
        ("int8", "configs/int8.yaml"),
        ("mine", "tiny:llama"),
        ("tiny:qwen3", "tiny:qwen3"),
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--endpoint", "https://api.example.com/v1"], "expected NAME=BASE_URL"),
        (["--endpoint", "cloud=api.example.com,model=m"], "expected NAME=BASE_URL"),
        (["--endpoint", "cloud=https://api.example.com/v1"], "model=ID is required"),
        (["--endpoint", "cloud=https://api.example.com/v1,model=m,colour=red"], "unknown option 'colour=red'"),
        (["--endpoint", "cloud=https://api.example.com/v1,model=m,price_in=cheap"], "price_in='cheap' is not a number"),
        (
            ["--endpoint", "cloud=https://api.example.com/v1,model=m,key_env=WORKBENCH_TEST_UNSET_KEY"],
            "WORKBENCH_TEST_UNSET_KEY",
        ),
        (["--configs", "configs/nope.yaml"], "configs/nope.yaml does not exist"),
        (["--configs", "./no-such-model-folder"], "does not exist"),
        (["--configs", "tiny:llama,tiny:llama"], "two targets are named tiny:llama"),
        (["--configs", "tiny:llama", "--tasks", "facts,poetry"], "unknown task(s) poetry"),
        (["--configs", "tiny:llama", "--local-price", "0.1"], "expected IN,OUT"),
        (["--configs", "tiny:llama", "--concurrency", "1,four"], "expected client counts"),
        (["--configs", "tiny:llama", "--harness", "workbench_mmlu,workbench_nope"], "no shipped task workbench_nope"),
        (["--configs", "tiny:llama", "--harness-limit", "0"], "--harness-limit must be at least 1"),
        (["--configs", "tiny:llama", "--windows", "-1"], "--windows must be 0"),
    ],
)
def test_bad_command_lines_fail_before_anything_runs_with_what_to_fix(argv, message, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["compare", *argv, "--out", str(tmp_path / "out")])
    assert message in str(exc.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--thinking", "maybe"], "--thinking takes on, off or both"),
        (["--thinking", "on,on"], "--thinking takes on, off or both"),
        (["--thinking", "on", "--thinking-tokens", "0"], "--thinking-tokens must be at least 1"),
    ],
)
def test_bad_thinking_options_fail_before_anything_runs(argv, message, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["quality", "--configs", "tiny:llama", *argv, "--out", str(tmp_path / "out")])
    assert message in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_an_unreadable_config_is_named_in_the_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(SystemExit, match="bad.yaml: not valid YAML"):
        main(["quality", "--configs", str(bad)])
    bad.write_text("model:\n  sorce: tiny:llama\n")
    with pytest.raises(SystemExit, match="sorce"):
        main(["quality", "--configs", str(bad)])


# --- a scripted foreign endpoint -------------------------------------------------------------

ORACLE_KEY = "oracle-secret"


def _oracle_app() -> FastAPI:
    """Answers the facts task right for questions about capitals and wrong otherwise, reports
    a fixed usage per reply, streams, and insists on its key: a foreign endpoint whose
    accuracy and cost are known in advance."""
    answers = {item.question: item.answer for item in TASKS["facts"].items()}
    app = FastAPI()

    def authorised(request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {ORACLE_KEY}"

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorised(request):
            return JSONResponse({"error": {"message": "bad key"}}, 401)
        return {"object": "list", "data": [{"id": "oracle-1", "object": "model", "context_length": 4096}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if not authorised(request):
            return JSONResponse({"error": {"message": "bad key"}}, 401)
        body = await request.json()
        question = body["messages"][-1]["content"]
        reply = answers[question] if "capital" in question else "I am not sure."
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        if not body.get("stream"):
            return {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                "usage": usage,
            }
        if "enable_thinking" in body:  # a reasoning model: right about capitals only after thinking
            thinks = body["enable_thinking"]
            reply = reply if thinks else "I am not sure."

            async def reasoned():
                for word in ["Let", " me", " recall."] if thinks else []:
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'reasoning_content': word}}]})}\n\n"
                for part in (reply[:2], reply[2:]):
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': part}}]})}\n\n"
                details = {"reasoning_tokens": 3 if thinks else 0}
                yield f"data: {json.dumps({'choices': [], 'usage': {**usage, 'completion_tokens_details': details}})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(reasoned(), media_type="text/event-stream")

        async def events():
            for word in ["Hello", " there", " friend"]:
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': word}}]})}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': {**usage, 'completion_tokens': 3}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def oracle():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_oracle_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


# --- the benches end to end -----------------------------------------------------------------


def test_quality_measures_perplexity_with_the_compression_measure_and_accuracy_over_http(tmp_path, capsys):
    import workbench
    from workbench.data import evaluation_texts, prose_texts
    from workbench.metrics import perplexity
    from workbench.models.anatomy import weight_bytes

    main(
        [
            "quality",
            "--configs",
            "tiny:llama",
            "--tasks",
            "all",
            "--limit",
            "3",
            "--windows",
            "1",
            "--harness",
            "workbench_arithmetic",
            "--harness-limit",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "quality.json").read_text())
    (result,) = data["results"]
    session = workbench.load("tiny:llama", quiet=True)
    assert result["perplexity"]["reference"] == pytest.approx(
        perplexity(session.model, session.tokenizer, evaluation_texts(), max_windows=1)
    )
    assert result["perplexity"]["prose"] == pytest.approx(
        perplexity(session.model, session.tokenizer, prose_texts(), max_windows=1)
    )
    # tiny:llama is its own original: no divergence to measure, and the table says why
    assert result["original"] and result["divergence"] == {}
    assert result["harness"]["workbench_arithmetic"]["samples"] == 2
    assert result["footprint"]["weight_bytes"] == weight_bytes(session.model)
    assert result["footprint"]["rss_bytes"] > result["footprint"]["weight_bytes"]
    for name in ("facts", "arithmetic"):
        task = result["tasks"][name]
        assert task["asked"] == 3 and task["failed"] == 0 and len(task["answers"]) == 3
        assert task["prompt_tokens"] > 0 and task["completion_tokens"] > 0
        assert task["correct"] == sum(
            is_correct(Item(a["question"], a["expected"]), a["reply"]) for a in task["answers"]
        )
    images = result["tasks"]["image_qa"]  # a tiny random model has no vision: each question is refused
    assert images["failed"] == images["asked"] == 3 and "no image input" in images["answers"][0]["error"]
    spoken = result["tasks"]["speech"]  # but it hears: Whisper transcribes, the tiny model babbles
    assert spoken["asked"] == 3 and spoken["failed"] == 0
    assert (tmp_path / "quality.html").exists()
    printed = capsys.readouterr().out
    assert "| tiny:llama |" in printed and "0 (the original)" in printed


def test_the_original_of_a_config_is_its_source_as_loaded_by_default():
    from workbench.bench.quality import original_config
    from workbench.config import load_config

    assert original_config(load_config("configs/default.yaml")) is None
    for name in ("bf16", "int8", "pruned-25", "thinking"):
        config = load_config(f"configs/{name}.yaml")
        original = original_config(config)
        assert original is not None and original.model.source == config.model.source
        assert (original.model.dtype, original.model.adapter, original.compression) == ("auto", None, [])


def test_quality_of_a_compressed_config_measures_its_divergence_from_the_original(tmp_path):
    config = tmp_path / "int8.yaml"
    config.write_text("model:\n  source: tiny:llama\ncompression:\n  - step: quantize\n    scheme: int8_weight_only\n")
    main(
        [
            "quality",
            "--configs",
            str(config),
            "--tasks",
            "facts",
            "--limit",
            "1",
            "--windows",
            "1",
            "--harness",
            "none",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    (result,) = json.loads((tmp_path / "out" / "quality.json").read_text())["results"]
    assert not result["original"] and result["harness"] == {}
    for text in ("reference", "prose"):
        drift = result["divergence"][text]
        assert 0 < drift["kl_mean"] <= drift["kl_max"] and 0 < drift["top1_agreement"] <= 1
        assert result["perplexity"][text] == drift["compressed_perplexity"]
    assert "KL mean / p99, prose" in (tmp_path / "out" / "quality.md").read_text()


def test_quality_of_a_foreign_endpoint_counts_right_and_wrong_answers(oracle, tmp_path, monkeypatch):
    monkeypatch.setenv("ORACLE_KEY", ORACLE_KEY)
    main(
        [
            "quality",
            "--endpoint",
            f"oracle={oracle},model=oracle-1,key_env=ORACLE_KEY",
            "--tasks",
            "facts,arithmetic",
            "--out",
            str(tmp_path),
        ]
    )
    (result,) = json.loads((tmp_path / "quality.json").read_text())["results"]
    capitals = sum("capital" in item.question for item in TASKS["facts"].items())
    assert result["perplexity"] == {} and result["harness"] == {} and result["footprint"] == {}
    assert (result["tasks"]["facts"]["correct"], result["tasks"]["facts"]["asked"]) == (capitals, 32)
    assert result["tasks"]["arithmetic"]["correct"] == 0
    assert "no log-probabilities" in (tmp_path / "quality.md").read_text()


def test_quality_asks_each_task_with_thinking_on_and_off_streamed(oracle, tmp_path, monkeypatch):
    monkeypatch.setenv("ORACLE_KEY", ORACLE_KEY)
    main(
        [
            "quality",
            "--endpoint",
            f"oracle={oracle},model=oracle-1,key_env=ORACLE_KEY",
            "--tasks",
            "facts",
            "--limit",
            "4",
            "--thinking",
            "on,off",
            "--out",
            str(tmp_path),
        ]
    )
    (result,) = json.loads((tmp_path / "quality.json").read_text())["results"]
    on, off = result["tasks"]["facts@thinking-on"], result["tasks"]["facts@thinking-off"]
    assert (on["correct"], on["asked"], on["thinking"]) == (4, 4, True)  # the first four are capitals
    assert (off["correct"], off["asked"], off["thinking"]) == (0, 4, False)
    assert (on["reasoning_tokens"], off["reasoning_tokens"]) == (12, 0)
    assert on["answers"][0]["reasoning"] == "Let me recall." and on["answers"][0]["reply"] == "Paris"
    assert off["answers"][0]["reasoning"] == ""
    assert all(a["first_answer_s"] > 0 for a in on["answers"] + off["answers"])
    markdown = (tmp_path / "quality.md").read_text()
    assert (
        "facts (capitals, units, science), thinking on | facts (capitals, units, science), thinking off |" in markdown
    )
    assert "| oracle | facts | on | 100% (4/4) | 3.0 |" in markdown


@pytest.fixture(scope="module")
def compared(oracle, tmp_path_factory):
    """One compare run: two local tiny configs, the scripted endpoint with prices, one
    endpoint with nothing listening and one that rejects the (missing) key."""
    out = tmp_path_factory.mktemp("compare")
    mp = pytest.MonkeyPatch()
    mp.setenv("ORACLE_KEY", ORACLE_KEY)
    try:
        main(
            [
                "compare",
                "--configs",
                "tiny:llama,qwen=tiny:qwen3",
                "--endpoint",
                f"oracle={oracle},model=oracle-1,key_env=ORACLE_KEY,price_in=0.5,price_out=2",
                "--endpoint",
                f"refused=http://127.0.0.1:{free_port()}/v1,model=m,context=1000",
                "--endpoint",
                f"nokey={oracle},model=oracle-1",
                "--local-price",
                "0.001,0.002",
                "--tasks",
                "all",
                "--limit",
                "4",
                "--windows",
                "1",
                "--harness",
                "workbench_arithmetic",
                "--harness-limit",
                "2",
                "--concurrency",
                "1,2",
                "--requests",
                "1",
                "--tokens",
                "4",
                "--out",
                str(out),
            ]
        )
    finally:
        mp.undo()
    data = json.loads((out / "compare.json").read_text())
    return out, {c["name"]: c for c in data["columns"]}, {r["row"]: r["cells"] for r in data["table"]}


def test_compare_measures_local_configs_through_the_workbench_server(compared):
    _, columns, _ = compared
    for name in ("tiny:llama", "qwen"):
        column = columns[name]
        assert column["error"] == ""
        assert [level["concurrency"] for level in column["serve"]] == [1, 2]
        assert all(
            level["failed"] == 0 and level["aggregate_tok_s"] > 0 and level["ttft_ms_p50"] > 0
            for level in column["serve"]
        )
        # /v1/models of this workbench's server reports the context limit (tiny models: 2048 positions)
        assert (column["context_length"], column["context_source"]) == (2048, "reported by /v1/models")
        assert column["quality"]["perplexity"]["reference"] > 1 and column["quality"]["perplexity"]["prose"] > 1
        assert column["quality"]["tasks"]["facts"]["asked"] == 4
        assert len(column["load_avg_1min_before_after"]) == 2 and min(column["load_avg_1min_before_after"]) >= 0


def test_compare_prices_questions_from_reported_usage(compared):
    _, columns, table = compared
    oracle = columns["oracle"]
    # four facts questions (all capitals: right), four arithmetic ones (wrong), four image and four
    # spoken questions, 10 + 5 tokens each
    assert (
        oracle["quality"]["tasks"]["facts"]["correct"] == 4 and oracle["quality"]["tasks"]["arithmetic"]["correct"] == 0
    )
    assert oracle["task_tokens"] == {"prompt": 160, "completion": 80}
    assert oracle["task_cost_usd"] == pytest.approx((160 * 0.5 + 80 * 2) / 1000)
    assert (oracle["context_length"], oracle["context_source"]) == (4096, "reported by /v1/models")
    assert all(level["aggregate_tok_s"] > 0 for level in oracle["serve"])
    assert table["accuracy: facts (capitals, units, science)"]["oracle"] == "100% (4/4)"
    local = columns["tiny:llama"]
    assert local["task_cost_usd"] == pytest.approx(
        (local["task_tokens"]["prompt"] * 0.001 + local["task_tokens"]["completion"] * 0.002) / 1000
    )


def test_compare_reports_failing_endpoints_in_their_column(compared):
    _, columns, table = compared
    assert "ConnectError" in columns["refused"]["error"]
    assert columns["nokey"]["error"].startswith("HTTP 401")
    for name in ("refused", "nokey"):
        assert table["time to first token p50 / p95, ms (1 client)"][name] == "error"
        assert table["accuracy: arithmetic (two-digit + - ×)"][name].startswith("error: ")
        assert table["accuracy: image questions (generated shapes)"][name].startswith("error: ")
    assert table["context length, tokens"]["refused"] == "1,000 (given)"
    assert table["load average on this machine while timing (1 min, before / after)"]["refused"] == "n/a"
    assert table["status"]["tiny:llama"] == "ok"
    assert table["workbench_arithmetic (acc)"]["tiny:llama"].count("±") == 1
    assert table["workbench_arithmetic (acc)"]["oracle"].startswith("n/a (endpoint")
    assert table["KL mean / p99, prose (1 x 512 tokens)"]["qwen"] == "0 (the original)"
    assert table["weights"]["tiny:llama"].endswith(" MB")


def test_compare_writes_markdown_and_html_with_every_column(compared):
    out, columns, _ = compared
    md = (out / "compare.md").read_text()
    assert md.count("\n| ") >= 14 and "| | tiny:llama | qwen | oracle | refused | nokey |" in md
    assert (out / "compare.html").stat().st_size > 0
