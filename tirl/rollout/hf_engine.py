"""Hugging Face ``generate`` as an :class:`~tirl.rollout.engine.Engine`.

Batched with left padding. Two hooks make ``generate`` token-in-token-out:

* ``_LogprobRecorder`` (a logits processor) records, at each step, the log-prob of the token
  sampled at the previous step, keeping only one step's distribution in memory. ``generate``
  applies its own temperature/top-k/top-p warpers *after* user processors, so we turn those off
  and pass the same warpers ourselves, before the recorder: it then sees exactly the
  distribution that is sampled from (a test checks this against a forward pass);
* ``_StopOnCondition`` (a stopping criterion) ends a row when the tool protocol's trigger
  appears in that row's text.

After ``generate`` returns, each row is cut at its own end (EOS, trigger, or its own budget)
with :func:`find_finish`, so padding never leaks into a trajectory.
"""

from __future__ import annotations

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tirl.models import compute_context
from tirl.rollout.engine import Generation, SamplingParams, StopCondition, find_finish


class _LogprobRecorder(LogitsProcessor):
    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None  # [B, V] log-softmax of the last step's scores
        self.logprobs: list[torch.Tensor] = []  # one [B] tensor per generated token (except the last)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prev is not None:
            self.logprobs.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor, n_steps: int) -> torch.Tensor:
        """[B, n_steps] log-probs of the generated tokens."""
        if len(self.logprobs) < n_steps and self.prev is not None:
            self.logprobs.append(self.prev.gather(1, last_tokens[:, None]).squeeze(1))
        return torch.stack(self.logprobs[:n_steps], dim=1)


class _StopOnCondition(StoppingCriteria):
    def __init__(self, tokenizer, stop: StopCondition, batch: int) -> None:
        self.tok, self.stop = tokenizer, stop
        self.texts = [""] * batch
        self.done = [False] * batch

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for i, tok in enumerate(last):
            if not self.done[i]:
                self.texts[i] += self.tok.decode([tok])
                self.done[i] = self.stop.find(self.texts[i]) is not None
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def _warpers(params: SamplingParams) -> list[LogitsProcessor]:
    if params.temperature == 0:
        return []
    out: list[LogitsProcessor] = []
    if params.temperature != 1.0:
        out.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        out.append(TopKLogitsWarper(top_k=params.top_k))
    if params.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=params.top_p))
    return out


class HFEngine:
    """Generates with the (shared, in-process) training model: weights are always in sync."""

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        eos = tokenizer.eos_token_id
        cfg_eos = getattr(model.generation_config, "eos_token_id", None)
        ids = {eos} if eos is not None else set()
        ids |= set(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else [])
        self.eos_ids = ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def generate(self, prompts, max_new_tokens, params: SamplingParams, stop: StopCondition | None = None) -> list[Generation]:
        out: list[Generation | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per chunk
        for c in range(0, len(order), self.batch_size):
            idx = order[c : c + self.batch_size]
            gens = self._generate_chunk([prompts[i] for i in idx], [max_new_tokens[i] for i in idx], params, stop)
            for i, g in zip(idx, gens):
                out[i] = g
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _generate_chunk(self, prompts, budgets, params: SamplingParams, stop) -> list[Generation]:
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        recorder = _LogprobRecorder()
        criteria = StoppingCriteriaList([_StopOnCondition(self.tok, stop, len(prompts))] if stop else [])
        greedy = params.temperature == 0
        gen_cfg = GenerationConfig(
            do_sample=not greedy, temperature=None, top_p=None, top_k=None,  # warpers: see _warpers
            max_new_tokens=max(budgets), eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id,
        )
        was_training = self.model.training
        self.model.eval()
        try:
            with compute_context(self.model):
                seqs = self.model.generate(
                    input_ids=ids.to(self.model.device), attention_mask=attn.to(self.model.device),
                    generation_config=gen_cfg, logits_processor=LogitsProcessorList([*_warpers(params), recorder]),
                    stopping_criteria=criteria,
                )
        finally:
            self.model.train(was_training)
        new = seqs[:, width:]  # on the model's device, as the recorder's distributions are
        logprobs = recorder.finish(new[:, -1], new.shape[1]).cpu()  # max_new_tokens >= 1
        new = new.cpu()
        gens = []
        for i, budget in enumerate(budgets):
            row = new[i, :budget].tolist()
            pieces = [self.tok.decode([t]) for t in row]
            n, reason = find_finish(pieces, row, self.eos_ids, stop)
            gens.append(Generation(token_ids=row[:n], logprobs=logprobs[i, :n].tolist(), finish_reason=reason))
        return gens
