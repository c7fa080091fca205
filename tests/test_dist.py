"""Data-parallel training under torchrun: real processes, real torch.distributed (gloo, CPU),
FSDP2 and DCP, spawned from pytest as PyTorch tests FSDP2 itself. The runs go through
``tests/dist_entry.py`` (the real CLI, plus a deterministic stand-in reward: every group has
signal, so every step updates, and a simulated crash when asked).

The reference is one process running the same config: 2 ranks must give the same weights (1e-5;
seen: identical) and the same metrics rows; a DCP checkpoint resumes at the other world size and
ends where the uninterrupted run does. Each torchrun job costs ~15-25 s on 2 cores (start-up and
imports), so the runs are shared between the tests through module-scoped fixtures."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "tests" / "dist_entry.py"


def _common(tiny_model_dir: Path, data: Path, out: Path, name: str, **extra) -> list[str]:
    base = {
        "model.name": str(tiny_model_dir), "data.source": str(data), "train.output_dir": str(out), "train.run_name": name,
        "rollout.engine": "hf", "rollout.prompts_per_step": 3, "rollout.group_size": 3, "rollout.max_tokens_per_turn": 24,
        "algo.dynamic_sampling": True, "algo.resample_on_correct": 2,  # batch decisions that must agree across ranks
        "rollout.max_response_tokens": 48, "rollout.temperature": 1.0, "optim.lr": 1e-3, "optim.micro_batch_size": 2,
        "train.steps": 3, "train.save_every": 1, "reward.terms": "{first_token_parity = 1.0, correct = 0.0}",
        # AdamW with its default eps 1e-8 moves a weight whose gradient nearly cancels (|g| ~ 1e-9) by
        # up to lr: summation order alone (2 shards vs 1) then changed one weight in 8192 by 1.2e-5
        "optim.eps": 1e-6,
    }
    base.update(extra)
    args = ["--config", "demo", "--no-progress", "--no-report"]
    return args + [f"{k}={json.dumps(v) if isinstance(v, str) and not v.startswith('{') else v}" for k, v in base.items()]


def _env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "WORLD_SIZE", "MASTER_"))}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **more}


def _run(args: list[str], ranks: int = 0, torchrun: list[str] | None = None, timeout: float = 240,
         **env: str) -> subprocess.CompletedProcess:
    """``tirl train ARGS`` alone (``ranks = 0``) or under ``torchrun --nproc-per-node RANKS``."""
    if ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", *(torchrun or ["--standalone"]),
               "--nproc-per-node", str(ranks), str(ENTRY), "train", *args]
    else:
        cmd = [sys.executable, str(ENTRY), "train", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _run_both(one: list[str], two: list[str], timeout: float = 240) -> None:
    """``tirl train ONE`` alone and ``TWO`` under ``torchrun --nproc-per-node 2``, side by side (each
    job spends most of its time starting up, so the pair takes little more than the longer one)."""
    cmds = [[sys.executable, str(ENTRY), "train", *one],
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(ENTRY),
             "train", *two]]
    _ok_all(cmds, timeout)


def _ok_all(cmds: list[list[str]], timeout: float) -> None:
    """Run ``cmds`` at the same time; each must succeed (its output's tail is the message if not)."""
    import tempfile

    logs = [tempfile.TemporaryFile("w+") for _ in cmds]  # (not pipes: a full one would stall its job)
    procs = [subprocess.Popen(c, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
             for c, log in zip(cmds, logs)]
    try:
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        log.seek(0)
        assert p.returncode == 0, log.read()[-6000:]


def _ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-6000:])


def _weights(run: Path, ckpt: str = "checkpoint"):
    from safetensors.torch import load_file

    return load_file(run / ckpt / "model.safetensors")


