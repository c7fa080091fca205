"""Engine throughput: vLLM vs Hugging Face ``generate``, same model, same prompts, same batch, same run.

    .venv/bin/python benchmarks/engine_bench.py [--batches 8,32] [--tokens 256] [--dtype bfloat16]

Both go through tirl's Engine interface (token ids in; ids + log-probs + finish reason out), with
temperature 1.0 (the RL setting) and no stop condition. Tokens/s = generated tokens / wall time
of one ``generate`` call over the whole batch (rows that end early at EOS count what they made).
"""

from __future__ import annotations

import argparse
import time


def _prompts(tok, n: int) -> list[list[int]]:
    topics = ["the history of numbers", "how a compiler works", "a walk in the mountains", "prime numbers",
              "the water cycle", "a chess game", "how bread is made", "the moon landing"]
    return [tok.apply_chat_template([{"role": "user", "content": f"Write a long essay about {topics[i % len(topics)]}."}],
                                    add_generation_prompt=True, tokenize=True, return_dict=False) for i in range(n)]


def _measure(engine, prompts, tokens: int, params) -> tuple[float, int]:
    t0 = time.perf_counter()
    gens = engine.generate(prompts, [tokens] * len(prompts), params)
    wall = time.perf_counter() - t0
    return wall, sum(len(g.token_ids) for g in gens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    import torch

    from tirl.models import load_model, resolve_model_path
    from tirl.rollout import SamplingParams
    from tirl.rollout.hf_engine import HFEngine

    path = str(resolve_model_path(args.model))
    model, tok = load_model(path, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    params = SamplingParams(temperature=1.0)
    t0 = time.perf_counter()
    from tirl.rollout.vllm_engine import VLLMEngine

    vllm = VLLMEngine(path, dtype=args.dtype, kv_cache_gb=2)
    startup = time.perf_counter() - t0
    hf = HFEngine(model, tok, batch_size=max(batches))
    rows = []
    for b in batches:
        prompts = _prompts(tok, b)
        _measure(vllm, prompts[:2], 8, params)  # warm-up (compilation, first-call allocations)
        _measure(hf, prompts[:2], 8, params)
        torch.manual_seed(0)
        v_wall, v_tok = _measure(vllm, prompts, args.tokens, params)
        h_wall, h_tok = _measure(hf, prompts, args.tokens, params)
        rows.append((b, v_tok / v_wall, v_tok, h_tok / h_wall, h_tok))
    print(f"model {args.model} ({args.dtype}), {args.tokens} new tokens per row, temperature 1.0, "
          f"torch threads {torch.get_num_threads()}; vLLM start-up {startup:.0f} s")
    print("| batch | vLLM tok/s | vLLM tokens | HF tok/s | HF tokens | vLLM / HF |")
    print("|---|---|---|---|---|---|")
    for b, vt, vn, ht, hn in rows:
        print(f"| {b} | {vt:.1f} | {vn} | {ht:.1f} | {hn} | {vt / ht:.2f}x |")


if __name__ == "__main__":
    main()
