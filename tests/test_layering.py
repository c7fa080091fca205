"""Modules import only what comes before them in the data flow (and types/config)."""

import ast
from pathlib import Path

import tirl

ORDER = ["types", "config", "dist", "models", "data", "prompt", "sandbox", "rollout", "traces", "reward", "shaping", "advantage", "loss",
         "update", "sft", "eval", "run", "train", "report", "headline", "cli"]


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_follow_the_data_flow():
    root = Path(tirl.__file__).parent
    bad = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).with_suffix("")
        here = rel.parts[0]
        if here in ("__init__", "__main__"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tirl."):
                there = _stage(node.module)
                if there != here and ORDER.index(there) > ORDER.index(here):
                    bad.append(f"{rel} imports {node.module}")
    assert not bad, "imports against the data flow:\n" + "\n".join(bad)
