"""Test-only fakes. Named as fakes wherever used."""

from __future__ import annotations

from tirl.rollout.engine import Generation, SamplingParams, StopCondition, find_finish


class ScriptedFakeEngine:
    """Plays back scripted completions as if a model had sampled their tokens.

    ``scripts[prompt_ids]`` is the list of texts that the row with that prompt "writes" on
    successive calls (give every row a distinct prompt). Each text is tokenised and cut exactly
    where a real engine would stop (EOS, the tool trigger, the budget). Every id returned is
    recorded in ``sampled`` so tests can check the mask against it.
    """

    def __init__(self, tokenizer, scripts: dict[tuple[int, ...], list[str]], logprob: float = -0.5):
        self.tok, self.scripts, self.logprob = tokenizer, scripts, logprob
        self.calls = {k: 0 for k in scripts}
        self.sampled: dict[tuple[int, ...], list[int]] = {k: [] for k in scripts}
        self.stops_seen: list[StopCondition | None] = []

    def _row(self, ids: list[int]) -> tuple[int, ...]:
        rows = [k for k in self.scripts if tuple(ids[: len(k)]) == k]
        assert len(rows) == 1, "give every scripted row a distinct prompt"
        return rows[0]

    def generate(self, prompts, max_new_tokens, params: SamplingParams, stop: StopCondition | None = None):
        self.stops_seen.append(stop)
        out = []
        for ids, budget in zip(prompts, max_new_tokens):
            row = self._row(ids)
            text = self.scripts[row][self.calls[row]]
            self.calls[row] += 1
            toks = self.tok(text, add_special_tokens=False)["input_ids"][:budget]
            n, reason = find_finish([self.tok.decode([t]) for t in toks], toks, {self.tok.eos_token_id}, stop)
            self.sampled[row] += toks[:n]
            out.append(Generation(token_ids=toks[:n], logprobs=[self.logprob] * n, finish_reason=reason))
        return out
