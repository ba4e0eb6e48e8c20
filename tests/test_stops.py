from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.engine.stops import StopMatcher

alphabet = st.sampled_from(list("ab\n#。"))
texts = st.text(alphabet, max_size=40)
stops = st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=1, max_size=3)


def run(chunks, stop_list):
    matcher = StopMatcher(stop_list)
    out = "".join(matcher.feed(c) for c in chunks) + matcher.flush()
    return out, matcher.stopped


def expected(text, stop_list):
    """Cut at the stop string that is complete first, scanning the text left to right."""
    for end in range(1, len(text) + 1):
        done = [end - len(s) for s in stop_list if text[:end].endswith(s)]
        if done:
            return text[: min(done)], True
    return text, False


@settings(max_examples=500)
@given(text=texts, stop_list=stops, cuts=st.lists(st.integers(0, 40), max_size=10))
def test_output_is_the_text_before_the_first_completed_stop_whatever_the_split(text, stop_list, cuts):
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert run(chunks, stop_list) == expected(text, stop_list)


def test_stop_split_across_chunks_never_leaks():
    matcher = StopMatcher(["###"])
    assert matcher.feed("done #") == "done "
    assert matcher.feed("#") == ""
    assert matcher.feed("# more") == ""
    assert matcher.stopped


def test_partial_stop_that_does_not_complete_is_released():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("ST") == ""
    assert matcher.feed("AY") == "STAY"


def test_overlapping_stops_cut_where_generation_would_halt():
    # "\n" is complete after two characters, before "a\na" is: generation halts there.
    assert run(["a\na"], ["\n", "a\na"]) == ("a", True)
    assert run(["a\n", "a"], ["\n", "a\na"]) == ("a", True)
