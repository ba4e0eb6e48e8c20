"""The `recover` step: heal a head-pruned model by distillation from the unpruned one.

Pruning removes capacity the rest of the network was trained to rely on; a short
distillation run teaches the remaining weights to reproduce the unpruned model's next-token
distribution (Minitron and Sheared-LLaMA recover this way; LLM-Pruner with LoRA). The
teacher is the model as loaded, before any step: the pipeline keeps a copy of it when a
config lists `recover`. The loss is the KL divergence of the student's from the teacher's
token distribution at temperature T (x T^2, as in Hinton et al., so the gradient scale does
not depend on T), on every position of windows drawn from the teacher's own chat replies, its
sampled continuations of varied openings and the step's calibration text (recovery_data.py;
`calibration:`, calibration.py).

Two ways to train: `lora` (peft adapters on the chosen linear layers, merged into the weights
at the end, so the result is a plain pruned model) or `attention` (the q/k/v/o weights of
every layer trained fully). Perplexity and KL to the teacher on held-out texts (`eval_texts`:
the reference text and fiction by default) are measured every `eval_every` steps and the best
state is kept, so a run that starts to fit its corpus rather than the model ends at its best
point. Those windows are the last of each text; quality.perplexity and the benches judge the
first ones.

`adapter: DIR` loads a trained LoRA instead of training (seconds): the folder records which
model and which pruned shapes it was trained on and refuses any other. `save_adapter: DIR`
writes one. A LoRA adapter is small (fp16 safetensors), which is how the embedded model's
recovery is shipped (data/recovery/pruned-25).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from workbench.compress import recovery_data as rd
from workbench.compress.calibration import resolve
from workbench.data import held_out_texts
from workbench.metrics import token_windows
from workbench.models.adapters import check_adapter, load_adapter, load_base, load_lora, save_adapter
from workbench.models.anatomy import attention_layers, pruned_shape
from workbench.paths import cache_root, resolve_path
from workbench.step_options import RecoverOptions

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class RecoverReport:
    step: str
    mode: str
    steps: int = 0
    best_step: int = 0
    seconds: float = 0.0
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    kl_before: float | None = None
    kl_after: float | None = None
    """held-out KL(teacher || student) per token, at the start and for the state kept; perplexity
    is the geometric mean over the held-out texts, KL their mean (what `keep` compares)"""
    held_out: dict[str, dict] = field(default_factory=dict)
    """per held-out text: {"perplexity_before", "perplexity_after", "kl_before", "kl_after"}"""
    history: list[dict] = field(default_factory=list)
    """[{"step", "loss", "perplexity", "kl", "texts": {text: {"perplexity", "kl"}}}] at every evaluation"""
    adapter: str | None = None
    trainable_params: int = 0
    calibration: dict | None = None
    """which calibration data the training windows were drawn from (Calibration.record)"""


# --- training ----------------------------------------------------------------------------------


def _windows(tokenizer, texts: list[str], window: int, count: int, device) -> list[torch.Tensor]:
    """The last `count` whole windows of the texts (the first ones are what the benches score)."""
    chunks = token_windows(tokenizer, texts, window=window, max_windows=None)
    chunks = ([c for c in chunks if len(c) == window] or chunks)[-count:]
    return [c.to(device)[None] for c in chunks]


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per token at temperature T, scaled by T^2."""
    t = temperature
    log_p_teacher = torch.log_softmax(teacher_logits.float() / t, dim=-1)
    log_p_student = torch.log_softmax(student_logits.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return kl.mean() * t * t


def held_out_kl(
    student, teacher, tokenizer, texts: list[str], *, window: int = 256, windows: int = 4, temperature: float = 1.0
) -> float:
    """Mean token KL(teacher || student) over the first windows of `texts`."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    chunks = [ids[i : i + window] for i in range(0, len(ids) - 1, window)][:windows]
    device = student.get_input_embeddings().weight.device
    total = 0.0
    with torch.inference_mode():
        for chunk in chunks:
            chunk = chunk.to(device)[None]
            total += float(kl_loss(student(input_ids=chunk).logits, teacher(input_ids=chunk).logits, temperature))
    return total / len(chunks)


@contextlib.contextmanager
def _threads(n: int | None):
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _trainable(model, opts: RecoverOptions):
    """(the module to call, its trainable parameters, the peft wrapper or None)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if opts.train == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=opts.rank,
            lora_alpha=opts.alpha or 2 * opts.rank,  # type: ignore[arg-type]  # peft says int; a float scales alike
            lora_dropout=opts.dropout,
            target_modules=list(opts.targets),
            bias="none",
            init_lora_weights=True,
        )
        peft_model = get_peft_model(model, lora)
        if opts.resume is not None:
            load_lora(peft_model, resolve_path(opts.resume), torch.float32)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        return peft_model, params, peft_model
    params = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ATTENTION and isinstance(module, torch.nn.Linear):
            for p in module.parameters():
                p.requires_grad_(True)
                params.append(p)
    return model, params, None


