"""Rollout wall time with a controlled tool latency: per-trajectory async vs lock-step, same run.

    .venv/bin/python benchmarks/async_bench.py [--engine vllm|hf] [--medians 0.25,0.5,1,2] [--n 16]

The engine is real (the embedded model, greedy: in float32 every schedule yields the same trajectories);
the tool is a stand-in with a *controlled* latency: every line the model ends is a tool call
(up to ``--calls`` per trajectory), the "sandbox" sleeps for a latency drawn from a log-normal distribution (median
M, sigma 1: mean 1.65 M, p90 3.6 M, p99 10 M — a fresh interpreter per call plus queueing has
such a long tail) and returns "ok". The latency of a call is a function of its text, so every
schedule waits the same. ``--lines-per-call lo-hi`` gives turns of varied length (each turn's line
count drawn from a hash of its first line). Rows:

* ``no tools``: the same prompts generate exactly the token count each trajectory sampled, in one
  request with no stops (vLLM: ``min_tokens = max_tokens``, EOS ignored) — the floor;
* ``tools, 0 s``: the same rollout with zero latency (the cost of turns themselves), with vLLM
  sessions (each trajectory's KV kept across its calls) and, for comparison, a new request per turn;
* ``lock-step`` / ``async`` at each median latency.
"""

from __future__ import annotations

import argparse
import math
import random
import time
import zlib
from dataclasses import dataclass

from tirl.rollout.protocol import ToolProtocol
from tirl.types import ExecResult

def line_protocol(k: int = 1) -> ToolProtocol:
    """Every ``k`` lines the model ends are one tool call (the code: those lines)."""
    return ToolProtocol(name=f"line{k}", open_re=r"\A", close_re=rf"\A(?:[^\n]*\n){{{k}}}",
                        block_re=rf"\A((?:[^\n]*\n){{{k - 1}}}[^\n]*)\n", output_open="```output\n",
                        output_close="\n```\n", stop_strings=("\n",))


LINE = line_protocol(1)


@dataclass(frozen=True)
class VariedLines(ToolProtocol):
    """A tool call every ``k`` lines, ``k`` drawn per turn from ``lo..hi`` by a hash of the turn's
    first line: turns of varied length, as in real rollouts (the same ``k`` in every schedule)."""

    lo: int = 1
    hi: int = 1

    def lines(self, text: str) -> int:
        first = text.split("\n", 1)[0]
        return self.lo + zlib.crc32(first.encode()) % (self.hi - self.lo + 1)

    def find_stop(self, text: str) -> int | None:
        ends = [i + 1 for i, c in enumerate(text) if c == "\n"]
        if not ends:
            return None
        k = self.lines(text)
        return ends[k - 1] if len(ends) >= k else None

    def extract_code(self, turn_text: str) -> str | None:
        end = self.find_stop(turn_text)
        return None if end is None else turn_text[: end - 1]

    def insertion(self, turn_text: str, obs: str) -> str:
        return f"{self.output_open}{obs}{self.output_close}"


def make_protocol(spec: str) -> ToolProtocol:
    """``"k"``: a call every k lines; ``"lo-hi"``: every k lines, k drawn per turn (:class:`VariedLines`)."""
    lo, _, hi = spec.partition("-")
    if not hi:
        return line_protocol(int(lo))
    return VariedLines(name=f"lines{spec}", open_re=r"\A", close_re=r"\A", block_re=r"\A(.*)\Z", output_open="```output\n",
                       output_close="\n```\n", stop_strings=("\n",), lo=int(lo), hi=int(hi))


class DelaySandbox:
    """Sleeps a latency determined by the code's text, then answers ``ok`` (nothing is run)."""

    def __init__(self, median_s: float, sigma: float = 1.0, seed: int = 0, workers: int | None = None):
        self.median, self.sigma, self.seed, self.total = median_s, sigma, seed, 0.0
        self.workers = workers  # a service with this many workers: more calls at once queue (None: no limit)
        self._sem = None

    def latency(self, code: str) -> float:
        if self.median <= 0:
            return 0.0
        rng = random.Random(zlib.crc32(code.encode()) ^ self.seed)
        return self.median * math.exp(rng.gauss(0.0, self.sigma))

    def run(self, code: str, timeout: float | None = None) -> ExecResult:
        d = self.latency(code)
        self.total += d
        time.sleep(d)
        return ExecResult("ok\n", "", 0, duration_s=d)

    def run_many(self, codes, timeout=None):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, min(len(codes), self.workers or len(codes)))) as ex:
            return list(ex.map(self.run, codes))

    async def arun(self, code: str, timeout: float | None = None) -> ExecResult:
        import asyncio

        if self._sem is None:
            self._sem = asyncio.Semaphore(self.workers or 1 << 30)
        d = self.latency(code)  # calls wait concurrently (up to ``workers``), as lock-step's run_many does
        self.total += d
        async with self._sem:
            await asyncio.sleep(d)
        return ExecResult("ok\n", "", 0, duration_s=d)

    def close(self) -> None:
        pass


