"""Trainer throughput and memory: tirl's policy update vs a bare masked-NLL training step, same
model, same batch, same optimizer; each row in a fresh process.

    .venv/bin/python benchmarks/update_bench.py [--shape qwen2.5-0.5b] [--dtype bfloat16] [--compute-dtype auto]
        [--device auto] [--batch 16] [--seq 1024] [--min-seq N] [--micro 4] [--max-tokens N] [--chunk 256]
        [--no-pack] [--steps 3] [--entropy-coef 0] [--grad-ckpt] [--before GIT_REF]

The model is randomly initialised with a real configuration (no weights are downloaded); the
batch is ``--batch`` trajectories of ``--seq`` random tokens (``--min-seq``: lengths spread evenly
from it to ``--seq``): a quarter prompt (mask 0), the rest a response with two inserted tool outputs
of 1/16 of its length each (mask 0), sampler log-probs and advantages of +-1. Rows:

* ``bare NLL``: for each micro-batch of ``--micro`` one forward with transformers' own causal-LM
  loss (``labels``, -100 where the mask is 0, normalised over the batch), one backward; then gradient
  clipping and an AdamW step: what a plain supervised step over these tokens costs;
* ``tirl before`` (with ``--before REF``): :func:`tirl.update.policy_update` of the package as of
  that commit (the full ``[B, T, V]`` logits, right-padded micro-batches of ``--micro``);
* ``tirl``: today's ``policy_update`` (GRPO's PPO-clip loss, token-mean, one mini-batch, with the
  per-token log-probs, entropy and sampler/trainer mismatch it logs), micro-batches by
  ``--max-tokens`` (packed unless ``--no-pack``), the LM head in blocks of ``--chunk`` tokens.

Tokens/s counts every token in the batch (prompt and tool outputs included: the forward pass runs
over them). Memory: on CUDA the peak allocated after a warm-up update; on the CPU two figures,
the process's peak resident memory (``RSS``) and the peak of the bytes in use by malloc
(``alloc``, glibc's ``mallinfo2``, sampled every 2 ms): the second is the CPU's counterpart of
CUDA's allocated bytes, the first adds the freed heap glibc keeps rather than returns. ``update
GiB`` is a peak less what was held before the timed updates (weights and AdamW state, created
beforehand with a zero gradient), i.e. what the update itself needs. ``--shape tiny`` (a 2-layer
model) is a smoke run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SHAPES = {  # Qwen2.5's published configurations (config.json), vocab as shipped
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


def build_model(shape: str, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)


def make_batch(n: int, seq: int, vocab: int, seed: int = 0, min_seq: int | None = None):
    """``n`` trajectories of ``seq`` tokens (or of lengths spread evenly from ``min_seq`` to ``seq``,
    in a shuffled order): prompt, response with two tool outputs (mask 0)."""
    from tirl.types import Problem, Trajectory

    rng = random.Random(seed)
    lengths = [seq] * n if min_seq is None else [min_seq + (seq - min_seq) * i // max(n - 1, 1) for i in range(n)]
    rng.shuffle(lengths)
    trajs, adv = [], []
    for i, length in enumerate(lengths):
        prompt, tool = length // 4, length // 16
        ids = [rng.randrange(1, vocab) for _ in range(length)]
        mask = [0] * prompt + [1] * (length - prompt)
        for start in (prompt + (length - prompt) // 3, prompt + 2 * (length - prompt) // 3):
            mask[start : start + tool] = [0] * tool
        logprobs = [-rng.uniform(0.1, 3.0) if m else 0.0 for m in mask]
        trajs.append(Trajectory(problem=Problem(id=f"b{i}", problem="", answer=""), group=i // 8, token_ids=ids,
                                mask=mask, logprobs=logprobs, prompt_len=prompt))
        adv.append(1.0 if i % 2 else -1.0)
    return trajs, adv


def bare_step(model, optimizer, trajs, micro: int, grad_clip: float) -> None:
    """One AdamW step of masked token-mean NLL over the batch, micro-batched: transformers' own
    causal-LM loss (``labels``, -100 where the mask is 0, normalised over the whole batch)."""
    import torch

    from tirl.models import compute_context
    from tirl.update.step import device_of, pad_tokens

    total = sum(sum(t.mask) for t in trajs)
    optimizer.zero_grad(set_to_none=True)
    for c in range(0, len(trajs), micro):
        part = trajs[c : c + micro]
        ids, attn, mask = pad_tokens([t.token_ids for t in part], [t.mask for t in part], 0, device_of(model))
        labels = ids.masked_fill(mask == 0, -100)
        with compute_context(model):
            loss = model(input_ids=ids, attention_mask=attn, labels=labels, num_items_in_batch=total).loss
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _rss_gib() -> float:
    """This process's resident memory now (Linux), GiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


