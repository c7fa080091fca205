"""The papers' headline on a laptop: code-integrated vs text-only training, same model and budget.

``tirl headline --seeds 0,1,2`` runs the two arms (recipes ``mini-retool`` and ``mini-text``: cold-start
SFT on synthetic traces, then GRPO, evaluated on the same fixed held-out set before RL and every
``eval.every`` steps) for each seed, then writes into the output folder:

* ``headline.json`` — every arm x seed curve (step, held-out accuracy, tool calls per answer);
* ``headline.md`` — the final table (after SFT, after RL, mean and per seed);
* ``headline.png`` — accuracy and tool use against training step for both arms.

Seeds change the SFT order, the RL sampling and the RL problem order; the problems, the held-out
set and the step counts are the same for both arms.

``tirl headline --experiment mixed`` (issue #23) runs ``mini-mixed`` and ``mini-mixed-cost`` instead:
the mixed task, whose held-out set is scored per kind, so ``mixed.{json,md,png}`` show accuracy and
code ratio of the easy problems and of the products against step.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

from tirl.config import load_config
from tirl.train import train

ARMS = ("mini-retool", "mini-text")
EXPERIMENTS = {"papers": ARMS, "mixed": ("mini-mixed", "mini-mixed-cost")}


def _curve(run_dir: Path) -> list[dict]:
    """``[{step, accuracy, tool_calls, kinds: {bench: {accuracy, code_ratio, tool_calls}}}]`` from a
    run's evaluation rows (``kinds``: every benchmark part, e.g. the mixed task's two kinds)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        acc = [v for k, v in row.items() if k.startswith("eval/avg/avg@")]
        if acc:
            calls = [v for k, v in row.items() if k.endswith("/tool_calls_per_traj") and not k.startswith("eval/avg/")]
            kinds = {}
            for k, v in row.items():
                bench, _, name = k[len("eval/"):].rpartition("/")
                if k.startswith("eval/") and bench != "avg" and name.startswith("avg@"):
                    kinds[bench] = {"accuracy": v, "code_ratio": row.get(f"eval/{bench}/code_ratio", 0.0),
                                    "tool_calls": row.get(f"eval/{bench}/tool_calls_per_traj", 0.0)}
            out.append({"step": row["step"], "accuracy": acc[0], "tool_calls": mean(calls) if calls else 0.0, "kinds": kinds})
    return out


def run_headline(seeds: list[int], out_dir: str | Path, overrides: list[str] | None = None,
                 arms: tuple[str, ...] = ARMS, progress: bool = True, name: str = "headline") -> dict:
    """Every arm x seed; ``<name>.json`` after each run (nothing lost if a later one fails), then the
    table and the plot (``mixed``-style per-kind ones when the runs' evaluations have kinds)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"seeds": seeds, "overrides": overrides or [], "arms": {arm: {} for arm in arms}}
    for seed in seeds:  # seed-major: a run cut short still has both arms for the seeds it finished
        for arm in arms:
            cfg = load_config(arm, [f"train.seed={seed}", f"train.output_dir={json.dumps(str(out))}",
                                    f"train.run_name={arm}-seed{seed}", *(overrides or [])])
            run_dir = train(cfg, progress=progress)
            results["arms"][arm][str(seed)] = _curve(run_dir)
            (out / f"{name}.json").write_text(json.dumps(results, indent=1))  # nothing lost if a later run fails
    per_kind = any(len(p.get("kinds", {})) > 1 for runs in results["arms"].values() for c in runs.values() for p in c)
    (out / f"{name}.md").write_text(kind_table(results) if per_kind else table(results))
    (plot_kinds if per_kind else plot)(results, out / f"{name}.png")
    return results


def kind_table(results: dict) -> str:
    """Per arm and kind: accuracy and code ratio right after SFT and after RL (means over seeds)."""
    lines = ["| arm | kind | accuracy after SFT | after RL | code ratio after SFT | after RL | per seed: code ratio SFT -> RL |",
             "|---|---|---|---|---|---|---|"]
    for arm, runs in results["arms"].items():
        curves = [c for c in runs.values() if c]
        for kind in sorted(curves[0][0]["kinds"]) if curves else []:
            first = [c[0]["kinds"][kind] for c in curves]
            last = [c[-1]["kinds"][kind] for c in curves]
            per_seed = ", ".join(f"{s}: {c[0]['kinds'][kind]['code_ratio']:.2f} -> {c[-1]['kinds'][kind]['code_ratio']:.2f}"
                                 for s, c in runs.items() if c)
            lines.append(f"| {arm} | {kind.split(':')[-1]} | {mean(x['accuracy'] for x in first):.3f} | "
                         f"{mean(x['accuracy'] for x in last):.3f} | {mean(x['code_ratio'] for x in first):.3f} | "
                         f"{mean(x['code_ratio'] for x in last):.3f} | {per_seed} |")
    return "\n".join(lines) + "\n"


def plot_kinds(results: dict, path: Path) -> None:
    """Accuracy and code ratio per kind against step: one column per arm, kinds as colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results["arms"])
    fig, axes = plt.subplots(2, len(arms), figsize=(5 * len(arms), 7), squeeze=False)
    for col, arm in enumerate(arms):
        curves = [c for c in results["arms"][arm].values() if c]
        kinds = sorted(curves[0][0]["kinds"]) if curves else []
        for kind, color in zip(kinds, ("tab:green", "tab:red", "tab:blue", "tab:orange")):
            for row, key in enumerate(("accuracy", "code_ratio")):
                ax = axes[row][col]
                for c in curves:
                    ax.plot([p["step"] for p in c], [p["kinds"][kind][key] for p in c], color=color, alpha=0.3, linewidth=1)
                steps = [p["step"] for p in curves[0]]
                if all(len(c) == len(steps) for c in curves):
                    ax.plot(steps, [mean(c[i]["kinds"][kind][key] for c in curves) for i in range(len(steps))], color=color,
                            linewidth=2.5, marker="o", label=f"{kind.split(':')[-1]} " + (
                                f"(mean of {len(curves)} seeds)" if len(curves) > 1 else "(1 seed)"))
        axes[0][col].set(title=f"{arm}: held-out accuracy", xlabel="RL step (0 = after SFT)", ylim=(-0.02, 1.02))
        axes[1][col].set(title=f"{arm}: code ratio (responses with code)", xlabel="RL step (0 = after SFT)", ylim=(-0.02, 1.02))
        axes[0][col].legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
