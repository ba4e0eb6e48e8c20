"""The datasets of the workbench's lm-eval tasks, built from what the workbench ships (no hub,
no network), and the answer check of its short-answer tasks. lm-eval imports this file by path,
from the task YAMLs beside it (`custom_dataset: !function loaders.NAME`)."""

from __future__ import annotations

from typing import Any

from datasets import Dataset, DatasetDict

from workbench import data as _data
from workbench.bench.tasks import TASKS, Item, arithmetic_items, is_correct
from workbench.harness import mmlu as _mmlu


def _test(rows: list[dict]) -> DatasetDict:
    return DatasetDict({"test": Dataset.from_list(rows)})


def mmlu(**_: Any) -> DatasetDict:
    return _test(_mmlu.questions())


def mmlu_subset(**_: Any) -> DatasetDict:
    return _test(_mmlu.subset())


def _short_answers(items: list[Item]) -> DatasetDict:
    return _test([{"question": i.question, "answer": i.answer, "aliases": list(i.aliases)} for i in items])


def facts(**_: Any) -> DatasetDict:
    items = TASKS["facts"].items
    assert items is not None
    return _short_answers(items())


def arithmetic(**_: Any) -> DatasetDict:
    return _short_answers(arithmetic_items())


def reference(**_: Any) -> DatasetDict:
    return _test([{"text": text} for text in _data.held_out_texts("reference")])


def prose(**_: Any) -> DatasetDict:
    return _test([{"text": text} for text in _data.held_out_texts("prose")])


def short_answer(doc: dict, results: list[str]) -> dict[str, float]:
    """The bench's own check (workbench.bench.tasks.is_correct): the answer or an alias as a
    word of the reply, a number as the one new number in it."""
    item = Item(doc["question"], doc["answer"], tuple(doc["aliases"]))
    return {"acc": float(is_correct(item, results[0]))}
