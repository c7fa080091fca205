"""The cost of data parallelism on one machine: the same policy update (same model, same batch)
by 1 process with T threads and by T processes of 1 thread under torchrun (FSDP2, gloo on CPU;
NCCL on a GPU node), so the ratio is what sharding and the collectives cost (or gain).

    .venv/bin/python benchmarks/dist_bench.py [--shape small] [--batch 16] [--seq 256] [--micro 2]
        [--steps 3] [--ranks 2]

It launches both configurations itself and prints one table. The model is randomly initialised
with ``update_bench``'s shapes (``small``: 4 layers, hidden 256, vocab 8192); the batch is
``update_bench.make_batch``. Step time is the median over ``--steps`` timed steps after one
warm-up step; under torchrun the slowest rank's time counts. ``--worker`` is the internal mode
each run uses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from update_bench import SHAPES, build_model, make_batch  # noqa: E402

SHAPES = {**SHAPES, "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=True)}


def worker(args) -> None:
    import torch

    import update_bench
    from tirl.config import AlgoConfig, OptimConfig
    from tirl.dist import Dist
    from tirl.update import policy_update

    update_bench.SHAPES.update(SHAPES)
    dist = Dist.from_env("cpu")
    model = dist.shard(build_model(args.shape, torch.float32, "cpu"))
    trajs, adv = make_batch(args.batch, args.seq, SHAPES[args.shape]["vocab_size"])
    mine = list(dist.block(len(trajs)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    times = []
    for step in range(args.steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        policy_update(model, opt, [trajs[i] for i in mine], [adv[i] for i in mine], AlgoConfig(),
                      OptimConfig(micro_batch_size=args.micro), temperature=1.0, pad_id=0, dist=dist, index=mine)
        took = time.perf_counter() - t0
        times.append(dist.max(int(took * 1e6)) / 1e6)
    if dist.writer:
        print("RESULT " + json.dumps({"step_s": statistics.median(times[1:]), "threads": torch.get_num_threads()}))
    dist.close()


def run(args, ranks: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    me = [str(Path(__file__).resolve()), "--worker", "--shape", args.shape, "--batch", str(args.batch),
          "--seq", str(args.seq), "--micro", str(args.micro), "--steps", str(args.steps)]
    cmd = [sys.executable, *me] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *me]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    base = run(args, 1, args.ranks)
    dp = run(args, args.ranks, 1)
    tokens = args.batch * args.seq
    print(f"policy update, shape {args.shape}, {args.batch} x {args.seq} tokens, micro-batch {args.micro}, "
          f"median of {args.steps} steps")
    print("| configuration | step (s) | tokens/s | vs 1 process |")
    print("|---|---|---|---|")
    print(f"| 1 process x {args.ranks} threads | {base['step_s']:.2f} | {tokens / base['step_s']:.0f} | 1.00x |")
    print(f"| {args.ranks} ranks x 1 thread (FSDP2, gloo) | {dp['step_s']:.2f} | {tokens / dp['step_s']:.0f} | "
          f"{base['step_s'] / dp['step_s']:.2f}x |")


if __name__ == "__main__":
    main()
