"""The completions API and vLLM's tokenizer endpoints over real HTTP, as lm-evaluation-harness's
`local-completions` backend uses them: echoed prompt logprobs (max_tokens 0 scores the prompt
alone), token-id prompts and batches, raw continuations through the engine, streaming, and
OpenAI-shaped 400s for everything a client can get wrong."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

import workbench
from workbench.engine.events import ReplyBuilder
from workbench.engine.request import PromptRequest
from workbench.serve.live import LiveServer

MODEL = "autoglm-phone-9b"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def session() -> workbench.Session:
    return workbench.load("tiny:llama", quiet=True)


@pytest.fixture(scope="module")
def server(session):
    with LiveServer(session) as live:
        yield live


def complete(server, **fields) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/completions", json={"model": MODEL, **fields}, timeout=60)


def ok(server, **fields) -> dict:
    reply = complete(server, **fields)
    assert reply.status_code == 200, reply.text
    return reply.json()


def reference_logprobs(model, ids: list[int]) -> list[float]:
    """Each token's logprob given the ones before it, from a plain forward of the model."""
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits.float().log_softmax(-1)[0]
    return logprobs[:-1].gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1).tolist()


def engine_greedy(session, ids: list[int], max_tokens: int) -> str:
    plan = session.engine.plan(PromptRequest(prompt_ids=ids, temperature=0, max_tokens=max_tokens, ignore_eos=True))
    reply = ReplyBuilder()
    for _, event in session.engine.generate([plan]):
        reply.add(event)
    return reply.result().text


IDS = [260, 78, 78, 81, 223, 89, 81, 84, 78, 70]


# --- scoring: echo + logprobs -----------------------------------------------------------------


def test_echo_with_max_tokens_0_scores_a_string_prompt_only(server, session):
    body = ok(server, prompt="hello world", echo=True, max_tokens=0, logprobs=1)
    choice = body["choices"][0]
    ids = session.tokenizer.encode("hello world")
    assert choice["text"] == "hello world" and choice["finish_reason"] == "length"
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [session.tokenizer.decode([i]) for i in ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx(reference_logprobs(session.model, ids), abs=1e-4)


def test_token_id_prompts_are_scored_as_sent(server, session):
    logprobs = ok(server, prompt=IDS, echo=True, max_tokens=0, logprobs=0)["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [session.tokenizer.decode([i]) for i in IDS]
    assert logprobs["token_logprobs"][1:] == pytest.approx(reference_logprobs(session.model, IDS), abs=1e-4)


def test_logprobs_0_lists_only_the_token_itself(server):
    logprobs = ok(server, prompt=IDS, echo=True, max_tokens=0, logprobs=0)["choices"][0]["logprobs"]
    for token, logprob, top in zip(
        logprobs["tokens"][1:], logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]
    ):
        assert top == {token: logprob}


def test_top_logprobs_are_dicts_of_the_likeliest_tokens_and_the_token_itself(server):
    logprobs = ok(server, prompt=IDS, echo=True, max_tokens=0, logprobs=3)["choices"][0]["logprobs"]
    for token, logprob, top in zip(
        logprobs["tokens"][1:], logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]
    ):
        assert isinstance(top, dict) and 1 <= len(top) <= 4 and top[token] == logprob
        assert all(lp <= 0 for lp in top.values())
        assert logprob <= max(top.values())  # lm-eval's is_greedy: the token's logprob equals the best one's


def test_text_offsets_count_characters_from_the_prompt_start(server):
    echoed = ok(server, prompt="hello world", echo=True, max_tokens=3, logprobs=1, temperature=0)["choices"][0]
    tokens = echoed["logprobs"]["tokens"]
    assert echoed["logprobs"]["text_offset"] == [len("".join(tokens[:i])) for i in range(len(tokens))]
    plain = ok(server, prompt="hello world", max_tokens=3, logprobs=1, temperature=0)["choices"][0]["logprobs"]
    assert plain["text_offset"][0] == len("hello world")
    assert plain["token_logprobs"] == echoed["logprobs"]["token_logprobs"][-3:]


def test_lm_evals_loglikelihood_request_scores_the_context_and_one_more_token(server):
    """lm-eval sends token-id prompts with echo, logprobs 1 and max_tokens 1, and reads
    token_logprobs[ctxlen:-1]: the prompt's part must be the scoring's."""
    scored = ok(server, prompt=[IDS], echo=True, max_tokens=0, logprobs=1)["choices"][0]["logprobs"]
    body = ok(server, prompt=[IDS], echo=True, max_tokens=1, logprobs=1, temperature=0, seed=1234)
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(IDS) + 1
    assert logprobs["token_logprobs"][: len(IDS)] == scored["token_logprobs"]
    assert logprobs["top_logprobs"][: len(IDS)] == scored["top_logprobs"]


