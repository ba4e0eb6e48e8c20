"""Train the vision adapter for a frozen text-only language model, then score it.

    python -m workbench.modalities.train_adapter [--out data/vision-adapter] [--images N]
        [--seed S] [--epochs E] [--steps T] [--model SOURCE] [--quick]
    python -m workbench.modalities.train_adapter --eval-only data/vision-adapter

No pretrained ViT can be downloaded, and the CPU budget is minutes, so training is staged:

1. the ViT learns to see: supervised classification of everything the generated pictures
   show (colour, shape, side, height, count) through small linear heads on the image
   tokens, so the tokens themselves carry the answers. Every epoch draws new pictures.
   No language model.
2. the projector learns to speak: the ViT is frozen and its token features are computed
   once; the projector is trained through the frozen language model (eval mode, no
   gradients for its weights) with next-token loss on the answer tokens only, in exactly
   the prompt format the engine uses. The system-prompt prefix does not depend on the
   picture, so its KV cache is computed once and reused by every step.

Held-out scoring generates greedily from pictures drawn with a different seed.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from workbench.modalities import shapes
from workbench.modalities.adapter import (
    IMAGE_SENTINEL,
    AdapterConfig,
    VisionAdapter,
    build_inputs,
    chat_prompt,
    shipped_adapter_dir,
)

HEADS = {
    "colour": len(shapes.COLOURS),
    "shape": len(shapes.SHAPES),
    "x": 2,
    "y": 2,
    "count": len(shapes.COUNTS),
}
VISION_QTYPES = ("colour", "shape", "position", "count")
VISION_SEED_STRIDE = 7919  # epoch e draws from seed + e * 7919: far from the held-out seed + 1000
EVAL_SEED_OFFSET = 1000


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --- stage 1: the ViT learns to see ---------------------------------------------------


class Probe(nn.Module):
    """Linear heads, one per attribute, over the image tokens' mean and the tokens themselves
    (training only): the mean path learns what a picture holds from every token alike, the
    per-token path lets each query specialise.
    """

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.vit_hidden_size)
        width = (config.n_tokens + 1) * config.vit_hidden_size
        self.heads = nn.ModuleDict({name: nn.Linear(width, n) for name, n in HEADS.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.norm(features)
        flat = torch.cat([tokens.mean(1), tokens.flatten(1)], dim=1)
        return {name: head(flat) for name, head in self.heads.items()}


def _label_tensor(items: list[shapes.Item]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([item.labels.get(name, -100) for item in items]) for name in HEADS}


def vision_pictures(n: int, seed: int, epoch: int) -> list[shapes.Item]:
    """Epoch ``epoch``'s stage-1 pictures: a fresh draw each epoch, still fixed by ``seed``.

    Drawing costs well under a second per thousand pictures, so every epoch sees new
    pictures and the ViT cannot memorise where particular shapes sat (with one fixed set it
    did: 80% of shapes right in training, 65% held out). Pictures of words are left out:
    the ViT does not learn to read in a CPU budget, and their steps taught shapes.
    """
    return shapes.generate(n, seed + epoch * VISION_SEED_STRIDE, VISION_QTYPES)


def train_vision(
    adapter: VisionAdapter, images: int, epochs: int, batch: int, lr: float, seed: int, bf16: bool
) -> dict[str, float]:
    probe = Probe(adapter.config)
    projector = {id(p) for p in adapter.projector.parameters()}
    params = [p for p in adapter.parameters() if id(p) not in projector] + list(probe.parameters())
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, images // batch)
    total = epochs * steps_per_epoch
    adapter.train()
    correct: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    step = 0
    bar = tqdm(total=total, desc="stage 1: ViT", unit="step", dynamic_ncols=True)
    for epoch in range(epochs):
        items = vision_pictures(images, seed, epoch)
        pixels, labels = _to_pixels(adapter, items), _label_tensor(items)
        order = torch.randperm(len(items), generator=generator)
        for i in range(steps_per_epoch):
            index = order[i * batch : (i + 1) * batch]
            for group in optimiser.param_groups:
                group["lr"] = _lr(step, total, lr, warmup=max(1, total // 20))
            with _autocast(bf16):
                logits = probe(adapter.features(pixels[index].float()))
            loss = cast(
                torch.Tensor,
                sum(
                    F.cross_entropy(logits[name].float(), labels[name][index], ignore_index=-100)
                    for name in HEADS
                    if (labels[name][index] != -100).any()
                ),
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            if epoch == epochs - 1:  # training accuracy of the last epoch, as a sanity check
                for name in HEADS:
                    mask = labels[name][index] != -100
                    hits = (logits[name].argmax(-1)[mask] == labels[name][index][mask]).sum()
                    correct[name][0] += int(hits)
                    correct[name][1] += int(mask.sum())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch + 1)
    bar.close()
    adapter.eval()
    return {name: round(hit / seen, 4) for name, (hit, seen) in correct.items() if seen}


# --- stage 2: the projector learns to speak -------------------------------------------


def caption_words(item: shapes.Item, n_tokens: int) -> list[str]:
    """The words the image tokens should start out meaning, one per token.

    A frozen chat model already answers "What colour is the shape?" from the words
    "red star left top" in its prompt; starting the projector at those words' embeddings
    leaves the language-model stage only the answer format to learn, which a few hundred
    CPU steps can do, where learning the whole mapping from noise could not.
    """
    labels = item.labels
    if "colour" in labels:
        words = [
            list(shapes.COLOURS)[labels["colour"]],
            shapes.SHAPES[labels["shape"]],
            "right" if labels["x"] else "left",
            "bottom" if labels["y"] else "top",
        ]
    elif "count" in labels:
        words = [str(shapes.COUNTS[labels["count"]])]
    else:
        words = [shapes.WORDS[labels["word"]]]
    return [words[i % len(words)] for i in range(n_tokens)]


def warm_start_projector(
    adapter: VisionAdapter,
    embed: nn.Module,
    tokenizer,
    items: list[shapes.Item],
    features: torch.Tensor,
    steps: int,
    seed: int,
) -> float:
    """Regress the projector onto caption-word embeddings (no language model: seconds)."""
    cache: dict[str, torch.Tensor] = {}

    def word_embedding(word: str) -> torch.Tensor:
        if word not in cache:
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                cache[word] = embed(torch.tensor(ids)).float().mean(0)
        return cache[word]

    n_tokens = adapter.n_tokens
    targets = torch.stack([torch.stack([word_embedding(w) for w in caption_words(item, n_tokens)]) for item in items])
    scale = cast(torch.Tensor, embed.weight).float().std().item()
    optimiser = torch.optim.AdamW(adapter.projector.parameters(), lr=2e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for step in tqdm(range(steps), desc="stage 2a: warm start", unit="step", dynamic_ncols=True):
        for group in optimiser.param_groups:
            group["lr"] = _lr(step, steps, 2e-3, warmup=max(1, steps // 20))
        index = torch.randint(0, len(items), (256,), generator=generator)
        loss = F.mse_loss(adapter.project(features[index]) / scale, targets[index] / scale)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return round(loss.item(), 4)


class _Prefix:
    """The prompt text before the first image: the same for every example, cached once."""

    def __init__(self, model, tokenizer, embed: nn.Module):
        text = chat_prompt(tokenizer, "?")
        self.text = text.split(IMAGE_SENTINEL)[0]
        self.ids = tokenizer(self.text, add_special_tokens=False)["input_ids"] if self.text else []
        self.cache = None
        if self.ids:
            with torch.no_grad():
                out = model.model(inputs_embeds=embed(torch.tensor([self.ids])), use_cache=True)
            self.cache = out.past_key_values

    def for_batch(self, batch: int):
        if self.cache is None:
            return None
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch)
        return cache


def _answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]


def train_projector(
    adapter: VisionAdapter,
    session,
    items: list[shapes.Item],
    features: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    bf16: bool,
) -> list[float]:
    model, tokenizer = session.model, session.tokenizer
    embed = model.get_input_embeddings()
    prefix = _Prefix(model, tokenizer, embed)
    prompts = {}
    for item in items:
        if item.question not in prompts:
            prompts[item.question] = chat_prompt(tokenizer, item.question)
    answers = {item.answer: _answer_ids(tokenizer, item.answer) for item in items}
    optimiser = torch.optim.AdamW(adapter.projector.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    pad = embed.weight.new_zeros(embed.weight.shape[1])
    losses: list[float] = []
    adapter.projector.train()
    bar = tqdm(range(steps), desc="stage 2: projector", unit="step", dynamic_ncols=True)
    for step in bar:
        for group in optimiser.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup=max(1, steps // 20))
        index = [rng.randrange(len(items)) for _ in range(batch)]
        with _autocast(bf16):
            image_embeds = adapter.project(features[index].float())
        rows, targets, starts = [], [], []
        for row, i in enumerate(index):
            item = items[i]
            ids, embeds = build_inputs(tokenizer, embed, prompts[item.question], [image_embeds[row]])
            if ids[: len(prefix.ids)] != prefix.ids:
                raise RuntimeError("the prompt prefix differs between examples; cannot cache it")
            target = answers[item.answer]
            with torch.no_grad():
                answer_embeds = embed(torch.tensor(target))
            suffix = embeds[0, len(prefix.ids) :]
            rows.append(torch.cat([suffix, answer_embeds.to(suffix.dtype)]))
            starts.append(suffix.shape[0] - 1)  # the position whose logits predict target[0]
            targets.append(target)
        width = max(r.shape[0] for r in rows)
        # Right padding: under causal attention no real position ever sees a pad.
        inputs = torch.stack([torch.cat([r, pad.expand(width - r.shape[0], -1)]) for r in rows])
        with _autocast(bf16):
            hidden = model.model(
                inputs_embeds=inputs, past_key_values=prefix.for_batch(batch), use_cache=True
            ).last_hidden_state
            picked = torch.cat([hidden[row, s : s + len(t)] for row, (s, t) in enumerate(zip(starts, targets))])
            logits = model.lm_head(picked).float()
        gold = torch.tensor([token for t in targets for token in t])
        loss = F.cross_entropy(logits, gold)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.projector.parameters(), 1.0)
        optimiser.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    adapter.projector.eval()
    return losses


# --- held-out scoring -----------------------------------------------------------------


def normalise(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def is_correct(prediction: str, answer: str) -> bool:
    """The canonical answer is the first word or appears as a word (numbers also as words)."""
    words = normalise(prediction)
    accepted = {answer.lower()}
    if answer.isdigit() and int(answer) in shapes.NUMBER_WORDS:
        accepted.add(shapes.NUMBER_WORDS[int(answer)])
    return bool(words) and (words[0] in accepted or bool(accepted & set(words)))


@torch.no_grad()
def answer_questions(
    adapter: VisionAdapter, session, images, questions: list[str], max_new_tokens: int = 8, batch: int = 16
) -> list[str]:
    """Greedy answers, one image per question, through ``build_inputs`` and the model."""
    model, tokenizer = session.model, session.tokenizer
    embed = model.get_input_embeddings()
    eos = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[str] = []
    for start in range(0, len(questions), batch):
        chunk = list(range(start, min(start + batch, len(questions))))
        image_embeds = adapter.encode([images[i] for i in chunk])
        rows = [
            build_inputs(tokenizer, embed, chat_prompt(tokenizer, questions[i]), [image_embeds[j]])[1][0]
            for j, i in enumerate(chunk)
        ]
        width = max(r.shape[0] for r in rows)
        # Left padding with a zero mask, so every row's last position is its real last token.
        inputs = torch.stack([torch.cat([r.new_zeros(width - r.shape[0], r.shape[1]), r]) for r in rows])
        mask = torch.stack(
            [
                torch.cat([torch.zeros(width - r.shape[0], dtype=torch.long), torch.ones(r.shape[0], dtype=torch.long)])
                for r in rows
            ]
        )
        generated = model.generate(
            inputs_embeds=inputs,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=eos,
        )
        for sequence in generated:
            out.append(tokenizer.decode(sequence, skip_special_tokens=True).strip())
    return out


def evaluate(
    adapter: VisionAdapter, session, n: int, seed: int, show: int = 0
) -> tuple[dict[str, dict[str, float]], list[tuple[str, str, str, bool]]]:
    items = shapes.generate(n, seed)
    predictions = []
    for start in tqdm(range(0, n, 50), desc="held-out", unit="chunk", dynamic_ncols=True):
        chunk = items[start : start + 50]
        predictions += answer_questions(adapter, session, [i.image for i in chunk], [i.question for i in chunk])
    per_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    rows = []
    for item, prediction in zip(items, predictions):
        ok = is_correct(prediction, item.answer)
        per_type[item.qtype][0] += int(ok)
        per_type[item.qtype][1] += 1
        rows.append((item.question, item.answer, prediction, ok))
    table = {
        qtype: {"accuracy": round(hit / seen, 4), "correct": hit, "items": seen}
        for qtype, (hit, seen) in sorted(per_type.items(), key=lambda kv: shapes.QUESTION_TYPES.index(kv[0]))
    }
    hit = sum(v["correct"] for v in table.values())
    table["all"] = {"accuracy": round(hit / max(1, n), 4), "correct": hit, "items": n}
    return table, rows[:show]


def print_table(table: dict[str, dict[str, float]]) -> None:
    print(f"{'question type':<14} {'accuracy':>8} {'correct':>8} {'items':>6}")
    for qtype, row in table.items():
        print(f"{qtype:<14} {row['accuracy'] * 100:7.1f}% {row['correct']:>8} {row['items']:>6}")


# --- the command ----------------------------------------------------------------------


def _load_session(source: str | None):
    import workbench

    return workbench.load(source, quiet=True) if source else workbench.load(quiet=True)


def _freeze(model) -> None:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def _model_name(session, source: str | None) -> str:
    loaded = getattr(session, "loaded", None)
    return getattr(loaded, "source", None) or source or "embedded:smollm2-135m-instruct"


def _to_pixels(adapter: VisionAdapter, items: list[shapes.Item], chunk: int = 512) -> torch.Tensor:
    # bfloat16 halves the memory of the cached pixel set; the ViT runs under bf16 autocast anyway.
    return torch.cat(
        [
            adapter.preprocess([i.image for i in items[s : s + chunk]]).to(torch.bfloat16)
            for s in range(0, len(items), chunk)
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workbench.modalities.train_adapter", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="adapter folder to write (default: the shipped data/vision-adapter)"
    )
    parser.add_argument(
        "--model", default=None, help="language model source (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help="generated pictures per stage-1 epoch (one question each; stage 2 uses epoch 0's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="stage 1 (ViT) epochs over the pictures")
    parser.add_argument("--steps", type=int, default=None, help="stage 2 (projector) steps")
    parser.add_argument("--batch", type=int, default=None, help="stage 2 batch size")
    parser.add_argument("--eval-items", type=int, default=None, help="held-out questions (seed + 1000)")
    parser.add_argument(
        "--eval-only",
        type=Path,
        default=None,
        metavar="PATH",
        help="re-score a saved adapter and update its config.json",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (well under a minute)")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 (bf16 autocast is the default on CPU)")
    # One thread by default: on a CPU shared with other jobs, two threads that wait on each
    # other at every barrier ran the ViT step 7x slower than one thread did (measured).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)  # callers in the same process (tests) keep theirs


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    bf16 = not args.no_bf16

    quick = args.quick
    images = args.images or (120 if quick else 12000)
    epochs = args.epochs or (1 if quick else 8)
    steps = args.steps or (4 if quick else 600)
    batch = args.batch or (4 if quick else 16)
    eval_items = args.eval_items or (10 if quick else 300)

    session = _load_session(args.model)
    _freeze(session.model)
    lm_hidden = session.model.get_input_embeddings().weight.shape[1]

    if args.eval_only:
        adapter = VisionAdapter.load(args.eval_only)
        if adapter.config.lm_hidden_size != lm_hidden:
            raise SystemExit(
                f"{args.eval_only} was trained for a model with hidden size {adapter.config.lm_hidden_size} "
                f"({adapter.config.lm}); this model's is {lm_hidden}"
            )
        seed = (adapter.config.seed if adapter.config.seed is not None else args.seed) + EVAL_SEED_OFFSET
        table, shown = evaluate(adapter, session, eval_items, seed, show=10)
        for question, answer, prediction, ok in shown:
            print(f"{'ok ' if ok else 'BAD'} {question!r} -> {prediction!r} (expected {answer!r})")
        print_table(table)
        adapter.config.held_out_accuracy = {"seed": seed, **table}
        adapter.save(args.eval_only)
        return 0

    out = args.out or shipped_adapter_dir()
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    load_start = _loadavg()
    sizes: dict[str, Any] = {"image_size": 32, "vit_layers": 1, "image_tokens": 1} if quick else {}
    config = AdapterConfig(lm_hidden_size=lm_hidden, **sizes)
    adapter = VisionAdapter(config)
    _match_embedding_scale(adapter, session.model)

    print(f"stage 1: {epochs} epochs of {images} fresh pictures each (seed {args.seed})", flush=True)
    t1 = time.perf_counter()
    probe_accuracy = train_vision(
        adapter, images, epochs=epochs, batch=32, lr=1e-3 if not quick else 3e-3, seed=args.seed, bf16=bf16
    )
    stage1_s = time.perf_counter() - t1
    print(f"stage 1 done in {stage1_s:.0f}s; last-epoch training accuracy {probe_accuracy}", flush=True)

    t2 = time.perf_counter()
    for name, parameter in adapter.named_parameters():
        parameter.requires_grad_(name.startswith("projector."))
    # The projector learns from epoch 0's pictures; the ViT's features are computed once.
    stage2_items = vision_pictures(images, args.seed, 0)
    pixels = _to_pixels(adapter, stage2_items)
    with torch.no_grad(), _autocast(bf16):
        stage2_features = torch.cat(
            [adapter.features(pixels[s : s + 256].float()).float() for s in range(0, len(stage2_items), 256)]
        )
    del pixels
    warm_loss = warm_start_projector(
        adapter,
        session.model.get_input_embeddings(),
        session.tokenizer,
        stage2_items,
        stage2_features,
        steps=50 if quick else 800,
        seed=args.seed,
    )
    print(f"stage 2a done; caption regression loss {warm_loss}", flush=True)
    losses = train_projector(
        adapter, session, stage2_items, stage2_features, steps=steps, batch=batch, lr=1e-3, seed=args.seed, bf16=bf16
    )
    stage2_s = time.perf_counter() - t2
    print(
        f"stage 2 done in {stage2_s:.0f}s; loss {sum(losses[:20]) / max(1, len(losses[:20])):.3f} -> "
        f"{sum(losses[-20:]) / max(1, len(losses[-20:])):.3f}",
        flush=True,
    )

    t3 = time.perf_counter()
    eval_seed = args.seed + EVAL_SEED_OFFSET
    table, shown = evaluate(adapter, session, eval_items, eval_seed, show=10)
    eval_s = time.perf_counter() - t3
    for question, answer, prediction, ok in shown:
        print(f"{'ok ' if ok else 'BAD'} {question!r} -> {prediction!r} (expected {answer!r})")
    print_table(table)
    wall = time.perf_counter() - started
    command = "python -m workbench.modalities.train_adapter " + " ".join(sys.argv[1:] if argv is None else argv)
    adapter.save(
        out,
        lm=_model_name(session, args.model),
        training_data=(
            f"{epochs} x {images} pictures (a fresh draw per epoch, no printed words) from the "
            + shapes.describe(VISION_QTYPES)
        ),
        seed=args.seed,
        held_out_accuracy={"seed": eval_seed, **table},
        training={
            "command": command.strip(),
            "stage1": {"epochs": epochs, "batch": 32, "seconds": round(stage1_s), "train_accuracy": probe_accuracy},
            "stage2a_caption_regression_loss": warm_loss,
            "stage2": {
                "steps": steps,
                "batch": batch,
                "seconds": round(stage2_s),
                "loss_first20": round(sum(losses[:20]) / max(1, len(losses[:20])), 4),
                "loss_last20": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
            },
            "eval_seconds": round(eval_s),
            "wall_seconds": round(wall),
            "bf16_autocast": bf16,
            "threads": args.threads,
            "loadavg_start": load_start,
            "loadavg_end": _loadavg(),
            "cpu_count": os.cpu_count(),
        },
    )
    print(f"wrote {out} in {wall:.0f}s wall (load average {_loadavg()})")
    return 0


def _match_embedding_scale(adapter: VisionAdapter, model) -> None:
    """Start the projector's outputs at the size of real token embeddings.

    A default-initialised projector emits vectors far larger or smaller than the model's
    embeddings; starting at the right scale spares the first hundred steps.
    """
    weight = model.get_input_embeddings().weight
    target = weight.float().std().item()
    with torch.no_grad():
        probe = adapter.project(torch.randn(256, adapter.config.vit_hidden_size))
        last = cast(nn.Linear, adapter.projector[2])
        last.weight.mul_(target / max(probe.std().item(), 1e-6))
        last.bias.zero_()


if __name__ == "__main__":
    raise SystemExit(main())
