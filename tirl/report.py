"""``tirl report RUN_DIR``: one self-contained HTML page and PNG plots for a run.

The page embeds its data (metrics, evaluations, trajectories) as JSON and draws everything with
inline JavaScript and SVG: it opens from disk with no network. Sections: training curves (reward,
accuracy, length, tool metrics, time split per step), the evaluation table, and a trajectory
viewer (filter by step, reward, correctness, number of tool calls; each trajectory shows its
prompt, the model's text, every tool output in a distinct masked block, and the verdict).
Works on a training run (``metrics.jsonl``, ``trajectories/``, ``eval/step_*/``) and on an
evaluation folder (``results.json``, ``trajectories/<bench>.jsonl``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tirl.types import TirlError

CURVES = [
    ("Reward and accuracy", ["reward_mean", "accuracy"]),
    ("Response length (tokens)", ["response_len", "policy_tokens"]),
    ("Tool use", ["code_ratio", "executed_code_ratio", "tool_calls_per_traj", "tool_error_rate"]),
    ("Update", ["update/logprob_mismatch", "update/grad_norm", "update/clip_frac_low", "update/clip_frac_high"]),
]
TIME_KEYS = ["time/generate", "time/tools", "time/reward", "time/update"]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _slim(t: dict[str, Any], step: int | str) -> dict[str, Any]:
    """What the viewer needs of a trajectory (token lists are replaced by counts)."""
    segs = t.get("segments", [])
    info = t.get("reward_info", {})
    return {
        "step": step, "id": t["problem"]["id"], "question": t["problem"]["problem"], "gold": t["problem"]["answer"],
        "prompt": "".join(s["text"] for s in segs if s["kind"] == "prompt"),
        "segments": [{"kind": s["kind"], "text": s["text"], "tokens": s["end"] - s["start"]} for s in segs if s["kind"] != "prompt"],
        "calls": [{"code": c["code"], "obs": c["observation"], "ok": c["result"]["returncode"] == 0 and not c["result"]["timed_out"]}
                  for c in t.get("tool_calls", [])],
        "reward": t.get("reward", 0.0), "correct": bool(info.get("correct")), "extracted": info.get("extracted"),
        "finish": t.get("finish_reason"), "masked": sum(1 for m in t.get("mask", []) if m == 0),
        "sampled": sum(t.get("mask", [])),
    }


def collect(run_dir: Path, max_per_step: int = 64) -> dict[str, Any]:
    if not run_dir.is_dir():
        raise TirlError(f"{run_dir} is not a folder: pass a training run folder or an eval output folder")
    data: dict[str, Any] = {"name": run_dir.name, "metrics": [], "evals": [], "trajectories": []}
    if (run_dir / "metrics.jsonl").is_file():
        data["metrics"] = _read_jsonl(run_dir / "metrics.jsonl")
    for f in sorted((run_dir / "trajectories").glob("step_*.jsonl")):
        step = int(f.stem.split("_")[1])
        data["trajectories"] += [_slim(t, step) for t in _read_jsonl(f)[:max_per_step]]
    evals = sorted(run_dir.glob("eval/step_*/results.json")) + ([run_dir / "results.json"] if (run_dir / "results.json").is_file() else [])
    for f in evals:
        res = json.loads(f.read_text())
        label = f.parent.name if f.parent != run_dir else "eval"
        data["evals"].append({"label": label, "model": res["model"], "benches": {b: r["scores"] for b, r in res["benches"].items()},
                              "tool": {b: r["tool"] for b, r in res["benches"].items()}, "average": res["average"]})
        if f.parent == run_dir:  # an eval folder: its trajectories are per benchmark
            for tf in sorted((run_dir / "trajectories").glob("*.jsonl")):
                if not tf.stem.startswith("step_"):
                    data["trajectories"] += [_slim(t, tf.stem) for t in _read_jsonl(tf)[: max_per_step * 8]]
    if not (data["metrics"] or data["evals"] or data["trajectories"]):
        raise TirlError(f"{run_dir} has no metrics.jsonl, results.json or trajectories/: nothing to report")
    return data


def write_plots(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG versions of the curves (for papers and READMEs); needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return []
    rows, paths = data["metrics"], []
    if not rows:
        return paths
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in rows]
    for title, keys in CURVES + [("Time per step (s)", TIME_KEYS)]:
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        for k in keys:
            ys = [r.get(k) for r in rows]
            if any(y is not None for y in ys):
                ax.plot(steps, [float("nan") if y is None else y for y in ys], marker="o", ms=3, label=k)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / (title.split(" (")[0].lower().replace(" ", "_") + ".png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(run_dir: str | Path, out: str | Path | None = None, max_per_step: int = 64) -> Path:
    run_dir = Path(run_dir)
    data = collect(run_dir, max_per_step)
    write_plots(data, run_dir / "plots")
    payload = json.dumps({**data, "curves": CURVES, "time_keys": TIME_KEYS}).replace("</", "<\\/")
    html = _TEMPLATE.replace("__TITLE__", _escape(data["name"])).replace("__DATA__", payload)
    path = Path(out) if out else run_dir / "report.html"
    path.write_text(html, encoding="utf-8")
    return path


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_TEMPLATE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tirl report: __TITLE__</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7fa}
header{background:#1d2330;color:#fff;padding:12px 24px}header h1{font-size:18px;margin:0}
main{padding:16px 24px;max-width:1200px}section{background:#fff;border:1px solid #dde1ea;border-radius:8px;padding:12px 16px;margin:0 0 16px}
h2{font-size:15px;margin:4px 0 10px}.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px}
.chart h3{font-size:13px;margin:0 0 4px}.legend span{margin-right:10px;font-size:12px}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #dde1ea;padding:3px 8px;text-align:right}th{background:#f0f2f7}td:first-child,th:first-child{text-align:left}
.filters{display:flex;gap:12px;flex-wrap:wrap;align-items:center;margin-bottom:8px}.filters label{font-size:13px}
.traj{border:1px solid #dde1ea;border-radius:6px;margin:8px 0}.traj summary{cursor:pointer;padding:6px 10px;display:flex;gap:12px;align-items:center}
.badge{font-size:12px;padding:1px 7px;border-radius:10px;color:#fff}.ok{background:#1a7f37}.bad{background:#c0362c}.muted{color:#6b7385;font-size:12px}
.body{padding:6px 12px 12px}.seg-model{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12.5px;margin:4px 0}
.seg-tool{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12.5px;background:#fff6dd;border-left:4px solid #e0a800;padding:4px 8px;margin:4px 0}
.seg-tool::before{content:attr(data-label);display:block;font:11px system-ui;color:#8a6d00}.prompt{white-space:pre-wrap;font-size:12px;color:#4a5163;background:#f0f2f7;padding:6px;border-radius:4px}
.verdict{margin-top:6px;font-size:13px}#more{margin-top:8px}
</style></head><body>
<header><h1>tirl report — __TITLE__</h1></header>
<main>
<section id="curves"><h2>Training curves</h2><div class="charts" id="charts"></div></section>
<section id="evals"><h2>Evaluation</h2><div id="eval-table"></div></section>
<section id="viewer"><h2>Trajectories</h2>
<div class="filters">
<label>step <select id="filter-step"></select></label>
<label>reward <select id="filter-reward"></select></label>
<label>verdict <select id="filter-correct"><option value="all">all</option><option value="correct">correct</option><option value="incorrect">incorrect</option></select></label>
<label>tool calls <select id="filter-calls"><option value="all">any</option><option value="0">0</option><option value="1">1</option><option value="2+">2+</option></select></label>
<span id="traj-count" class="muted"></span></div>
<div id="traj-list"></div><button id="more">show more</button>
</section></main>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const COLORS = ["#2f6fde", "#d9480f", "#1a7f37", "#8e44ad", "#c0362c", "#0e8a8a"];
const el = (tag, attrs = {}, text) => { const e = document.createElement(tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); if (text !== undefined) e.textContent = text; return e; };
const svgEl = (tag, attrs) => { const e = document.createElementNS("http://www.w3.org/2000/svg", tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); return e; };

function chart(title, keys, rows) {
  const series = keys.map(k => ({k, pts: rows.filter(r => typeof r[k] === "number").map(r => [r.step, r[k]])})).filter(s => s.pts.length);
  if (!series.length) return null;
  const box = el("div", {class: "chart"}); box.appendChild(el("h3", {}, title));
  const W = 360, H = 180, P = 34, all = series.flatMap(s => s.pts);
  let [x0, x1] = [Math.min(...all.map(p => p[0])), Math.max(...all.map(p => p[0]))], [y0, y1] = [Math.min(...all.map(p => p[1])), Math.max(...all.map(p => p[1]))];
  if (x0 === x1) x1 = x0 + 1; if (y0 === y1) { y0 -= 1; y1 += 1; }
  const sx = x => P + (x - x0) / (x1 - x0) * (W - P - 8), sy = y => H - 20 - (y - y0) / (y1 - y0) * (H - 30);
  const svg = svgEl("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img"});
  svg.appendChild(svgEl("line", {x1: P, y1: H - 20, x2: W - 8, y2: H - 20, stroke: "#aab"}));
  svg.appendChild(svgEl("line", {x1: P, y1: 10, x2: P, y2: H - 20, stroke: "#aab"}));
  for (const [v, y] of [[y0, sy(y0)], [y1, sy(y1)]]) { const t = svgEl("text", {x: 2, y: y + 4, "font-size": 10, fill: "#556"}); t.textContent = +v.toFixed(3); svg.appendChild(t); }
  const tx = svgEl("text", {x: W - 40, y: H - 4, "font-size": 10, fill: "#556"}); tx.textContent = "step " + x1; svg.appendChild(tx);
  const legend = el("div", {class: "legend"});
  series.forEach((s, i) => {
    const c = COLORS[i % COLORS.length];
    svg.appendChild(svgEl("polyline", {points: s.pts.map(p => sx(p[0]) + "," + sy(p[1])).join(" "), fill: "none", stroke: c, "stroke-width": 2}));
    for (const p of s.pts) svg.appendChild(svgEl("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: c}));
    const item = el("span"); const sw = el("i"); sw.style.background = c; item.appendChild(sw); item.appendChild(document.createTextNode(s.k)); legend.appendChild(item);
  });
  box.appendChild(svg); box.appendChild(legend); return box;
}

function timeChart(rows) {
  const keys = D.time_keys.filter(k => rows.some(r => typeof r[k] === "number"));
  if (!keys.length) return null;
  const box = el("div", {class: "chart"}); box.appendChild(el("h3", {}, "Time per step (s), stacked"));
  const W = 360, H = 180, P = 34, max = Math.max(...rows.map(r => keys.reduce((a, k) => a + (r[k] || 0), 0))) || 1;
  const svg = svgEl("svg", {width: W, height: H}), bw = Math.max(2, (W - P - 8) / rows.length - 2);
  rows.forEach((r, i) => { let y = H - 20; keys.forEach((k, j) => { const h = (r[k] || 0) / max * (H - 30); y -= h;
    svg.appendChild(svgEl("rect", {x: P + i * (bw + 2), y, width: bw, height: h, fill: COLORS[j % COLORS.length]})); }); });
  const t = svgEl("text", {x: 2, y: 14, "font-size": 10, fill: "#556"}); t.textContent = max.toFixed(1); svg.appendChild(t);
  const legend = el("div", {class: "legend"});
  keys.forEach((k, j) => { const item = el("span"); const sw = el("i"); sw.style.background = COLORS[j % COLORS.length]; item.appendChild(sw); item.appendChild(document.createTextNode(k)); legend.appendChild(item); });
  box.appendChild(svg); box.appendChild(legend); return box;
}

function renderCurves() {
  const host = document.getElementById("charts");
  if (!D.metrics.length) { host.appendChild(el("p", {class: "muted"}, "No training metrics in this folder.")); return; }
  const evalKeys = Object.keys(D.metrics[D.metrics.length - 1]).filter(k => k.startsWith("eval/avg/"));
  for (const [title, keys] of D.curves.concat(evalKeys.length ? [["Periodic evaluation", evalKeys]] : [])) {
    const c = chart(title, keys, D.metrics); if (c) host.appendChild(c);
  }
  const t = timeChart(D.metrics); if (t) host.appendChild(t);
}

function renderEvals() {
  const host = document.getElementById("eval-table");
  if (!D.evals.length) { host.appendChild(el("p", {class: "muted"}, "No evaluation in this folder.")); return; }
  const table = el("table"), head = el("tr");
  ["run", "benchmark", "score", "value (%)", "code ratio", "calls / response", "tool error rate"].forEach(h => head.appendChild(el("th", {}, h)));
  table.appendChild(head);
  for (const ev of D.evals) for (const [b, scores] of Object.entries(ev.benches)) for (const [k, v] of Object.entries(scores)) {
    const tr = el("tr"), tool = ev.tool[b] || {};
    [ev.label, b, k, (100 * v).toFixed(1), fmt(tool.code_ratio), fmt(tool.tool_calls_per_traj), fmt(tool.tool_error_rate)].forEach(c => tr.appendChild(el("td", {}, c)));
    table.appendChild(tr);
  }
  host.appendChild(table);
}
const fmt = v => (typeof v === "number" && isFinite(v)) ? v.toFixed(2) : "-";

let shown = 20;
function filtered() {
  const step = document.getElementById("filter-step").value, rew = document.getElementById("filter-reward").value;
  const cor = document.getElementById("filter-correct").value, calls = document.getElementById("filter-calls").value;
  return D.trajectories.filter(t => (step === "all" || String(t.step) === step) && (rew === "all" || String(t.reward) === rew)
    && (cor === "all" || (cor === "correct") === t.correct)
    && (calls === "all" || (calls === "2+" ? t.calls.length >= 2 : t.calls.length === +calls)));
}

function trajCard(t) {
  const d = el("details", {class: "traj", "data-correct": t.correct, "data-calls": t.calls.length});
  const s = el("summary");
  s.appendChild(el("span", {class: "badge " + (t.correct ? "ok" : "bad")}, t.correct ? "correct" : "incorrect"));
  s.appendChild(el("span", {}, `step ${t.step} · ${t.id} · reward ${t.reward} · ${t.calls.length} tool call(s)`));
  s.appendChild(el("span", {class: "muted"}, t.question.slice(0, 90)));
  d.appendChild(s);
  const body = el("div", {class: "body"});
  const pr = el("details"); pr.appendChild(el("summary", {}, "prompt")); pr.appendChild(el("div", {class: "prompt"}, t.prompt)); body.appendChild(pr);
  for (const seg of t.segments) {
    if (seg.kind === "tool") body.appendChild(el("div", {class: "seg-tool", "data-label": `tool output · inserted · mask 0 · ${seg.tokens} tokens`}, seg.text));
    else body.appendChild(el("div", {class: "seg-model", title: `sampled by the policy · mask 1 · ${seg.tokens} tokens`}, seg.text));
  }
  const v = el("div", {class: "verdict"});
  v.textContent = `verdict: ${t.correct ? "correct" : "incorrect"} · extracted ${t.extracted === null ? "(no answer)" : JSON.stringify(t.extracted)} · reference ${JSON.stringify(t.gold)} · finish ${t.finish} · ${t.sampled} sampled / ${t.masked} masked tokens`;
  body.appendChild(v); d.appendChild(body); return d;
}

function renderList() {
  const list = document.getElementById("traj-list"), items = filtered();
  list.replaceChildren(...items.slice(0, shown).map(trajCard));
  document.getElementById("traj-count").textContent = `${items.length} trajectories`;
  document.getElementById("more").style.display = items.length > shown ? "" : "none";
}

function initViewer() {
  const steps = [...new Set(D.trajectories.map(t => String(t.step)))], rewards = [...new Set(D.trajectories.map(t => String(t.reward)))].sort((a, b) => +a - +b);
  const fill = (id, vals) => { const s = document.getElementById(id); s.appendChild(el("option", {value: "all"}, "all")); vals.forEach(v => s.appendChild(el("option", {value: v}, v))); };
  fill("filter-step", steps); fill("filter-reward", rewards);
  for (const id of ["filter-step", "filter-reward", "filter-correct", "filter-calls"]) document.getElementById(id).addEventListener("change", () => { shown = 20; renderList(); });
  document.getElementById("more").addEventListener("click", () => { shown += 20; renderList(); });
  renderList();
}

renderCurves(); renderEvals(); initViewer();
</script></body></html>
"""
