"""One rollout engine per node, serving every rank of the node (``rollout.engine_per = "node"``).

Under torchrun each rank rolls out its own share of the step's groups. With an engine per rank,
every rank holds a whole copy of the weights beside its shards of the trainer's: a 32B model's
bfloat16 copy is 64 GB per GPU, which with the trainer's shards does not fit an 80 GB GPU. Here
the node's first rank (the leader) holds the node's one engine (vLLM on CUDA spans the node's
GPUs, tensor-parallel) and every rank of the node sends it its turns.

Each rank still runs its own trajectories: its prompts, its tool calls in its own sandbox lanes,
its rewards. Only ``generate`` crosses: every call is a collective of the node's ranks (the
channel's ``exchange``), in lock step. The leader batches the requests of all ranks (one
``generate`` per sampling parameters and stop condition) and hands each rank its own rows. A
rank whose rollout has ended calls :meth:`NodeEngine.end_round`, which keeps taking part with no
request until every rank of the node is done. Each row samples from its own seeded stream (its
trajectory's global index), so the tokens are those an engine per rank, or one process, samples.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from tirl.rollout.engine import Generation, SamplingParams, StopCondition

_END = "end of round"  # the answer to every rank once none of them has a request


class Channel(Protocol):
    """What :class:`tirl.dist.NodeChannel` offers."""

    leader: bool
    size: int

    def exchange(self, payload: Any, serve: Callable[[list[Any]], list[Any]]) -> Any: ...


@dataclass
class _Request:
    prompts: list[list[int]]  # [rows][tokens]
    budgets: list[int]  # [rows]
    params: SamplingParams
    stop: StopCondition | None
    seeds: list[int] | None  # [rows]


class NodeEngine:
    """The node's engine as each of its ranks sees it. ``inner``: the engine itself, on the
    leader (``None`` on the other ranks). The leader's ``inner`` also serves the writer's
    evaluation directly (:attr:`local`), which runs on one rank alone."""

    per_request_seeds = True
    lockstep_only = True  # every generate is a collective: the async schedule's timing-dependent calls cannot be

    def __init__(self, inner, channel: Channel, pad_id: int):
        if channel.leader and inner is None:
            raise ValueError("the node's leader needs the engine itself")
        self.inner, self.channel, self.pad_id = inner, channel, pad_id
        info = channel.exchange(None, lambda got: [_describe(inner)] * len(got))  # the leader's engine, to all
        self.kind: str = info["kind"]
        self.weight_sync: str | None = info["weight_sync"]  # how the leader's engine takes weights

    @property
    def name(self) -> str:
        return f"NodeEngine({self.kind})"

    @property
    def local(self):
        """The engine itself where this rank holds it, else None."""
        return self.inner

    def generate(self, prompts, max_new_tokens, params: SamplingParams, stop: StopCondition | None = None,
                 seeds: list[int] | None = None) -> list[Generation]:
        return self.channel.exchange(_Request(list(prompts), list(max_new_tokens), params, stop, seeds), self._serve)

    def end_round(self) -> None:
        """This rank's rollout has ended: take part (with no request) until every rank's has."""
        while self.channel.exchange(None, self._serve) != _END:
            pass

    def load_weights(self, model, via: str = "memory", tensors=None, place=None) -> None:
        """The leader's engine takes the new weights; every other rank still takes part in the
        gathers (``tensors`` are collectives) and, when they go through a node folder, in its
        barriers."""
        if self.inner is not None:
            self.inner.load_weights(model, via, tensors, place=place)
            return
        if via == "disk" and place is not None:
            with place() as (_path, _writes, ready):
                _consume(tensors)
                ready()
        else:
            _consume(tensors)

    def _serve(self, got: list[_Request | None]) -> list[Any]:
        """On the leader: every rank's rows, one ``generate`` per (params, stop), split back."""
        if all(r is None for r in got):
            return [_END] * len(got)
        answers: list[Any] = [[] if r is not None else None for r in got]
        batches: dict[bytes, list[int]] = {}
        for rank, r in enumerate(got):
            if r is not None and r.prompts:
                batches.setdefault(pickle.dumps((r.params, r.stop)), []).append(rank)
        for ranks in batches.values():
            reqs = [got[k] for k in ranks]
            seeded = all(r.seeds is not None for r in reqs)  # type: ignore[union-attr]
            kw = {"seeds": [s for r in reqs for s in r.seeds]} if seeded else {}  # type: ignore[union-attr]
            gens = self.inner.generate([p for r in reqs for p in r.prompts], [b for r in reqs for b in r.budgets],
                                       reqs[0].params, reqs[0].stop, **kw)
            at = 0
            for k, r in zip(ranks, reqs):
                answers[k] = gens[at : at + len(r.prompts)]
                at += len(r.prompts)
        return answers


def _describe(inner) -> dict[str, Any]:
    return {"kind": type(inner).__name__, "weight_sync": getattr(inner, "weight_sync", None)}


def _consume(tensors) -> None:
    for _ in tensors if tensors is not None else ():
        pass
