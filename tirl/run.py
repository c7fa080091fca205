"""A run directory: the config it ran with, metrics, trajectories and checkpoints.

    runs/<name>/
      config.toml                 the resolved config (re-run with --config runs/<name>/config.toml)
      metrics.jsonl               one JSON object per step
      events.jsonl                start, checkpoints, errors
      trajectories/step_000001.jsonl
      checkpoint/                 Hugging Face folder + trainer_state.json (+ trainer/)

``trainer/`` is a ``torch.distributed.checkpoint`` (DCP) folder: the policy, the optimizer, the
scheduler, the critic and its optimizer, the KL reference and the RNG states, each rank writing
its own shards, keyed by parameter name, so a run resumes at any world size. The Hugging Face
folder beside it (for eval and serving) is gathered from the shards and written by one rank. A
checkpoint is written whole into ``.<name>.partial`` and then swapped in, so a crash while saving
leaves the previous one as it was.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from tirl.config import Config, config_to_toml
from tirl.dist import Dist
from tirl.types import TirlError, Trajectory

TRAINER_DIR = "trainer"  # the DCP checkpoint inside a checkpoint folder


LEGACY_TRAINER_FILE = "trainer.pt"  # the training state of checkpoints written before DCP (one process)


def has_training_state(ckpt: Path) -> bool:
    """Whether ``ckpt`` holds a complete DCP checkpoint of the training state (or an older
    single-process ``trainer.pt``)."""
    return (Path(ckpt) / TRAINER_DIR / ".metadata").is_file() or (Path(ckpt) / LEGACY_TRAINER_FILE).is_file()


def find_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a checkpoint, else the run folder's resumable checkpoint with the
    most completed steps."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    found = []
    for state_file in path.glob("*/trainer_state.json"):
        if state_file.parent.name.startswith("."):  # a checkpoint being written or replaced
            continue
        state = json.loads(state_file.read_text())
        if state.get("resumable", True) and has_training_state(state_file.parent):
            found.append((state["step"], state_file.stat().st_mtime, state_file.parent))
    if not found:
        raise TirlError(f"no resumable checkpoint in {path} (a folder with trainer_state.json and {TRAINER_DIR}/). "
                        "Fix: pass a run folder written by `tirl train` (it holds checkpoint/, checkpoint-N/ or "
                        "checkpoint-interrupted/) or one of those folders.")
    return max(found)[2]


def check_resumable(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's ``trainer_state.json`` if an exact resume from it is possible, else a
    TirlError that says why and what to use instead."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if not state.get("resumable", True) or not has_training_state(ckpt):
        raise TirlError(f"{ckpt} cannot be resumed exactly: it was saved in the middle of step {state['step'] + 1}'s "
                        f"update (or without {TRAINER_DIR}/). Fix: resume from the run folder (its latest resumable "
                        "checkpoint is taken) or an earlier checkpoint-N.")
    return state


def resume_config(path: Path, overrides: list[str]) -> tuple[Config, Path]:
    """The config of the run that wrote ``path`` (a run folder or one of its checkpoints), with
    ``overrides`` (e.g. ``train.steps=200`` to go further), and the checkpoint to resume from."""
    from tirl.config import load_config

    ckpt = find_checkpoint(path)
    step = check_resumable(ckpt)["step"]
    toml = ckpt.parent / "config.toml"
    if not toml.is_file():
        raise TirlError(f"{toml} is missing: --resume needs the run folder `tirl train` wrote around {ckpt}.")
    fixed = [f"model.name={json.dumps(str(ckpt))}", "sft.before_rl=false"]  # the checkpoint holds the SFT'd weights
    cfg = load_config(str(toml), [*overrides, *fixed])
    if step >= cfg.train.steps:
        raise TirlError(f"{ckpt} has completed {step} of train.steps = {cfg.train.steps}: nothing left to run. "
                        f"Fix: pass train.steps={2 * step} (any number above {step}) to go further.")
    return cfg, ckpt


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class RunDir:
    def __init__(self, path: Path):
        self.path = path
        (path / "trajectories").mkdir(parents=True, exist_ok=True)
        self._tb = None
        self._wandb = None

    def attach_loggers(self, cfg: Config) -> None:
        """TensorBoard / Weights & Biases, when listed in ``train.loggers`` (JSONL is always on)."""
        if "tensorboard" in cfg.train.loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TirlError("train.loggers has 'tensorboard' but it is not installed. Fix: pip install tensorboard") from None
            self._tb = SummaryWriter(log_dir=str(self.path / "tensorboard"))
        if "wandb" in cfg.train.loggers:
            try:
                import wandb
            except ImportError:
                raise TirlError("train.loggers has 'wandb' but it is not installed. Fix: pip install wandb") from None
            self._wandb = wandb.init(project=cfg.train.wandb_project, name=self.path.name, dir=str(self.path),
                                     config=cfg.model_dump(mode="json"))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    @classmethod
    def create(cls, cfg: Config) -> "RunDir":
        name = cfg.train.run_name or f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = Path(cfg.train.output_dir) / name
        n = 1
        while path.exists() and any(path.iterdir()):
            n += 1
            path = Path(cfg.train.output_dir) / f"{name}-{n}"
        run = cls(path)
        (path / "config.toml").write_text(config_to_toml(cfg))
        return run

    def _append(self, name: str, row: dict[str, Any]) -> None:
        with (self.path / name).open("a", encoding="utf-8") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")

    def log_metrics(self, row: dict[str, Any]) -> None:
        self._append("metrics.jsonl", row)
        numeric = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "step" and math.isfinite(v)}
        step = int(row.get("step", 0))
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def log_event(self, event: str, **info: Any) -> None:
        self._append("events.jsonl", {"time": time.time(), "event": event, **info})

    def log_trajectories(self, step: int, trajs: list[Trajectory]) -> None:
        with (self.path / "trajectories" / f"step_{step:06d}.jsonl").open("w", encoding="utf-8") as f:
            for t in trajs:
                f.write(json.dumps(t.to_json()) + "\n")

    def save_checkpoint(self, model, tokenizer, state: dict[str, Any], name: str = "checkpoint",
                        extra: dict[str, Any] | None = None) -> Path:
        """A single process's :func:`save_checkpoint` into this run folder."""
        return save_checkpoint(Dist(), self, self.path, model, tokenizer, state, name, extra)

    @classmethod
    def reopen(cls, path: Path, step: int) -> "RunDir":
        """An existing run continued after ``step``: metrics of later steps (written after that
        checkpoint, before the run stopped) are dropped; they will be written again."""
        run = cls(path)
        metrics = path / "metrics.jsonl"
        if metrics.is_file():
            rows = [line for line in metrics.read_text().splitlines() if line.strip()]
            kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
            metrics.write_text("".join(line + "\n" for line in kept))
        return run


