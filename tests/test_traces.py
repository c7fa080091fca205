"""Synthetic cold-start traces: every program runs and prints its answer; the text derivations are
exact; the SFT mask covers exactly the interpreter spans."""

import re

import pytest

from tirl.rollout.protocol import TORL
from tirl.sandbox import ZygotePool
from tirl.sft import example_from_messages
from tirl.traces import make_traces
from tirl.types import TirlError


@pytest.fixture(scope="module")
def pool():
    with ZygotePool(lanes=2) as sb:
        yield sb


def test_every_program_runs_in_the_real_sandbox_and_prints_the_answer(pool):
    rows = make_traces(60, "code", seed=3, sandbox=pool, system="S")
    for r in rows:
        text = r["messages"][-1]["content"]
        (code,) = re.findall(r"```python\n(.*?)\n```", text, re.S)
        (out,) = re.findall(r"```output\n(.*?)\n```", text, re.S)
        assert pool.run(code).stdout.strip() == out == r["answer"]  # the output shown is the program's real output
        assert text.rstrip().endswith(f"\\boxed{{{r['answer']}}}.")
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
    assert len({re.sub(r"\d+", "N", r["messages"][-1]["content"]) for r in rows}) >= 40  # phrasing varies


def test_text_traces_are_exact_long_multiplications():
    for r in make_traces(60, "text", seed=3):
        text = r["messages"][-1]["content"]
        assert "```" not in text
        for a, p, q in re.findall(r"(\d+) (?:\\times|times|\\cdot) (\d+) (?:=|is) (\d+)\.", text):
            assert int(a) * int(p) == int(q)
        (terms, total) = re.search(r"((?:\d+ \+ )*\d+) = (\d+)\.$", text.splitlines()[-2]).groups()
        assert sum(int(t) for t in terms.split(" + ")) == int(total) == int(r["answer"])
        assert f"\\boxed{{{r['answer']}}}" in text


def test_traces_are_seeded_and_disjoint_by_start(pool):
    a = make_traces(10, "text", seed=1)
    assert a == make_traces(10, "text", seed=1)
    assert not {r["id"] for r in a} & {r["id"] for r in make_traces(10, "text", seed=1, start=10)}
    with pytest.raises(TirlError, match="sandbox"):
        make_traces(2, "code")


def test_sft_mask_covers_exactly_the_interpreter_spans(tiny, pool):
    _, tok = tiny
    for r in make_traces(20, "code", seed=5, sandbox=pool, system="Use Python."):
        ex = example_from_messages(tok, r["messages"], TORL)
        learned = tok.decode([t for t, m in zip(ex.token_ids, ex.mask) if m])
        response = r["messages"][-1]["content"]
        (span,) = re.findall(r"\n```output\n.*?\n```\n", response, re.S)
        before, after = response.split(span)
        # mask 1 = exactly the assistant's own text (before and after the output) and its end-of-turn
        assert learned == before + after + "<|im_end|>"
        given = [t for t, m in zip(ex.token_ids, ex.mask) if not m]
        assert span in tok.decode(given) and r["messages"][1]["content"] in tok.decode(given)


def test_the_traces_command_writes_the_recipes_prompt_and_real_outputs(tmp_path):
    import json

    from tirl.cli import main

    out = tmp_path / "t.jsonl"
    assert main(["traces", "--style", "code", "--n", "3", "--start", "7", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["arith-0-7", "arith-0-8", "arith-0-9"]
    for r in rows:
        system, user, reply = r["messages"]
        assert system["role"] == "system" and "```python" in system["content"]  # mini-retool's prompt
        assert f"```output\n{r['answer']}\n```" in reply["content"]  # the program's real output


def test_mixed_traces_use_code_on_the_intended_fraction_whatever_the_kind(pool):
    """Issue #23's cold start: code on exactly round(p n) traces, drawn without looking at the kind
    (each kind gets about p), every program runs and prints the answer, every text answer is right."""
    n, p = 200, 0.3
    rows = make_traces(n, "mixed", seed=5, sandbox=pool, system="S", code_fraction=p)
    assert sum(r["uses_code"] for r in rows) == round(p * n)
    by_kind = {k: [r for r in rows if r["kind"] == k] for k in ("easy", "product")}
    assert all(len(v) >= 70 for v in by_kind.values())  # the mix is about half and half
    for kind, rs in by_kind.items():
        share = sum(r["uses_code"] for r in rs) / len(rs)
        assert abs(share - p) < 0.12, (kind, share)  # binomial spread, not a kind-dependent choice
    for r in rows:
        text = r["messages"][-1]["content"]
        assert text.rstrip().endswith(f"\\boxed{{{r['answer']}}}.")
        codes = re.findall(r"```python\n(.*?)\n```", text, re.S)
        assert len(codes) == int(r["uses_code"])
        if r["uses_code"]:
            (out,) = re.findall(r"```output\n(.*?)\n```", text, re.S)
            assert pool.run(codes[0]).stdout.strip() == out == r["answer"]
    easy_text = [r for r in by_kind["easy"] if not r["uses_code"]]
    for r in easy_text:  # one line in words, and the arithmetic in it is the answer
        a, op, b = re.search(r"(\d+) (\+|-|\\times) (\d+) (?:=|is)", r["messages"][-1]["content"]).groups()
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "\\times": int(a) * int(b)}[op] == int(r["answer"])
    assert make_traces(20, "mixed", seed=5, sandbox=pool, code_fraction=0.0)[0]["uses_code"] is False
    assert all(r["uses_code"] for r in make_traces(10, "mixed", seed=5, sandbox=pool, code_fraction=1.0))
