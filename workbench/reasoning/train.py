"""Teach a chat model to think when asked to, and only then: a LoRA on generated traces.

One adapter must honour the switch both ways, so the training mixture has four kinds of
example, each a chat turn whose loss covers the reply only:

- `think`: an arithmetic problem with thinking on; the reply is the step-by-step trace,
  `</think>`, then the answer (the template already opened the block);
- `plain`: an arithmetic problem with thinking off; the reply is the answer alone;
- `general`: a general chat prompt with thinking off; the reply is the model's own greedy
  reply from before training (data/recovery/prompts.txt, the recovery step's cached
  replies), so the adapter is pulled back to what the model already did everywhere else,
  which is what keeps `facts` where it was;
- `general-think`: the same prompts with thinking on; a one-line thought that there is
  nothing to work out, then the model's own reply.

The loop is the recovery step's (same peft LoRA, schedule and adapter files); the loss is
plain next-token cross-entropy on the reply tokens, since the traces are the targets, plus a
guard on plain prose: each step also reads `text_rows` windows of data/calibration.txt and adds
the KL divergence of the trained model's token distribution from the stock model's there (the
stock model is the same weights with the LoRA switched off, so no copy is kept). Without it the
chat-only training left `facts` alone but raised held-out perplexity on the reference text
(data/evaluation.txt) from 15.7 to 24.4. The report gives both held-out texts' perplexity, stock and
trained: `perplexity_before` / `_after` the reference text's, `perplexity_prose_before` / `_after` the
out-of-domain prose's (data/prose.txt).
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from workbench.bench.tasks import arithmetic_items, is_correct
from workbench.compress import recovery_data as rd
from workbench.compress.recovery import _default_cache, _schedule, _threads, kl_loss
from workbench.compress.recovery_data import greedy_replies
from workbench.data import SHORT_ANSWER_PROMPT, calibration_texts, evaluation_texts, prose_texts
from workbench.engine.thinking import split_thinking
from workbench.metrics import perplexity
from workbench.models.adapters import TEMPLATE_FILE, save_adapter
from workbench.paths import ADAPTER_RECORD
from workbench.reasoning import problems as pb
from workbench.reasoning.template import with_thinking_switch
from workbench.step_options import LORA_TARGETS

GENERAL_THOUGHT = "There is nothing to calculate here, so I answer directly."
SYSTEMS = (None, SHORT_ANSWER_PROMPT, "You are a helpful assistant.", "You are a careful math tutor.")
"""System messages the arithmetic examples are asked under (None: the template's default);
the second is the bench's short-answer prompt, which the arithmetic task sends."""


class ThinkingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(150, ge=1, le=100_000)
    batch: int = Field(8, ge=1, le=1024)
    lr: float = Field(1e-3, gt=0.0, lt=1.0)
    warmup: int = Field(10, ge=0)
    rank: int = Field(16, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0.0)
    problems: int = Field(6000, ge=10)
    """Distinct arithmetic problems generated for training (none of the held-out ones)."""
    shares: dict[str, float] = Field(
        default_factory=lambda: {"think": 0.55, "plain": 0.15, "general": 0.2, "general-think": 0.1}
    )
    reply_tokens: int = Field(96, ge=8, le=1024)
    """Length of the model's own replies to the general prompts."""
    text_rows: int = Field(1, ge=0, le=1024)
    """Windows of calibration prose per step held to the stock model's distribution (0: none)."""
    text_len: int = Field(128, ge=16, le=4096)
    text_weight: float = Field(2.0, ge=0.0)
    seed: int = 0
    threads: int | None = Field(None, ge=1, le=1024)
    cache_dir: str | None = None

    def model_post_init(self, _):
        unknown = set(self.shares) - {"think", "plain", "general", "general-think"}
        if unknown or not any(v > 0 for v in self.shares.values()) or any(v < 0 for v in self.shares.values()):
            raise ValueError(
                f"shares: give non-negative weights for think, plain, general, general-think (got {self.shares})"
            )
        if self.warmup >= self.steps:
            raise ValueError(f"warmup ({self.warmup}) must be shorter than steps ({self.steps})")


@dataclass
class Example:
    kind: str
    messages: list[dict]
    thinking: bool
    reply: str
    """Everything the model writes after the generation prompt, without the end token."""


@dataclass
class TrainReport:
    steps: int = 0
    seconds: float = 0.0
    replies_seconds: float = 0.0
    """Generating the model's own general replies (cached after the first run)."""
    examples: dict[str, int] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    held_out: dict = field(default_factory=dict)
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    """the held-out reference text (4 x 512 tokens of data/evaluation.txt), stock and trained"""
    perplexity_prose_before: float | None = None
    perplexity_prose_after: float | None = None
    """the held-out prose text (4 x 512 tokens of data/prose.txt, out of the calibration text's
    domain), stock and trained"""
    trainable_params: int = 0


def arithmetic_examples(problems: list[pb.Problem], rng: random.Random) -> dict[str, list[Example]]:
    def chat(p: pb.Problem) -> list[dict]:
        system = rng.choice(SYSTEMS)
        return [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": p.question}]

    think = [Example("think", chat(p), True, f"{p.trace}\n</think>\n\n{p.answer}") for p in problems]
    plain = [Example("plain", chat(p), False, p.answer) for p in problems]
    return {"think": think, "plain": plain}


def general_examples(chats: list[list[dict]], replies: list[str]) -> dict[str, list[Example]]:
    pairs = [(c, r) for c, r in zip(chats, replies) if r.strip()]
    return {
        "general": [Example("general", c, False, r) for c, r in pairs],
        "general-think": [Example("general-think", c, True, f"{GENERAL_THOUGHT}\n</think>\n\n{r}") for c, r in pairs],
    }


def encode(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(input ids, labels): the prompt as the engine renders it, then the reply and the end
    token, tokenised apart as the engine sees them (prompt ids, then generated ids)."""
    prompt = tokenizer.apply_chat_template(
        example.messages, tokenize=False, add_generation_prompt=True, enable_thinking=example.thinking
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(example.reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + reply_ids, [-100] * len(prompt_ids) + reply_ids


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def micro_batches(rows: list[tuple[list[int], list[int]]], parts: int = 2) -> list[tuple[list, float]]:
    """The batch sorted by length and cut in `parts`, each with its share of the reply tokens:
    arithmetic turns are half as long as general ones, so one padded batch would spend a third
    of its compute on padding. The weighted losses add up to the whole batch's mean."""
    rows = sorted(rows, key=lambda r: len(r[0]))
    size = -(-len(rows) // parts)
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    counts = [sum(sum(t != -100 for t in labels[1:]) for _, labels in chunk) for chunk in chunks]
    total = sum(counts) or 1
    return [(chunk, count / total) for chunk, count in zip(chunks, counts)]


def held_out_accuracy(
    model, tokenizer, *, thinking: bool, count: int = 20, max_tokens: int = 160, batch: int = 10
) -> dict:
    """Greedy replies to the bench's held-out arithmetic questions (asked as the bench asks
    them: its short-answer system prompt), scored by the bench's checker on the answer part."""
    items = arithmetic_items(count)
    correct, closed, replies = 0, 0, []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "system", "content": SHORT_ANSWER_PROMPT}, {"role": "user", "content": i.question}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=thinking,
            )
            for i in chunk
        ]
        for item, text in zip(chunk, greedy_replies(model, tokenizer, texts, max_tokens)):
            reasoning, answer = split_thinking(text, start_in_reasoning=thinking)
            ok = is_correct(item, answer)
            correct += ok
            closed += thinking and "</think>" in text
            replies.append(
                {
                    "question": item.question,
                    "expected": item.answer,
                    "reasoning": reasoning,
                    "answer": answer,
                    "correct": ok,
                }
            )
    return {
        "thinking": thinking,
        "asked": len(items),
        "correct": correct,
        "closed_think_blocks": closed,
        "replies": replies,
    }


def _kinds(pools: dict[str, list], shares: dict[str, float], count: int, rng: random.Random) -> list[str]:
    kinds = [k for k, w in shares.items() if w > 0 and pools.get(k)]
    return rng.choices(kinds, weights=[shares[k] for k in kinds], k=count)


def train(session, opts: ThinkingOptions, out: Path, *, progress: bool = True) -> TrainReport:
    """Train the adapter on `session`'s model, save it to `out` with its chat template, and
    leave it merged into the session's model."""
    from peft import LoraConfig, get_peft_model

    model: PreTrainedModel = session.model
    tokenizer = session.tokenizer
    report = TrainReport()
    start = time.perf_counter()
    rng = random.Random(opts.seed)
    torch.manual_seed(opts.seed)
    device = cast(torch.device, model.get_input_embeddings().weight.device)
    with _threads(opts.threads):
        chats = rd.load_prompts()
        began = time.perf_counter()
        # before the switch is added: the same cache key as the recovery step's teacher replies
        replies = rd.teacher_replies(
            model,
            tokenizer,
            chats,
            max_tokens=opts.reply_tokens,
            cache_dir=Path(opts.cache_dir).expanduser() if opts.cache_dir else _default_cache(),
            progress=progress,
        )
        if not tokenizer.chat_template:
            raise ValueError("the model's tokenizer has no chat template to add the thinking switch to")
        if "enable_thinking" not in tokenizer.chat_template:
            tokenizer.chat_template = with_thinking_switch(tokenizer.chat_template)
        report.replies_seconds = round(time.perf_counter() - began, 1)
        report.perplexity_before = perplexity(model, tokenizer, evaluation_texts(), max_windows=4)
        report.perplexity_prose_before = perplexity(model, tokenizer, prose_texts(), max_windows=4)
        prose = (
            rd.Mixture(
                torch.zeros(0, dtype=torch.long),
                rd.text_stream(tokenizer, calibration_texts()),
                opts.text_len,
                1.0,
                opts.seed,
            )
            if opts.text_rows
            else None
        )
        pools = {**arithmetic_examples(pb.generate(opts.problems, opts.seed), rng), **general_examples(chats, replies)}
        report.examples = {k: len(v) for k, v in pools.items()}
        lora = LoraConfig(
            r=opts.rank,
            lora_alpha=opts.alpha or 2 * opts.rank,  # type: ignore[arg-type]  # peft takes a float
            target_modules=list(LORA_TARGETS),
            bias="none",
        )
        for p in model.parameters():
            p.requires_grad_(False)
        peft_model = get_peft_model(model, lora)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        report.trainable_params = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, opts))  # type: ignore[arg-type]  # reads warmup, steps
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        running: list[float] = []
        peft_model.train()
        bar = tqdm(range(opts.steps), desc="thinking lora", disable=not progress, file=sys.stderr)
        for step in bar:
            rows = [encode(tokenizer, rng.choice(pools[kind])) for kind in _kinds(pools, opts.shares, opts.batch, rng)]
            loss: torch.Tensor | float = 0.0  # a tensor once the first part adds to it
            for part, weight in micro_batches(rows):
                batch = {k: v.to(device) for k, v in collate(part, pad).items()}
                with (
                    torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
                ):
                    part_loss = peft_model(**batch, use_cache=False).loss * weight
                part_loss.backward()
                loss += part_loss.detach()
            if prose is not None:
                ids = prose.batch(opts.text_rows).to(device)
                with torch.no_grad(), peft_model.disable_adapter():
                    stock = peft_model(input_ids=ids, use_cache=False).logits
                drift = kl_loss(peft_model(input_ids=ids, use_cache=False).logits, stock, 1.0) * opts.text_weight
                drift.backward()
                loss += drift.detach()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running.append(float(loss))
            if (step + 1) % 25 == 0 or step + 1 == opts.steps:
                mean = sum(running) / len(running)
                report.history.append(
                    {"step": step + 1, "loss": round(mean, 4), "seconds": round(time.perf_counter() - start, 1)}
                )
                bar.set_postfix(loss=f"{mean:.4f}")
                running = []
        peft_model.eval()
        for p in params:
            p.requires_grad_(False)
        report.steps = opts.steps
        report.seconds = round(time.perf_counter() - start, 1)
        peft_model.peft_config["default"].base_model_name_or_path = session.loaded.source
        record = {
            "purpose": "thinking",
            "source": session.loaded.source,
            "options": opts.model_dump(mode="json"),
            "seconds": report.seconds,
            "history": report.history,
            "examples": report.examples,
        }
        save_adapter(peft_model, model, out, record)
        (out / TEMPLATE_FILE).write_text(tokenizer.chat_template, encoding="utf-8")
        merged = peft_model.merge_and_unload()
        assert merged is model
        model.eval()
        report.perplexity_after = perplexity(model, tokenizer, evaluation_texts(), max_windows=4)
        report.perplexity_prose_after = perplexity(model, tokenizer, prose_texts(), max_windows=4)
        report.held_out = {
            "on": held_out_accuracy(model, tokenizer, thinking=True),
            "off": held_out_accuracy(model, tokenizer, thinking=False, max_tokens=32),
        }
    record.update(
        {
            "perplexity_before": report.perplexity_before,
            "perplexity_after": report.perplexity_after,
            "perplexity_prose_before": report.perplexity_prose_before,
            "perplexity_prose_after": report.perplexity_prose_after,
            "held_out": {
                k: {"correct": v["correct"], "asked": v["asked"], "closed_think_blocks": v["closed_think_blocks"]}
                for k, v in report.held_out.items()
            },
        }
    )
    (out / ADAPTER_RECORD).write_text(
        json.dumps({**json.loads((out / ADAPTER_RECORD).read_text()), **record}, indent=2)
    )
    (out / "held_out.json").write_text(json.dumps(report.held_out, indent=1, ensure_ascii=False))
    return report