def test_a_reply_that_ends_at_once_still_lists_its_end_token(server, session, monkeypatch):
    """lm-eval reads token_logprobs[ctxlen:-1], taking the last entry for the generated token. When
    the model's first token is its end token the entry must still be there (as vLLM lists it), or
    the continuation's last token is dropped and scored as 0 (seen with the embedded model on MMLU)."""
    with torch.no_grad():
        first = int(session.model(torch.tensor([IDS])).logits[0, -1].argmax())
    monkeypatch.setattr(session.engine, "eos_ids", {first})  # the greedy first token now ends the reply
    body = ok(server, prompt=[IDS], echo=True, max_tokens=1, logprobs=1, temperature=0)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    scored = ok(server, prompt=[IDS], echo=True, max_tokens=0, logprobs=1)["choices"][0]["logprobs"]
    assert len(choice["logprobs"]["token_logprobs"]) == len(IDS) + 1
    assert choice["logprobs"]["token_logprobs"][: len(IDS)] == scored["token_logprobs"]


# --- batches ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompts", [["hello", "world wide", "hi"], [IDS, IDS[:4], [7, 8, 9]]])
def test_a_batch_gets_one_choice_per_prompt_in_order(server, prompts):
    fields = {"echo": True, "max_tokens": 0, "logprobs": 1}
    batch = ok(server, prompt=prompts, **fields)
    assert [c["index"] for c in batch["choices"]] == list(range(len(prompts)))
    for prompt, choice in zip(prompts, batch["choices"], strict=True):
        alone = ok(server, prompt=prompt, **fields)["choices"][0]
        assert choice["text"] == alone["text"]
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
            alone["logprobs"]["token_logprobs"][1:], abs=1e-4
        )
    assert batch["usage"]["prompt_tokens"] == sum(
        ok(server, prompt=p, **fields)["usage"]["prompt_tokens"] for p in prompts
    )


def test_a_batch_of_generations_matches_each_prompt_alone(server):
    prompts = [IDS, IDS[:3]]
    fields = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    batch = ok(server, prompt=prompts, **fields)
    assert [c["text"] for c in batch["choices"]] == [
        ok(server, prompt=p, **fields)["choices"][0]["text"] for p in prompts
    ]
    assert batch["usage"]["completion_tokens"] == 12


# --- generation ---------------------------------------------------------------------------------


def test_greedy_generation_continues_the_raw_prompt_like_the_engine(server, session):
    body = ok(server, prompt=IDS, max_tokens=8, temperature=0, ignore_eos=True)
    choice = body["choices"][0]
    assert choice["text"] == engine_greedy(session, IDS, 8)
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": len(IDS), "completion_tokens": 8, "total_tokens": len(IDS) + 8}
    echoed = ok(server, prompt=IDS, max_tokens=8, temperature=0, ignore_eos=True, echo=True)["choices"][0]["text"]
    assert echoed == session.tokenizer.decode(IDS) + choice["text"]


def test_max_tokens_defaults_to_16_as_openai(server):
    assert ok(server, prompt=IDS, temperature=0, ignore_eos=True)["usage"]["completion_tokens"] == 16


