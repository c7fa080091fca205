from hypothesis import given, settings
from hypothesis import strategies as st

from tirl.rollout import protocol as P
from tirl.types import ExecResult


def test_stop_on_closing_fence_and_output_trigger():
    assert P.find_stop("Let me compute.\n```python\nprint(1)\n") is None
    t = "Let me compute.\n```python\nprint(1)\n```"
    assert P.find_stop(t) == len(t)
    t2 = "```python\nprint(1)\n```\n```output"
    assert P.find_stop(t2) == t2.index("```\n```output") + 3  # the closing fence comes first
    assert P.find_stop("the result:\n```output") == len("the result:\n```output")
    assert P.find_stop("```\nnot python\n```\n") is None
    assert P.find_stop("```py\nx=1\n```") is not None


def test_extract_last_block_of_turn():
    t = "a\n```python\nx = 1\n```\nthen\n```python\nprint(x + 1)\n```\n"
    assert P.extract_code(t) == "print(x + 1)\n"
    assert P.extract_code("```python\nunclosed") is None
    assert P.extract_code("no code") is None


def test_observation_formats():
    assert P.observation(ExecResult("42\n", "", 0)) == "42"
    tb = "Traceback (most recent call last):\n  File ...\nZeroDivisionError: division by zero\n"
    assert P.observation(ExecResult("", tb, 1)) == "ZeroDivisionError: division by zero"
    assert P.observation(ExecResult("partial\n", tb, 1)) == "partial\nZeroDivisionError: division by zero"
    assert P.observation(ExecResult("", "", 0)) == P.EMPTY_OUTPUT
    assert "TimeoutError" in P.observation(ExecResult("", "", None, timed_out=True))
    assert "SIGSEGV" in P.observation(ExecResult("", "", -11))
    assert P.observation(ExecResult("x" * 300, "", 0), 128, 128) == "x" * 128 + "..." + "x" * 128


def test_insertion_completes_what_the_model_started():
    obs = "42"
    assert P.insertion("```python\nprint(42)\n```", obs) == "\n```output\n42\n```\n"
    assert P.insertion("```python\nprint(42)\n```\n", obs) == "```output\n42\n```\n"
    assert P.insertion("```python\nprint(42)\n```\n```output", obs) == "\n42\n```\n"
    assert P.insertion("```python\nprint(42)\n```\n```output\n", obs) == "42\n```\n"


@given(st.text(), st.integers(0, 300), st.integers(0, 300))
def test_truncate_middle_properties(text, head, tail):
    out = P.truncate_middle(text, head, tail)
    if len(text) <= head + tail:
        assert out == text
    else:
        assert out == text[:head] + "..." + text[len(text) - tail:]
        assert len(out) == head + tail + 3


_code_line = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="`\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), max_size=30)


@settings(max_examples=200)
@given(st.lists(_code_line, min_size=1, max_size=6), st.text(alphabet="abc .,\n", max_size=40))
def test_extract_code_roundtrip(lines, prose):
    code = "\n".join(lines) + "\n"
    text = f"{prose}\n```python\n{code}```"
    assert P.extract_code(text) == code
    assert P.find_stop(text) == len(text)
