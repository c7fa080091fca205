import json
import math

import pytest

from conftest import SHARED_DATA
from tirl.data import ProblemSampler, arithmetic_problems, build_problems, load_problems, make_problem
from tirl.types import TirlError

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")


def test_synthetic_is_seeded_and_index_stable():
    a = arithmetic_problems(50, seed=3)
    assert a == arithmetic_problems(50, seed=3)
    assert a[10:20] == arithmetic_problems(10, seed=3, start=10)  # independent of how many are asked for
    assert a != arithmetic_problems(50, seed=4)
    assert len({p.id for p in a}) == 50


def test_synthetic_answers_are_exact():
    """Re-derive every kind's answer independently from the problem text."""
    import re

    seen = set()
    for p in arithmetic_problems(300, seed=1):
        kind = p.source.split(":")[1]
        seen.add(kind)
        nums = [int(x) for x in re.findall(r"\d+", p.problem)]
        ans = int(p.answer)
        if kind == "product":
            assert ans == nums[0] * nums[1]
        elif kind == "modpow":
            assert ans == pow(nums[0], nums[1], nums[2])
        elif kind == "gcd_lcm":
            assert ans == (math.gcd(*nums) if "greatest" in p.problem else math.lcm(*nums))
        elif kind == "divisors":
            assert ans == sum(1 for d in range(1, nums[0] + 1) if nums[0] % d == 0)
        elif kind == "choose":
            assert ans == math.comb(nums[1], nums[0])
        elif kind == "digit_sum":
            assert ans == sum(int(c) for c in str(nums[0] ** nums[1]))
        elif kind == "series" and "squares" in p.problem:
            assert ans == sum(k * k for k in range(1, nums[-1] + 1))
    assert len(seen) == 7


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown problem kinds"):
        arithmetic_problems(3, kinds=("nope",))
    assert make_problem(0, 5, kinds=("product",)).source == "synthetic:product"


@needs_shared
@pytest.mark.parametrize("name", ["eval/aime24.jsonl", "eval/math500.jsonl", "eval/gsm8k.jsonl", "train/math.jsonl",
                                  "eval/olympiadbench.jsonl", "eval/minerva_math.jsonl", "eval/amc23.jsonl", "eval/aime25.jsonl"])
def test_loads_shared_files(name):
    probs = load_problems(SHARED_DATA / name)
    assert probs and all(p.problem and p.answer for p in probs)
    assert len({p.id for p in probs}) == len(probs)


@needs_shared
def test_loads_verl_parquet_with_dotted_fields():
    probs = load_problems(SHARED_DATA / "formats/verl_format_torl_test.parquet",
                          problem_field="prompt.-1.content", answer_field="reward_model.ground_truth", id_field=None)
    assert len(probs) == 374
    assert all(isinstance(p.problem, str) and p.answer for p in probs)


def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def test_malformed_rows_name_file_line_and_field(tmp_path):
    p = _write(tmp_path, [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?"}])
    with pytest.raises(TirlError) as e:
        load_problems(p)
    assert f"{p}:2" in str(e.value) and "'answer'" in str(e.value) and "answer_field" in str(e.value)

    p = _write(tmp_path, [{"problem": "1+1?", "answer": "2"}, "{not json"], "bad.jsonl")
    with pytest.raises(TirlError, match=r"bad.jsonl:2: not valid JSON"):
        load_problems(p)

    p = _write(tmp_path, [{"question": "1+1?", "answer": 2}], "q.jsonl")
    with pytest.raises(TirlError, match=r"q.jsonl:1: field 'problem' \(problem\) is missing"):
        load_problems(p)
    assert load_problems(p, problem_field="question")[0].answer == "2"

    p = _write(tmp_path, [{"problem": "x", "answer": "  "}], "e.jsonl")
    with pytest.raises(TirlError, match="is empty"):
        load_problems(p)
    with pytest.raises(TirlError, match="does not exist"):
        load_problems(tmp_path / "nope.jsonl")


def test_build_problems_and_sampler_state():
    probs = build_problems("synthetic:arithmetic", num_synthetic=7, seed=2)
    s = ProblemSampler(probs, seed=1)
    first = s.next(5)
    state = s.state_dict()
    rest = s.next(9)  # crosses an epoch boundary
    s2 = ProblemSampler(probs, seed=1)
    s2.load_state_dict(state)
    assert s2.next(9) == rest
    assert sorted(p.id for p in first + rest[:2]) == sorted(p.id for p in probs)
    with pytest.raises(TirlError, match="unknown synthetic"):
        build_problems("synthetic:nope")


def test_synthetic_sources_select_kinds_and_disjoint_ranges():
    train = build_problems("synthetic:product", num_synthetic=50)
    held = build_problems("synthetic:product@20000", num_synthetic=50)
    assert all(p.source == "synthetic:product" for p in train + held)
    assert not {p.problem for p in train} & {p.problem for p in held}
    assert held[0] == make_problem(0, 20000, kinds=("product",))
    two = build_problems("synthetic:product+gcd_lcm@7", num_synthetic=40)
    assert {p.source for p in two} == {"synthetic:product", "synthetic:gcd_lcm"}
    for bad in ("synthetic:product@x", "synthetic:product+nope", "synthetic:"):
        with pytest.raises(TirlError, match="synthetic"):
            build_problems(bad)
