"""A Hugging Face causal LM as an :class:`~tirl.rollout.engine.Engine`: batched, left-padded,
with the model's KV cache, and its own sampling.

The engine draws each token itself from :func:`~tirl.rollout.engine.sampling_logprobs` (the
temperature / top-k / top-p distribution) and records the log-prob of the drawn token under that
same distribution, so what a trajectory claims is what it was sampled from. It does not use
``generate``: ``generate`` fills every unset option from the model's ``generation_config`` and
then from its global defaults (``GenerationConfig._get_default_generation_params``, merged in
``_prepare_generation_config``), so ``top_k=None`` became ``top_k = 50``; it appends its own
warpers after any caller's logits processor; and a real checkpoint's ``generation_config.json``
(Qwen2.5: ``top_k = 20``, ``top_p = 0.8``, ``repetition_penalty = 1.05``) would silently reshape
the distribution again. Here nothing but the model's logits and :class:`SamplingParams` decide.

With ``seeds`` (one per row; the rollout passes each trajectory's), a row samples from its own
generator seeded from (its seed, its prompt length), as the vLLM engine does: its tokens do not
depend on which rows share its batch. Without them, torch's global generator is used.

Each row ends at EOS, at its stop condition (the protocol's trigger, checked on the row's text
token by token) or at its own budget; :func:`find_finish` then cuts it there, so padding never
leaks into a trajectory.
"""

from __future__ import annotations

import torch

from tirl.models import compute_context
from tirl.rollout.engine import Generation, SamplingParams, StopCondition, derive_seed, find_finish, sampling_logprobs


def draw(logp_BV: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None) -> torch.Tensor:
    """``[B]`` token ids drawn from ``exp(logp_BV)`` (argmax when greedy), row ``i`` from
    ``generators[i]`` when given."""
    if params.temperature == 0:
        return logp_BV.argmax(dim=-1)
    probs = logp_BV.exp()
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


class HFEngine:
    """Generates with a Hugging Face model: by default the (shared, in-process) training model,
    whose weights are always in sync. ``own_weights=True``: ``model`` is the engine's own copy
    (a data-parallel rank's, beside the trainer's sharded one), refreshed by :meth:`load_weights`."""

    per_request_seeds = True  # each row may carry its own seed (its own torch.Generator)

    def __init__(self, model, tokenizer, batch_size: int = 16, own_weights: bool = False):
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self.shares_weights = not own_weights
        eos = tokenizer.eos_token_id
        cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids = {eos} if eos is not None else set()
        ids |= set(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else [])
        self.eos_ids = ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def generate(self, prompts, max_new_tokens, params: SamplingParams, stop: StopCondition | None = None,
                 seeds: list[int] | None = None) -> list[Generation]:
        out: list[Generation | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per chunk
        for c in range(0, len(order), self.batch_size):
            idx = order[c : c + self.batch_size]
            gens = self._generate_chunk([prompts[i] for i in idx], [max_new_tokens[i] for i in idx], params, stop,
                                        [seeds[i] for i in idx] if seeds is not None else None)
            for i, g in zip(idx, gens):
                out[i] = g
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def load_weights(self, model, via: str = "memory", tensors=None, place=None) -> None:
        """Copy ``tensors`` (``(name, full tensor)`` pairs, one at a time; default ``model``'s
        state dict) into the engine's own copy of the weights (in memory: ``via`` and ``place``
        do not apply)."""
        if self.shares_weights:
            return
        mine = self.model.state_dict()
        for name, t in tensors if tensors is not None else model.state_dict().items():
            mine[name].copy_(t)

    def _generators(self, prompts, seeds, device) -> list[torch.Generator] | None:
        if seeds is None:
            return None
        return [torch.Generator(device=device).manual_seed(derive_seed(s, len(p))) for p, s in zip(prompts, seeds)]

    @torch.no_grad()
    def _generate_chunk(self, prompts, budgets, params: SamplingParams, stop, seeds) -> list[Generation]:
        dev = self.model.device
        n, width, steps = len(prompts), max(map(len, prompts)), max(budgets)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        ids, attn = ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        gens = self._generators(prompts, seeds, dev)
        new = torch.full((n, steps), self.pad_id, dtype=torch.long, device=dev)
        logprobs = torch.zeros((n, steps), device=dev)
        texts, done = [""] * n, [False] * n
        inp, past = ids, None
        was_training = self.model.training
        self.model.eval()
        try:
            for k in range(steps):
                with compute_context(self.model):
                    o = self.model(input_ids=inp, attention_mask=attn, position_ids=pos, past_key_values=past,
                                   use_cache=True, logits_to_keep=1)
                past = o.past_key_values
                logp = sampling_logprobs(o.logits[:, -1], params)
                tok = draw(logp, params, gens)
                new[:, k], logprobs[:, k] = tok, logp.gather(1, tok[:, None]).squeeze(1)
                if self._all_done(tok.tolist(), k, budgets, texts, done, stop):
                    break
                inp, pos = tok[:, None], pos[:, -1:] + 1
                attn = torch.cat([attn, attn.new_ones((n, 1))], dim=1)
        finally:
            self.model.train(was_training)
        new, logprobs = new.cpu(), logprobs.cpu()
        out = []
        for i, budget in enumerate(budgets):
            row = new[i, : min(budget, k + 1)].tolist()
            pieces = [self.tok.decode([t]) for t in row]
            m, reason = find_finish(pieces, row, self.eos_ids, stop)
            out.append(Generation(token_ids=row[:m], logprobs=logprobs[i, :m].tolist(), finish_reason=reason))
        return out

    def _all_done(self, toks: list[int], k: int, budgets, texts: list[str], done: list[bool], stop) -> bool:
        """Marks the rows that ended with step ``k``'s token (EOS, budget, stop); True when all have."""
        for i, t in enumerate(toks):
            if done[i]:
                continue
            if t in self.eos_ids or k + 1 >= budgets[i]:
                done[i] = True
            elif stop is not None:
                texts[i] += self.tok.decode([t])
                done[i] = stop.find(texts[i]) is not None
        return all(done)
