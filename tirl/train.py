"""The outer loop: data -> prompt -> rollout -> reward -> advantage -> update, one step at a time.

Everything a step needs lives in :class:`Trainer`; the state that changes between steps
(step count, data position) is the small, serialisable :class:`TrainState`.
"""

from __future__ import annotations

import random
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tirl.advantage import ADVANTAGES
from tirl.config import Config
from tirl.data import ProblemSampler, build_problems
from tirl.eval import rollout_metrics
from tirl.eval.runner import evaluate
from tirl.loss import AGGREGATIONS, POLICY_LOSSES
from tirl.models import load_model
from tirl.prompt import render_prompt
from tirl.reward import Verifier, check_terms, score
from tirl.rollout import RolloutLimits, SamplingParams, rollout
from tirl.rollout.hf_engine import HFEngine
from tirl.run import RunDir
from tirl.sandbox import describe, make_sandbox
from tirl.types import TirlError, Trajectory
from tirl.update import policy_update


@dataclass
class TrainState:
    step: int = 0
    data: dict[str, int] = field(default_factory=dict)


def check_registries(cfg: Config) -> None:
    for what, name, reg in (
        ("algo.advantage", cfg.algo.advantage, ADVANTAGES), ("algo.loss", cfg.algo.loss, POLICY_LOSSES),
        ("algo.aggregation", cfg.algo.aggregation, AGGREGATIONS),
    ):
        if name not in reg:
            raise TirlError(f"unknown {what} {name!r}; registered: {', '.join(sorted(reg))}")
    check_terms(cfg.reward.terms)


class Trainer:
    def __init__(self, cfg: Config):
        check_registries(cfg)
        self.cfg = cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        d = cfg.data
        self.sampler = ProblemSampler(build_problems(
            d.source, problem_field=d.problem_field, answer_field=d.answer_field, id_field=d.id_field,
            limit=d.limit, num_synthetic=d.num_synthetic, difficulty=d.difficulty, seed=d.seed), seed=cfg.train.seed)
        self.model, self.tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.cache_dir)
        if cfg.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.engine = HFEngine(self.model, self.tok, cfg.rollout.generation_batch_size)
        s = cfg.sandbox
        self.sandbox = make_sandbox(s)
        self.verifier = Verifier(cfg.reward.verifier_workers, cfg.reward.verifier_timeout_s)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: min(1.0, (i + 1) / o.warmup_steps) if o.warmup_steps else 1.0)
        r = cfg.rollout
        self.params = SamplingParams(r.temperature, r.top_p, r.top_k)
        self.limits = RolloutLimits(r.max_tool_calls, r.max_tokens_per_turn, r.max_response_tokens,
                                    r.obs_head_chars, r.obs_tail_chars, s.timeout_s, s.replay_history, s.print_last_expr)
        self.state = TrainState()

    def step(self) -> tuple[dict[str, Any], list[Trajectory]]:
        cfg, r = self.cfg, self.cfg.rollout
        self.state.step += 1
        torch.manual_seed(cfg.train.seed * 1_000_003 + self.state.step)  # a step's samples depend on (seed, step)
        problems = self.sampler.next(r.prompts_per_step)
        p = cfg.prompt
        prompts = [render_prompt(pr, self.tok, p.style, p.template, p.system) for pr in problems]
        items = [(pr, g, prompts[g]) for g, pr in enumerate(problems) for _ in range(r.group_size)]

        trajs, times = rollout(self.engine, self.tok, self.sandbox, items, self.params, self.limits)
        t0 = time.perf_counter()
        score(trajs, cfg.reward, self.verifier)
        t_reward = time.perf_counter() - t0
        rewards = torch.tensor([t.reward for t in trajs]).view(r.prompts_per_step, r.group_size)
        adv = ADVANTAGES[cfg.algo.advantage](rewards, eps=cfg.algo.adv_eps).flatten().tolist()

        t0 = time.perf_counter()
        upd = policy_update(self.model, self.optimizer, trajs, adv, cfg.algo, cfg.optim,
                            temperature=r.temperature or 1.0, pad_id=self.engine.pad_id)
        self.scheduler.step()
        t_update = time.perf_counter() - t0
        self.state.data = self.sampler.state_dict()
        metrics = {"step": self.state.step, **rollout_metrics(trajs), **{f"update/{k}": v for k, v in upd.items()},
                   "lr": self.scheduler.get_last_lr()[0], "time/generate": times.generate_s,
                   "time/tools": times.tools_s, "time/reward": t_reward, "time/update": t_update}
        return metrics, trajs

    def evaluate(self, out_dir: Path) -> dict[str, float]:
        """Periodic evaluation; returns flat ``eval/<bench>/<score>`` metrics."""
        res = evaluate(self.model, self.tok, self.cfg, self.sandbox, self.verifier, out_dir)
        flat = {f"eval/{b}/{k}": v for b, r in res["benches"].items() for k, v in r["scores"].items()}
        flat.update({f"eval/avg/{k}": v for k, v in res["average"].items()})
        return flat

    def state_dict(self) -> dict[str, Any]:
        return {**asdict(self.state), "seed": self.cfg.train.seed}


def train(cfg: Config, progress: bool = True) -> Path:
    """Run ``cfg.train.steps`` steps; returns the run directory. On any failure a checkpoint of
    the current weights and the error are written before the exception propagates."""
    from tqdm.auto import tqdm

    trainer = Trainer(cfg)
    run = RunDir.create(cfg)
    try:
        run.attach_loggers(cfg)
    except BaseException:
        trainer.sandbox.close()
        trainer.verifier.close()
        raise
    run.log_event("start", steps=cfg.train.steps, model=cfg.model.name, sandbox=describe(trainer.sandbox))
    bar = tqdm(total=cfg.train.steps, desc=f"tirl {cfg.recipe}", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        while trainer.state.step < cfg.train.steps:
            t0 = time.perf_counter()
            metrics, trajs = trainer.step()
            metrics["time/step"] = time.perf_counter() - t0
            if cfg.train.save_trajectories:
                run.log_trajectories(trainer.state.step, trajs)
            if cfg.eval.every and trainer.state.step % cfg.eval.every == 0:
                metrics.update(trainer.evaluate(run.path / "eval" / f"step_{trainer.state.step:06d}"))
            run.log_metrics(metrics)
            if cfg.train.save_every and trainer.state.step % cfg.train.save_every == 0:
                run.save_checkpoint(trainer.model, trainer.tok, trainer.state_dict(), f"checkpoint-{trainer.state.step}")
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:+.2f}", acc=f"{metrics['accuracy']:.2f}",
                            calls=f"{metrics['tool_calls_per_traj']:.2f}", len=f"{metrics['response_len']:.0f}")
    except BaseException as e:
        bar.close()
        run.log_event("error", step=trainer.state.step, error=repr(e), traceback=traceback.format_exc())
        out = run.save_checkpoint(trainer.model, trainer.tok, trainer.state_dict(), "checkpoint-interrupted")
        print(f"[tirl] run stopped at step {trainer.state.step} ({type(e).__name__}); weights saved to {out}; "
              f"metrics and trajectories so far are in {run.path}", flush=True)
        raise
    finally:
        trainer.sandbox.close()
        trainer.verifier.close()
        run.close()
    bar.close()
    run.save_checkpoint(trainer.model, trainer.tok, trainer.state_dict(), "checkpoint")
    run.log_event("done", step=trainer.state.step)
    return run.path
