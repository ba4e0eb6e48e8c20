"""What compression broke, layer by layer and head by head: a map of where a compressed model
parts from the original on the same tokens.

Output-level figures (perplexity, KL, MMLU) say *how much* a compressed model lost; this says
*where*. Both models read the same token ids in one process, and the map is plain data:

- **per layer**: the logit-lens KL (each layer's residual stream through that model's own final
  norm and lm_head, original || compressed), the cosine similarity of the hidden states and the
  relative norm of their difference. The lens of the last layer is the output itself.
- **per head** (original numbering) that survives in both: the Jensen-Shannon divergence of its
  attention pattern (bits, over the key positions, averaged over queries) and the relative error
  of its *contribution* to the residual stream (o_proj applied to that head's slice alone, each
  model with its own o_proj). The pattern says whether the head still looks at the same tokens;
  the contribution says whether what it writes changed, so a head whose output is zeroed or
  whose o_proj was quantized badly is found even when its pattern is intact. Both are given as
  the models read the text (a head late in the model inherits every change below it) and
  against the original's head run on the compressed model's own input to that layer (`own_`),
  which singles out the heads that changed themselves. Heads a prune removed are marked
  `removed`.
- **per module**: for every linear layer the compressed model has at the original's name, the
  relative MSE and SQNR of its output against the original module's on the *same input* (the
  compressed model's own activations), so each module's error is its own, not what flowed in
  from upstream. Unchanged modules score exactly zero; a merged adapter shows everywhere.
- **per position**: KL of the output and top-1 agreement along the text, to see where the
  models part.

A session whose KV-cache policy is not `dynamic` (a sliding window, a quantized cache) reads
the text one token at a time through a cache of that policy, as it does when it generates, so
the map shows the policy's effect past its window; otherwise one forward pass reads it all.
Plotting lives in `workbench.inspect.figures`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from workbench.models.anatomy import attention_layers, eager_attention, kv_groups
from workbench.session import Session, load

LN2 = math.log(2.0)
HEAD_MEASURES = ("pattern_js", "output_error", "own_pattern_js", "own_error")


@dataclass
class DivergenceMap:
    """Where two models on the same tokens part, as frames (see the module docstring)."""

    tokens: list[str]
    layers: pd.DataFrame
    """layer, logit_lens_kl (nats/token), cosine, relative_difference"""
    heads: pd.DataFrame
    """layer, head, group (original numbering), status (kept / removed / unmatched),
    pattern_js (bits, 0..1) and output_error (relative) as each model read the text, and
    own_pattern_js / own_error: the same against the original's head run on the compressed
    model's own input to that layer, so they single out the heads that changed themselves
    rather than inherited a change from below (NaN for a token-by-token read)."""
    modules: pd.DataFrame
    """module, layer (None for lm_head), kind (compressed class / weight dtype), relative_mse, sqnr_db"""
    positions: pd.DataFrame
    """position, token, kl (nats), top1_agree"""
    output: dict[str, float] = field(default_factory=dict)
    """kl_mean, kl_p99, kl_max, top1_agreement, tokens"""
    labels: tuple[str, str] = ("original", "compressed")

    def top_layers(self, n: int = 5) -> pd.DataFrame:
        """The layers whose logit lens parts most; the first layer where the KL jumps is where
        the damage enters (later layers inherit it)."""
        frame = self.layers.copy()
        frame["kl_increase"] = frame["logit_lens_kl"].diff().fillna(frame["logit_lens_kl"])
        return frame.nlargest(n, "kl_increase")

    def top_heads(self, n: int = 5) -> pd.DataFrame:
        """The surviving heads that changed most by themselves (`own_error`: on the same input),
        or, where that was not measured (a token-by-token read), as read (`output_error`)."""
        kept = self.heads[self.heads.status == "kept"]
        column = "own_error" if kept.own_error.notna().any() else "output_error"
        return kept.nlargest(n, column)

    def top_modules(self, n: int = 5) -> pd.DataFrame:
        return self.modules.nlargest(n, "relative_mse")

    def to_dict(self) -> dict:
        """Plain JSON-able data: every frame as records (NaN as None)."""

        def records(frame: pd.DataFrame) -> list[dict]:
            return [
                {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                for row in frame.astype(object).where(frame.notna(), None).to_dict("records")
            ]

        return {
            "labels": list(self.labels),
            "output": self.output,
            "layers": records(self.layers),
            "heads": records(self.heads),
            "modules": records(self.modules),
            "positions": records(self.positions),
        }

    def to_markdown(self, top: int = 5) -> str:
        """The map's headline as Markdown: where the KL enters, the heads and modules that
        changed most by themselves, and where along the text the models part."""
        out = self.output
        lines = [
            f"On {out['tokens']} tokens: output KL {out['kl_mean']:.4g} nats/token (p99 {out['kl_p99']:.4g}), "
            f"top-1 agreement {out['top1_agreement']:.1%}.",
            "",
            "| layer | logit-lens KL | KL added by this layer | hidden cosine | relative difference |",
            "|---|---|---|---|---|",
            *(
                f"| {r.layer} | {r.logit_lens_kl:.4g} | {r.kl_increase:+.4g} | {r.cosine:.4f} | "
                f"{r.relative_difference:.4f} |"
                for r in self.top_layers(top).itertuples()
            ),
            "",
        ]
        heads = self.top_heads(top)
        removed = int((self.heads.status == "removed").sum())
        if len(heads):
            lines += [
                f"Heads that changed most by themselves ({removed} of {len(self.heads)} removed):",
                "",
                "| layer | head | own contribution error | own pattern JS (bits) | as read: error | as read: JS |",
                "|---|---|---|---|---|---|",
                *(
                    f"| {r.layer} | {r.head} | {r.own_error:.4g} | {r.own_pattern_js:.4g} | {r.output_error:.4g} | "
                    f"{r.pattern_js:.4g} |"
                    for r in heads.itertuples()
                ),
                "",
            ]
        modules = self.top_modules(top)
        modules = modules[modules.relative_mse > 0]
        if len(modules):
            lines += [
                "Modules with the largest output error on the same input:",
                "",
                "| module | kind | relative MSE | SQNR dB |",
                "|---|---|---|---|",
                *(f"| {r.module} | {r.kind} | {r.relative_mse:.4g} | {r.sqnr_db:.1f} |" for r in modules.itertuples()),
                "",
            ]
        else:
            lines += ["No module's output differs on the same input: the change is in the shapes or the cache.", ""]
        return "\n".join(lines)


# --- one model reading the text -----------------------------------------------------------


@dataclass
class _Side:
    model: Any
    """a transformers decoder (PreTrainedModel)"""
    kept: list[list[int] | None]
    """per layer, the original KV groups this model still has, in its order (None: unknown)"""
    cache_factory: Callable[[Any], Any] | None
    """a KV-cache policy to read through token by token, or None for one full forward"""


@dataclass
class _Trace:
    hidden: list[torch.Tensor]
    """per layer, the residual stream after it: [T, d] float32"""
    o_input: list[torch.Tensor]
    """per layer, o_proj's input: [T, heads x head_dim] in the model's dtype"""
    probs: list[torch.Tensor]
    """per layer, attention probabilities at absolute key positions: [heads, T, T] float32"""
    log_probs: torch.Tensor
    """[T, vocab] float32"""


def _kept_groups(model, reports: list[dict]) -> list[list[int] | None]:
    """The original KV groups each layer still holds, from the session's prune record(s)."""
    attns = attention_layers(model)
    counts = [kv_groups(a) for a in attns]
    original = getattr(model.config, "num_key_value_heads", None) or max(counts)
    kept: list[list[int]] = [list(range(original)) for _ in attns]
    for report in reports:
        if report.get("step") != "prune_heads":
            continue
        for layer, groups in report.get("removed", {}).items():
            kept[int(layer)] = [g for g in kept[int(layer)] if g not in set(groups)]
    return [k if len(k) == n else None for k, n in zip(kept, counts)]


