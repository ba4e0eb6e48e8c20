"""Calibration data as a choice: what a user's file, folder or JSONL becomes, the built-in mix,
what a report records, and a clear refusal of every bad input."""

import json

import pytest

import workbench
from workbench.compress import calibration as cal
from workbench.compress.pruning import importance
from workbench.config import ConfigError, parse_config
from workbench.data import calibration_texts, check_calibration, held_out_texts, read_calibration, split_documents

DIGITS = "0 1 2 3 4 5 6 7 8 9 " * 20
COUNTING = "10 20 30 40 50 " * 30


def prune_config(**options):
    step = {"step": "prune_heads", "criterion": "taylor", "ratio": 0.5, "calibration_texts": 2}
    return parse_config({"model": {"source": "tiny:llama"}, "compression": [{**step, **options}]})


# --- what a spec reads -----------------------------------------------------------------------


def test_a_text_file_splits_on_form_feeds_or_else_blank_lines():
    assert split_documents("one\nstill one\n\n\ntwo\n") == ["one\nstill one", "two"]
    assert split_documents("a\n\nb\n\f\nc") == ["a\n\nb", "c"]
    assert split_documents((workbench.paths.DATA_DIR / "calibration.txt").read_text()) == calibration_texts()


def test_a_folder_reads_its_text_and_jsonl_files_in_name_order(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n")
    (tmp_path / "a.txt").write_text("first\n\nfirst again")
    (tmp_path / "notes.md").write_text("not read")
    assert read_calibration(str(tmp_path)) == ["first", "first again", "second"]


def test_jsonl_chats_are_rendered_in_the_models_chat_template(tmp_path):
    path = tmp_path / "chats.jsonl"
    chat = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Teal."}]
    path.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"text": "plain"}) + "\n")
    session = workbench.load("tiny:llama", quiet=True)
    data = cal.resolve(session, str(path))
    assert data.texts == [session.tokenizer.apply_chat_template(chat, tokenize=False), "plain"]
    assert "Teal." in data.texts[0] and data.name == str(path)


def test_joined_specs_are_read_as_one_interleaved_set_recorded_by_part(tmp_path):
    path = tmp_path / "digits.txt"
    path.write_text(f"{DIGITS}\n\n{COUNTING}\n")
    session = workbench.load("tiny:llama", quiet=True)
    joined = cal.resolve(session, f"reference+{path}")
    reference = calibration_texts()
    assert joined.texts[:5] == [reference[0], DIGITS.strip(), reference[1], COUNTING.strip(), reference[2]]
    assert len(joined.texts) == len(reference) + 2
    assert joined.record()["sources"] == {"reference": len(reference), str(path): 2}
    assert joined.name == f"reference+{path}" and joined.sha256 != cal.resolve(session, "reference").sha256
    plus = tmp_path / "a+b.txt"  # a path that exists is one path, `+` and all
    plus.write_text("one document")
    assert cal.resolve(session, str(plus)).texts == ["one document"]


def test_the_shipped_books_are_prose_of_two_kinds_none_of_it_held_out():
    books = read_calibration("data/recovery/books.txt")
    assert books[0].startswith("CHAPTER I\n\nDown the Rabbit-Hole") and books[1].startswith("INTRODUCTION")
    assert "`" not in "".join(books) and all(len(b) <= 5600 for b in books)
    assert check_calibration("mix+data/recovery/books.txt") == "mix+data/recovery/books.txt"


# --- what a report records -------------------------------------------------------------------


def test_a_user_calibration_file_changes_the_importance_ranking_and_is_recorded(tmp_path):
    path = tmp_path / "digits.txt"
    path.write_text(f"{DIGITS}\n\n{COUNTING}\n")
    session = workbench.load("tiny:llama", quiet=True)
    reference = importance(session.model, session.tokenizer, "taylor", texts=calibration_texts(), calibration_texts=2)
    user = importance(session.model, session.tokenizer, "taylor", texts=[DIGITS, COUNTING], calibration_texts=2)
    assert reference.flatten().argsort().tolist() != user.flatten().argsort().tolist()

    by_reference = workbench.load(prune_config(calibration="reference"), quiet=True).reports[0]
    by_user = workbench.load(prune_config(calibration=str(path)), quiet=True).reports[0]
    assert by_user["removed"] != by_reference["removed"]
    assert by_user["calibration"] == {
        "name": str(path),
        "texts": 2,
        "chars": len(DIGITS.strip()) + len(COUNTING.strip()),
        "sha256": cal.Calibration.of("x", [DIGITS.strip(), COUNTING.strip()]).sha256,
        "texts_used": 2,
    }
    assert by_reference["calibration"]["name"] == "reference" and by_reference["calibration"]["texts"] == 40


def test_steps_that_read_no_text_record_no_calibration():
    report = workbench.load(
        parse_config(
            {
                "model": {"source": "tiny:llama"},
                "compression": [{"step": "prune_heads", "criterion": "random", "ratio": 0.5}],
            }
        ),
        quiet=True,
    ).reports[0]
    assert report["calibration"] is None


# --- the built-in mix ------------------------------------------------------------------------


