"""``tirl verify FILE.jsonl``: run the verifier over ``{"gold", "response"}`` rows and write each
row back with ``"extracted"``, ``"correct"`` and ``"how"``, so anyone can audit it on their data.

A response is graded as training grades the policy's text: tool outputs (ToRL's ```output blocks,
ReTool's <interpreter> spans, chat tool messages) and programs are removed before the final
answer is extracted, so a ``\\boxed{}`` printed by a program never counts. ``keep_tool_output``
(``--keep-tool-output``) grades the text as it is, for plain answers that are not transcripts.

Numbers are compared as the row's benchmark compares them: a row's ``data_source`` (or
``source``) field, or ``benchmark`` (``--benchmark``) for every row, picks the tolerance
(:func:`tirl.reward.verify.rel_tol_for`: ``minerva_math`` 1%, every other benchmark exact)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tirl.reward.extract import extract_answer
from tirl.reward.verify import Verifier, rel_tol_for
from tirl.rollout.protocol import strip_code, strip_tool_output
from tirl.types import TirlError


def audit_file(path: str, out: str | None = None, workers: int = 2, timeout_s: float = 5.0,
               keep_tool_output: bool = False, benchmark: str | None = None) -> dict[str, float]:
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TirlError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "gold" not in row or "response" not in row:
                raise TirlError(f"{path}:{lineno}: each row needs \"gold\" and \"response\" fields")
            rows.append(row)
    with Verifier(workers, timeout_s) as v:
        texts = [str(r["response"]) if keep_tool_output else strip_tool_output(str(r["response"])) for r in rows]
        answers = [extract_answer(strip_code(t)) for t in texts]
        tols = [rel_tol_for(benchmark or str(r.get("data_source") or r.get("source") or "")) for r in rows]
        verdicts = v.verify_batch([(str(r["gold"]), a) for r, a in zip(rows, answers)], rel_tol=tols)
    sink = open(out, "w", encoding="utf-8") if out else sys.stdout
    try:
        for r, a, vd in zip(rows, answers, verdicts):
            sink.write(json.dumps({**r, "extracted": a, "correct": vd.correct, "how": vd.how}) + "\n")
    finally:
        if out:
            sink.close()
    n = max(len(rows), 1)
    summary = {"rows": len(rows), "correct": sum(v.correct for v in verdicts) / n,
               "no_answer": sum(a is None for a in answers) / n, "timeouts": sum(v.how == "timeout" for v in verdicts)}
    print(json.dumps(summary), file=sys.stderr)
    return summary