def _side(who, what: str) -> _Side:
    if isinstance(who, Session):
        policy = who.engine.cache_policy
        factory = None if policy.name == "dynamic" else policy.factory
        return _Side(who.model, _kept_groups(who.model, who.reports), factory)
    if isinstance(who, nn.Module) and hasattr(who, "config"):
        return _Side(who, _kept_groups(who, []), None)
    raise TypeError(f"{what} must be a workbench Session or a transformers model, not {type(who).__name__}")


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _hooks(model, trace_hidden: list, trace_o: list, trace_probs: list, total: int) -> Iterator[list[int]]:
    """Record what each layer writes, reads into o_proj and attends to; `offset[0]` is the
    position of the first query of the forward that is running (token-by-token reads)."""
    layers = model.model.layers
    attns = attention_layers(model)
    offset = [0]
    handles = []
    for i, (layer, attn) in enumerate(zip(layers, attns)):
        trace_probs.append(None)

        def hidden(module, args, output, i=i):
            trace_hidden[i].append(_first(output)[0].detach().float().cpu())

        def o_in(module, args, i=i):
            trace_o[i].append(args[0][0].detach())

        def probs(module, args, output, i=i):
            weights = output[1]
            if weights is None:
                raise RuntimeError(f"layer {i} returned no attention probabilities under eager attention")
            w = weights[0].detach().float().cpu()  # heads, queries, keys
            if trace_probs[i] is None:
                trace_probs[i] = torch.zeros(w.shape[0], total, total)
            queries, keys = w.shape[1], w.shape[2]
            end = offset[0] + queries  # keys end at the last query's own position
            trace_probs[i][:, offset[0] : end, end - keys : end] = w

        handles += [
            layer.register_forward_hook(hidden),
            attn.o_proj.register_forward_pre_hook(o_in),
            attn.register_forward_hook(probs),
        ]
    try:
        yield offset
    finally:
        for handle in handles:
            handle.remove()


