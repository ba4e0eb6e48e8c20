"""Constrained decoding: a reply that must match a JSON schema, a regular expression, one of a
list of choices or a grammar, enforced token by token.

A 135M model does not keep a JSON format on its own; an app that parses its reply needs the
format guaranteed. Before each sampled token the grammar's matcher says which tokens may come
next, every other token's logit becomes -inf, and the chosen token advances the matcher. The
grammar engine is llguidance (Microsoft's, the one vLLM, SGLang and llama.cpp use): it installs
as one CPU wheel with no dependencies (xgrammar pulls triton and torch pins), compiles a JSON
schema lazily instead of ahead of time (no per-schema wait), computes a mask in about 45 µs
for a 49k vocabulary on this CPU, and reads JSON schemas, regexes and Lark grammars alike.

Each row of a batch has its own matcher, so constrained and free rows decode in one batch.
A constraint starts with the answer: when the template opened a think block the reasoning is
free and the grammar takes over after `</think>`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from workbench.errors import RequestError

if TYPE_CHECKING:
    from llguidance import LLMatcher, LLTokenizer
    from transformers import PreTrainedTokenizerBase

    from workbench.engine.request import StructuredOutput


@dataclass(frozen=True)
class Constraint:
    """A validated grammar (llguidance's serialised form) and what it was asked as."""

    grammar: str
    kind: str
    """json_schema, json_object, regex, choice, grammar or tool_calls: said in errors and stats."""


def json_schema(schema: dict[str, Any], *, field: str = "json_schema") -> str:
    if not isinstance(schema, dict):
        raise RequestError(f"{field}: a JSON schema is an object, not {type(schema).__name__}")
    from llguidance import LLMatcher

    # Compact, one-line JSON: the form a small model writes best and clients parse alike.
    return LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})


def json_object() -> str:
    return json_schema({"type": "object"})


def regex(pattern: str) -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_regex(pattern)


def choice(options: Seq[str]) -> str:
    if not options or not all(isinstance(o, str) and o for o in options):
        raise RequestError("choice: give a non-empty list of non-empty strings")
    return lark("start: " + " | ".join(json.dumps(o) for o in options))


def lark(grammar: str) -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_lark(grammar)


class Grammars:
    """The tokenizer as llguidance sees it (about 0.5 s to build, so built once per engine, on
    the first constrained request) and the matchers made from it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_ids: set[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_ids = sorted(eos_ids)
        self._ll: LLTokenizer | None = None

    @property
    def ll_tokenizer(self) -> LLTokenizer:
        if self._ll is None:
            try:
                import llguidance.hf
            except ImportError as exc:  # pragma: no cover - a pinned dependency
                raise RequestError(f"structured outputs need llguidance (pip install llguidance): {exc}") from None
            if not getattr(self._tokenizer, "is_fast", False):
                raise RequestError(
                    "structured outputs need a fast (Rust) tokenizer; this model's tokenizer is "
                    f"{type(self._tokenizer).__name__}"
                )
            self._ll = llguidance.hf.from_tokenizer(
                self._tokenizer,  # type: ignore[arg-type]  # a fast tokenizer, checked above
                n_vocab=self._vocab_size,
                eos_token=self._eos_ids or None,
            )
        return self._ll

    def check(self, constraint: Constraint, param: str) -> None:
        """Refuse (RequestError, a 400 naming `param`) a grammar llguidance cannot compile,
        before any generation."""
        from llguidance import LLMatcher

        error = LLMatcher.validate_grammar(constraint.grammar, self.ll_tokenizer)
        if error:
            raise RequestError(f"{param}: the {constraint.kind} cannot be enforced: {error.strip()}", param=param)

    def matcher(self, constraint: Constraint) -> Matcher:
        from llguidance import LLMatcher

        return Matcher(LLMatcher(self.ll_tokenizer, constraint.grammar, log_level=0), self.ll_tokenizer.vocab_size)


class Matcher:
    """One reply's position in its grammar: which tokens may come next, and the token taken."""

    def __init__(self, matcher: LLMatcher, vocab_size: int):
        import llguidance.torch

        self._matcher = matcher
        self._torch = llguidance.torch
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of (1, vocab) `logits` with every token the grammar forbids next at -inf."""
        self._torch.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        out = logits.float().clone()
        width = min(out.shape[-1], self._bitmask.shape[-1] * 32)
        self._torch.apply_token_bitmask_inplace(out[:, :width], self._bitmask)
        return out

    def take(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            # The mask allowed only grammatical tokens, so this is llguidance's own failure.
            raise RuntimeError(f"the grammar refused token {token}: {self._matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more: the reply ends here."""
        return bool(self._matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        return bool(self._matcher.is_accepting())


def constraint_of(structured: StructuredOutput) -> Constraint:
    """The grammar of a request's structured output (not yet checked against the tokenizer)."""
    if structured.json_schema is not None:
        grammar = json_schema(structured.json_schema)
    elif structured.json_object:
        grammar = json_object()
    elif structured.regex is not None:
        grammar = regex(structured.regex)
    elif structured.choice is not None:
        grammar = choice(structured.choice)
    else:
        assert structured.grammar is not None  # StructuredOutput holds exactly one
        grammar = lark(structured.grammar)
    return Constraint(grammar, structured.kind)