def _schedule(step: int, opts: RecoverOptions) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < opts.warmup:
        return (step + 1) / opts.warmup
    progress = (step - opts.warmup) / max(opts.steps - opts.warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def train(
    student,
    teacher,
    tokenizer,
    opts: RecoverOptions,
    *,
    calibration: list[str],
    evaluation: dict[str, list[str]],
    progress: bool = True,
) -> tuple[RecoverReport, Any]:
    """Distil `teacher` into `student` in place; returns the report and the peft wrapper (lora; else None)."""
    report = RecoverReport(step="recover", mode=opts.train)
    start = time.perf_counter()
    torch.manual_seed(opts.seed)
    device = student.get_input_embeddings().weight.device
    bf16 = device.type == "cuda" if opts.bf16 is None else opts.bf16
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    cache = Path(opts.cache_dir).expanduser() if opts.cache_dir else _default_cache()
    chats = rd.load_prompts(resolve_path(opts.prompts) if opts.prompts else None) if opts.calibration_share < 1 else []
    replies = (
        rd.teacher_replies(teacher, tokenizer, chats, max_tokens=opts.reply_tokens, cache_dir=cache, progress=progress)
        if chats
        else []
    )
    openings = rd.load_openings(resolve_path(opts.openings) if opts.openings else None) if opts.sample_share > 0 else []
    samples = (
        rd.teacher_samples(
            teacher,
            tokenizer,
            openings,
            per_opening=opts.samples_per_opening,
            max_tokens=opts.sample_tokens,
            seed=opts.seed,
            cache_dir=cache,
            progress=progress,
        )
        if openings
        else []
    )
    data = rd.Mixture(
        rd.chat_stream(tokenizer, chats, replies),
        rd.text_stream(tokenizer, calibration),
        opts.seq_len,
        opts.calibration_share,
        opts.seed,
        samples=rd.text_stream(tokenizer, samples) if samples else None,
        sample_share=opts.sample_share,
    )

    windows = {name: _windows(tokenizer, texts, 512, opts.eval_windows, device) for name, texts in evaluation.items()}

    def evaluate(model) -> dict[str, tuple[float, float]]:
        """Per held-out text: perplexity and KL to the teacher, from one forward of each model
        per window."""
        model.eval()
        out = {}
        with torch.inference_mode():
            for name, text_windows in windows.items():
                nll, kl, tokens = 0.0, 0.0, 0
                for w in text_windows:
                    student_logits = model(input_ids=w, use_cache=False).logits.float()
                    n = w.shape[1] - 1
                    nll += float(torch.nn.functional.cross_entropy(student_logits[0, :-1], w[0, 1:], reduction="sum"))
                    teacher_logits = teacher(input_ids=w, use_cache=False).logits
                    kl += float(kl_loss(student_logits, teacher_logits, opts.temperature)) * n
                    tokens += n
                out[name] = (math.exp(nll / tokens), kl / tokens)
        return out

    def overall(result: dict[str, tuple[float, float]]) -> tuple[float, float]:
        """(geometric mean perplexity, mean KL) over the held-out texts."""
        ppl = math.exp(sum(math.log(p) for p, _ in result.values()) / len(result))
        return ppl, sum(k for _, k in result.values()) / len(result)

    def score(result: dict[str, tuple[float, float]]) -> float:
        ppl, kl = overall(result)
        return {"perplexity": ppl, "kl": kl, "last": 0.0}[opts.keep]

    module, params, peft_model = _trainable(student, opts)
    first = evaluate(module)  # where training starts: a resumed LoRA counts, a new one adds zero
    report.perplexity_before, report.kl_before = overall(first)
    report.held_out = {
        name: {"perplexity_before": round(p, 4), "kl_before": round(k, 5)} for name, (p, k) in first.items()
    }
    kept = first
    report.trainable_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=opts.peak_lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, opts))
    best = score(first)
    best_state, running = _snapshot(params), []
    report.perplexity_after, report.kl_after = report.perplexity_before, report.kl_before
    bar = tqdm(range(opts.steps), desc="recover", disable=not progress, file=sys.stderr)
    for step in bar:
        module.train()
        ids = data.batch(opts.batch).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            with torch.no_grad():
                target = teacher(input_ids=ids, use_cache=False).logits
            loss = kl_loss(module(input_ids=ids, use_cache=False).logits, target, opts.temperature)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.item())
        if (step + 1) % opts.eval_every == 0 or step + 1 == opts.steps:
            result = evaluate(module)
            ppl, kl = overall(result)
            mean_loss = sum(running) / len(running)
            running = []
            report.history.append(
                {
                    "step": step + 1,
                    "loss": round(mean_loss, 5),
                    "perplexity": round(ppl, 4),
                    "kl": round(kl, 5),
                    "texts": {n: {"perplexity": round(p, 4), "kl": round(k, 5)} for n, (p, k) in result.items()},
                }
            )
            if score(result) <= best:
                best, best_state, report.best_step, kept = score(result), _snapshot(params), step + 1, result
                report.perplexity_after, report.kl_after = ppl, kl
            bar.set_postfix(loss=f"{mean_loss:.4f}", **{n: f"{p:.2f}/{k:.3f}" for n, (p, k) in result.items()})
    with torch.no_grad():
        for p, saved in zip(params, best_state):
            p.copy_(saved)
    for p in params:
        p.requires_grad_(False)
    module.eval()
    for name, (p, k) in kept.items():
        report.held_out[name].update(perplexity_after=round(p, 4), kl_after=round(k, 5))
    report.steps = opts.steps
    report.seconds = round(time.perf_counter() - start, 1)
    return report, peft_model


