"""Distribution in one place: the process group, the device mesh, sharding, gathers, and who
writes to disk. Everything else in tirl is rank-agnostic: it asks a :class:`Dist` to sum, gather,
shard or save, and the same calls are exact no-ops at world size 1 (no process group is made, no
module is wrapped, nothing is copied), so a single process behaves exactly as before.

Launch with ``torchrun``, which sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and the rendezvous::

    torchrun --nproc-per-node 8 -m tirl train --config torl-1.5b                  # one node
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 --rdzv-id RUN -m tirl train --config retool-32b  # on each node

The policy, the reference model and the critic are sharded with FSDP2 (``fully_shard`` on every
decoder layer, the classes in the model's ``_no_split_modules``, then at the root) over an
explicit 1-D device mesh (CPU: gloo, CUDA: NCCL; an explicit CPU mesh because a gloo group on a
machine with GPUs can crash otherwise, pytorch#132471). Gradients are *summed* over ranks (the
loss is normalised by the global mini-batch, so the sum is the single-process gradient), in
float32 (``MixedPrecisionPolicy(param_dtype=compute dtype, reduce_dtype=float32)``).

Sharded forward passes are collectives: every rank must run the same number of them, in the same
order. :meth:`Dist.rounds` gives the count a loop over local batches must run (the most any rank
has); a rank short of batches runs a dummy one that adds nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" / "nccl" at world > 1
    mesh: Any = None  # a 1-D DeviceMesh over all ranks at world > 1
    _folders: int = field(default=0, repr=False)  # node folders made so far (their names count them)
    _channel: "NodeChannel | None" = field(default=None, repr=False)

    @classmethod
    def from_env(cls, device: str = "cpu", timeout_s: float = 600.0) -> "Dist":
        """The job torchrun started (``WORLD_SIZE`` > 1), or a single process. ``device``: where
        this process trains (``cpu`` or ``cuda``); at world > 1 a CUDA process takes the GPU
        numbered by its ``LOCAL_RANK``."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as td
        from torch.distributed.device_mesh import init_device_mesh

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(local)
        backend = "nccl" if cuda else "gloo"
        if not td.is_initialized():
            td.init_process_group(backend, store=_attempt_store(rank, world, timeout_s), rank=rank, world_size=world,
                                  timeout=datetime.timedelta(seconds=timeout_s))
        mesh = init_device_mesh("cuda" if cuda else "cpu", (world,), mesh_dim_names=("dp",))
        return cls(rank=rank, world=world, local_rank=local, backend=backend, mesh=mesh)

    # --- who -------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> bool:
        """The one rank that writes metrics, events, trajectories, reports and HF exports."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """This rank's device for a resolved ``model.device`` (``cuda`` -> ``cuda:LOCAL_RANK``)."""
        if self.active and device.startswith("cuda"):
            return f"cuda:{self.local_rank}"
        return device

    def describe(self) -> dict[str, Any]:
        """For the run's start event."""
        return {"world_size": self.world, "backend": self.backend,
                "mesh": None if self.mesh is None else {"device": self.mesh.device_type, "shape": list(self.mesh.shape),
                                                        "dims": list(self.mesh.mesh_dim_names or ())}}

    def block(self, n: int) -> range:
        """This rank's contiguous share of ``range(n)`` (shares differ by at most one)."""
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        return range(lo, hi)

    def say(self, message: str) -> None:
        """Print once for the whole job (on the writer)."""
        if self.writer:
            print(message, flush=True)

    def on_writer(self, fn: Callable[..., T], *args: Any, share: bool = False, **kwargs: Any) -> T | None:
        """``fn(*args, **kwargs)`` on the writer alone; with ``share``, its result on every rank."""
        out = fn(*args, **kwargs) if self.writer else None
        return self.broadcast(out) if share else out

    def node_share(self, n: int) -> int:
        """This rank's share of ``n`` per-node resources (sandbox lanes): at least 1."""
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.active else 1
        return max(1, n // local)

    @staticmethod
    def node_cpus() -> list[int]:
        """The CPUs this node's processes may use."""
        return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))

    def local_cpus(self) -> list[int]:
        """This rank's contiguous share of the CPUs this node's processes may use (at least one)."""
        cpus = self.node_cpus()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.active else 1
        lr, n = self.local_rank % local, len(cpus)
        return cpus[lr * n // local:(lr + 1) * n // local] or [cpus[lr % n]]

    @contextlib.contextmanager
    def own_process_env(self, device: str, whole_node: bool = False) -> Iterator[dict[str, str]]:
        """The environment while this rank starts a process of its own (its vLLM engine core), restored
        after: the torchrun variables are hidden (that process is a world of one, not a rank of this
        job); on CUDA only this rank's GPU is visible to it; on CPU vLLM's OpenMP threads are bound to
        this rank's share of the node's cores (unless ``VLLM_CPU_OMP_THREADS_BIND`` is set). With
        ``whole_node`` (the node's one engine) it gets all of the node's GPUs, or cores. A no-op at
        world size 1. Yields the variables it set."""
        if not self.active:
            yield {}
            return
        hide = [k for k in os.environ if k in _TORCHRUN_VARS or k.startswith("TORCHELASTIC_")]
        put: dict[str, str] = {}
        if device.startswith("cuda"):
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            put["CUDA_VISIBLE_DEVICES"] = ",".join(ids) if whole_node else ids[self.local_rank % len(ids)]
        elif "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            cpus = self.node_cpus() if whole_node else self.local_cpus()
            put["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus))
        saved = {k: os.environ.get(k) for k in [*hide, *put]}
        try:
            for k in hide:
                os.environ.pop(k, None)
            os.environ.update(put)
            yield put
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def writer_only(self, obj: T) -> T:
        """``obj`` on the writer; elsewhere a stand-in whose every method does nothing."""
        return obj if self.writer else _Nothing()  # type: ignore[return-value]

    # --- collectives (identity at world size 1) -------------------------------------------

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64."""
        if not self.active or not values:
            return list(values)
        import torch.distributed as td

        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        td.all_reduce(t)
        return t.cpu().tolist()

    def max(self, value: int) -> int:
        if not self.active:
            return value
        import torch.distributed as td

        t = torch.tensor([value], dtype=torch.long, device=self._comm_device())
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return int(t.item())

    def gather(self, items: list[T]) -> list[T]:
        """Every rank's ``items``, concatenated in rank order, on every rank."""
        if not self.active:
            return list(items)
        import torch.distributed as td

        out: list[Any] = [None] * self.world
        td.all_gather_object(out, list(items))
        return [x for part in out for x in part]

    def broadcast(self, obj: T) -> T:
        """The writer's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()

    def rounds(self, n_local: int) -> int:
        """How many sharded forward passes a loop over ``n_local`` local batches must run."""
        return self.max(n_local)

    def node_channel(self) -> "NodeChannel":
        """The channel between this node's ranks and its first rank (``LOCAL_RANK`` 0, the
        leader), made on first use (every rank must ask for it together): a node's one rollout
        engine serves all of them through it (``rollout.engine_per = "node"``). At world size 1
        the process is its own leader and nothing is sent."""
        if self._channel is None:
            self._channel = NodeChannel.make(self)
        return self._channel

    def _comm_device(self) -> str:
        return "cuda" if self.backend == "nccl" else "cpu"

    @contextlib.contextmanager
    def node_folder(self, prefix: str) -> Iterator[tuple[str, bool, Callable[[], None]]]:
        """A fresh folder in ``/dev/shm`` that this node's ranks share for the block: yields
        ``(path, writes, ready)``. The node's first rank (``LOCAL_RANK`` 0) makes it and
        ``writes`` into it; every rank calls ``ready()`` (a barrier) before reading it; it is
        removed once every rank has left the block. Every rank must enter it together. (The
        weights a node's vLLM engines reload: one copy per node, not one per rank.)"""
        import shutil
        import tempfile

        self._folders += 1
        root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        job = f"{os.environ.get('TORCHELASTIC_RUN_ID', os.getpid())}-{restarts()}"  # (torchrun's id of the job)
        path = os.path.join(root, f"tirl-{prefix}-{job}-node{os.environ.get('GROUP_RANK', '0')}-{self._folders}")
        writes = self.local_rank == 0
        if writes:
            shutil.rmtree(path, ignore_errors=True)  # (a crashed attempt's, if its name came back)
            os.makedirs(path)
        try:
            yield path, writes, self.barrier
        finally:
            self.barrier()
            if writes:
                shutil.rmtree(path, ignore_errors=True)

    # --- sharding ----------------------------------------------------------------------------

    def shard(self, module: torch.nn.Module, layers_of: torch.nn.Module | None = None) -> torch.nn.Module:
        """FSDP2 over the mesh: every decoder layer of ``layers_of`` (default ``module``; the
        classes in its ``_no_split_modules``), then ``module`` itself. A no-op at world size 1.
        A module with mixed precision (``tirl_compute_dtype``, see :mod:`tirl.models`) gets
        ``MixedPrecisionPolicy(param_dtype=that, reduce_dtype=float32)`` instead of autocast."""
        if not self.active:
            return module
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        compute = getattr(module, "tirl_compute_dtype", None)
        mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute else MixedPrecisionPolicy()
        src = layers_of if layers_of is not None else module
        names = set(getattr(src, "_no_split_modules", None) or [])
        if not names:
            raise ValueError(f"{type(src).__name__} names no decoder layer class (_no_split_modules): cannot shard it per layer")
        for sub in list(module.modules()):
            if sub is not module and type(sub).__name__ in names:
                fully_shard(sub, mesh=self.mesh, mp_policy=mp)
        fully_shard(module, mesh=self.mesh, mp_policy=mp)
        module.tirl_compute_dtype = None  # FSDP2 casts the parameters itself: no autocast on top
        for sub in module.modules():
            if hasattr(sub, "set_gradient_divide_factor"):
                sub.set_gradient_divide_factor(1.0)  # a sum: the loss is already globally normalised
                sub.set_force_sum_reduction_for_comms(True)  # no reliance on gloo's AVG (pytorch#162338)
        return module

    def materialize(self, module: torch.nn.Module, device: str, full_of: Callable[[str], torch.Tensor]) -> None:
        """Storage on ``device`` for a module built empty (parameters on the meta device, see
        ``load_model(empty=True)``) and sharded, then every parameter filled with this rank's shard
        of ``full_of(name)``: one full tensor at a time, each rank slicing its own shard out of it
        (no communication unless ``full_of`` gathers). Buffers keep the values they were built with
        (the rotary frequencies, which a checkpoint does not hold)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        kept = {n: b.detach().clone() for n, b in module.named_buffers() if not b.is_meta}
        module.to_empty(device=device)
        with torch.no_grad():
            for name, b in module.named_buffers():
                if name in kept:
                    b.copy_(kept[name])
            for name, p in module.named_parameters():
                full = full_of(name)
                if tuple(full.shape) != tuple(p.shape):
                    raise ValueError(f"{name}: the checkpoint's tensor is {tuple(full.shape)}, the model's {tuple(p.shape)}")
                full = full.to(device=device, dtype=p.dtype)
                if isinstance(p, DTensor):
                    full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
                p.copy_(full)
                del full

    @staticmethod
    def gathered(module: torch.nn.Module) -> Callable[[str], torch.Tensor]:
        """``name -> full tensor`` of ``module``'s parameters (a sharded one gathered when asked
        for: a collective, so every rank must ask for the same names in the same order)."""
        params = dict(module.named_parameters())

        def full(name: str) -> torch.Tensor:
            t = params[name].detach()
            return t.full_tensor() if hasattr(t, "full_tensor") else t

        return full

    def replicate(self, module: torch.nn.Module) -> None:
        """Every rank's ``module`` takes the writer's parameters and buffers (before sharding)."""
        if not self.active:
            return
        import torch.distributed as td

        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                if t.device.type == "cpu" and self.backend == "nccl":
                    continue
                td.broadcast(t.data, src=0)

    @staticmethod
    def plain_class_name(module: torch.nn.Module) -> str:
        """The model's own class name, under FSDP2's wrapper class (``FSDPQwen2ForCausalLM``)."""
        from torch.distributed.fsdp import FSDPModule

        return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule)).__name__

    def full_tensors(self, module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, full tensor)`` for every entry of ``module``'s state dict, one at a time: a
        sharded tensor is gathered (``full_tensor()``, a collective: every rank iterates in step)
        just before it is yielded, so at most one full tensor exists beyond what the caller keeps."""
        for name, t in module.state_dict().items():
            yield name, (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()

    def full_state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole state dict gathered onto the CPU (for the Hugging Face export), without the
        duplicates of tied weights (``lm_head.weight`` of a model with tied embeddings), as
        ``save_pretrained`` writes a single process's."""
        out, seen = {}, set()
        for name, t in module.state_dict().items():
            local = t.to_local() if hasattr(t, "to_local") else t
            key = (local.data_ptr(), local.shape, local.dtype)
            full = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()  # (every rank gathers)
            if key not in seen or local.numel() == 0:
                out[name] = full
            seen.add(key)
        return out

    def clip_grad_norm(self, params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
        """Clip to ``max_norm`` by the global gradient norm (over every rank's shards); returns it."""
        grads = [p for p in params if p.grad is not None]
        if not self.active:
            return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
        total = torch.nn.utils.get_total_norm([p.grad for p in grads])
        if hasattr(total, "full_tensor"):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total)
        return float(total)

    # --- checkpoints (torch.distributed.checkpoint) --------------------------------------------

    def save_sharded(self, state: dict[str, Any], path: str) -> None:
        """A DCP checkpoint of ``state`` (every rank writes its shards into ``path``)."""
        import warnings

        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():  # (a single process: DCP says it assumes one, which it is)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=path)

    def load_sharded(self, state: dict[str, Any], path: str) -> None:
        """Fill ``state`` in place from a DCP checkpoint saved at any world size."""
        import warnings

        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path)

    def fail(self, e: BaseException, events: Path, **info: Any) -> None:
        """A rank's run failed: say so once, naming the rank, and record it in ``events``; then
        raise :class:`RankFailed`, which ends this process at once (torchrun then stops the
        others, or restarts the job with ``--max-restarts``). A rank that failed only because
        another one did (its collective broke) says that in one line instead."""
        import traceback

        if _peer_failure(e):
            print(f"[tirl] rank {self.rank}: stopped because another rank failed ({type(e).__name__})", flush=True)
        else:
            tb = "".join(traceback.format_exception(e))
            print(f"[tirl] rank {self.rank} of {self.world} failed: {type(e).__name__}: {e}\n{tb}", file=sys.stderr,
                  flush=True)
            with events.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"time": time.time(), "event": "error", "rank": self.rank, "error": repr(e),
                                    "traceback": tb, **info}) + "\n")
        raise RankFailed(self.rank) from e

    def close(self) -> None:
        if self.active:
            import torch.distributed as td

            if td.is_initialized():
                td.barrier()  # every rank tears gloo down together (one leaving early aborted another's teardown)
                td.destroy_process_group()


