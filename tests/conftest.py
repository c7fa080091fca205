"""Shared fixtures. The tiny model is built locally (no network): a byte-level BPE tokenizer
trained on a few KB of synthetic text, with ChatML special tokens and a chat template, and a
2-layer Qwen2 model (~100k parameters). Built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    import random

    rng = random.Random(0)
    lines = []
    for i in range(400):
        a, b = rng.randint(10, 9999), rng.randint(2, 999)
        lines.append(f"What is {a} * {b}? Let me compute.\n```python\nprint({a} * {b})\n```\n```output\n{a * b}\n```\nThe answer is \\boxed{{{a * b}}}.")
        lines.append(f"def f(x):\n    return x ** {i % 7} + {b}\nfor k in range({a % 50}):\n    print(f(k))")
    return lines


def build_tiny_model(path: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHATML
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                      bos_token_id=None)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer) loaded through tirl's own loader. Tests must not train this shared copy."""
    from tirl.models import load_model

    return load_model(str(tiny_model_dir))


def skip_unless_memory_cap(have: bool, why: str) -> None:
    """Skip a test that needs the sandbox's memory cgroups where this machine cannot make them
    (no root, or no writable cgroup hierarchy: containers, the GPU machines); under
    ``TIRL_REQUIRE_FULL_SANDBOX=1`` (CI) their absence fails instead."""
    if have:
        return
    if os.environ.get("TIRL_REQUIRE_FULL_SANDBOX") == "1":
        pytest.fail("TIRL_REQUIRE_FULL_SANDBOX=1 but " + why)
    pytest.skip(why)


@pytest.fixture
def sandbox():
    from tirl.sandbox import SubprocessSandbox

    sb = SubprocessSandbox(timeout_s=5.0, max_output_bytes=4096, memory_mb=512, max_workers=4)
    yield sb
    sb.close()