def save_checkpoint(dist: Dist, run: RunDir, path: Path, model, tokenizer, state: dict[str, Any],
                    name: str = "checkpoint", sharded: dict[str, Any] | None = None) -> Path:
    """The policy as a Hugging Face folder and ``trainer_state.json``; with ``sharded`` (the DCP
    state: ``Trainer.training_state``) also ``trainer/``, and with both an exact resume is
    possible. Every rank calls this (DCP and the gather of the export are collectives); one
    writes the export. Written whole beside ``name``, then swapped in: a crash while saving (over
    checkpoint-interrupted, say) never leaves new weights beside an old ``trainer_state.json``.
    ``run`` logs the event (on the writer)."""
    out, tmp, old = path / name, path / f".{name}.partial", path / f".{name}.old"
    dist.on_writer(_fresh_dir, tmp)
    dist.barrier()
    if sharded is not None:
        dist.save_sharded(sharded, str(tmp / TRAINER_DIR))
    full = dist.full_state_dict(model) if dist.active else None  # (a single process saves its own)
    dist.on_writer(_export, model, tokenizer, full, tmp, state, dist.plain_class_name(model))
    dist.on_writer(_swap, tmp, out, old)
    dist.barrier()
    run.log_event("checkpoint", path=str(out), step=state.get("step"), resumable=state.get("resumable"))
    return out


def _fresh_dir(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def _export(model, tokenizer, full: dict | None, tmp: Path, state: dict[str, Any], architecture: str) -> None:
    model.save_pretrained(tmp, state_dict=full)
    if full is not None:  # save_pretrained names the class it was called on: FSDP's wrapper class
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["architectures"] = [architecture]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(tmp)
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))


def _swap(tmp: Path, out: Path, old: Path) -> None:
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def load_training_state(dist: Dist, ckpt: Path, template: dict[str, Any]) -> None:
    """Fill ``template`` (the state dicts of the objects to restore) from ``ckpt``'s DCP folder,
    whatever the world size it was saved at."""
    dist.load_sharded(template, str(Path(ckpt) / TRAINER_DIR))
