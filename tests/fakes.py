"""Test-only fakes. Named as fakes wherever used."""

from __future__ import annotations

import itertools

from tirl.rollout.engine import Generation, SamplingParams, StopCondition, find_finish


class ScriptedFakeEngine:
    """Plays back scripted completions as if a model had sampled their tokens.

    ``scripts[prompt_ids]`` is the list of texts that the row with that prompt "writes" on
    successive calls (give every row a distinct prompt). Each text is tokenised and cut exactly
    where a real engine would stop (EOS, the tool trigger, the budget). Every id returned is
    recorded in ``sampled`` so tests can check the mask against it.
    """

    def __init__(self, tokenizer, scripts: dict[tuple[int, ...], list[str]], logprob: float = -0.5,
                 eos_ids: set[int] | None = None):
        self.tok, self.scripts, self.logprob = tokenizer, scripts, logprob
        self.eos_ids = eos_ids if eos_ids is not None else {tokenizer.eos_token_id}
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
            n, reason = find_finish([self.tok.decode([t]) for t in toks], toks, self.eos_ids, stop)
            self.sampled[row] += toks[:n]
            out.append(Generation(token_ids=toks[:n], logprobs=[self.logprob] * n, finish_reason=reason))
        return out


class TimedScriptedFakeEngine(ScriptedFakeEngine):
    """A :class:`ScriptedFakeEngine` whose calls take ``seconds_per_call`` (a batched ``generate``
    as long as one request, as on a real engine), with an async ``agenerate``, logging
    ``(time, "gen_start"|"gen_end", row)`` events."""

    def __init__(self, tokenizer, scripts, seconds_per_call: float = 0.05, log: list | None = None):
        super().__init__(tokenizer, scripts)
        self.seconds, self.log = seconds_per_call, log if log is not None else []

    async def agenerate(self, prompt, max_new_tokens, params, stop=None):
        import asyncio
        import time

        row = self._row(prompt)
        self.log.append((time.perf_counter(), "gen_start", row))
        await asyncio.sleep(self.seconds)
        (g,) = super().generate([prompt], [max_new_tokens], params, stop)
        self.log.append((time.perf_counter(), "gen_end", row))
        return g

    def generate(self, prompts, max_new_tokens, params, stop=None):
        import time

        time.sleep(self.seconds)
        return super().generate(prompts, max_new_tokens, params, stop)


class DelayFakeSandbox:
    """Answers ``print(<n>)`` with ``n`` after sleeping ``delays[n]`` seconds (a controlled tool
    latency, no real execution), logging ``(time, "tool_start"|"tool_end", n)``."""

    def __init__(self, delays: dict[int, float], log: list | None = None):
        self.delays, self.log = delays, log if log is not None else []

    def run(self, code, timeout=None):
        import time

        from tirl.types import ExecResult

        n = int(code.strip().removeprefix("print(").removesuffix(")"))
        self.log.append((time.perf_counter(), "tool_start", n))
        time.sleep(self.delays.get(n, 0.0))
        self.log.append((time.perf_counter(), "tool_end", n))
        return ExecResult(f"{n}\n", "", 0)

    def run_many(self, codes, timeout=None):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, len(codes))) as ex:
            return list(ex.map(self.run, codes))

    async def arun(self, code, timeout=None):
        import asyncio

        return await asyncio.to_thread(self.run, code, timeout)

    def close(self):
        pass


_ALTERNATING = itertools.count()


def alternating_fake_reward(traj, cfg) -> float:
    """Fake reward term: +1 and -1 by turns, so every GRPO group has signal (the tiny model never
    answers anything right). Registered as ``fake_alternating`` by :func:`tiny_trainer_config`."""
    return 1.0 if next(_ALTERNATING) % 2 else -1.0


def tiny_trainer_config(tiny_model_dir, tmp_path, *overrides: str):
    """The demo recipe on the tiny model and six toy problems, the HF engine, a short budget and the
    fake alternating reward; ``overrides`` go last."""
    import json

    from tirl.config import load_config
    from tirl.reward import REWARD_TERMS, register_term

    if "fake_alternating" not in REWARD_TERMS:
        register_term("fake_alternating")(alternating_fake_reward)
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(6)))
    return load_config("demo", [f"model.name={json.dumps(str(tiny_model_dir))}", f"data.source={json.dumps(str(data))}",
                                f"train.output_dir={json.dumps(str(tmp_path / 'runs'))}", "rollout.engine=\"hf\"",
                                "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.temperature=1.0",
                                "reward.terms={fake_alternating = 1.0, correct = 0.0}", *overrides])