def _read(side: _Side, ids: torch.Tensor, module_hooks: ExitStack | None = None) -> _Trace:
    model = side.model
    device = model.get_input_embeddings().weight.device
    ids = ids.to(device)
    n_layers = len(model.model.layers)
    total = ids.shape[1]
    hidden: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    o_input: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    probs: list = []
    logits = []
    with (
        ExitStack() as stack,
        _hooks(model, hidden, o_input, probs, total) as offset,
        eager_attention(model),
        torch.inference_mode(),
    ):
        if side.cache_factory is None:
            logits.append(model(input_ids=ids, use_cache=False).logits[0])
        else:
            # One token per forward is a few small products: on a shared 2-core CPU, torch's
            # second thread mostly waits at barriers (measured 3-4x slower than one thread).
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            stack.callback(torch.set_num_threads, threads)
            cache = side.cache_factory(model.config)
            for t in range(total):
                offset[0] = t
                out = model(
                    input_ids=ids[:, t : t + 1],
                    past_key_values=cache,
                    use_cache=True,
                    cache_position=torch.tensor([t], device=device),
                )
                logits.append(out.logits[0])
    return _Trace(
        hidden=[torch.cat(h) for h in hidden],
        o_input=[torch.cat(o) for o in o_input],
        probs=probs,
        log_probs=torch.log_softmax(torch.cat(logits).float().cpu(), dim=-1),
    )


# --- comparisons ---------------------------------------------------------------------------


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) at each row, nats."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _lens(model, hidden: torch.Tensor) -> torch.Tensor:
    """The logit lens: a residual stream through the model's own final norm and lm_head."""
    norm, head = model.model.norm, model.get_output_embeddings()
    weight = head.weight
    x = hidden.to(weight.device)
    with torch.inference_mode():
        x = norm(x.to(next(norm.parameters()).dtype))
        return torch.log_softmax(head(x).float().cpu(), dim=-1)


def _layer_rows(a: _Side, b: _Side, ta: _Trace, tb: _Trace) -> pd.DataFrame:
    rows = []
    last = len(ta.hidden) - 1
    for layer, (ha, hb) in enumerate(zip(ta.hidden, tb.hidden)):
        if layer == last:
            kl = _kl_rows(ta.log_probs, tb.log_probs)
        else:
            kl = _kl_rows(_lens(a.model, ha), _lens(b.model, hb))
        cosine = torch.nn.functional.cosine_similarity(ha, hb, dim=-1)
        difference = (hb - ha).norm(dim=-1) / ha.norm(dim=-1).clamp(min=1e-12)
        rows.append(
            {
                "layer": layer,
                "logit_lens_kl": float(kl.mean()),
                "cosine": float(cosine.mean()),
                "relative_difference": float(difference.mean()),
            }
        )
    return pd.DataFrame(rows, columns=["layer", "logit_lens_kl", "cosine", "relative_difference"])


