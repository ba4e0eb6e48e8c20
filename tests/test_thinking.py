"""The streaming thinking parser: the same split whatever the token boundaries."""

import re

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from workbench.engine.thinking import (
    CLOSE_TAG,
    OPEN_TAG,
    ThinkingParser,
    split_thinking,
)


def reference_split(text: str, start_in_reasoning: bool = False) -> tuple[str, str]:
    """The rules written as a whole-text regex walk, independent of the streaming code."""
    reasoning, answer = [], []
    channel = "reasoning" if start_in_reasoning else "text"
    skip_space = True
    for piece in re.split(f"({re.escape(OPEN_TAG)}|{re.escape(CLOSE_TAG)})", text):
        if piece == OPEN_TAG:
            if channel == "text":
                channel, skip_space = "reasoning", True
        elif piece == CLOSE_TAG:
            if channel == "reasoning":
                channel, skip_space = "text", True
        else:
            if skip_space:
                piece = piece.lstrip()
                if piece:
                    skip_space = False
            (reasoning if channel == "reasoning" else answer).append(piece)
    return "".join(reasoning), "".join(answer)


def stream(chunks: list[str], start_in_reasoning: bool = False) -> tuple[str, str]:
    parser = ThinkingParser(start_in_reasoning=start_in_reasoning)
    parts = [p for chunk in chunks for p in parser.feed(chunk)] + parser.flush()
    return (
        "".join(t for c, t in parts if c == "reasoning"),
        "".join(t for c, t in parts if c == "text"),
    )


def split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


# Text made of fragments that are likely to form, break and nest tags.
fragments = st.sampled_from(
    [
        OPEN_TAG,
        CLOSE_TAG,
        "<",
        ">",
        "</",
        "<th",
        "ink>",
        "/think>",
        "<thin",
        " ",
        "\n",
        "a",
        "b c",
        "思考",
        "x<y",
        "</thinking>",
    ]
)
texts = st.lists(fragments, max_size=30).map("".join)


@settings(max_examples=400)
@given(text=texts, cuts=st.lists(st.integers(min_value=0, max_value=500), max_size=20), start=st.booleans())
def test_any_split_gives_the_whole_text_result(text, cuts, start):
    assert stream(split_at(text, cuts), start) == split_thinking(text, start_in_reasoning=start)


@settings(max_examples=400)
@given(text=texts, start=st.booleans())
def test_streaming_follows_the_written_rules(text, start):
    assert split_thinking(text, start_in_reasoning=start) == reference_split(text, start)


@settings(max_examples=300)
@given(text=texts, start=st.booleans())
def test_tags_never_reach_the_answer_even_one_character_at_a_time(text, start):
    # Tags are removed in one left-to-right pass; text such as "<th</think>ink>" spells a
    # new "<think>" only once its tag is gone, and that is text the model wrote, not a tag.
    assume(not re.search("<think>|</think>", re.sub("<think>|</think>", "", text)))
    reasoning, answer = stream(list(text), start)
    assert OPEN_TAG not in answer and CLOSE_TAG not in answer
    assert OPEN_TAG not in reasoning and CLOSE_TAG not in reasoning


def test_plain_reasoning_then_answer():
    assert split_thinking("<think>\nLet me see: 2+2.\n</think>\n\nIt is 4.") == ("Let me see: 2+2.\n", "It is 4.")


def test_tags_split_across_tokens():
    assert stream(["<th", "in", "k>plan", "</", "thi", "nk", ">", "done"]) == ("plan", "done")


def test_missing_close_tag_leaves_everything_as_reasoning():
    assert split_thinking("<think>I was cut off by max_tokens") == ("I was cut off by max_tokens", "")


def test_text_before_the_open_tag_is_answer():
    assert split_thinking("Sure. <think>why?</think>Because.") == ("why?", "Sure. Because.")


def test_prompt_that_opened_the_block_starts_in_reasoning():
    assert split_thinking("step one</think>answer", start_in_reasoning=True) == ("step one", "answer")


def test_thinking_off_but_tags_emitted_anyway_are_still_split_out():
    assert split_thinking("<think></think>\n\nHello") == ("", "Hello")


def test_stray_close_tag_is_dropped_from_the_answer():
    assert split_thinking("Hi</think> there") == ("", "Hi there")


def test_lookalike_tags_are_text():
    assert split_thinking("a <thinking> b") == ("", "a <thinking> b")
    assert stream(["a <thi", "s> b"]) == ("", "a <this> b")


def test_held_back_partial_tag_is_released_at_the_end():
    assert stream(["answer <thi"]) == ("", "answer <thi")
