"""``tirl sandbox serve`` replayed against SandboxFusion's documented API: each status, the defaults,
truncation, the time and memory limits, files in and out, bad requests (422), the busy answer —
through plain HTTP and through SandboxFusion's own client SDK (PyPI ``sandbox-fusion``), on the
real pool. Also the multi-server client and the math runtime inside the sandbox."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import time
import urllib.error
import urllib.request

import pytest

from tirl.sandbox import ZygotePool
from tirl.sandbox.fusion import SandboxFusionSandbox
from tirl.sandbox.server import STREAM_LIMIT, ServerLimits, ServerThread, create_app


@pytest.fixture(scope="module")
def pool():
    with ZygotePool(lanes=2, timeout_s=5.0) as p:
        yield p


@pytest.fixture(scope="module")
def url(pool):
    srv = ServerThread(create_app(pool, ServerLimits(max_run_timeout_s=60.0, max_memory_mb=4096)))
    yield srv.url
    srv.stop()


def post(url: str, body: dict, timeout: float = 60.0) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/run_code", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def run(url: str, code: str, **kw) -> dict:
    status, body = post(url, {"code": code, "language": "python", **kw})
    assert status == 200, body
    return body


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_each_status_as_sandboxfusion(url):
    ok = run(url, "print('hi')")
    assert ok["status"] == "Success" and ok["message"] == "" and ok["compile_result"] is None and ok["files"] == {}
    assert {k: ok["run_result"][k] for k in ("status", "return_code", "stdout", "stderr")} == \
        {"status": "Finished", "return_code": 0, "stdout": "hi\n", "stderr": ""}
    err = run(url, "1/0")
    assert err["status"] == "Failed" and err["run_result"]["status"] == "Finished"
    assert err["run_result"]["return_code"] == 1 and "ZeroDivisionError" in err["run_result"]["stderr"]
    tle = run(url, "while True: pass", run_timeout=1)
    assert tle["status"] == "Failed" and tle["run_result"]["status"] == "TimeLimitExceeded"
    assert tle["run_result"]["return_code"] is None and 1 <= tle["run_result"]["execution_time"] < 3
    other = run(url, "int main() {}", language="cpp")  # a language SandboxFusion knows, not run here
    assert other["status"] == "SandboxError" and "not available" in other["message"]
    assert run(url, "print(input()[::-1])", stdin="abc")["run_result"]["stdout"] == "cba\n"
    with urllib.request.urlopen(url + "/v1/ping", timeout=5) as r:
        assert json.loads(r.read()) == "pong"  # FastAPI's JSON string, as SandboxFusion's


def test_bad_requests_are_422_naming_the_field(url):
    for body, field in [({"language": "python"}, "code"), ({"code": "1", "language": "klingon"}, "language"),
                        ({"code": "1"}, "language"), ({"code": "1", "language": "python", "run_timeout": "soon"}, "run_timeout"),
                        ({"code": "1", "language": "python", "files": {"a": 3}}, "files")]:
        status, out = post(url, body)
        assert status == 422 and field in json.dumps(out["detail"]), (body, out)


def test_the_default_run_timeout_is_sandboxfusions_10_s_and_limits_above_the_max_are_refused(url):
    assert run(url, "import time; time.sleep(6); print('done')")["status"] == "Success"  # the old server cut at 5 s
    status, out = post(url, {"code": "1", "language": "python", "run_timeout": 1000})
    assert status == 422 and "60" in out["detail"][0]["msg"] and out["detail"][0]["loc"] == ["body", "run_timeout"]
    status, out = post(url, {"code": "1", "language": "python", "memory_limit_MB": 10**6})
    assert status == 422 and "4096" in out["detail"][0]["msg"]


def test_memory_limits(url):
    alloc = "b = bytearray({mb} << 20); b[::4096] = b'x' * len(b[::4096]); print('ok')"
    assert run(url, alloc.format(mb=1500))["status"] == "Success"  # -1 (default): no per-request limit below the server's
    small = run(url, alloc.format(mb=600), memory_limit_MB=256)
    assert small["status"] == "Failed" and small["run_result"]["return_code"] != 0
    assert run(url, alloc.format(mb=600), memory_limit_MB=1024)["status"] == "Success"


def test_output_up_to_sandboxfusions_limit_and_a_cut_is_never_a_success(url):
    big = run(url, f"print('x' * {STREAM_LIMIT - 1000})")
    assert big["status"] == "Success" and len(big["run_result"]["stdout"]) == STREAM_LIMIT - 999  # the old cap: 65,536
    flood = run(url, f"import sys\nsys.stdout.write('y' * {3 * STREAM_LIMIT})\nprint('never')")
    rr = flood["run_result"]
    assert flood["status"] == "Failed" and rr["status"] == "Finished" and rr["return_code"] not in (0, None)
    assert len(rr["stdout"]) <= STREAM_LIMIT and set(rr["stdout"]) == {"y"} and "cut" in rr["stderr"]


def test_files_in_and_out(url):
    code = ("import os\nprint(open('data/in.txt').read())\nopen('out.txt', 'w').write('result 42')\n"
            "os.makedirs('sub', exist_ok=True); open('sub/b.bin', 'wb').write(bytes(range(256)))")
    out = run(url, code, files={"data/in.txt": b64("hello"), "skipped.txt": None},
              fetch_files=["out.txt", "sub/b.bin", "missing.txt"])
    assert out["status"] == "Success" and out["run_result"]["stdout"] == "hello\n"
    assert set(out["files"]) == {"out.txt", "sub/b.bin"}  # a missing file is left out, as SandboxFusion
    assert base64.b64decode(out["files"]["out.txt"]) == b"result 42"
    assert base64.b64decode(out["files"]["sub/b.bin"]) == bytes(range(256))
    assert run(url, "import os; print(os.path.exists('skipped.txt'))", files={"skipped.txt": None})["run_result"]["stdout"] == "False\n"
    for bad in ({"/etc/passwd": b64("x")}, {"../escape.txt": b64("x")}, {"/mnt/../etc/x": b64("x")}, {"/mnt": b64("x")},
                {"ok.txt": "not base64!"}):
        status, body = post(url, {"code": "1", "language": "python", "files": bad})
        assert status == 422 and body["detail"][0]["loc"][1] == "files", bad
    status, body = post(url, {"code": "1", "language": "python", "fetch_files": ["/etc/passwd"]})
    assert status == 422 and "/mnt" in body["detail"][0]["msg"]  # the message names where paths may point
    assert run(url, "print(open('out.txt').read() if __import__('os').path.exists('out.txt') else 'clean')")["run_result"]["stdout"] == "clean\n"


def test_absolute_paths_in_the_sandboxs_private_mounts(url, pool):
    """SandboxFusion takes absolute ``files`` / ``fetch_files`` paths (its own test writes ``/mnt/b``):
    here they may point into the sandbox's private, wiped /tmp and /mnt, and come back under the name asked."""
    if not pool.writable_dirs:
        pytest.skip("no bubblewrap: absolute paths are refused (422), tested above")
    code = ("open('a.txt', 'w').write('secret'); open('/mnt/b', 'w').write('sauce')\n"
            "import os; os.makedirs('/mnt/out', exist_ok=True); open('/mnt/out/c', 'w').write(open('/mnt/in/x').read() * 2)\n"
            "print(open('/tmp/given.txt').read())")
    out = run(url, code, files={"/mnt/in/x": b64("ab"), "/tmp/given.txt": b64("given")},
              fetch_files=["a.txt", "/mnt/b", "/mnt/out/c", "/mnt/missing"])
    assert out["status"] == "Success" and out["run_result"]["stdout"] == "given\n", out
    assert {k: base64.b64decode(v).decode() for k, v in out["files"].items()} == {"a.txt": "secret", "/mnt/b": "sauce", "/mnt/out/c": "abab"}
    assert run(url, "import os; print(os.listdir('/mnt'), os.path.exists('/tmp/given.txt'))")["run_result"]["stdout"] == "[] False\n"