def _default_cache() -> Path:
    return cache_root() / "recovery"


def recover(session, *, teacher=None, prune: dict | None = None, **options) -> RecoverReport:
    """The step. `teacher` (the unpruned model) and `prune` (the prune_heads report, recorded
    in a saved adapter) are passed by the pipeline; neither is a config option."""
    opts = RecoverOptions.model_validate(options)
    model = session.model
    if opts.adapter is not None:
        folder = resolve_path(opts.adapter)
        start = time.perf_counter()
        record = load_adapter(model, folder, (prune or {}).get("removed"))
        return RecoverReport(
            step="recover",
            mode="adapter",
            adapter=str(opts.adapter),
            seconds=round(time.perf_counter() - start, 2),
            perplexity_before=record.get("perplexity_before"),
            perplexity_after=record.get("perplexity_after"),
            held_out=record.get("held_out", {}),
        )
    if teacher is None:
        raise ValueError(
            "recover needs the unpruned model as its teacher: list it after prune_heads in a config's "
            "compression steps (the pipeline keeps a copy of the model as loaded), or pass teacher="
        )
    if pruned_shape(teacher) == pruned_shape(model):
        raise ValueError(
            "recover: the model has the same heads as its teacher; it heals a pruned model, so put prune_heads first"
        )
    calibration = resolve(session, opts.calibration, model=teacher) if opts.reads_calibration else None
    resumed = None
    if opts.resume is not None:
        folder = resolve_path(opts.resume)
        resumed = check_adapter(folder, model, (prune or {}).get("removed"))  # its shape and groups
        load_base(model, folder)
    base = pruned_o_proj(model, teacher) if opts.save_adapter is not None else None
    with _threads(opts.threads):
        report, peft_model = train(
            model,
            teacher,
            session.tokenizer,
            opts,
            calibration=calibration.texts if calibration is not None else [],
            evaluation={name: held_out_texts(name) for name in opts.eval_texts},
        )
        report.calibration = calibration.record() if calibration is not None else None
        if peft_model is not None:
            if opts.save_adapter is not None:
                record = {
                    "options": opts.model_dump(mode="json"),
                    "calibration_data": report.calibration,
                    # resumed: the groups and the base are the first stage's prune (this one only cut them)
                    "prune": (resumed.get("prune") if resumed is not None else prune) or {},
                    "perplexity_before": report.perplexity_before,
                    "perplexity_after": report.perplexity_after,
                    "held_out": report.held_out,
                    "best_step": report.best_step,
                    "seconds": report.seconds,
                    "history": report.history,
                }
                if resumed is not None:
                    record["resumed_from"] = {"adapter": opts.resume, **resumed}
                # peft records the path the model was read from (a cache or temporary folder of
                # the training machine) and warns when it differs at load; the source is what
                # names the model (recovery.json checks its shape).
                peft_model.peft_config["default"].base_model_name_or_path = session.loaded.source
                save_adapter(peft_model, model, resolve_path(opts.save_adapter), record, base)
                report.adapter = opts.save_adapter
            merged = peft_model.merge_and_unload()
            assert merged is model
    return report


def pruned_o_proj(model, teacher) -> dict[str, torch.Tensor]:
    """The o_proj weights of the layers pruning changed, as they are before training: the base
    a saved adapter carries (compensation refits them from calibration text; models/adapters.py)."""
    pruned = [i for i, (a, b) in enumerate(zip(pruned_shape(model), pruned_shape(teacher))) if a != b]
    names = {id(m): n for n, m in model.named_modules()}
    attns = attention_layers(model)
    return {f"{names[id(attns[i].o_proj)]}.weight": attns[i].o_proj.weight.detach().clone() for i in pruned}


def teacher_copy(model):
    """The model as loaded, frozen: what `recover` distils from."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