class AllocatedPeak:
    """The peak of the bytes malloc has handed out and not had back (heap chunks in use plus
    mmapped ones, every arena), sampled every ``every`` seconds on a thread: what the process's
    tensors hold, without the freed memory glibc keeps. ``None`` where glibc lacks ``mallinfo2``."""

    def __init__(self, every: float = 0.002):
        try:
            self._mallinfo = ctypes.CDLL("libc.so.6").mallinfo2
            self._mallinfo.restype = _MallInfo2
        except (OSError, AttributeError):
            self._mallinfo = None
        self.peak = 0
        self._every, self._stop = every, threading.Event()

    def now(self) -> int | None:
        if self._mallinfo is None:
            return None
        m = self._mallinfo()
        return m.uordblks + m.hblkhd

    def start(self) -> "AllocatedPeak":
        if self._mallinfo is not None:
            self.peak = self.now()
            threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.peak = max(self.peak, self.now())

    def stop_gib(self) -> float | None:
        self._stop.set()
        return None if self._mallinfo is None else max(self.peak, self.now()) / 2**30


def _peak_gib(device) -> float:
    """Peak accelerator memory allocated (CUDA) or this process's peak resident memory (CPU), GiB."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _prime(model, optimizer) -> None:
    """Create the optimizer's state with an all-zero gradient (Adam moves nothing but its weight
    decay), so that the memory before the timed updates holds weights and optimizer state."""
    import torch

    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_row(args, name: str) -> dict:
    """Build the model and batch, then time ``args.steps`` updates of the row ``name``; returns
    ``{"s": seconds per update, "peak": peak GiB, "base": GiB before the updates}``."""
    import torch

    from tirl.config import AlgoConfig, OptimConfig
    from tirl.models import resolve_device, set_compute_dtype
    from tirl.update import policy_update

    device = torch.device(resolve_device(args.device))
    model = build_model(args.shape, getattr(torch, args.dtype), device)
    set_compute_dtype(model, args.compute_dtype)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable()
    trajs, adv = make_batch(args.batch, args.seq, SHAPES[args.shape]["vocab_size"], min_seq=args.min_seq)
    optim = OptimConfig(lr=1e-7, micro_batch_size=args.micro)
    if name == "tirl":
        optim = OptimConfig(lr=1e-7, micro_batch_size=args.micro, max_tokens_per_micro_batch=args.max_tokens,
                            pack=not args.no_pack, logprob_chunk=args.chunk)
    algo = AlgoConfig(entropy_coef=args.entropy_coef)
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr)
    if name == "bare NLL":
        fn = lambda: bare_step(model, opt, trajs, args.micro, optim.grad_clip)  # noqa: E731
    else:
        fn = lambda: policy_update(model, opt, trajs, adv, algo, optim, temperature=1.0, pad_id=0)  # noqa: E731
    _prime(model, opt)
    if device.type == "cuda":
        fn()  # warm-up: kernels, allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**30
    else:
        base = _rss_gib()
    alloc = AllocatedPeak()
    alloc_base = None if alloc.now() is None or device.type == "cuda" else alloc.now() / 2**30
    alloc.start()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    s = (time.perf_counter() - t0) / args.steps
    alloc_peak = alloc.stop_gib()
    return {"s": s, "peak": _peak_gib(device), "base": base,
            "alloc": None if alloc_base is None else alloc_peak - alloc_base,
            "params": sum(p.numel() for p in model.parameters()), "device": str(device)}


def _old_tree(ref: str) -> str:
    """The ``tirl`` package as of git ``ref``, unpacked into a temporary folder."""
    out = tempfile.mkdtemp(prefix="tirl-before-")
    arch = subprocess.run(["git", "-C", str(REPO), "archive", ref, "tirl"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", out], input=arch, check=True)
    return out


def run_isolated(args, argv: list[str], name: str) -> dict:
    """``run_row`` in a fresh process (its peak memory is then this row's alone); the ``tirl before``
    row imports the package from ``--before``."""
    env = dict(os.environ)
    if name == "tirl before":
        env["PYTHONPATH"] = _old_tree(args.before)
    cmd = [sys.executable, __file__, *argv, "--only", name]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(REPO))
    if out.returncode != 0:
        raise SystemExit(f"row {name!r} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="weights and AdamW state")
    ap.add_argument("--compute-dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                    help="forward/backward (auto: --dtype; float32 weights + bfloat16: mixed precision)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=16, help="trajectories per update")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per trajectory (the longest, with --min-seq)")
    ap.add_argument("--min-seq", type=int, default=None, help="mixed lengths: spread evenly from this to --seq")
    ap.add_argument("--micro", type=int, default=4, help="micro-batch size (bare, tirl before; tirl without --max-tokens)")
    ap.add_argument("--max-tokens", type=int, default=None, help="tirl: optim.max_tokens_per_micro_batch")
    ap.add_argument("--chunk", type=int, default=256, help="tirl: optim.logprob_chunk (0: full logits)")
    ap.add_argument("--no-pack", action="store_true", help="tirl: optim.pack = false")
    ap.add_argument("--steps", type=int, default=3, help="timed updates per row")
    ap.add_argument("--entropy-coef", type=float, default=0.0)
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in every row")
    ap.add_argument("--before", default=None, metavar="GIT_REF",
                    help="add a row for tirl as of this commit (e.g. 0f28c64, before chunking and packing)")
    ap.add_argument("--rows", default=None, help="comma-separated subset of the rows to run (default: all)")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.only:
        print(json.dumps(run_row(args, args.only)))
        return
    names = ["bare NLL"] + (["tirl before"] if args.before else []) + ["tirl"]
    if args.rows:
        names = [n for n in names if n in args.rows.split(",")]
    rows = []
    for name in names:
        print(f"[update_bench] {name} ...", file=sys.stderr, flush=True)
        rows.append((name, run_isolated(args, argv, name)))
    first = rows[0][1]  # the ratios are against the first row run (bare NLL unless --rows leaves it out)
    n_tok = sum(len(t.token_ids) for t in make_batch(args.batch, args.seq, 2, min_seq=args.min_seq)[0])
    lengths = f"{args.min_seq}-{args.seq}" if args.min_seq else str(args.seq)
    print(f"{args.shape} ({first['params'] / 1e6:.0f}M params, {args.dtype} weights, {args.compute_dtype} compute) on "
          f"{first['device']}: {args.batch} trajectories of {lengths} tokens ({n_tok} in all), micro-batch {args.micro}"
          f", tirl: max_tokens {args.max_tokens}, pack {not args.no_pack}, chunk {args.chunk}; entropy_coef "
          f"{args.entropy_coef}{', gradient checkpointing' if args.grad_ckpt else ''}; each row a fresh process")
    cpu = first["alloc"] is not None
    extra = f" | {'alloc GiB':>9} | {'alloc vs bare':>13}" if cpu else ""
    print(f"| {'update':<11} | {'s/update':>8} | {'tokens/s':>9} | {'peak GiB':>8} | {'update GiB':>10} | "
          f"{'time vs bare':>12} | {'update mem vs bare':>18}{extra} |")
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if cpu else ""))
    for name, r in rows:
        grow, grow0 = r["peak"] - r["base"], first["peak"] - first["base"]
        cells = [f"{r['s']:8.3f}", f"{n_tok / r['s']:9.0f}", f"{r['peak']:8.2f}", f"{grow:10.2f}",
                 f"{r['s'] / first['s']:11.2f}x", f"{_ratio(grow, grow0):17.2f}x"]
        if cpu:
            cells += [f"{r['alloc']:9.2f}", f"{_ratio(r['alloc'], first['alloc']):12.2f}x"]
        print(f"| {name:<11} | " + " | ".join(cells) + " |")


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


if __name__ == "__main__":
    main()
