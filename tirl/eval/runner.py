"""Evaluate a model on benchmarks: rollouts with the training protocol (or without tools), the
strict verifier, avg@k / pass@k / maj@k per benchmark and on average, the papers' tool metrics.

Outputs (``out_dir``): ``results.json`` (scores, the exact config, model, seed, versions) and
``trajectories/<bench>.jsonl`` (every trajectory)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from tirl.config import Config
from tirl.data import build_problems, load_problems, parse_synthetic
from tirl.eval.metrics import rollout_metrics
from tirl.eval.published import TORL_BENCHES, published_for
from tirl.eval.scores import aggregate, problem_scores
from tirl.prompt import CODE_INTERPRETER_TOOL, render_prompt
from tirl.reward import Verifier, score
from tirl.rollout import RolloutLimits, SamplingParams, resolve_mode, rollout
from tirl.rollout.engine import derive_seed
from tirl.rollout.protocol import get_protocol
from tirl.rollout.hf_engine import HFEngine
from tirl.sandbox import Sandbox
from tirl.types import Problem, TirlError

ALIASES = {"olympiad": "olympiadbench", "minerva": "minerva_math", "math": "math500", "amc": "amc23"}
# Where a hub is reachable: (dataset, config, split, problem field, answer field)
HUB = {
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "problem", "answer"),
    "aime24": ("HuggingFaceH4/aime_2024", None, "train", "problem", "answer"),
    "gsm8k": ("openai/gsm8k", "main", "test", "question", "answer"),
}
TOOL_KEYS = ("code_ratio", "executed_code_ratio", "tool_calls_per_traj", "tool_error_rate", "boxed_ratio",
             "response_len", "truncation_ratio")


def default_data_dir() -> Path | None:
    for cand in (os.environ.get("TIRL_DATA_DIR"), "shared/data/eval", "../shared/data/eval"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


def resolve_benchmark(name: str, data_dir: str | None, limit: int | None, problem_field: str = "problem",
                      answer_field: str = "answer") -> list[Problem]:
    """``name``: a file ``<name>.jsonl`` in the data dir; a known benchmark on the hub (MATH-500,
    AIME24, GSM8K); or any hub dataset id ``org/name[:split]`` (fields from data.problem_field /
    data.answer_field), where a hub is reachable."""
    name = ALIASES.get(name, name)
    path = Path(name).expanduser()
    if path.suffix in (".jsonl", ".json", ".parquet") and path.is_file():
        return bench_file(path, limit, problem_field, answer_field)
    if name.startswith("synthetic:"):  # the embedded generator: a fixed, seeded set (seed 0)
        return build_problems(name, num_synthetic=limit or 100)
    root = Path(data_dir) if data_dir else default_data_dir()
    if root is not None and (root / f"{name}.jsonl").is_file():
        return load_problems(root / f"{name}.jsonl", limit=limit)
    if name in HUB:
        return _from_hub(name, HUB[name], limit)
    if "/" in name and not Path(name).exists():
        dataset, _, split = name.partition(":")
        return _from_hub(name, (dataset, None, split or "test", problem_field, answer_field), limit)
    known = sorted(p.stem for p in root.glob("*.jsonl")) if root else []
    raise TirlError(f"benchmark {name!r}: no {name}.jsonl in {root or '(no data dir found)'}. Known here: "
                    f"{', '.join(known) or 'none'}. Fix: --data-dir DIR (or $TIRL_DATA_DIR) with <name>.jsonl files.")


VERL_FIELDS = ("prompt.-1.content", "reward_model.ground_truth")  # verl's parquet layout (ToRL's test file)


def bench_file(path: Path, limit: int | None, problem_field: str = "problem", answer_field: str = "answer") -> list[Problem]:
    """A benchmark file (.jsonl/.json/.parquet) with the fields ``tirl train`` takes; verl's layout
    (``prompt`` messages, ``reward_model.ground_truth``, ``data_source``) is recognised when the
    default fields are absent. ``limit``: the first N problems of each ``data_source``."""
    from tirl.data.loader import _MISSING, _rows, get_field

    first = next((row for _, row in _rows(path)), None)
    if isinstance(first, dict) and (problem_field, answer_field) == ("problem", "answer"):
        if get_field(first, "problem") is _MISSING and get_field(first, VERL_FIELDS[0]) is not _MISSING:
            problem_field, answer_field = VERL_FIELDS
    problems = load_problems(path, problem_field, answer_field)
    if limit is None:
        return problems
    seen: dict[str, int] = {}
    out = []
    for p in problems:
        seen[p.source] = seen.get(p.source, 0) + 1
        if seen[p.source] <= limit:
            out.append(p)
    return out


def bench_parts(bench: str, problems: list[Problem]) -> list[tuple[str, list[Problem]]]:
    """``(name, problems)`` to score: a file's problems by their ``data_source`` (ToRL's test file
    gives aime24 / aime25 / math500), a synthetic set of several kinds by kind (``synthetic:easy``,
    ``synthetic:product``: the mixed task's metrics per kind), anything else as one benchmark."""
    several_kinds = bench.startswith("synthetic:") and len(parse_synthetic(bench)[0] or ()) > 1
    if not several_kinds and not Path(bench).expanduser().is_file():
        return [(bench, problems)]
    groups: dict[str, list[Problem]] = {}
    for p in problems:
        groups.setdefault(p.source, []).append(p)
    return list(groups.items())


def _from_hub(name: str, spec: tuple[str, str | None, str, str, str], limit: int | None) -> list[Problem]:
    """``spec`` = (dataset, config, split, problem field, answer field)."""
    dataset, conf, split, pf, af = spec
    try:
        from datasets import load_dataset

        rows = load_dataset(dataset, conf, split=split)
    except Exception as e:  # noqa: BLE001 - no hub, no package: one clear message
        first = (str(e).splitlines() or [""])[0][:200]
        raise TirlError(f"benchmark {name!r} is not in the data dir and {dataset} could not be loaded from the hub "
                        f"({type(e).__name__}: {first}). Fix: --data-dir with a {name.split('/')[-1]}.jsonl file, "
                        "or pip install datasets on a machine that reaches the hub.") from None
    out = []
    for i, row in enumerate(rows):
        answer = str(row[af]).split("####")[-1].strip()
        out.append(Problem(id=f"{name}-{i}", problem=row[pf], answer=answer, source=dataset))
        if limit and len(out) >= limit:
            break
    return out


def finite(obj: Any) -> Any:
    """JSON has no NaN: undefined values (e.g. tool error rate with no tool call) become null."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def versions() -> dict[str, str]:
    import transformers

    import tirl

    return {"tirl": tirl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def evaluate(model, tok, cfg: Config, sandbox: Sandbox, verifier: Verifier, out_dir: Path | None = None,
             model_name: str | None = None, engine=None) -> dict[str, Any]:
    """``engine``: reuse one (the trainer's); default an HF engine on ``model``."""
    e, r = cfg.eval, cfg.rollout
    engine = engine or HFEngine(model, tok, r.generation_batch_size)
    params = SamplingParams(temperature=e.temperature if e.n > 1 or e.temperature > 0 else 0.0, top_p=e.top_p)
    limits = RolloutLimits(r.max_tool_calls if e.tools else 0, r.max_tokens_per_turn, r.max_response_tokens,
                           r.obs_head_chars, r.obs_tail_chars, cfg.sandbox.timeout_s, cfg.sandbox.replay_history,
                           cfg.sandbox.print_last_expr)
    system, template = (cfg.prompt.system, cfg.prompt.template) if e.tools else (e.no_tools_system, e.no_tools_template)
    results: dict[str, Any] = {}
    parts = [part for bench in e.benches for part in
             bench_parts(bench, resolve_benchmark(bench, e.data_dir, e.limit, cfg.data.problem_field,
                                                  cfg.data.answer_field))]
    for bench, problems in parts:
        torch.manual_seed(e.seed)
        t0 = time.perf_counter()
        tools = [CODE_INTERPRETER_TOOL] if e.tools and r.protocol == "chat" else None
        prompts = [render_prompt(p, tok, cfg.prompt.style, template, system, tools) for p in problems]
        items = [(p, i, prompts[i]) for i, p in enumerate(problems) for _ in range(e.n)]
        trajs, _ = rollout(engine, tok, sandbox, items, params, limits, get_protocol(r.protocol, tok),
                           resolve_mode(r.mode, engine), seed=derive_seed(e.seed, bench))
        score(trajs, cfg.reward, verifier, benchmark=bench)  # Minerva: its grader's 1% tolerance
        per_problem = []
        for i in range(len(problems)):
            group = trajs[i * e.n : (i + 1) * e.n]
            per_problem.append(problem_scores([t.reward_info["extracted"] for t in group],
                                              [bool(t.reward_info["correct"]) for t in group], e.pass_ks))
        tool = rollout_metrics(trajs)
        results[bench] = {"problems": len(problems), "samples": len(trajs), "scores": aggregate(per_problem),
                          "tool": {k: tool[k] for k in TOOL_KEYS}, "seconds": time.perf_counter() - t0}
        if out_dir is not None:
            (out_dir / "trajectories").mkdir(parents=True, exist_ok=True)
            with (out_dir / "trajectories" / f"{bench}.jsonl").open("w") as f:
                for t in trajs:
                    f.write(json.dumps(t.to_json()) + "\n")
    keys = set.intersection(*(set(v["scores"]) for v in results.values())) if results else set()
    average = {k: sum(v["scores"][k] for v in results.values()) / len(results) for k in sorted(keys)}
    out = finite({"model": model_name or cfg.model.name, "seed": e.seed, "benches": results, "average": average,
                  "config": cfg.model_dump(mode="json"), "versions": versions(), "time": time.time()})
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(out, indent=2))
    return out


def headline_key(results: dict[str, Any]) -> str:
    """The main score: greedy accuracy (avg@1) or avg@n."""
    return next(k for k in results["average"] if k.startswith("avg@")) if results["average"] else "avg@1"


def format_table(results: dict[str, Any]) -> str:
    """Markdown in the layout of ToRL's README tables (percent), papers' numbers beside ours."""
    key = headline_key(results)
    benches = list(results["benches"])
    order = [b for b in TORL_BENCHES if b in benches] + [b for b in benches if b not in TORL_BENCHES]
    head = "| Model | " + " | ".join(b.upper() if b.startswith("aime") else b for b in order) + " | Avg |"
    rows = [head, "|" + "---|" * (len(order) + 2)]
    ours = [100 * results["benches"][b]["scores"][key] for b in order]
    rows.append(f"| {results['model']} (tirl, {key}) | " + " | ".join(f"{x:.1f}" for x in ours)
                + f" | {sum(ours) / len(ours):.1f} |")
    paper = published_for(results["model"])
    if paper:
        vals = [paper.get(b) for b in order]
        known = [v for v in vals if v is not None]
        rows.append(f"| {results['model']} (paper) | " + " | ".join("-" if v is None else f"{v:.1f}" for v in vals)
                    + f" | {sum(known) / len(known):.1f} |")
    extra = [f"{k}={100 * v:.1f}" for k, v in results["average"].items() if k != key]
    tool = {}
    for k in ("code_ratio", "tool_calls_per_traj", "tool_error_rate"):
        vals = [results["benches"][b]["tool"][k] for b in order if results["benches"][b]["tool"][k] is not None]
        if vals:
            tool[k] = sum(vals) / len(vals)
    return "\n".join(rows) + "\n\nAverage " + ", ".join(extra) + " | tool: " + ", ".join(f"{k} {v:.2f}" for k, v in tool.items())