def test_pytest_language(url):
    passing = "def add(a, b):\n    return a + b\n\ndef test_add():\n    assert add(2, 3) == 5\n"
    out = run(url, passing, language="pytest")
    assert out["status"] == "Success" and "1 passed" in out["run_result"]["stdout"]
    failing = passing + "\ndef test_wrong():\n    assert add(2, 2) == 5\n"
    out = run(url, failing, language="pytest")
    assert out["status"] == "Failed" and out["run_result"]["return_code"] == 1 and "1 failed" in out["run_result"]["stdout"]


def test_sandboxfusions_own_sdk_reads_every_answer_correctly(url):
    from sandbox_fusion import RunCodeRequest, RunStatus, run_code, summary_run_code_result
    from sandbox_fusion.models import SummaryMapping

    mapping = SummaryMapping(Success="ok", Failed="failed", RunFailed="run_failed", RunTimeout="timeout")
    cases = {"print(1)": "ok", "1/0": "run_failed", "while True: pass": "timeout",
             f"print('z' * {2 * STREAM_LIMIT})": "run_failed"}  # a cut output is a failed run, not a success
    for code, want in cases.items():
        resp = run_code(RunCodeRequest(code=code, language="python", run_timeout=1), endpoint=url, max_attempts=1)
        assert summary_run_code_result(resp, mapping) == want, code
    resp = run_code(RunCodeRequest(code="print(open('a.txt').read())", language="python", files={"a.txt": b64("sdk")},
                                   fetch_files=["a.txt"]), endpoint=url, max_attempts=1)
    assert resp.status == RunStatus.Success and resp.run_result.stdout == "sdk\n" and resp.files == {"a.txt": b64("sdk")}


