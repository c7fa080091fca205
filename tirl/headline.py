"""The papers' headline on a laptop: code-integrated vs text-only training, same model and budget.

``tirl headline --seeds 0,1,2`` runs the two arms (recipes ``mini-retool`` and ``mini-text``: cold-start
SFT on synthetic traces, then GRPO, evaluated on the same fixed held-out set before RL and every
``eval.every`` steps) for each seed, then writes into the output folder:

* ``headline.json`` — every arm x seed curve (step, held-out accuracy, tool calls per answer);
* ``headline.md`` — the final table (after SFT, after RL, mean and per seed);
* ``headline.png`` — accuracy and tool use against training step for both arms.

Seeds change the SFT order, the RL sampling and the RL problem order; the problems, the held-out
set and the step counts are the same for both arms.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

from tirl.config import load_config
from tirl.train import train

ARMS = ("mini-retool", "mini-text")


def _curve(run_dir: Path) -> list[dict[str, float]]:
    """``[{step, accuracy, tool_calls}]`` from a run's evaluation rows."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        acc = [v for k, v in row.items() if k.startswith("eval/avg/avg@")]
        if acc:
            calls = [v for k, v in row.items() if k.endswith("/tool_calls_per_traj") and not k.startswith("eval/avg/")]
            out.append({"step": row["step"], "accuracy": acc[0], "tool_calls": mean(calls) if calls else 0.0})
    return out


def run_headline(seeds: list[int], out_dir: str | Path, overrides: list[str] | None = None,
                 arms: tuple[str, ...] = ARMS, progress: bool = True) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"seeds": seeds, "overrides": overrides or [], "arms": {arm: {} for arm in arms}}
    for seed in seeds:  # seed-major: a run cut short still has both arms for the seeds it finished
        for arm in arms:
            cfg = load_config(arm, [f"train.seed={seed}", f"train.output_dir={json.dumps(str(out))}",
                                    f"train.run_name={arm}-seed{seed}", *(overrides or [])])
            run_dir = train(cfg, progress=progress)
            results["arms"][arm][str(seed)] = _curve(run_dir)
            (out / "headline.json").write_text(json.dumps(results, indent=1))  # nothing lost if a later run fails
    (out / "headline.md").write_text(table(results))
    plot(results, out / "headline.png")
    return results


def table(results: dict) -> str:
    lines = ["| arm | held-out accuracy after SFT | after RL | RL - SFT | tool calls per answer after RL | per seed (SFT -> RL) |",
             "|---|---|---|---|---|---|"]
    for arm, runs in results["arms"].items():
        curves = [c for c in runs.values() if c]
        if not curves:
            continue
        first, last = [c[0]["accuracy"] for c in curves], [c[-1]["accuracy"] for c in curves]
        per_seed = ", ".join(f"{s}: {c[0]['accuracy']:.2f} -> {c[-1]['accuracy']:.2f}" for s, c in runs.items() if c)
        lines.append(f"| {arm} | {mean(first):.3f} | {mean(last):.3f} | {mean(last) - mean(first):+.3f} | "
                     f"{mean(c[-1]['tool_calls'] for c in curves):.2f} | {per_seed} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (arm, runs), color in zip(results["arms"].items(), ("tab:blue", "tab:orange", "tab:green")):
        curves = [c for c in runs.values() if c]
        for key, ax in zip(("accuracy", "tool_calls"), axes):
            for c in curves:
                ax.plot([p["step"] for p in c], [p[key] for p in c], color=color, alpha=0.3, linewidth=1)
            steps = [p["step"] for p in curves[0]] if curves else []
            if curves and all(len(c) == len(steps) for c in curves):
                ax.plot(steps, [mean(c[i][key] for c in curves) for i in range(len(steps))], color=color,
                        linewidth=2.5, marker="o", label=f"{arm} (mean of {len(curves)} seeds)")
    axes[0].set(title="held-out accuracy", xlabel="RL step (0 = after SFT)", ylabel="accuracy", ylim=(-0.02, 1.02))
    axes[1].set(title="tool calls per answer (held-out)", xlabel="RL step (0 = after SFT)", ylabel="calls")
    axes[0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
