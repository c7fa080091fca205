"""The verifier's regression table and its never-hang guarantee."""

import time

import pytest

from tirl.reward import Verifier, extract_answer
from tirl.reward.verify import fast_verdict, plain_number
from tirl.rollout.protocol import strip_code

from verifier_cases import CASES


@pytest.fixture(scope="module")
def verifier():
    v = Verifier(workers=2, timeout_s=3.0)
    yield v
    v.close()


def test_table_has_enough_cases():
    assert len(CASES) >= 150
    assert all(len(c) == 4 and c[3] for c in CASES)


@pytest.mark.parametrize("gold,response,expected,reason", CASES, ids=[f"{i:03d}-{c[3][:40]}" for i, c in enumerate(CASES)])
def test_case(verifier, gold, response, expected, reason):
    answer = extract_answer(strip_code(response))
    t0 = time.monotonic()
    verdict = verifier.verify(gold, answer)
    assert time.monotonic() - t0 < verifier.timeout_s + 2.0, "verification outlived its timeout"
    assert verdict.correct is expected, f"{reason}: gold={gold!r} answer={answer!r} ({verdict.how})"


def test_batch_matches_single(verifier):
    pairs = [(g, extract_answer(strip_code(r))) for g, r, _, _ in CASES[:60]]
    assert [v.correct for v in verifier.verify_batch(pairs)] == [e for _, _, e, _ in CASES[:60]]


def test_pathological_input_is_bounded_and_worker_replaced():
    with Verifier(workers=1, timeout_s=1.0) as v:
        t0 = time.monotonic()
        verdict = v.verify("1", "9^{9^{9^{9}}}")
        assert not verdict.correct and time.monotonic() - t0 < 3.5
        assert v.verify("x+1", "1+x").correct  # the (possibly replaced) worker still answers


def test_async_batch(verifier):
    import asyncio

    out = asyncio.run(verifier.averify_batch([("\\frac12", "0.5"), ("2", "3"), ("1", None)]))
    assert [o.correct for o in out] == [True, False, False] and out[2].how == "no answer"


def test_fast_path_is_exact():
    assert plain_number("1,234") == 1234 and plain_number("\\frac{-3}{4}") == plain_number("-0.75")
    assert fast_verdict("007", "7") is True and fast_verdict("0.3333", "\\frac13") is False
    assert fast_verdict("x+1", "1+x") is None  # not a plain number: the worker decides


from conftest import SHARED_DATA  # noqa: E402


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_every_eval_gold_verifies_against_itself_through_the_parser(verifier):
    """The verifier's self-check: each gold answer of every benchmark, boxed, is correct against
    itself, with the string fast path turned off (so math-verify must parse every gold)."""
    from tirl.data import load_problems

    failures = []
    for path in sorted((SHARED_DATA / "eval").glob("*.jsonl")):
        probs = load_problems(path)
        pairs = [(p.answer, extract_answer(f"So the answer is \\boxed{{{p.answer}}}.")) for p in probs]
        for p, v in zip(probs, verifier.verify_batch(pairs, fast=False)):
            if not v.correct:
                failures.append((path.name, p.id, p.answer, v.how))
    assert not failures, failures[:20]


def test_cli_verify_audits_a_file(tmp_path, capsys):
    import json

    from tirl.cli import main

    rows = [{"gold": "42", "response": "so \\boxed{42}"}, {"gold": "\\frac13", "response": "\\boxed{0.333}"},
            {"gold": "7", "response": "no box"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["verify", str(src), "--out", str(tmp_path / "out.jsonl")]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["correct"] for o in out] == [True, False, False]
    assert [o["extracted"] for o in out] == ["42", "0.333", None]
    (tmp_path / "bad.jsonl").write_text('{"gold": "1"}\n')
    assert main(["verify", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_batch_uses_the_fast_path_for_every_plain_number():
    with Verifier(workers=1) as v:
        v.verify_batch([(str(i), str(i + i % 2)) for i in range(200)])
        assert v.stats["fast"] == 200 and v.stats["slow"] == 0 and v._workers is None  # no worker started


def test_cli_verify_ignores_what_tools_printed(tmp_path):
    """Transcripts from elsewhere have the tool outputs inline: a box printed by a program (ToRL's
    ```output, ReTool's <interpreter>, a chat tool message) is never the answer, and one printed
    after the model's own answer does not override it; --keep-tool-output grades the text as is."""
    import json

    from tirl.cli import main

    torl = "```python\nprint('\\\\boxed{42}')\n```\n```output\n\\boxed{42}\n```\n"
    rows = [
        {"gold": "42", "response": torl + "So nothing."},  # the only box is the program's
        {"gold": "42", "response": "\\boxed{42}\n<code>\n```python\nprint(7)\n```\n</code>\n<interpreter>\n\\boxed{7}\n</interpreter>"},
        {"gold": "42", "response": "<tool_call>{}</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n\\boxed{42}\n</tool_response>"},
        {"gold": "42", "response": torl + "Thus \\boxed{42}."},
        {"gold": "42", "response": "```output\n\\boxed{42}"},  # a cut transcript: the block never closes
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["verify", str(src), "--out", str(tmp_path / "out.jsonl")]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["correct"] for o in out] == [False, True, False, True, False]
    assert main(["verify", str(src), "--out", str(tmp_path / "kept.jsonl"), "--keep-tool-output"]) == 0
    kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert [o["extracted"] for o in kept][:2] == ["42", "7"]  # the old behaviour, on request


MINERVA = [  # (gold, answer, with Minerva's 1% rule, exact)
    ("4.5e33", "4.46 \\times 10^{33}", True, True),   # 0.9% off; also rounds to the gold's 2 figures
    ("4.5e33", "4.55e33", False, False),                # 1.1% off
    ("3e8", "3.1 \\times 10^{8}", False, True),         # 3.3% off, though 1 stated figure would round to it
    ("1.24e-8", "1.25 \\times 10^{-8}", True, False),   # 0.8% off: Minerva accepts another third figure
    ("1.6", "1.59", True, False),                       # a decimal gold within 1%
    ("1.6", "1.5708", False, False),                    # 1.8% off
    ("42", "42.3", True, False),                        # an integer gold is a digits number too
    ("-2.5", "-2.51", True, False),                     # negative values: 1% of the mean's size
    ("0", "0.001", False, False),                       # zero: only zero
    ("2.5", "\\sqrt{6.3}", True, False),                # a symbolic answer, evaluated exactly (0.4% off)
    ("-1./3", "-0.333", False, False),                  # a fraction gold is not written in digits: exact
    ("1.5", "x", False, False),
]


@pytest.mark.parametrize("gold,answer,minerva,exact", MINERVA)
def test_minerva_tolerance(verifier, gold, answer, minerva, exact):
    """Minerva's grader: a gold written in digits matches within 1% of the mean; elsewhere exact."""
    from tirl.reward.verify import rel_tol_for

    assert rel_tol_for("minerva_math") == 0.01 and rel_tol_for("math500") is None
    assert verifier.verify(gold, answer, rel_tol=rel_tol_for("minerva_math")).correct is minerva
    assert verifier.verify(gold, answer, fast=False, rel_tol=0.01).correct is minerva  # the worker's tiers agree
    assert verifier.verify(gold, answer).correct is exact
    assert verifier.verify_batch([(gold, answer)], rel_tol=[0.01])[0].correct is minerva