@pytest.fixture
def few_prompts(monkeypatch, tmp_path):
    """32 of the recovery prompts (8 in the mix), 6 openings, short replies and samples and a fresh
    cache: the mix in seconds."""
    from workbench.compress import recovery_data

    prompts = recovery_data.load_prompts()[:32]
    openings = recovery_data.load_openings()[:6]
    monkeypatch.setattr(cal.rd, "load_prompts", lambda: prompts)
    monkeypatch.setattr(cal.rd, "load_openings", lambda: openings)
    monkeypatch.setattr(cal, "MIX_REPLY_TOKENS", 8)
    monkeypatch.setattr(cal, "MIX_SAMPLE_TOKENS", 8)
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_the_mix_interleaves_reference_text_the_models_own_chats_and_text_and_everyday_sentences(few_prompts):
    session = workbench.load("tiny:qwen3", quiet=True)
    mix = cal.resolve(session, None)
    assert mix.name == "mix" and mix.sources == {
        "reference": 40,
        "self_generated_chats": 8,
        "self_generated_text": 6,
        "everyday": 5,
    }
    reference = calibration_texts()
    assert mix.texts[0] == reference[0] and mix.texts[4] == reference[1]
    first_prompt = cal.rd.load_prompts()[0][-1]["content"]
    assert first_prompt in mix.texts[1] and mix.texts[1] != first_prompt  # a chat, in its template
    opening = cal.rd.load_openings()[0]
    assert mix.texts[2].startswith(opening) and len(mix.texts[2]) > len(opening)  # the model's continuation
    assert mix.texts[3] == cal.everyday_sentences()[0]
    assert mix.record()["sources"] == mix.sources
    assert cal.resolve(session, "mix") is mix  # once per session


def test_the_mix_is_generated_once_per_model_and_read_from_the_cache_after(few_prompts, monkeypatch):
    session = workbench.load("tiny:qwen3", quiet=True)
    first = cal.mix(session.model, session.tokenizer)
    monkeypatch.setattr(cal.rd, "greedy_replies", lambda *a, **k: pytest.fail("generated again"))
    monkeypatch.setattr(cal.rd, "sampled_continuations", lambda *a, **k: pytest.fail("sampled again"))
    again = cal.mix(workbench.load("tiny:qwen3", quiet=True).model, session.tokenizer)
    assert again.sha256 == first.sha256


def test_a_step_after_pruning_reads_the_mix_of_the_model_as_loaded(few_prompts):
    """The pipeline resolves calibration before the first step: a later step reading `mix` gets
    the original model's replies, not the pruned model's."""
    config = parse_config(
        {
            "model": {"source": "tiny:qwen3"},
            "compression": [
                {"step": "prune_heads", "criterion": "taylor", "per_layer": 1, "calibration_texts": 2},
                {"step": "prune_heads", "criterion": "weight_norm", "per_layer": 0, "compensate": True},
            ],
        }
    )
    session = workbench.load(config, quiet=True)
    original = workbench.load("tiny:qwen3", quiet=True)
    expected = cal.mix(original.model, original.tokenizer).sha256
    assert [r["calibration"]["sha256"] for r in session.reports] == [expected, expected]


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (None, "missing.txt", "no such file or folder, and not a built-in name"),
        ("", "empty.txt", "holds no text"),
        ("\n\n  \n", "blank.txt", "holds no text"),
        ('{"text": "fine"}\n{"text": oops}\n', "bad.jsonl", r"bad.jsonl, line 2 is not JSON"),
        (
            '{"text": "fine"}\n\n{"prompt": "x"}\n',
            "keys.jsonl",
            r'line 3: expected an object with "text" or "messages"',
        ),
        ('{"messages": [{"content": "x"}]}\n', "chat.jsonl", r'line 1: "messages" must be a non-empty list'),
        ("a,b\n", "data.csv", r"unknown format \.csv"),
    ],
)
def test_bad_calibration_input_is_named_when_the_config_is_read(tmp_path, content, name, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        prune_config(calibration=str(path))


def test_held_out_text_is_refused_as_calibration(tmp_path):
    for held_out in ("data/evaluation.txt", "data/prose.txt"):
        with pytest.raises(ValueError, match="held-out evaluation text"):
            check_calibration(held_out)
    copied = tmp_path / "mine.txt"
    copied.write_text("My own notes.\n\f\n" + held_out_texts("prose")[3])
    with pytest.raises(ValueError, match="contains a document of the held-out prose text"):
        check_calibration(str(copied))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mix+", "an empty part between '\\+'"),
        ("mix++reference", "an empty part"),
        ("mix+reference+mix", "names a part twice"),
        ("mix+nowhere.txt", "calibration 'nowhere.txt': no such file or folder"),
        ("reference+data/prose.txt", "prose.txt is held-out evaluation text"),
    ],
)
def test_a_bad_part_of_a_joined_spec_is_named_when_the_config_is_read(spec, message):
    with pytest.raises(ConfigError, match=message):
        prune_config(calibration=spec)


def test_an_empty_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="holds no .txt or .jsonl files"):
        check_calibration(str(tmp_path))
