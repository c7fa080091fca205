"""``tirl`` command line.

    tirl train [--config RECIPE_OR_TOML] [--model NAME_OR_PATH] [key.sub=value ...]
    tirl train --resume RUN_DIR [key.sub=value ...]   continue a run exactly where it stopped
    tirl model prepare [NAME]        convert an embedded model into the cache (done on first use anyway)
    tirl sandbox serve|bench|check   SandboxFusion-compatible server, benchmark, isolation check
    tirl verify FILE.jsonl           audit the verifier on {gold, response} rows
    tirl sft --data traces.jsonl     cold-start SFT, interpreter spans masked
    tirl eval --model M --bench aime24,math500 [--n k] [--no-tools]
    tirl report RUN_DIR              HTML report with a trajectory viewer, PNG plots
    tirl recipes                     list the built-in recipes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _cmd_train(args: argparse.Namespace) -> int:
    from tirl.config import load_config
    from tirl.train import train

    from tirl.dist import restarts, say, writer_process
    from tirl.run import resume_config
    from tirl.types import TirlError

    overrides = ([f"model.name={json.dumps(args.model)}"] if args.model else []) + list(args.overrides)
    ckpt, resume = None, args.resume
    if not resume and restarts():  # torchrun --max-restarts brought the job back: continue the named run
        cfg = load_config(args.config, overrides)
        named = Path(cfg.train.output_dir) / cfg.train.run_name if cfg.train.run_name else None
        if named is not None and (named / "config.toml").is_file():
            say(f"[tirl] restart {restarts()} of the job: resuming {named}")
            resume = str(named)
    if resume:
        if args.model:
            raise TirlError("--resume continues the run's own weights; drop --model")
        try:
            cfg, ckpt = resume_config(Path(resume), list(args.overrides))
        except TirlError:
            if resume == args.resume:
                raise
            say(f"[tirl] {resume} has no resumable checkpoint yet: starting it again")
            cfg = load_config(args.config, overrides)
        else:
            say(f"[tirl] resuming {ckpt.parent} from {ckpt.name} "
                f"(step {json.loads((ckpt / 'trainer_state.json').read_text())['step']})")
    else:
        cfg = load_config(args.config, overrides)
    _quiet_libraries()
    path = train(cfg, progress=not args.no_progress, resume=ckpt)
    say(f"[tirl] done: metrics, trajectories and checkpoint in {path}")
    if not args.no_report and writer_process():
        from tirl.report import write_report

        print(f"[tirl] report: {write_report(path)} (plots in {path / 'plots'})")
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    from tirl.models import resolve_model_path

    _quiet_libraries()
    print(resolve_model_path(args.name, args.cache_dir))
    return 0


def _make_pool(args: argparse.Namespace):
    from tirl.sandbox import ZygotePool

    return ZygotePool(lanes=args.lanes, timeout_s=args.timeout, isolation=args.isolation)


def _cmd_sandbox(args: argparse.Namespace) -> int:
    if args.action == "serve":
        from tirl.sandbox.server import ServerLimits, main_serve

        limits = ServerLimits(max_run_timeout_s=args.max_timeout, max_queue=args.max_queue, max_wait_s=args.max_wait,
                              **({"max_memory_mb": args.max_memory_mb} if args.max_memory_mb else {}))
        main_serve(_make_pool(args), args.host, args.port, limits)
    elif args.action == "bench":
        from tirl.sandbox.bench import format_table, run_bench

        table = format_table(run_bench(n=args.n, baseline_n=args.baseline_n, lanes=args.lanes, rounds=args.rounds,
                                       isolation=args.isolation))
        print(table)
        if args.out:
            with open(args.out, "a") as f:
                f.write(table + "\n")
    else:  # check
        with _make_pool(args) as pool:
            res = pool.run("import numpy, sympy, sys; print(sys.version.split()[0], numpy.__version__, sympy.__version__)")
            print(f"isolation: {pool.level.describe()}")
            for m in pool.level.missing:
                print(f"  missing: {m}")
            print(f"interpreter: {pool.python} ({res.stdout.strip() or res.stderr.strip()})")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from tirl.reward.audit import audit_file

    audit_file(args.file, args.out, args.workers, args.timeout, keep_tool_output=args.keep_tool_output,
               benchmark=args.benchmark)
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from tirl.config import load_config
    from tirl.dist import Dist
    from tirl.models import resolve_device
    from tirl.run import RunDir, save_checkpoint
    from tirl.sft import run_sft

    overrides = ([f"sft.data={json.dumps(args.data)}"] if args.data else []) + list(args.overrides)
    overrides += [f"model.name={json.dumps(args.model)}"] if args.model else []
    cfg = load_config(args.config, overrides)
    _quiet_libraries()
    dist = Dist.from_env(resolve_device(cfg.model.device), cfg.train.collective_timeout_s)  # torchrun: data parallel
    model, tok, log = run_sft(cfg, progress=not args.no_progress, dist=dist)
    name = cfg.train.run_name or f"sft-{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(dist.on_writer(lambda: str(Path(cfg.train.output_dir) / name), share=True))
    run = dist.writer_only(dist.on_writer(RunDir, path))
    for row in log:
        run.log_metrics(row)
    out = save_checkpoint(dist, run, path, model, tok, {"step": len(log), "kind": "sft", "world_size": dist.world})
    dist.say(f"[tirl] SFT done ({len(log)} steps, final loss {log[-1]['sft/loss']:.4f}); checkpoint in {out}")
    dist.close()
    return 0


def _cmd_traces(args: argparse.Namespace) -> int:
    from tirl.config import load_config
    from tirl.traces import traces_for, write_traces

    rows = traces_for(load_config(args.config, list(args.overrides)), args.style, args.n, args.seed, args.start)
    print(f"[tirl] {len(rows)} {args.style} traces in {write_traces(rows, args.out)}")
    return 0


def _cmd_headline(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tirl.headline import EXPERIMENTS, run_headline

    _quiet_libraries()
    seeds = [int(x) for x in args.seeds.split(",")]
    name = "headline" if args.experiment == "papers" else args.experiment
    out = args.out or f"runs/{name}"
    run_headline(seeds, out, list(args.overrides), arms=EXPERIMENTS[args.experiment], progress=not args.no_progress,
                 name=name)
    print(Path(out, f"{name}.md").read_text())
    print(f"[tirl] plot, table and curves in {out}/{name}.{{png,md,json}}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from tirl.config import load_config
    from tirl.eval.runner import evaluate, format_table
    from tirl.models import load_model
    from tirl.reward import Verifier
    from tirl.sandbox import make_sandbox

    overrides = [f"eval.benches={json.dumps(args.bench.split(','))}", f"eval.n={args.n}", f"eval.seed={args.seed}"]
    overrides += [f"model.name={json.dumps(args.model)}"] if args.model else []
    overrides += [f"eval.temperature={args.temperature}"] if args.temperature is not None else []
    overrides += [f"eval.limit={args.limit}"] if args.limit else []
    overrides += ["eval.tools=false"] if args.no_tools else []
    overrides += [f"eval.data_dir={json.dumps(args.data_dir)}"] if args.data_dir else []
    cfg = load_config(args.config, overrides + list(args.overrides))
    if cfg.eval.n > 1 and cfg.eval.temperature == 0:
        from tirl.types import TirlError

        raise TirlError("eval.n > 1 needs sampling: pass --temperature (ReTool evaluates at 1.0)")
    _quiet_libraries()
    out = Path(args.out or f"runs/eval-{Path(cfg.model.name).name}-{time.strftime('%Y%m%d-%H%M%S')}")
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.cache_dir, cfg.model.device, cfg.model.compute)
    with make_sandbox(cfg.sandbox) as sandbox, Verifier(cfg.reward.verifier_workers, cfg.reward.verifier_timeout_s) as ver:
        results = evaluate(model, tok, cfg, sandbox, ver, out)
    print(format_table(results))
    print(f"[tirl] scores in {out / 'results.json'}, trajectories in {out / 'trajectories'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from tirl.report import write_report

    path = write_report(args.run_dir, args.out, args.max_per_step)
    print(f"[tirl] report: {path}")
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from tirl.config import RECIPES_DIR

    for p in sorted(RECIPES_DIR.glob("*.toml")):
        first = next((ln.lstrip("# ").strip() for ln in p.read_text().splitlines() if ln.startswith("#")), "")
        print(f"{p.stem:20s} {first}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tirl", description="Tool-integrated RL for language models.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="run GRPO with tool-integrated rollouts")
    t.add_argument("--config", default="demo", help="a recipe name (see `tirl recipes`) or a TOML file [demo]")
    t.add_argument("--model", default=None, help="embedded name, local HF folder or hub id (= model.name=...)")
    t.add_argument("--resume", default=None, metavar="RUN",
                   help="continue a run exactly from its latest resumable checkpoint (or the checkpoint given), "
                        "with its own config; overrides apply on top (e.g. train.steps=200)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--no-report", action="store_true", help="do not write report.html and plots at the end")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=3 rollout.group_size=8")
    t.set_defaults(fn=_cmd_train)
    m = sub.add_parser("model", help="model utilities")
    m.add_argument("action", choices=["prepare"])
    m.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    m.add_argument("--cache-dir", default=None)
    m.set_defaults(fn=_cmd_model)
    sb = sub.add_parser("sandbox", help="the code sandbox: serve (SandboxFusion API), bench, check")
    sb.add_argument("action", choices=["serve", "bench", "check"])
    sb.add_argument("--host", default="127.0.0.1")
    sb.add_argument("--port", type=int, default=8080)
    sb.add_argument("--lanes", type=int, default=2, help="zygotes = executions at once [2]")
    sb.add_argument("--timeout", type=float, default=5.0, help="default per-run timeout, s [5]")
    sb.add_argument("--max-timeout", type=float, default=300.0,
                    help="serve: the longest run_timeout accepted; longer is refused (422) [300]")
    sb.add_argument("--max-memory-mb", type=int, default=None,
                    help="serve: the largest memory_limit_MB accepted, and what -1 means [the machine's memory]")
    sb.add_argument("--max-queue", type=int, default=None, help="serve: requests that may wait for a lane [64 x lanes]")
    sb.add_argument("--max-wait", type=float, default=10.0,
                    help="serve: longest wait for a lane before a 504 busy answer, s [10]")
    sb.add_argument("--isolation", choices=["auto", "bwrap", "process"], default="auto")
    sb.add_argument("--n", type=int, default=450, help="bench: executions through the pool [450]")
    sb.add_argument("--baseline-n", type=int, default=72, help="bench: executions through the baseline [72]")
    sb.add_argument("--rounds", type=int, default=3, help="bench: alternating pool/baseline blocks [3]")
    sb.add_argument("--out", default=None, help="bench: also append the table to this file")
    sb.set_defaults(fn=_cmd_sandbox)
    v = sub.add_parser("verify", help="audit the verifier: rows {gold, response} -> + extracted, correct")
    v.add_argument("file")
    v.add_argument("--out", default=None, help="write rows here (default: stdout)")
    v.add_argument("--workers", type=int, default=2)
    v.add_argument("--timeout", type=float, default=5.0, help="hard limit per answer, s [5]")
    v.add_argument("--keep-tool-output", action="store_true",
                   help="grade the response as it is (default: tool outputs are removed first, as in training)")
    v.add_argument("--benchmark", default=None,
                   help="grade every row by this benchmark's numeric rule (minerva_math: within 1%%; "
                        "default: each row's data_source, else exact)")
    v.set_defaults(fn=_cmd_verify)
    sf = sub.add_parser("sft", help="cold-start SFT on code-integrated traces (interpreter output masked)")
    sf.add_argument("--config", default="demo")
    sf.add_argument("--data", default=None, help="traces .jsonl/.parquet (= sft.data)")
    sf.add_argument("--model", default=None)
    sf.add_argument("--no-progress", action="store_true")
    sf.add_argument("overrides", nargs="*")
    sf.set_defaults(fn=_cmd_sft)
    tr = sub.add_parser("traces", help="write synthetic cold-start SFT traces (code-integrated or text-only)")
    tr.add_argument("--style", choices=["code", "text"], default="code")
    tr.add_argument("--n", type=int, default=400)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--start", type=int, default=0, help="first problem index [0]")
    tr.add_argument("--config", default="mini-retool", help="recipe giving the prompt [mini-retool]")
    tr.add_argument("--out", default="traces.jsonl")
    tr.add_argument("overrides", nargs="*")
    tr.set_defaults(fn=_cmd_traces)
    hl = sub.add_parser("headline", help="code-integrated vs text-only training (mini-retool vs mini-text), several seeds, "
                                         "one plot; --experiment mixed: when to use the tool (mini-mixed, mini-mixed-cost)")
    hl.add_argument("--seeds", default="0,1,2")
    hl.add_argument("--experiment", choices=["papers", "mixed"], default="papers",
                    help="papers: mini-retool vs mini-text; mixed: accuracy and code ratio per kind [papers]")
    hl.add_argument("--out", default=None, help="[runs/headline, or runs/mixed]")
    hl.add_argument("--no-progress", action="store_true")
    hl.add_argument("overrides", nargs="*", help="applied to both arms, e.g. train.steps=4")
    hl.set_defaults(fn=_cmd_headline)
    e = sub.add_parser("eval", help="evaluate a model on benchmarks (with or without tools)")
    e.add_argument("--model", default=None, help="embedded name, local folder or hub id [the recipe's model]")
    e.add_argument("--config", default="demo", help="recipe giving protocol, call limit, budgets [demo]")
    e.add_argument("--bench", default="math500", help="comma-separated: aime24,aime25,math500,amc23,olympiadbench,minerva_math,gsm8k, or a .jsonl/.parquet file (verl layout recognised; scored per data_source)")
    e.add_argument("--n", type=int, default=1, help="samples per problem (avg@n, pass@k, maj@n) [1 = greedy]")
    e.add_argument("--temperature", type=float, default=None)
    e.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    e.add_argument("--no-tools", action="store_true", help="text-only: no code execution")
    e.add_argument("--data-dir", default=None, help="folder with <bench>.jsonl [$TIRL_DATA_DIR or ../shared/data/eval]")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default=None, help="output folder [runs/eval-<model>-<time>]")
    e.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    e.set_defaults(fn=_cmd_eval)
    rp = sub.add_parser("report", help="self-contained HTML report (curves, eval table, trajectory viewer) + PNG plots")
    rp.add_argument("run_dir")
    rp.add_argument("--out", default=None, help="[RUN_DIR/report.html]")
    rp.add_argument("--max-per-step", type=int, default=64, help="trajectories per step kept in the page [64]")
    rp.set_defaults(fn=_cmd_report)
    r = sub.add_parser("recipes", help="list built-in recipes")
    r.set_defaults(fn=_cmd_recipes)
    return ap


def main(argv: list[str] | None = None) -> int:
    from tirl.types import TirlError

    from tirl.dist import RankFailed

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except RankFailed:  # it said why (with its rank); end now, without waiting on the other ranks
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except TirlError as e:
        print(f"tirl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tirl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
