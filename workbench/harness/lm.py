"""lm-evaluation-harness's model interface on a workbench session: `--model workbench`.

lm-eval asks a model three things: how likely a continuation is after a context
(`loglikelihood`, every multiple-choice task: MMLU, ARC, HellaSwag), how likely a whole text is
(`loglikelihood_rolling`, perplexity tasks) and what it writes after a prompt (`generate_until`).
Here all three run on the session's own weights, as compressed, pruned or adapter-merged by its
config, so a score is the score of what the workbench serves.

Scoring matches lm-eval's `hf` backend request for request: the same tokenization (no special
tokens added, trailing context spaces moved into the continuation), the same truncation to
`max_length` and the same greedy test. Two things make it cheaper on a small CPU:
- requests whose model input is the same token sequence share one forward (the four answers of an
  MMLU question are one row, not four), as lm-eval's own logits cache does;
- the language-model head runs only at the positions that are scored, not at every position of the
  prompt: one row of logits over a 49K vocabulary is 196 KB, a 2K-token prompt's are 400 MB.
Generation goes through `Engine.generate`, the loop the server and the chat page use, greedy with
neutral penalties unless the task asks for sampling.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any, cast

import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry loads them only while empty)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from workbench.engine.events import TextDelta
from workbench.engine.request import PromptRequest

if TYPE_CHECKING:
    from workbench.session import Session

TOKENS_PER_BATCH = 4096
"""Padded tokens per forward: one MMLU prompt is 60 to 700 tokens, so 6 to 60 rows a batch."""

HEAD_CHUNK = 1024
"""Scored positions per run of the language-model head: 1024 x 49152 float32 logits are 200 MB."""

GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}
"""lm-eval's default generation: greedy, and none of the session's sampling defaults."""

LM_EVAL_DEFAULT_DEVICE = "cuda:0"
"""What lm-eval's command line passes as `device` when the user names none."""

Request = tuple[tuple[str, str] | None, list[int], list[int]]


