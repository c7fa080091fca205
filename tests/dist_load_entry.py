"""Loading a model under torchrun, measured (``tests/test_dist.py``): ``load_policy`` with
``model.sharded_load`` on, then off, each rank's peak resident memory over each load (Linux's
``VmHWM``, reset between them through ``/proc/self/clear_refs``), and whether the sharded model
holds exactly the checkpoint's tensors. Writes ``OUT/rank-R.json``."""

import json
import sys
from pathlib import Path

import torch


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_growth(load) -> tuple[object, int]:
    """``load()``'s result and how far this process's resident memory rose above where it was (bytes)."""
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current size
    before = _kib("VmRSS")
    out = load()
    return out, (_kib("VmHWM") - before) * 1024


def main(model_dir: str, out: str) -> None:
    from safetensors.torch import load_file

    from tirl.config import ModelConfig
    from tirl.dist import Dist
    from tirl.models import load_policy

    dist = Dist.from_env("cpu")
    from torch.distributed.fsdp import fully_shard  # noqa: F401 - imported before measuring, as by either load
    from torch.distributed.tensor import distribute_tensor  # noqa: F401

    from tirl.models import load_model

    load_model(model_dir, empty=True)  # (transformers' model code imported: no weights are made)
    (sharded, _), grew_sharded = _peak_growth(lambda: load_policy(ModelConfig(name=model_dir), dist, "cpu"))
    files = load_file(str(Path(model_dir) / "model.safetensors"))
    worst = max(float((full - files[name]).abs().max()) for name, full in dist.full_tensors(sharded) if name in files)
    del sharded, files
    (whole, _), grew_whole = _peak_growth(lambda: load_policy(ModelConfig(name=model_dir, sharded_load=False), dist, "cpu"))
    local = sum(p.to_local().numel() * p.element_size() for p in whole.parameters())
    Path(out, f"rank-{dist.rank}.json").write_text(json.dumps(
        {"sharded_peak_growth": grew_sharded, "whole_peak_growth": grew_whole, "worst_difference": worst,
         "local_shard_bytes": local, "threads": torch.get_num_threads()}))
    dist.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
