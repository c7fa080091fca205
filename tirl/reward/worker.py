"""A verifier worker process: ``python -m tirl.reward.worker``. Reads ``[gold, answer, rel_tol]`` JSON
lines on stdin, writes ``["ok", bool]`` or ``["error", message]`` lines on stdout."""

import json
import logging
import os
import sys
import warnings


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # math-verify warns about its disabled timeouts on every call
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from tirl.reward.verify import slow_verdict

    slow_verdict("1", "1")  # import and warm
    out = sys.stdout
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        try:
            gold, answer, rel_tol = json.loads(line)
            reply = ["ok", slow_verdict(gold, answer, rel_tol)]
        except Exception as e:  # noqa: BLE001 - a verifier error is an incorrect answer
            reply = ["error", repr(e)[:200]]
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
