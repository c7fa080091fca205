"""Cold-start SFT: exact masks (interpreter spans get no gradient) and format learning."""

import json
import random

import pytest
import torch

from tirl.config import load_config
from tirl.prompt import render_prompt
from tirl.rollout import RolloutLimits, SamplingParams, rollout
from tirl.rollout.hf_engine import HFEngine
from tirl.rollout.protocol import RETOOL, TORL
from tirl.sft import example_from_messages, example_from_text, load_examples, run_sft, sft_loss
from tirl.types import Problem

RESPONSE = ("Let me compute.\n<code>\n```python\nprint(6 * 7)\n```\n</code>\n<interpreter>\n42\n</interpreter>\n\n"
            "Check again.\n<code>\n```python\nprint(42 + 0)\n```\n</code>\n<interpreter>\n42\n</interpreter>\n\n"
            "<answer>\n\\boxed{42}\n</answer>")
INTERP = ["\n<interpreter>\n42\n</interpreter>\n\n"] * 2


def _spans(tok, ex, value):
    """Decoded runs of tokens whose mask equals ``value``."""
    runs, cur = [], []
    for t, m in zip(ex.token_ids, ex.mask):
        if m == value:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_retool_trace_masks_exactly_the_interpreter_spans(tiny):
    _, tok = tiny
    prompt = "<|im_start|>user\nWhat is 6*7?<|im_end|>\n<|im_start|>assistant\n"
    ex = example_from_text(tok, prompt, RESPONSE, RETOOL)
    zeros = _spans(tok, ex, 0)
    assert zeros[0] == prompt and zeros[1:] == INTERP
    assert "".join(_spans(tok, ex, 1)) == RESPONSE.replace(INTERP[0], "") + tok.eos_token
    assert tok.decode(ex.token_ids) == prompt + RESPONSE + tok.eos_token


def test_torl_output_blocks_are_masked(tiny):
    _, tok = tiny
    resp = "```python\nprint(2 ** 10)\n```\n```output\n1024\n```\nSo \\boxed{1024}."
    ex = example_from_text(tok, "Q: ", resp, TORL)
    assert _spans(tok, ex, 0)[1:] == ["\n```output\n1024\n```\n"]


def test_chat_messages_mask_tool_turns(tiny):
    _, tok = tiny
    msgs = [{"role": "user", "content": "What is 6*7?"}, {"role": "assistant", "content": "<code>\n```python\nprint(6*7)\n```\n</code>"},
            {"role": "tool", "content": "42"}, {"role": "assistant", "content": "\\boxed{42}"}]
    ex = example_from_messages(tok, msgs, RETOOL)
    learned = _spans(tok, ex, 1)
    assert learned == ["<code>\n```python\nprint(6*7)\n```\n</code><|im_end|>", "\\boxed{42}<|im_end|>"]
    assert tok.decode(ex.token_ids) == tok.apply_chat_template(msgs, tokenize=False)
    assert "42<|im_end|>" in "".join(_spans(tok, ex, 0))  # the tool message is given, not learned


def test_masked_tokens_get_no_gradient():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 11, requires_grad=True)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 1, 0, 0, 1, 1.0]])  # targets 3 and 4 (positions 2, 3) are interpreter output
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # as the trainer's
    sft_loss(torch.nn.functional.pad(logp, (1, 0)), mask, num_tokens=3).backward()
    # logits at position t predict token t+1: positions 1 and 2 predict the masked targets
    assert torch.all(logits.grad[0, 1:3] == 0)
    assert torch.all(logits.grad[0, [0, 3, 4]].abs().sum(-1) > 0)
    assert torch.all(logits.grad[0, 5] == 0)  # the last position predicts nothing


def test_bad_rows_are_named(tiny, tmp_path):
    _, tok = tiny
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(Exception, match=r"t.jsonl:2: row has neither"):
        load_examples(str(p), tok, RETOOL, 512)


def _traces(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": f"<|im_start|>user\nWhat is {a} * {b}?<|im_end|>\n<|im_start|>assistant\n",
                     "response": f"<code>\n```python\nprint({a} * {b})\n```\n</code>\n<interpreter>\n{a * b}\n</interpreter>\n\n"
                                 f"<answer>\n\\boxed{{{a * b}}}\n</answer>"})
    return rows


def test_short_sft_teaches_the_retool_format(tiny_model_dir, tmp_path, sandbox):
    from tirl.models import load_model

    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _traces(64)))
    cfg = load_config(None, [f"model.name={json.dumps(str(tiny_model_dir))}", f"sft.data={json.dumps(str(data))}",
                             "sft.steps=150", "sft.batch_size=16", "sft.lr=3e-3", "optim.micro_batch_size=16",
                             "rollout.protocol=retool"])
    model, tok = load_model(str(tiny_model_dir))
    model, tok, log = run_sft(cfg, progress=False, model=model, tok=tok)
    assert log[-1]["sft/loss"] < log[0]["sft/loss"] / 3
    probs = [Problem(f"p{i}", f"What is {10 + i} * {20 + i}?", str((10 + i) * (20 + i))) for i in range(8)]
    items = [(p, i, render_prompt(p, tok, "chat", "{problem}", None)) for i, p in enumerate(probs)]
    torch.manual_seed(0)
    trajs, _ = rollout(HFEngine(model, tok), tok, sandbox, items, SamplingParams(temperature=0.0),
                       RolloutLimits(max_tool_calls=1, max_tokens_per_turn=48, max_response_tokens=96), RETOOL)
    executed = [t for t in trajs if t.tool_calls and t.tool_calls[0].result.ok]
    assert len(executed) >= 6, [t.response_text[:120] for t in trajs]
    assert all("<interpreter>" in t.segments[2].text and t.mask[t.tool_calls[0].span[0]] == 0 for t in executed)