@register_model("workbench")
class WorkbenchLM(TemplateLM):
    """`lm_eval --model workbench --model_args config=configs/int8.yaml` (through
    `python -m workbench.harness`), or `WorkbenchLM(session=...)` on a session already loaded."""

    def __init__(
        self,
        config: str | None = None,
        session: Session | None = None,
        batch_size: int | str | None = None,
        max_length: int | None = None,
        device: str | None = None,
        **ignored: Any,
    ) -> None:
        super().__init__()
        if (config is None) == (session is None):
            raise ValueError(
                "the workbench model takes one of config=... (a config file, a saved model folder or a "
                "source such as embedded:smollm2-135m-instruct) or session=..., not both and not neither"
            )
        if session is None:
            import workbench

            if device == LM_EVAL_DEFAULT_DEVICE and not torch.cuda.is_available():
                device = None  # lm-eval's own default, not the user's choice: the config's device decides

            session = workbench.load(cast(str, config), device=device) if device else workbench.load(cast(str, config))
        self.session = session
        self.tokenizer = session.tokenizer
        self.model = session.model
        limit = session.engine.context_limit
        positions = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        self._max_length = int(max_length or min(limit, positions or limit))
        self.rows = None if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        """most rows a forward or a generation batch takes; None: as many as TOKENS_PER_BATCH allows"""
        self._check_head()

    # what lm-eval reads ---------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return int(cast(int, self.tokenizer.eos_token_id))

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))

    def tok_decode(self, tokens: list[int]) -> str:
        return cast(str, self.tokenizer.decode(tokens))

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return cast(
            str,
            self.tokenizer.apply_chat_template(
                chat_history,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
            ),
        )

    # scoring --------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(summed logprob of the continuation, whether greedy decoding would write it) per request."""
        rows: dict[tuple[int, ...], list[tuple[int, list[int]]]] = defaultdict(list)
        for index, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError("lm-eval sent an empty continuation: nothing to score")
            whole = (context + continuation)[-(self.max_length + 1) :]
            rows[tuple(whole[:-1])].append((index, whole[-len(continuation) :]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        ordered = sorted(rows, key=len, reverse=True)  # longest first: an out-of-memory shows at once
        with tqdm(total=len(requests), desc="scoring", disable=disable_tqdm) as bar:
            for batch in self._batches(ordered):
                wanted = [max(len(target) for _, target in rows[ids]) for ids in batch]
                for ids, logprobs in zip(batch, self._tail_logprobs(batch, wanted), strict=True):
                    for index, target in rows[ids]:
                        tail = logprobs[-len(target) :]
                        chosen = tail.gather(-1, torch.tensor(target).unsqueeze(-1)).squeeze(-1)
                        greedy = bool((tail.argmax(dim=-1) == torch.tensor(target)).all())
                        results[index] = (float(chosen.double().sum()), greedy)
                        bar.update(1)
        return results

    def _batches(self, ordered: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
        batches: list[list[tuple[int, ...]]] = []
        for ids in ordered:  # longest first, so the first row of a batch sets its width
            if batches:
                batch = batches[-1]
                fits = (len(batch) + 1) * len(batch[0]) <= TOKENS_PER_BATCH
                if fits and (self.rows is None or len(batch) < self.rows):
                    batch.append(ids)
                    continue
            batches.append([ids])
        return batches

    def _tail_logprobs(self, batch: list[tuple[int, ...]], wanted: list[int]) -> list[torch.Tensor]:
        """Per row, log-softmax of the next-token logits at its last `wanted` positions, float32, CPU."""
        hidden = self._hidden(batch)
        picked = torch.cat([hidden[row, len(ids) - n : len(ids)] for row, (ids, n) in enumerate(zip(batch, wanted))])
        head = self.model.get_output_embeddings()
        with torch.inference_mode():
            logprobs = torch.cat(
                [torch.log_softmax(head(chunk).float(), dim=-1).cpu() for chunk in picked.split(HEAD_CHUNK)]
            )
        return list(logprobs.split(wanted))

    def _hidden(self, batch: list[tuple[int, ...]]) -> torch.Tensor:
        """The decoder's last hidden states for right-padded rows: under a causal mask the
        padding after a row cannot change the positions before it."""
        width = len(batch[0])
        input_ids = torch.full((len(batch), width), self.session.engine.pad_id, dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        with torch.inference_mode():
            out = self.model.get_decoder()(input_ids=input_ids.to(self.session.engine.device), use_cache=False)
        return cast(torch.Tensor, out.last_hidden_state)

    def _check_head(self) -> None:
        """The decoder's states through the output embeddings must be the model's own logits:
        a model that scales or caps its logits after the head would be scored wrongly, silently."""
        ids = (1, 2, 3, 4)
        ours = self._tail_logprobs([ids], [len(ids)])[0]
        with torch.inference_mode():
            logits = self.model(
                input_ids=torch.tensor([ids], device=self.session.engine.device), use_cache=False
            ).logits
        theirs = torch.log_softmax(logits[0].float(), dim=-1).cpu()
        if not torch.allclose(ours, theirs, atol=1e-3, rtol=1e-3):
            raise ValueError(
                f"{type(self.model).__name__}'s logits are not its decoder's states through its output "
                "embeddings (a logit scale or cap?); the workbench lm-eval backend cannot score it"
            )

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's summed logprob over disjoint windows of `max_length` tokens, as the hf backend scores it."""
        totals = []
        for request in tqdm(requests, desc="rolling loglikelihood", disable=disable_tqdm):
            (text,) = request.args
            windows = [
                (None, *make_disjoint_window(w))
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            totals.append(sum(score for score, _ in self._loglikelihood_tokens(windows, disable_tqdm=True)))
        return totals

    # generation -----------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each context continued by the engine until one of the task's stop strings (kept out of
        the text) or `max_gen_toks`; rows decode together in one batch."""
        plans = []
        engine = self.session.engine
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(kwargs.pop("max_gen_toks", 256))
            sampled = bool(kwargs.pop("do_sample", False)) and kwargs.get("temperature", 1.0) > 0
            knobs = (
                {k: kwargs[k] for k in ("temperature", "top_p", "top_k", "seed") if k in kwargs} if sampled else GREEDY
            )
            ids = self.tok_encode(context)[-(engine.context_limit - max_tokens) :]
            plans.append(engine.plan(PromptRequest(prompt_ids=ids, max_tokens=max_tokens, stop=until, **knobs)))
        texts = [""] * len(plans)
        with tqdm(total=len(plans), desc="generating", disable=disable_tqdm) as bar:
            for start in range(0, len(plans), self.rows or 16):
                chunk = plans[start : start + (self.rows or 16)]
                for index, event in engine.generate(chunk):
                    if isinstance(event, TextDelta):
                        texts[start + index] += event.text
                bar.update(len(chunk))
        return texts
