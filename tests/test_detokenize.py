from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.engine.detokenize import IncrementalDetokenizer
from workbench.models.tiny import build_tokenizer

TOKENIZER = build_tokenizer("qwen3")


def stream_decode(tokenizer, ids):
    detok = IncrementalDetokenizer(tokenizer)
    return "".join(detok.add(i) for i in ids) + detok.flush()


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40))
def test_deltas_add_up_to_the_full_decode(text):
    ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
    assert stream_decode(TOKENIZER, ids) == TOKENIZER.decode(ids, skip_special_tokens=True)


def test_multibyte_characters_are_never_emitted_half_done():
    ids = TOKENIZER("你好，世界 🙂", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(TOKENIZER)
    deltas = [detok.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == "你好，世界 🙂"


def test_embedded_tokenizer_keeps_spaces_and_chinese(embedded):
    text = "The capital of France is Paris. 你好！ 3.14"
    ids = embedded.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert stream_decode(embedded.tokenizer, ids) == text