def _no_tools_seconds(engine, items, counts: list[int]) -> float:
    """Wall time to sample exactly ``counts[i]`` tokens after prompt ``i``, no stops."""
    t0 = time.perf_counter()
    if hasattr(engine, "llm"):
        from vllm import SamplingParams as VSP

        engine.llm.generate([{"prompt_token_ids": list(pr.token_ids)} for _, _, pr in items],
                            [VSP(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, logprobs=0) for n in counts],
                            use_tqdm=False)
    else:  # HF: one batch to the longest count (a static batch cannot stop rows early anyway)
        import torch

        from tirl.rollout import SamplingParams

        with torch.no_grad():
            engine.generate([list(pr.token_ids) for _, _, pr in items], counts, SamplingParams(temperature=0.0))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32", help="float32: batch composition never flips a greedy token; bfloat16: ~1.7x faster on CPUs with avx512_bf16")
    ap.add_argument("--medians", default="0.25,0.5,1,2")
    ap.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of the tool latency [1]")
    ap.add_argument("--n", type=int, default=16, help="trajectories")
    ap.add_argument("--calls", type=int, default=4, help="max tool calls per trajectory")
    ap.add_argument("--turn-tokens", type=int, default=64)
    ap.add_argument("--lines-per-call", default="1",
                    help="lines the model writes per tool call: k, or lo-hi (k drawn per turn) [1]")
    ap.add_argument("--sandbox-workers", type=int, default=None,
                    help="calls the stand-in sandbox serves at once, the rest queue (default: no limit)")
    ap.add_argument("--max-seqs", type=int, default=None,
                    help="vLLM max_num_seqs: requests decoded at once, the rest queue (default: vLLM's, 256 on CPU)")
    args = ap.parse_args()

    from tirl.data import arithmetic_problems
    from tirl.models import load_model, resolve_model_path
    from tirl.prompt import render_prompt
    from tirl.rollout import RolloutLimits, SamplingParams, rollout

    path = str(resolve_model_path(args.model))
    model, tok = load_model(path, args.dtype)
    if args.engine == "vllm":
        from tirl.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(path, dtype=args.dtype, kv_cache_gb=2, max_num_seqs=args.max_seqs)
    else:
        from tirl.rollout.hf_engine import HFEngine

        engine = HFEngine(model, tok, batch_size=args.n)
    items = [(p, i, render_prompt(p, tok, "chat", "{problem}\nExplain your reasoning step by step, one short line per step.", ""))
             for i, p in enumerate(arithmetic_problems(args.n, seed=3))]
    proto = make_protocol(args.lines_per_call)
    limits = RolloutLimits(max_tool_calls=args.calls, max_tokens_per_turn=args.turn_tokens,
                           max_response_tokens=args.turn_tokens * (args.calls + 1) + 64 * args.calls)
    greedy = SamplingParams(temperature=0.0)
    # Warm-up at full size: the first run of a batch shape pays vLLM's one-off costs (measured ~2.7 s
    # of a 14 s row at n=32), which would be charged to whichever schedule ran first.
    warm, _ = rollout(engine, tok, DelaySandbox(0), items, greedy, limits, proto, "async")
    _no_tools_seconds(engine, items, [sum(t.mask) for t in warm])

    def run(mode: str, median: float):
        sb = DelaySandbox(median, args.sigma, workers=args.sandbox_workers)
        t0 = time.perf_counter()
        trajs, times = rollout(engine, tok, sb, items, greedy, limits, proto, mode)
        return time.perf_counter() - t0, trajs, times, sb.total

    wall0, ref, _, _ = run("async", 0.0)
    counts = [sum(t.mask) for t in ref]
    floor = _no_tools_seconds(engine, items, counts)
    calls = sum(len(t.tool_calls) for t in ref)
    inserted = sum(len(t.token_ids) - t.prompt_len - sum(t.mask) for t in ref)
    # the other reading of "the same token count": trajectories as long, every token sampled
    floor_all = _no_tools_seconds(engine, items, [len(t.token_ids) - t.prompt_len for t in ref])
    print(f"engine {args.engine}, {args.model} ({args.dtype}), greedy; {args.n} trajectories, {sum(counts)} sampled "
          f"tokens, {calls} tool calls ({args.lines_per_call} line(s) each, <= {args.calls} per trajectory, <= "
          f"{args.turn_tokens} tokens per turn), {inserted} inserted output tokens; "
          f"latency log-normal, sigma {args.sigma:g}, sandbox workers {args.sandbox_workers or 'unlimited'}; vLLM max_num_seqs {args.max_seqs or 'default'}")

    def same(trajs) -> str:  # greedy in bf16 can flip a token when the batch differs: then say how much changed
        if [t.token_ids for t in trajs] == [t.token_ids for t in ref]:
            return "yes"
        return f"no: {sum(sum(t.mask) for t in trajs)} sampled, {sum(len(t.tool_calls) for t in trajs)} calls"

    def vs(wall: float) -> str:  # against both floors
        return f"{wall / floor:.2f}x | {wall / floor_all:.2f}x"

    print("| tool latency (median) | schedule | wall s | exposed tool s | sum of tool latencies s | same tokens | vs no tools | "
          "vs no tools, as long | lock-step / async |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| - | no tools (same sampled token counts) | {floor:.1f} | - | - | - | {vs(floor)} | - |")
    print(f"| - | no tools (as long: sampled + inserted counts, all sampled) | {floor_all:.1f} | - | - | - | {vs(floor_all)} | - |")
    print(f"| 0 | async | {wall0:.1f} | - | 0 | yes | {vs(wall0)} | - |")
    if getattr(engine, "sessions", False):  # the same, every turn a new request (no KV kept across calls)
        engine.sessions = False
        wall_ns, trajs, _, _ = run("async", 0.0)
        engine.sessions = True
        print(f"| 0 | async, a new request per turn | {wall_ns:.1f} | - | 0 | {same(trajs)} | {vs(wall_ns)} | - |")
    for m in [float(x) for x in args.medians.split(",")]:
        res = {mode: run(mode, m) for mode in ("lockstep", "async")}
        for mode, (wall, trajs, times, total) in res.items():
            ratio = f"{res['lockstep'][0] / res['async'][0]:.2f}x" if mode == "async" else ""
            print(f"| {m:g} s | {mode} | {wall:.1f} | {times.tools_s:.1f} | {total:.1f} | {same(trajs)} | {vs(wall)} | {ratio} |",
                  flush=True)


if __name__ == "__main__":
    main()