@dataclass
class NodeChannel:
    """A node's ranks and their leader, in lock step: :meth:`exchange` is a collective of the node's
    ranks. Each sends one payload; the leader computes every rank's answer from all of them
    (``serve``, on the leader alone) and each gets its own back. Objects go over a gloo group of the
    node's ranks (CPU tensors of pickled objects, also on a CUDA job)."""

    leader: bool = True
    size: int = 1  # ranks on this node
    leader_rank: int = 0  # the leader's global rank
    group: Any = None  # the node's process group (None at world size 1)

    @classmethod
    def make(cls, dist: Dist) -> "NodeChannel":
        if not dist.active:
            return cls()
        import torch.distributed as td

        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        leader = dist.rank - dist.local_rank
        if dist.world % local or leader % local or dist.local_rank >= local:
            raise RuntimeError(f"rank {dist.rank}: a node's ranks must be numbered contiguously, the same number on "
                               f"every node (world {dist.world}, {local} on this node, local rank {dist.local_rank}); "
                               "torchrun numbers them so with the same --nproc-per-node on every node")
        group, _ = td.new_subgroups(group_size=local, backend="gloo")
        return cls(leader=dist.local_rank == 0, size=local, leader_rank=leader, group=group)

    def exchange(self, payload: Any, serve: Callable[[list[Any]], list[Any]]) -> Any:
        """Send ``payload`` to the leader; the leader runs ``serve(payloads)`` (one per rank of the
        node, in local-rank order; it returns one answer per rank); returns this rank's answer."""
        if self.group is None or self.size == 1:
            return serve([payload])[0]
        import torch.distributed as td

        got: list[Any] | None = [None] * self.size if self.leader else None
        td.gather_object(payload, got, dst=self.leader_rank, group=self.group)
        answers = serve(got) if self.leader else None  # type: ignore[arg-type]
        if answers is not None and len(answers) != self.size:
            raise RuntimeError(f"serve answered {len(answers)} ranks of {self.size}")
        box: list[Any] = [None]
        td.scatter_object_list(box, answers, src=self.leader_rank, group=self.group)
        return box[0]