def _js_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence of each row pair, in bits (0: same pattern, 1: disjoint)."""
    m = 0.5 * (p + q)

    def kl(x, y):
        return torch.where(x > 0, x * (x.clamp(min=1e-30).log() - y.clamp(min=1e-30).log()), 0.0).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)) / LN2


def _contributions(o_proj: nn.Module, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """What each head writes to the residual stream, [heads, T, hidden]: o_proj of that head's
    input slice alone (the bias, o_proj of zeros, taken off), all heads in one product."""
    tokens, width = x.shape
    heads = width // head_dim
    masked = torch.zeros(heads, tokens, heads, head_dim, dtype=x.dtype, device=x.device)
    index = torch.arange(heads, device=x.device)
    masked[index, :, index, :] = x.view(tokens, heads, head_dim).transpose(0, 1)
    with torch.inference_mode():
        return (o_proj(masked.view(heads, tokens, width)) - o_proj(torch.zeros_like(x[:1]))).float().cpu()


def _relative_errors(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    return (got - expected).flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1).clamp(min=1e-12)


def _mean_js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per head, the JS divergence of the patterns averaged over queries 1..T-1 (query 0 can
    only attend to itself)."""
    if p.shape[1] < 2:
        return torch.zeros(p.shape[0])
    return _js_bits(p[:, 1:], q[:, 1:]).mean(-1)


def _head_rows(a: _Side, b: _Side, ta: _Trace, tb: _Trace, own: _Own | None) -> pd.DataFrame:
    rows = []
    attns_a, attns_b = attention_layers(a.model), attention_layers(b.model)
    for layer, (attn_a, attn_b) in enumerate(zip(attns_a, attns_b)):
        gs, hd = attn_a.num_key_value_groups, attn_a.head_dim
        kept_a, kept_b = a.kept[layer], b.kept[layer]
        n_groups = getattr(a.model.config, "num_key_value_heads", None) or kv_groups(attn_a)
        heads = [(g, h) for g in range(n_groups) for h in range(g * gs, (g + 1) * gs)]
        if kept_a is None or kept_b is None:
            status = {h: "unmatched" for _, h in heads}
        else:
            status = {h: "kept" if g in kept_a and g in kept_b else "removed" for g, h in heads}
        both = [(g, h) for g, h in heads if status[h] == "kept"]
        measured: dict[int, dict[str, float]] = {}
        if both:
            ia = torch.tensor([kept_a.index(g) * gs + h % gs for g, h in both])  # type: ignore[union-attr]
            ib = torch.tensor([kept_b.index(g) * gs + h % gs for g, h in both])  # type: ignore[union-attr]
            pb = tb.probs[layer][ib]
            ca = _contributions(attn_a.o_proj, ta.o_input[layer], hd)[ia]
            cb = _contributions(attn_b.o_proj, tb.o_input[layer], hd)[ib]
            columns = {"pattern_js": _mean_js(ta.probs[layer][ia], pb), "output_error": _relative_errors(cb, ca)}
            if own is not None and layer in own.probs:
                co = _contributions(attn_a.o_proj, own.o_input[layer], hd)[ia]
                columns |= {"own_pattern_js": _mean_js(own.probs[layer][ia], pb), "own_error": _relative_errors(cb, co)}
            measured = {h: {k: float(v[i]) for k, v in columns.items()} for i, (_, h) in enumerate(both)}
        for g, h in heads:
            values = {k: measured.get(h, {}).get(k, math.nan) for k in HEAD_MEASURES}
            rows.append({"layer": layer, "head": h, "group": g, "status": status[h], **values})
    return pd.DataFrame(rows, columns=["layer", "head", "group", "status", *HEAD_MEASURES])


