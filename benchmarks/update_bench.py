"""Trainer throughput: tirl's policy update vs a bare masked-NLL training step, same model, same
batch, same optimizer, same run.

    .venv/bin/python benchmarks/update_bench.py [--shape qwen2.5-0.5b] [--dtype bfloat16] [--compute-dtype auto] [--device auto]
        [--batch 16] [--seq 1024] [--micro 4] [--steps 3] [--entropy-coef 0]

The model is randomly initialised with a real configuration (no weights are downloaded); the
batch is ``--batch`` trajectories of ``--seq`` random tokens: a quarter prompt (mask 0), the rest a
response with two inserted tool outputs of 1/16 of the length each (mask 0), sampler log-probs and
advantages of +-1. Rows:

* ``bare NLL``: for each micro-batch one forward with transformers' own causal-LM loss (``labels``,
  -100 where the mask is 0, normalised over the batch), one backward; then gradient clipping and an
  AdamW step: what a plain supervised step over these tokens costs;
* ``tirl``: :func:`tirl.update.policy_update` (GRPO's PPO-clip loss, token-mean, one mini-batch,
  with the per-token log-probs, entropy and sampler/trainer mismatch it logs).

Tokens/s counts every token in the batch (prompt and tool outputs included: the forward pass runs
over them); peak memory is the accelerator's (CUDA only). ``--shape tiny`` (a 2-layer model) is a
smoke run for CPUs.
"""

from __future__ import annotations

import argparse
import random
import time

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


def make_batch(n: int, seq: int, vocab: int, seed: int = 0):
    """``n`` trajectories of ``seq`` tokens: prompt, response with two tool outputs (mask 0)."""
    from tirl.types import Problem, Trajectory

    rng = random.Random(seed)
    prompt, tool = seq // 4, seq // 16
    trajs, adv = [], []
    for i in range(n):
        ids = [rng.randrange(1, vocab) for _ in range(seq)]
        mask = [0] * prompt + [1] * (seq - prompt)
        for start in (prompt + (seq - prompt) // 3, prompt + 2 * (seq - prompt) // 3):
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


def _time(fn, steps: int, device) -> float:
    import torch

    fn()  # warm-up: allocator, kernels, AdamW state
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="weights and AdamW state")
    ap.add_argument("--compute-dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                    help="forward/backward (auto: --dtype; float32 weights + bfloat16: mixed precision)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=16, help="trajectories per update")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per trajectory")
    ap.add_argument("--micro", type=int, default=4, help="micro-batch size")
    ap.add_argument("--steps", type=int, default=3, help="timed updates per row (after one warm-up)")
    ap.add_argument("--entropy-coef", type=float, default=0.0)
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in both rows")
    args = ap.parse_args(argv)

    import torch

    from tirl.config import AlgoConfig, OptimConfig
    from tirl.models import resolve_device, set_compute_dtype
    from tirl.update import policy_update

    device = torch.device(resolve_device(args.device))
    model = build_model(args.shape, getattr(torch, args.dtype), device)
    set_compute_dtype(model, args.compute_dtype)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable()
    trajs, adv = make_batch(args.batch, args.seq, SHAPES[args.shape]["vocab_size"])
    optim = OptimConfig(lr=1e-7, micro_batch_size=args.micro)
    algo = AlgoConfig(entropy_coef=args.entropy_coef)
    rows = []
    for name, fn in (
        ("bare NLL", lambda opt: bare_step(model, opt, trajs, args.micro, optim.grad_clip)),
        ("tirl", lambda opt: policy_update(model, opt, trajs, adv, algo, optim, temperature=1.0, pad_id=0)),
    ):
        opt = torch.optim.AdamW(model.parameters(), lr=optim.lr)
        wall = _time(lambda: fn(opt), args.steps, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        rows.append((name, wall, args.batch * args.seq / wall, peak))
        del opt
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.shape} ({n_params / 1e6:.0f}M params, {args.dtype} weights, {args.compute_dtype} compute) on {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}: "
          f"{args.batch} x {args.seq} tokens, micro-batch {args.micro}, entropy_coef {args.entropy_coef}"
          f"{', gradient checkpointing' if args.grad_ckpt else ''}")
    print(f"| {'update':<9} | {'s/update':>8} | {'tokens/s':>9} | {'peak GiB':>8} | {'vs bare':>7} |")
    print("|---|---:|---:|---:|---:|")
    for name, wall, tps, peak in rows:
        print(f"| {name:<9} | {wall:8.3f} | {tps:9.0f} | {peak:8.1f} | {wall / rows[0][1]:6.2f}x |")


if __name__ == "__main__":
    main()