_TORCHRUN_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT"}


def _attempt_store(rank: int, world: int, timeout_s: float):
    """The rendezvous store of this attempt of the job: torchrun's (``MASTER_ADDR:MASTER_PORT``),
    its keys prefixed with the attempt. After ``--max-restarts`` brought a job back, the
    restarted ranks otherwise read the last attempt's gloo addresses from the reused store and
    failed to connect ("Connection refused")."""
    import torch.distributed as td

    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts the store
    store = td.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                        is_master=not agent and rank == 0, timeout=datetime.timedelta(seconds=timeout_s),
                        multi_tenant=not agent)
    return td.PrefixStore(f"tirl/attempt-{restarts()}", store)


class RankFailed(Exception):
    """Raised after a rank reported its failure (:meth:`Dist.fail`): the CLI exits with status 1
    at once, printing nothing more."""


def _peer_failure(e: BaseException) -> bool:
    """Whether ``e`` is a broken collective (another rank died), not this rank's own error."""
    import torch.distributed as td

    text = str(e)
    return isinstance(e, getattr(td, "DistError", ())) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout"))


class _Nothing:
    """What a non-writer rank holds instead of the run directory: every call does nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def model_state(module: torch.nn.Module) -> dict[str, Any]:
    """``module``'s parameters by name for DCP (sharded tensors stay sharded)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module)


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter names (so it reloads at any world size)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer)


def set_model_state(module: torch.nn.Module, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state)


def set_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state)


def writer_process() -> bool:
    """Whether this process is the job's writer (rank 0, or no torchrun at all); for code that
    runs outside a :class:`Dist`'s life (the CLI before and after training)."""
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    """Print once for the whole job."""
    if writer_process():
        print(message, flush=True)


def restarts() -> int:
    """How many times torchrun has restarted this job (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