def test_the_same_seed_draws_the_same_continuation(server):
    fields = {"prompt": "hello", "max_tokens": 8, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    assert ok(server, **fields)["choices"][0]["text"] == ok(server, **fields)["choices"][0]["text"]


def test_a_stop_string_ends_the_reply(server):
    whole = ok(server, prompt=IDS, max_tokens=12, temperature=0, ignore_eos=True)["choices"][0]["text"]
    stop = whole[4:6]
    cut = ok(server, prompt=IDS, max_tokens=12, temperature=0, ignore_eos=True, stop=[stop])["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == whole[: whole.index(stop)]


# --- streaming ----------------------------------------------------------------------------------


def stream_chunks(server, **fields) -> list[dict]:
    body = {"model": MODEL, "stream": True, **fields}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_streamed_chunks_add_up_to_the_whole_reply(server):
    fields = {"prompt": [IDS, IDS[:3]], "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    whole = ok(server, **fields)["choices"]
    chunks = stream_chunks(server, **fields, stream_options={"include_usage": True})
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    for index, choice in enumerate(whole):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["length"]
        streamed = [lp for c in mine if c["logprobs"] for lp in c["logprobs"]["token_logprobs"]]
        offsets = [o for c in mine if c["logprobs"] for o in c["logprobs"]["text_offset"]]
        assert streamed == choice["logprobs"]["token_logprobs"] and offsets == choice["logprobs"]["text_offset"]


def test_a_streamed_echo_sends_the_prompt_first(server):
    chunks = stream_chunks(server, prompt="hello", echo=True, max_tokens=0, logprobs=1)
    assert len(chunks) == 1
    choice = chunks[0]["choices"][0]
    assert choice["text"] == "hello" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["token_logprobs"][0] is None


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("suffix", "end"),
        ("best_of", 2),
        ("tools", [{}]),
        ("response_format", {"type": "json_object"}),
        ("guided_regex", "a+"),
    ],
)
def test_unsupported_fields_are_refused_naming_the_field(server, field, value):
    reply = complete(server, prompt="hi", **{field: value})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "unsupported_parameter" and error["param"] == field and field in error["message"]


def test_harmless_values_of_those_fields_still_work(server):
    assert complete(server, prompt="hi", max_tokens=1, n=1, best_of=1, logit_bias={}, suffix=None).status_code == 200


@pytest.mark.parametrize("prompt", [IDS * 300, "hello " * 2000, [IDS, IDS * 300]])
def test_prompts_over_the_context_are_refused_before_any_work(server, prompt):
    reply = complete(server, prompt=prompt, echo=True, max_tokens=0)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"


def test_prompt_plus_max_tokens_over_the_context_is_refused(server, session):
    limit = session.engine.context_limit
    reply = complete(server, prompt=[5] * (limit - 2), max_tokens=5)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    ("prompt", "says"),
    [
        ("", "empty"),
        ([], "empty"),
        ([[]], "prompt 0 of the batch is empty"),
        (["a", ""], "prompt 1 of the batch is empty"),
        ([5, 100000], "token id 100000 at position 1 is outside the vocabulary"),
        ([[5], [6, -1]], "prompt 1 of the batch: token id -1"),
        (5, "must be a string"),
        ([1.5, 2], "must be a string"),
        (["a", [1]], "must be a string"),
        ({"text": "a"}, "must be a string"),
        (None, "must be a string"),
    ],
)
def test_bad_prompts_are_400s_that_say_why(server, prompt, says):
    reply = complete(server, prompt=prompt, echo=True, max_tokens=0)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "prompt" and error["code"] == "invalid_value" and says in error["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "hi", "logprobs": 6}, "logprobs"),
        ({"prompt": "hi", "temperature": 3}, "temperature"),
        ({"prompt": "hi", "echo": "yes please"}, "echo"),
        ({}, "prompt"),
    ],
)
def test_bad_fields_are_400s_naming_the_field(server, fields, param):
    reply = complete(server, **fields)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_an_unknown_model_is_a_404(server):
    reply = httpx.post(server.base_url + "/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"


def test_the_server_keeps_serving_chat_after_all_that(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


# --- vLLM's tokenizer endpoints -----------------------------------------------------------------


def test_tokenize_then_detokenize_round_trips(server, session):
    text = "hello world, 你好"
    tokenized = httpx.post(server.base_url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert tokenized["tokens"] == session.tokenizer.encode(text, add_special_tokens=False)
    assert tokenized["count"] == len(tokenized["tokens"])
    assert tokenized["max_model_len"] == session.engine.context_limit
    back = httpx.post(server.base_url + "/detokenize", json={"tokens": tokenized["tokens"]}).json()
    assert back == {"prompt": text}


def test_tokenize_takes_the_model_name_and_token_strings_like_vllm(server, session):
    body = {"model": MODEL, "prompt": "hello", "return_token_strs": True}
    tokenized = httpx.post(server.base_url + "/tokenize", json=body).json()
    assert tokenized["token_strs"] == session.tokenizer.convert_ids_to_tokens(tokenized["tokens"])
    wrong = httpx.post(server.base_url + "/tokenize", json={"model": "gpt-9", "prompt": "hi"})
    assert wrong.status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"add_special_tokens": False}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/detokenize", {"tokens": [5, 100000]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ],
)
def test_tokenizer_endpoints_refuse_bad_bodies(server, path, body, param):
    reply = httpx.post(server.base_url + path, json=body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param


def test_tokenizer_info_has_the_fields_lm_eval_reads(server, session):
    info = httpx.get(server.base_url + "/tokenizer_info").json()
    tokenizer = session.tokenizer
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert info["pad_token"] == tokenizer.pad_token and info["chat_template"] == tokenizer.chat_template
    assert info["model_max_length"] == session.engine.context_limit
    assert info["tokenizer_class"] == type(tokenizer).__name__


def test_openapi_documents_the_new_bodies_and_replies(server):
    spec = httpx.get(server.base_url + "/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ("CompletionRequest", "CompletionResponse", "TokenizeRequest", "TokenizeResponse"):
        assert name in schemas
    assert {"/v1/completions", "/tokenize", "/detokenize", "/tokenizer_info"} <= set(spec["paths"])
    body = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}


# --- the embedded model ------------------------------------------------------------------------


@pytest.mark.embedded
def test_summed_prompt_logprob_over_http_equals_a_plain_transformers_forward(embedded):
    text = "The capital of France is Paris, and the capital of Italy is Rome."
    ids = embedded.tokenizer.encode(text)
    with LiveServer(embedded) as live:
        body = {"model": MODEL, "prompt": [ids], "echo": True, "max_tokens": 0, "logprobs": 1}
        reply = httpx.post(live.base_url + "/v1/completions", json=body, timeout=120).json()
    over_http = sum(reply["choices"][0]["logprobs"]["token_logprobs"][1:])
    assert over_http == pytest.approx(sum(reference_logprobs(embedded.model, ids)), abs=1e-3)
