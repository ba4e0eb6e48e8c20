"""The shipped texts (workbench/data.py): the held-out prose text loads, is big enough and shares
nothing with the calibration or the reference text. Reads files only; loads no model."""

import pytest

from workbench.data import HELD_OUT, calibration_texts, evaluation_texts, held_out_texts, prose_texts
from workbench.paths import DATA_DIR


def test_prose_text_loads_with_enough_documents():
    docs = prose_texts()
    assert len(docs) >= 30
    assert all(len(d) > 1000 for d in docs)
    assert sum(map(len, docs)) > 150_000
    assert docs == held_out_texts("prose")


def test_prose_shares_no_document_with_calibration_or_reference():
    prose = set(prose_texts())
    assert len(prose) == len(prose_texts())
    assert not prose & set(calibration_texts())
    assert not prose & set(evaluation_texts())


def test_prose_has_no_project_gutenberg_boilerplate():
    text = "\n".join(prose_texts())
    assert "Gutenberg" not in text
    assert "\r" not in text


def test_held_out_names_their_files():
    assert held_out_texts("reference") == evaluation_texts()
    for name in HELD_OUT.values():
        assert (DATA_DIR / name).is_file()


def test_unknown_held_out_text_names_the_known_ones():
    with pytest.raises(ValueError, match="nope") as raised:
        held_out_texts("nope")
    assert "reference" in str(raised.value)
    assert "prose" in str(raised.value)