def _linear_names(model) -> dict[str, nn.Linear]:
    """The linear layers of the decoder blocks and lm_head, by name."""
    out = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in name}
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        out["lm_head"] = head
    return out


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def _reference(name: str, original: nn.Linear, compressed: nn.Linear, a: _Side, b: _Side):
    """The original module as a function on the compressed module's input, or None when they
    cannot be compared (a pruned projection whose surviving rows are unknown, or a module of
    the original that is itself not a plain linear layer but has a different shape)."""
    if (original.in_features, original.out_features) == (compressed.in_features, compressed.out_features):
        return original
    layer, proj = _layer_of(name), name.rsplit(".", 1)[-1]
    if layer is None or proj not in ("q_proj", "k_proj", "v_proj", "o_proj") or type(original) is not nn.Linear:
        return None
    kept_b = b.kept[layer]
    if kept_b is None or a.kept[layer] != list(range(len(a.kept[layer] or []))):
        return None
    attn = attention_layers(b.model)[layer]
    hd, gs = attn.head_dim, attn.num_key_value_groups
    width = gs * hd if proj in ("q_proj", "o_proj") else hd
    index = torch.tensor([g * width + i for g in kept_b for i in range(width)], device=original.weight.device)
    dim = 1 if proj == "o_proj" else 0
    weight = original.weight.detach().index_select(dim, index)
    bias: torch.Tensor | None = original.bias
    if bias is not None and dim == 0:
        bias = bias.detach().index_select(0, index)
    return lambda x: torch.nn.functional.linear(x, weight, bias)


def _module_hooks(a: _Side, b: _Side, stack: ExitStack) -> dict[str, dict]:
    """Hooks on the compressed model's linear layers that run the original's module on the
    same input and add up the squared error; the totals fill in as the compressed model reads."""
    originals = _linear_names(a.model)
    totals: dict[str, dict] = {}
    for name, module in _linear_names(b.model).items():
        if name not in originals:
            continue
        reference = _reference(name, originals[name], module, a, b)
        if reference is None:
            continue
        ref_dtype = originals[name].weight.dtype if originals[name].weight.is_floating_point() else torch.float32
        kind = f"{type(module).__name__} / {str(module.weight.dtype).removeprefix('torch.')}"
        totals[name] = {"kind": kind, "error": 0.0, "signal": 0.0}

        def hook(mod, args, output, name=name, reference=reference, ref_dtype=ref_dtype):
            x = args[0]
            ref_device = originals[name].weight.device
            with torch.inference_mode():
                expected = reference(x.to(ref_device, ref_dtype)).double().cpu()
            got = output.double().cpu()
            totals[name]["error"] += float(((got - expected) ** 2).sum())
            totals[name]["signal"] += float((expected**2).sum())

        handle = module.register_forward_hook(hook)
        stack.callback(handle.remove)
    return totals


@dataclass
class _Own:
    """The original's attention run on the compressed model's own layer inputs, per layer."""

    o_input: dict[int, torch.Tensor] = field(default_factory=dict)
    probs: dict[int, torch.Tensor] = field(default_factory=dict)


def _cast(value, device, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(device, dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, device, dtype) for v in value)
    return value


def _own_hooks(a: _Side, b: _Side, stack: ExitStack) -> _Own:
    """Hooks on the compressed model's attention modules that run the original's attention of
    the same layer on the same input (one full forward only: a token-by-token read would hand
    the original the compressed model's cache)."""
    own = _Own()
    attns_a = attention_layers(a.model)
    weight = a.model.get_input_embeddings().weight
    stack.enter_context(eager_attention(a.model))
    for layer, attn_b in enumerate(attention_layers(b.model)):
        attn_a = attns_a[layer]

        def run_original(module, args, kwargs, output, layer=layer, attn_a=attn_a):
            seen: list[torch.Tensor] = []
            handle = attn_a.o_proj.register_forward_pre_hook(lambda m, x: seen.append(x[0][0].detach()))
            try:
                with torch.inference_mode():
                    out = attn_a(
                        *_cast(args, weight.device, weight.dtype),
                        **{k: _cast(v, weight.device, weight.dtype) for k, v in kwargs.items()},
                    )
            finally:
                handle.remove()
            own.o_input[layer] = seen[0]
            own.probs[layer] = out[1][0].detach().float().cpu()

        handle = attn_b.register_forward_hook(run_original, with_kwargs=True)
        stack.callback(handle.remove)
    return own