def _assert_same_weights(a: Path, b: Path, tol: float = 1e-5) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert worst <= tol, worst


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _assert_same_rows(a: Path, b: Path, steps: list[int]) -> None:
    ra = {r["step"]: r for r in _rows(a)}
    rb = {r["step"]: r for r in _rows(b)}
    assert sorted(rb) == sorted(ra)
    for s in steps:
        for k, v in ra[s].items():
            if k.startswith("time/"):
                continue
            w = rb[s][k]
            if isinstance(v, float) and isinstance(w, float):
                assert w == pytest.approx(v, rel=1e-4, abs=1e-6), (s, k, v, w)
            else:
                assert v == w, (s, k, v, w)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    data = root / "toy.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(8)))
    return data, root / "runs"


@pytest.fixture(scope="module")
def grpo(tiny_model_dir, toy) -> dict[str, Path]:
    """One process, 3 steps (checkpoints after each), and the same under torchrun with 2 ranks."""
    data, out = toy
    _run_both(_common(tiny_model_dir, data, out, "one"), _common(tiny_model_dir, data, out, "two"))
    return {"one": out / "one", "two": out / "two"}


def test_two_ranks_equal_one_rank_grpo(grpo):
    """Same final weights and the same metrics rows (every non-timing key), and the run's start
    event records the world size and the mesh; every rank's trajectories are in the log. The
    config makes the batch's composition a decision of every rank: DAPO's dynamic sampling (a
    group without signal is dropped and refilled) and resample-on-correct, with 3 groups over 2
    ranks (one rank runs dummy passes to keep the sharded passes in step)."""
    _assert_same_weights(grpo["one"], grpo["two"])
    _assert_same_rows(grpo["one"], grpo["two"], [1, 2, 3])
    rows = _rows(grpo["two"])
    assert all(r["update/tokens_trained"] > 0 for r in rows)
    assert sum(r["shaping/dropped_groups"] for r in rows) > 0  # the refill happened
    start = json.loads((grpo["two"] / "events.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2 and start["mesh"] == {"device": "cpu", "shape": [2], "dims": ["dp"]}
    for step in (1, 2, 3):
        a = (grpo["one"] / "trajectories" / f"step_{step:06d}.jsonl").read_text().splitlines()
        b = (grpo["two"] / "trajectories" / f"step_{step:06d}.jsonl").read_text().splitlines()
        assert len(a) == len(b) == 9
        assert [json.loads(x)["token_ids"] for x in a] == [json.loads(x)["token_ids"] for x in b]


def test_ppo_with_a_critic_two_ranks_equal_one_rank(tiny_model_dir, toy):
    """ReTool's shape: SFT first (``sft.before_rl``, each rank on its share of the traces), then PPO
    with a critic (GAE whitened over every rank's tokens, the value loss over the global batch) and
    a KL reference. Under torchrun the critic and the reference are built empty and sharded, then
    filled from the policy's shards after SFT, and each rank's engine gets the SFT weights."""
    data, out = toy
    extra = {"algo.advantage": "gae", "algo.critic_lr": 1e-3, "algo.kl_coef": 0.05, "train.save_every": 0,
             "sft.before_rl": "true", "sft.data": "synthetic:code", "sft.num_traces": 8, "sft.steps": 2,
             "sft.batch_size": 4, "sft.lr": 1e-3}
    _run_both(_common(tiny_model_dir, data, out, "ppo-one", **extra), _common(tiny_model_dir, data, out, "ppo-two", **extra))
    _assert_same_weights(out / "ppo-one", out / "ppo-two")
    _assert_same_rows(out / "ppo-one", out / "ppo-two", [1, 2, 3])
    assert _rows(out / "ppo-two")[-1]["update/critic/value_loss"] > 0


def test_checkpoints_resume_at_the_other_world_size(grpo, tmp_path):
    """1 -> 2: the single process's checkpoint after step 2, resumed by 2 ranks to step 3; and
    2 -> 1: the 2 ranks' checkpoint after step 2, resumed by one process (the two jobs side by
    side). Each ends with the uninterrupted run's weights and its step-3 metrics."""
    for name in ("one", "two"):
        shutil.copytree(grpo[name], tmp_path / name)
    resume = lambda name: ["--resume", str(tmp_path / name / "checkpoint-2"), "--no-progress", "--no-report"]  # noqa: E731
    _run_both(resume("two"), resume("one"))  # (2 -> 1 alone, 1 -> 2 under torchrun)
    for name in ("one", "two"):
        _assert_same_weights(grpo["one"], tmp_path / name)
        _assert_same_rows(grpo["one"], tmp_path / name, [3])


def test_a_failing_rank_ends_the_attempt_and_max_restarts_resumes_the_run_on_a_node_engine(tiny_model_dir, toy, grpo):
    """Rank 1 raises in the middle of step 3 (in the first attempt only), under ``torchrun
    --max-restarts 1``: the attempt ends well within 60 s of the error (the restart's start event
    follows it), the error is printed once with its rank (the other rank says in one line that
    it stopped because of it) and is in events.jsonl; torchrun brings the job back, it resumes
    the named run from its last checkpoint (2 ranks) and finishes with the uninterrupted run's
    weights.

    The job also runs ``rollout.engine_per = "node"`` (one torchrun job for both, as each costs
    ~20 s): the node's first rank alone holds an engine and both ranks send it their turns, in
    lock step, each running its own trajectories. Every step's trajectories, token for token, and
    the metrics rows are those of one process (the ``grpo`` fixture's), before and after the
    resume, so the node's engine follows the updates and the restored weights."""
    data, out = toy
    p = _run(_common(tiny_model_dir, data, out, "restart", **{"rollout.engine_per": "node"}), ranks=2,
             torchrun=["--standalone", "--max-restarts", "1"], TIRL_TEST_FAIL="1:3")
    _ok(p)
    assert p.stdout.count("one rollout engine per node, on its first rank, serving its 2 ranks") == 2  # each attempt
    _assert_same_rows(grpo["one"], out / "restart", [1, 2, 3])
    for step in (1, 2, 3):
        a = (grpo["one"] / "trajectories" / f"step_{step:06d}.jsonl").read_text().splitlines()
        b = (out / "restart" / "trajectories" / f"step_{step:06d}.jsonl").read_text().splitlines()
        assert [json.loads(x)["token_ids"] for x in a] == [json.loads(x)["token_ids"] for x in b]
    text = p.stdout + p.stderr
    assert text.count("[tirl] rank 1 of 2 failed: RuntimeError: simulated crash of rank 1 at step 3") == 1, text[-4000:]
    assert text.count("Traceback (most recent call last)") <= 2  # ours (rank 1), and torchrun's own summary
    assert "restart 1 of the job: resuming" in p.stdout
    events = [json.loads(x) for x in (out / "restart" / "events.jsonl").read_text().splitlines()]
    errors = [e for e in events if "error" in e]
    assert [(e["rank"], e["step"]) for e in errors] == [(1, 3)]
    later = [e["time"] for e in events if e["time"] > errors[0]["time"] and e["event"] in ("start", "resume")]
    assert later and later[0] - errors[0]["time"] < 60, events
    assert {e["engine"] for e in events if e["event"] in ("start", "resume")} == {"NodeEngine(HFEngine)"}
    _assert_same_weights(grpo["one"], out / "restart")


def test_sft_two_ranks_equal_one_rank(tiny_model_dir, tmp_path):
    """`tirl sft` under torchrun: each rank trains on its share of every batch (loss normalised
    by the whole batch's tokens, gradients summed): the weights one process reaches, and the
    same loss curve; the export is gathered from the shards by one rank."""
    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} * 7?", "response": f"Compute it.\n```python\n"
                                        f"print({i} * 7)\n```\n```output\n{i * 7}\n```\nSo \\boxed{{{i * 7}}}."}) + "\n"
                            for i in range(12)))
    args = ["--no-progress", f"model.name={json.dumps(str(tiny_model_dir))}", f"sft.data={json.dumps(str(data))}",
            "sft.steps=3", "sft.batch_size=6", "optim.micro_batch_size=2", "sft.lr=1e-3", "optim.eps=1e-6",
            f"train.output_dir={json.dumps(str(tmp_path / 'runs'))}"]
    jobs = (("one", [sys.executable, "-m", "tirl", "sft"]),
            ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                     "-m", "tirl", "sft"]))
    _ok_all([[*cmd, *args, f"train.run_name={name}"] for name, cmd in jobs], 240)
    _assert_same_weights(tmp_path / "runs" / "one", tmp_path / "runs" / "two")
    _assert_same_rows(tmp_path / "runs" / "one", tmp_path / "runs" / "two", [1, 2, 3])
    config = json.loads((tmp_path / "runs" / "two" / "checkpoint" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]  # not FSDP's wrapper class


def test_under_torchrun_no_rank_holds_the_whole_model_while_loading_it(tiny_model_dir, tmp_path):
    """``model.sharded_load`` (the default): each rank builds the model empty, shards it, then reads
    its shards from the safetensors one tensor at a time. Measured on a random-init Qwen2 shape of
    233 MB with 2 ranks (``tests/dist_load_entry.py``, each rank's peak resident memory over the
    load): a rank grows by its half and about one tensor, where loading it whole (the same job,
    ``sharded_load = false``) grows by more than the model. The shards hold the checkpoint exactly."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = tmp_path / "model"
    Qwen2ForCausalLM(Qwen2Config(hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=12,
                                 num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=False)).save_pretrained(model)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, model / f.name)
    size = (model / "model.safetensors").stat().st_size
    largest = 768 * 3072 * 4
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests" / "dist_load_entry.py"), str(model), str(tmp_path)]
    _ok(subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180))
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert r["worst_difference"] == 0.0
        assert r["local_shard_bytes"] < 0.51 * size
        assert r["whole_peak_growth"] > size, r  # (the measurement sees a whole model when there is one)
        assert r["sharded_peak_growth"] < r["local_shard_bytes"] + 2 * largest + 32 * 2**20, r
        assert r["sharded_peak_growth"] < 0.6 * r["whole_peak_growth"], r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.embedded
def test_two_nodes_on_localhost_train_the_embedded_model(toy, tmp_path):
    """Two torchrun agents, each a node of one process (``--nnodes 2``, c10d rendezvous on
    127.0.0.1), run 2 steps of the embedded SmolLM2-135M, in float32: on a CPU without AVX-512
    (this VM's AMD EPYC, AVX2 only) bfloat16 matmuls run ~15x slower than float32 ones, and the
    test took 221 s in bfloat16 against 84 s in float32."""
    from tirl.models import embedded_model_dir

    model = embedded_model_dir("smollm2-135m-instruct")  # converted once, before the agents start
    data, _ = toy
    port = _free_port()
    args = _common(model, data, tmp_path / "runs", "nodes", **{
        "train.steps": 2, "train.save_every": 0, "rollout.prompts_per_step": 2, "rollout.group_size": 2,
        "rollout.max_tokens_per_turn": 8, "rollout.max_response_tokens": 8, "optim.lr": 1e-5, "model.dtype": "float32",
        # one micro-batch, no refills, a short prompt: the test is the rendezvous and the collectives
        "optim.micro_batch_size": 4, "algo.dynamic_sampling": False, "algo.resample_on_correct": 1,
        "prompt.style": "raw", "prompt.template": "{problem} ="})
    agents = []
    for node in (0, 1):
        rdzv = ["--nnodes", "2", "--node-rank", str(node), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "tirl-test"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, "--nproc-per-node", "1", str(ENTRY), "train", *args]
        agents.append(subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True))
    outs = []
    for a in agents:
        try:
            outs.append(a.communicate(timeout=300)[0])
        finally:
            a.kill()
    assert [a.returncode for a in agents] == [0, 0], [o[-3000:] for o in outs]
    rows = _rows(tmp_path / "runs" / "nodes")
    assert [r["step"] for r in rows] == [1, 2]
    assert len((tmp_path / "runs" / "nodes" / "trajectories" / "step_000002.jsonl").read_text().splitlines()) == 4
    start = json.loads((tmp_path / "runs" / "nodes" / "events.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2


@pytest.mark.slow  # ~5-8 min on 2 cores: each rank starts a vLLM engine (make test-all)
@pytest.mark.vllm
@pytest.mark.embedded
def test_every_rank_rolls_out_with_its_own_vllm_and_it_follows_the_updates(toy, tmp_path):
    """``rollout.engine = vllm`` under torchrun: each rank's vLLM runs its engine core in a process of
    its own (a world of one), gets the gathered weights after every update through /dev/shm, and its
    teardown leaves the trainer's process group alone. What the engines record matches what the
    trainer recomputes on the updated weights at every step (a stale engine would drift from step 2)."""
    pytest.importorskip("vllm")
    from tirl.models import embedded_model_dir

    model = embedded_model_dir("smollm2-135m-instruct")
    data, _ = toy
    args = _common(model, data, tmp_path / "runs", "vllm", **{
        "rollout.engine": "vllm", "rollout.vllm_kv_cache_gb": 1, "train.steps": 3, "train.save_every": 0,
        "rollout.prompts_per_step": 2, "rollout.group_size": 4, "rollout.max_tokens_per_turn": 16,
        "rollout.max_response_tokens": 16, "optim.lr": 1e-4, "model.dtype": "float32",
        "reward.terms": "{token_sum_parity = 1.0, correct = 0.0}"})
    p = _run(args, ranks=2, timeout=900)
    _ok(p)
    assert "every rank starts its own" in p.stdout and p.stdout.count("vLLM ready") == 1  # said once, by the writer
    rows = _rows(tmp_path / "runs" / "vllm")
    assert [r["step"] for r in rows] == [1, 2, 3]
    mismatch = [r["update/logprob_mismatch"] for r in rows]
    assert max(mismatch) < 2e-3, mismatch


def test_a_ranks_own_engine_process_sees_a_world_of_one_and_its_share_of_the_cores(monkeypatch):
    """What a rank's vLLM engine core inherits (no process group made here: the env alone): no
    torchrun variables, OpenMP bound to this rank's share of the node's cores, and everything back after."""
    from tirl.dist import Dist

    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    d = Dist(rank=1, world=2, local_rank=1, backend="gloo")
    assert d.local_cpus() == [2, 3]
    before = dict(os.environ)
    with d.own_process_env("cpu") as put:
        assert put == {"VLLM_CPU_OMP_THREADS_BIND": "2,3"} and os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "2,3"
        assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "TORCHELASTIC_RUN_ID"} & set(os.environ)
    assert dict(os.environ) == before
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "5")  # the user's binding is kept
    with d.own_process_env("cpu") as put:
        assert put == {} and os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "5"
    with Dist().own_process_env("cpu") as put:  # one process: nothing changes
        assert put == {} and os.environ["RANK"] == "1"


def test_a_node_folder_is_written_by_the_nodes_first_rank_and_removed_after(monkeypatch):
    """``Dist.node_folder`` (where a node's vLLM engines reload the weights from: one copy per node):
    LOCAL_RANK 0 makes it and writes, another rank of the node only reads the same path; it is
    gone after the block, and the next one has another name. (Barriers are those of a single
    process here; 2 ranks use it in the slow vLLM test above.)"""
    from tirl.dist import Dist

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test-job")
    first, other = Dist(), Dist(rank=1, world=1, local_rank=1)
    with first.node_folder("weights") as (path, writes, ready):
        assert writes and os.path.isdir(path)
        with other.node_folder("weights") as (same, writes_too, _):
            assert same == path and not writes_too
        ready()
    assert not os.path.exists(path)
    with first.node_folder("weights") as (again, _, _):
        assert again != path
