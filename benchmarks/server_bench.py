"""Load on ``tirl sandbox serve`` over loopback: many concurrent clients, a realistic mix of requests,
every answer checked. Compares this tree's server with the server as of ``--before`` (a git ref)
at the same load, each started the same way (``python -m tirl sandbox serve``).

    .venv/bin/python benchmarks/server_bench.py [--clients 64] [--requests 5000] [--lanes 2] [--before a7b7496]

The mix (weights): arithmetic prints (40), sympy (15), numpy (10), a ZeroDivisionError (10),
stdin echo (10), a ~50 ms loop (10), a time-out at 0.5 s (5). Clients behave as verl's: a new
connection per request, a 504 (busy) retried after 1 s then 2 s (3 attempts). ``lost``: no answer at
all (a client time-out or a connection error); ``busy after 3 tries``: still 504; ``wrong``: an
answer that is not what the code prints.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _mix(k: int, rng: random.Random) -> tuple[dict, str, str]:
    """(request, expected top-level status, expected stdout or stderr piece) for request ``k``."""
    kind = rng.choices(["arith", "sympy", "numpy", "error", "stdin", "loop", "timeout"], [40, 15, 10, 10, 10, 10, 5])[0]
    a, b = rng.randint(100, 9999), rng.randint(100, 9999)
    if kind == "arith":
        return {"code": f"print({a} * {b})"}, "Success", f"{a * b}\n"
    if kind == "sympy":
        return ({"code": f"import sympy as sp\nx = sp.Symbol('x')\nprint(sp.solve(x**2 - {a * a}, x))"}, "Success",
                f"[{-a}, {a}]\n")
    if kind == "numpy":
        return {"code": f"import numpy as np\nprint(int(np.arange({a}).sum()))"}, "Success", f"{a * (a - 1) // 2}\n"
    if kind == "error":
        return {"code": f"x = {a}\nprint(x / 0)"}, "Failed", "ZeroDivisionError"
    if kind == "stdin":
        return {"code": "print(input()[::-1])", "stdin": f"{a}-{b}"}, "Success", f"{a}-{b}"[::-1] + "\n"
    if kind == "loop":
        return {"code": "s = 0\nfor i in range(600000):\n    s += i\nprint(s)"}, "Success", f"{sum(range(600000))}\n"
    return {"code": "while True:\n    pass", "run_timeout": 0.5}, "Failed", "TimeLimitExceeded"


def _post(url: str, body: dict, timeout: float) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}


def _check(resp: dict, status: str, want: str) -> bool:
    rr = resp.get("run_result") or {}
    if resp.get("status") != status:
        return False
    if want == "TimeLimitExceeded":
        return rr.get("status") == want
    if status == "Failed":
        return want in (rr.get("stderr") or "")
    return rr.get("stdout") == want


def load(url: str, clients: int, requests: int, seed: int = 0) -> dict:
    """Send ``requests`` requests from ``clients`` threads; every answer checked."""
    rng = random.Random(seed)
    work = [_mix(k, rng) for k in range(requests)]
    lock, latencies, counts = threading.Lock(), [], {"wrong": 0, "lost": 0, "lost_busy": 0, "busy_retries": 0}
    nxt = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                k = next(nxt, None)
            if k is None:
                return
            body, status, want = work[k]
            body = {"language": "python", "run_timeout": 10, **body}
            t0 = time.perf_counter()
            for attempt in range(3):  # verl's client: 3 attempts, a 504 retried after 1 s, then 2 s
                try:
                    code, resp = _post(url + "/run_code", body, timeout=body["run_timeout"] + 10)
                except (OSError, TimeoutError):
                    code, resp = -1, {}
                if code != 504:
                    break
                with lock:
                    counts["busy_retries"] += 1
                if attempt < 2:
                    time.sleep(1.0 * (attempt + 1))
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                if code == 504:
                    counts["lost_busy"] += 1
                elif code != 200:
                    counts["lost"] += 1
                elif not _check(resp, status, want):
                    counts["wrong"] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"requests": requests, "rps": requests / wall, "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))], "wall_s": wall, **counts}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _old_tree(ref: str) -> str:
    out = tempfile.mkdtemp(prefix="tirl-before-")
    arch = subprocess.run(["git", "-C", str(REPO), "archive", ref, "tirl"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", out], input=arch, check=True)
    return out


def start_server(lanes: int, pythonpath: str | None = None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {}))
    proc = subprocess.Popen([sys.executable, "-m", "tirl", "sandbox", "serve", "--port", str(port), "--lanes", str(lanes)],
                            env=env, cwd=pythonpath or str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/v1/ping", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--before", default=None, metavar="GIT_REF", help="also load the server as of this commit")
    args = ap.parse_args(argv)
    rows = {}
    for name, path in ([("before " + args.before, _old_tree(args.before))] if args.before else []) + [("tirl", None)]:
        proc, url = start_server(args.lanes, path)
        try:
            load(url, min(args.clients, 8), min(200, args.requests), seed=99)  # warm-up, not counted
            rows[name] = load(url, args.clients, args.requests)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        print(f"[{name}] {json.dumps({k: round(v, 2) for k, v in rows[name].items()})}", file=sys.stderr, flush=True)
    base = rows.get("before " + args.before) if args.before else None
    print(f"\n{args.clients} clients, {args.requests} requests, {args.lanes} lanes, loopback\n")
    print("| server | req/s | p50 ms | p99 ms | lost (no answer) | busy after 3 tries | wrong | 504 answers | req/s vs before |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        ratio = f"{r['rps'] / base['rps']:.2f}x" if base else "-"
        print(f"| {name} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['lost']} | {r['lost_busy']} | {r['wrong']} | "
              f"{r['busy_retries']} | {ratio} |")


if __name__ == "__main__":
    main()