def _module_rows(totals: Mapping[str, dict]) -> pd.DataFrame:
    rows = []
    for name, t in totals.items():
        relative = t["error"] / t["signal"] if t["signal"] else math.nan
        rows.append(
            {
                "module": name,
                "layer": _layer_of(name),
                "kind": t["kind"],
                "relative_mse": relative,
                "sqnr_db": -10 * math.log10(relative) if relative > 0 else math.inf,
            }
        )
    frame = pd.DataFrame(rows, columns=["module", "layer", "kind", "relative_mse", "sqnr_db"])
    frame["layer"] = frame["layer"].astype("Int64")
    return frame


def _position_rows(tokens: list[str], ta: _Trace, tb: _Trace) -> pd.DataFrame:
    kl = _kl_rows(ta.log_probs, tb.log_probs)
    agree = ta.log_probs.argmax(-1) == tb.log_probs.argmax(-1)
    return pd.DataFrame(
        {"position": range(len(tokens)), "token": tokens, "kl": kl.numpy(), "top1_agree": agree.numpy()}
    )


# --- the entry point -----------------------------------------------------------------------


def _token_ids(tokenizer, text: str | list[int], max_tokens: int | None) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if isinstance(text, str) else list(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the text must be at least 2 tokens long")
    return torch.tensor([ids])


def _check_same_shape(a, b) -> None:
    ca, cb = a.config, b.config
    for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if getattr(ca, key, None) != getattr(cb, key, None):
            raise ValueError(
                f"the two models differ in {key} ({getattr(ca, key, None)} against {getattr(cb, key, None)}): "
                "a layer-by-layer map needs the same architecture (compression keeps it; pruning heads only "
                "narrows the attention)"
            )


def divergence_map(
    original: Session | nn.Module,
    compressed: Session | nn.Module | str | Any,
    text: str | list[int],
    *,
    max_tokens: int | None = 256,
    tokenizer=None,
) -> DivergenceMap:
    """The map of where `compressed` parts from `original` on `text` (a string, tokenized
    without special tokens, or token ids), first `max_tokens` tokens.

    `compressed` may also be a config (a path, `WorkbenchConfig` or source string), which is
    loaded here; sessions carry their prune record (for the head numbering) and KV-cache
    policy, a bare transformers model neither. `tokenizer` is needed only when neither
    argument is a session."""
    if not isinstance(compressed, (Session, nn.Module)):
        compressed = load(compressed, quiet=True)
    a, b = _side(original, "original"), _side(compressed, "compressed")
    _check_same_shape(a.model, b.model)
    tok = tokenizer or next((s.tokenizer for s in (original, compressed) if isinstance(s, Session)), None)
    if tok is None:
        raise ValueError("give a tokenizer: neither model is a Session that carries one")
    ids = _token_ids(tok, text, max_tokens)
    trace_a = _read(a, ids)
    with ExitStack() as stack:
        totals = _module_hooks(a, b, stack)
        own = _own_hooks(a, b, stack) if b.cache_factory is None and a.cache_factory is None else None
        trace_b = _read(b, ids)
    tokens = [str(tok.decode([t])) for t in ids[0].tolist()]
    kl = _kl_rows(trace_a.log_probs, trace_b.log_probs).double()
    agree = (trace_a.log_probs.argmax(-1) == trace_b.log_probs.argmax(-1)).double()
    return DivergenceMap(
        tokens=tokens,
        layers=_layer_rows(a, b, trace_a, trace_b),
        heads=_head_rows(a, b, trace_a, trace_b, own),
        modules=_module_rows(totals),
        positions=_position_rows(tokens, trace_a, trace_b),
        output={
            "kl_mean": float(kl.mean()),
            "kl_p99": float(torch.quantile(kl, 0.99)),
            "kl_max": float(kl.max()),
            "top1_agreement": float(agree.mean()),
            "tokens": len(tokens),
        },
    )