def test_a_full_queue_answers_busy_504_at_once_instead_of_a_silent_wait(pool):
    srv = ServerThread(create_app(pool, ServerLimits(max_queue=1, max_wait_s=0.5)))
    try:
        sleep = {"code": "import time; time.sleep(2.5); print('slept')", "language": "python"}
        def timed_post():
            t0 = time.monotonic()
            return post(srv.url, sleep), time.monotonic() - t0

        with cf.ThreadPoolExecutor(8) as ex:
            futs = []
            for _ in range(5):
                futs.append(ex.submit(timed_post))
                time.sleep(0.05)
            answers = [f.result() for f in futs]
        codes = sorted(status for (status, _), _ in answers)
        assert codes == [200, 200, 504, 504, 504]  # 2 lanes run; 1 waits 0.5 s then is refused; 2 find the queue full
        for (status, body), dt in answers:
            if status == 504:
                assert body["status"] == "SandboxError" and body["message"].startswith("busy") and dt < 1.5
            else:
                assert body["run_result"]["stdout"] == "slept\n"
        with urllib.request.urlopen(srv.url + "/level", timeout=5) as r:
            level = json.loads(r.read())
        assert level["busy"] == 3 and level["served"] == 2 and level["lanes"] == 2
    finally:
        srv.stop()


def test_many_servers_least_outstanding_and_failover(pool):
    a, b = (ServerThread(create_app(pool, ServerLimits(max_queue=64, max_wait_s=30))) for _ in range(2))
    try:
        client = SandboxFusionSandbox([a.url, "http://127.0.0.1:9", b.url], timeout_s=5.0, max_workers=8, backoff_s=0.05)
        out = client.run_many([f"print({k} * 2)" for k in range(24)])
        assert [r.stdout for r in out] == [f"{2 * k}\n" for k in range(24)] and all(r.ok for r in out)
        stats = client.stats()
        dead = stats["http://127.0.0.1:9/run_code"]
        assert dead["errors"] == dead["requests"] >= 1  # tried, failed, retried elsewhere
        live = [stats[a.url + "/run_code"], stats[b.url + "/run_code"]]
        assert all(s["requests"] >= 6 and s["errors"] == 0 and s["p50_s"] > 0 for s in live)  # both carry the load
        assert sum(s["requests"] for s in live) == 24
        down = SandboxFusionSandbox(["http://127.0.0.1:9"], timeout_s=1.0, retries=1, backoff_s=0.01).run("print(1)")
        assert down.error and "no sandbox server" in down.error
    finally:
        a.stop()
        b.stop()


def test_the_math_runtime_and_multiprocessing_inside_the_sandbox(pool):
    r = pool.run("import scipy.special, scipy.optimize, pandas, networkx, mpmath, gmpy2, sympy, numpy\n"
                 "print(round(float(scipy.special.gamma(5)), 6), pandas.Series([1, 2, 3]).sum(),\n"
                 "      networkx.shortest_path_length(networkx.path_graph(5), 0, 4), mpmath.mpf(2) ** 10, gmpy2.isqrt(99))",
                 timeout=30)
    assert r.ok, r
    assert r.stdout.split() == ["24.0", "6", "4", "1024.0", "9"]
    mp = pool.run("import multiprocessing as m\nif __name__ == '__main__':\n    with m.Pool(2) as p:\n"
                  "        print(sum(p.map(abs, range(-10, 10))))", timeout=30)
    assert mp.ok and mp.stdout == "100\n", mp
