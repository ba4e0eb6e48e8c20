"""Penalties, min-p and logprobs: exact arithmetic on hand-made logits, then what they do to
replies of a tiny model and of the real embedded model (agreement and robust properties, not
one exact sampled token)."""

import pytest
import torch
from pydantic import ValidationError

import workbench
from workbench.config import GenerationConfig
from workbench.engine import ChatRequest, TextDelta, TokenLogprob
from workbench.engine.sampling import _NO_IDS, Sampler, apply_penalties, penalize

LOGITS = [2.0, -1.0, 0.5, 3.0]


def sampler(**kw) -> Sampler:
    return Sampler(temperature=kw.pop("temperature", 0.0), top_p=1.0, top_k=0, seed=0, device=torch.device("cpu"), **kw)


def test_penalties_follow_openai_and_vllm_per_row():
    logits = torch.tensor([LOGITS, LOGITS])
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0]])
    seen = torch.tensor([[True, True, False, True], [True, True, False, True]])  # token 3: in the prompt only
    out = apply_penalties(
        logits,
        counts,
        seen,
        frequency=torch.tensor([0.5, 0.0]),
        presence=torch.tensor([0.25, 0.0]),
        repetition=torch.tensor([2.0, 1.0]),
    )
    # row 0: token 0: 2/2 - 0.5*2 - 0.25; token 1: -1*2 - 0.5*1 - 0.25; token 2 unseen; token 3: 3/2 (prompt only)
    assert out[0].tolist() == [-0.25, -2.75, 0.5, 1.5]
    assert out[1].tolist() == LOGITS  # row 1 asked for nothing: untouched
    assert logits.tolist() == [LOGITS, LOGITS]  # a copy, not in place


def test_repetition_penalty_matches_transformers_own_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    ids = torch.tensor([[3, 7, 7, 20], [1, 2, 3, 49]])  # prompt and reply tokens of each row
    seen = torch.zeros(2, 50, dtype=torch.bool).scatter_(1, ids, True)
    zero = torch.zeros(2)
    ours = apply_penalties(logits, torch.zeros(2, 50), seen, zero, zero, torch.tensor([1.3, 1.3]))
    assert torch.equal(ours, RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()))


def test_penalize_counts_each_rows_own_tokens_and_leaves_plain_rows_alone():
    plain, penalised = sampler(), sampler(frequency_penalty=1.0, repetition_penalty=2.0, prompt_ids=[3])
    logits = torch.tensor([LOGITS, LOGITS])
    assert penalize(logits, [plain, plain]) is logits  # nobody asked: no copy, no work
    first = penalize(logits, [plain, penalised])
    assert first[0].tolist() == LOGITS and first[1].tolist() == [2.0, -1.0, 0.5, 1.5]  # prompt token 3 halved
    assert penalised(first[1:]) == 0 and plain(first[:1]) == 3
    second = penalize(logits, [plain, penalised])
    assert second[0].tolist() == LOGITS
    assert second[1].tolist() == [2.0 / 2 - 1.0, -1.0, 0.5, 1.5]  # token 0 now generated once
    assert penalised.counts.tolist() == [1.0, 0.0, 0.0, 0.0] and plain.counts is None


def test_min_p_drops_tokens_below_its_share_of_the_best():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    scores = sampler(temperature=1.0, min_p=0.35).warpers(_NO_IDS, logits)
    # kept: p >= 0.35 * 0.5 = 0.175
    assert torch.isfinite(scores).tolist() == [[True, True, False, False]]
    draws = sampler(temperature=1.0, min_p=0.35)
    assert {draws(logits) for _ in range(200)} <= {0, 1}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("frequency_penalty", 2.5),
        ("presence_penalty", -2.1),
        ("repetition_penalty", 0.0),
        ("min_p", 1.5),
        ("logprobs", 21),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        ChatRequest.from_prompt("hi", **{field: value})
    if field in GenerationConfig.model_fields:  # a config file's defaults are held to the same ranges
        with pytest.raises(ValidationError, match=field):
            GenerationConfig(**{field: value})


@pytest.fixture(scope="module")
def llama():
    return workbench.load("tiny:llama", quiet=True)


def token_ids(session, **kw) -> list[int]:
    reply = session.chat("hi", temperature=0, max_tokens=40, ignore_eos=True, logprobs=0, **kw)
    return [e.token_id for e in reply.logprobs]


def test_a_presence_penalty_stops_a_greedy_loop(llama):
    looping = token_ids(llama)
    assert len(set(looping)) < len(looping) / 2  # the random tiny model loops on a few tokens
    # its logits are small: a penalty of 2 outweighs them, so no token comes twice
    penalised = token_ids(llama, presence_penalty=2.0)
    assert len(set(penalised)) == len(penalised) == 40
    assert token_ids(llama, presence_penalty=2.0) == penalised  # deterministic
    assert len(set(token_ids(llama, repetition_penalty=0.5))) <= len(set(looping))  # < 1 rewards repeats


def test_rows_of_one_batch_keep_their_own_penalties(llama):
    asks = [{}, {"frequency_penalty": 1.5}, {"repetition_penalty": 0.5}, {}, {"repetition_penalty": 1.8}]
    alone = [llama.chat("hi", temperature=0, max_tokens=24, ignore_eos=True, **kw).text for kw in asks]
    plans = [
        llama.engine.plan(ChatRequest.from_prompt("hi", temperature=0, max_tokens=24, ignore_eos=True, **kw))
        for kw in asks
    ]
    together = [""] * len(asks)
    for index, event in llama.engine.generate(plans):
        if isinstance(event, TextDelta):
            together[index] += event.text
    assert together == alone
    assert alone[0] == alone[3] and all(text != alone[0] for text in alone[1:3] + alone[4:])  # each setting tells


def test_logprobs_are_the_models_own_with_the_greedy_token_on_top(llama):
    reply = llama.chat("hi", temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
    assert len(reply.logprobs) == 12 and all(isinstance(e, TokenLogprob) for e in reply.logprobs)
    for entry in reply.logprobs:
        assert len(entry.top) == 5 and entry.top[0] == (entry.token_id, entry.logprob)
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        assert entry.logprob <= 0
    assert llama.chat("hi", temperature=0, max_tokens=4).logprobs == ()  # only when asked


@pytest.mark.embedded
def test_penalties_change_the_real_models_greedy_reply_reproducibly(embedded):
    prompt = "List the days of the week, then list them again."
    plain = embedded.chat(prompt, temperature=0, max_tokens=48).text
    penalised = embedded.chat(prompt, temperature=0, max_tokens=48, repetition_penalty=1.5, frequency_penalty=1.0).text
    assert penalised != plain
    assert (
        embedded.chat(prompt, temperature=0, max_tokens=48, repetition_penalty=1.5, frequency_penalty=1.0).text
        == penalised
    )
