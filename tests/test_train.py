"""The whole loop on the tiny model: outputs on disk, clear errors, nothing lost on a crash."""

import json

import pytest
import torch

from tirl.cli import main
from tirl.config import load_config
from tirl.models import load_model
from tirl.train import Trainer, train


def _data(tmp_path, n=6):
    p = tmp_path / "toy.jsonl"
    p.write_text("".join(json.dumps({"id": f"t{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(n)))
    return p


def _overrides(tiny_model_dir, tmp_path, **extra):
    base = {
        "model.name": str(tiny_model_dir), "data.source": str(_data(tmp_path)), "train.output_dir": str(tmp_path / "runs"),
        "train.run_name": "t", "rollout.engine": "hf", "rollout.prompts_per_step": 2, "rollout.group_size": 3, "rollout.max_tokens_per_turn": 24,
        "rollout.max_response_tokens": 48, "rollout.temperature": 1.0, "optim.lr": 1e-3, "train.steps": 2,
    }
    base.update(extra)
    return [f"{k}={json.dumps(v) if isinstance(v, str) and not v.startswith('{') else v}" for k, v in base.items()]


def test_cli_train_writes_metrics_trajectories_checkpoint(tiny_model_dir, tmp_path, capsys):
    assert main(["train", "--config", "demo", "--no-progress", *_overrides(tiny_model_dir, tmp_path)]) == 0
    run = tmp_path / "runs" / "t"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_mean", "accuracy", "response_len", "tool_calls_per_traj", "tool_error_rate", "code_ratio",
                "update/logprob_mismatch", "time/generate", "time/tools", "time/update"):
        assert key in rows[0], key
    assert rows[0]["update/logprob_mismatch"] < 1e-3  # in-process engine: sampler == trainer
    trajs = [json.loads(line) for line in (run / "trajectories" / "step_000002.jsonl").read_text().splitlines()]
    assert len(trajs) == 6 and {"segments", "tool_calls", "reward", "mask", "token_ids"} <= trajs[0].keys()
    model, tok = load_model(str(run / "checkpoint"))  # a loadable Hugging Face folder
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert load_config(str(run / "config.toml")).model.name == str(tiny_model_dir)
    assert (run / "report.html").is_file() and (run / "plots" / "reward_and_accuracy.png").is_file()


def test_training_changes_the_weights(tiny_model_dir, tmp_path):
    from tirl.reward import register_term

    calls = iter(range(10**6))

    @register_term("always_varied")
    def _varied(traj, cfg):  # fake reward term for this unit test: alternates, so every group has signal
        return 1.0 if next(calls) % 2 else -1.0

    cfg = load_config("demo", _overrides(tiny_model_dir, tmp_path, **{"reward.terms": "{always_varied = 1.0, correct = 0.0}"}))

    t = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    try:
        metrics, _ = t.step()
    finally:
        t.sandbox.close()
        t.verifier.close()
    assert metrics["update/tokens_trained"] > 0
    assert any(not (p.detach() == before[n]).all() for n, p in t.model.named_parameters())


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    assert main(["train", "--config", "demo", "rollout.group_sise=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'rollout.group_sise'" in err and "group_size" in err and "Traceback" not in err


def test_missing_model_path_and_unreachable_hub_are_clear(tmp_path, capsys):
    assert main(["train", "--model", f"{tmp_path}/nope", f"train.output_dir={tmp_path}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "model.name=SomeOrg/some-model-that-is-not-here", f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "could not load model 'SomeOrg/some-model-that-is-not-here'" in err and "Traceback" not in err


def test_crash_mid_run_keeps_everything(tiny_model_dir, tmp_path, monkeypatch):
    cfg = load_config("demo", _overrides(tiny_model_dir, tmp_path, **{"train.steps": 3}))
    calls = {"n": 0}
    orig = Trainer.step

    def step_then_fail(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash in step 2")
        return orig(self)

    monkeypatch.setattr(Trainer, "step", step_then_fail)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, progress=False)
    run = tmp_path / "runs" / "t"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert (run / "trajectories" / "step_000001.jsonl").is_file()
    assert (run / "checkpoint-interrupted" / "config.json").is_file()
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "error" and "simulated crash" in e["error"] for e in events)


def test_chat_tool_call_protocol_runs_in_the_trainer(tiny_model_dir, tmp_path):
    cfg = load_config("demo", _overrides(tiny_model_dir, tmp_path, **{"rollout.protocol": "chat", "train.steps": 1}))
    t = Trainer(cfg)
    try:
        metrics, trajs = t.step()
        assert t.protocol.name == "chat" and len(trajs) == 6
        assert "<|im_start|>system" in trajs[0].prompt_text
    finally:
        t.sandbox.close()
        t.verifier.close()


def test_auto_engine_falls_back_to_hf_when_vllm_cannot_start(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Fake vLLM for this unit test: a module that is 'installed' but fails to start."""
    import importlib.util
    import sys
    import types

    from tirl.train import make_engine

    broken = types.ModuleType("tirl.rollout.vllm_engine")

    class VLLMEngine:  # stands in for a vLLM build that cannot run on this machine
        def __init__(self, *a, **k):
            raise RuntimeError("no CUDA device")

    broken.VLLMEngine = VLLMEngine
    monkeypatch.setitem(sys.modules, "tirl.rollout.vllm_engine", broken)
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find(name, *a))
    model, tok = load_model(str(tiny_model_dir))
    cfg = load_config("demo", [f"model.name={json.dumps(str(tiny_model_dir))}"])
    assert type(make_engine(cfg, model, tok)).__name__ == "HFEngine"
    assert "vLLM could not start (RuntimeError: no CUDA device)" in capsys.readouterr().out
    with pytest.raises(Exception, match="vLLM could not start"):
        make_engine(load_config("demo", [f"model.name={json.dumps(str(tiny_model_dir))}", "rollout.engine=vllm"]), model, tok)


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_final_weights(a, b) -> bool:
    import torch
    from safetensors.torch import load_file, save_file

    wa, wb = load_file(a / "checkpoint" / "model.safetensors"), load_file(b / "checkpoint" / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _resume_extra(**more):
    """Overrides of the resume tests: a deterministic stand-in reward (the parity of the first
    sampled token: groups have signal, the same in every run) and a warm-up that is still moving
    the learning rate at steps 3-4. (The parity of the whole length had no signal once the HF engine
    sampled the full distribution: every response ran to the token budget.)"""
    from tirl.reward import register_term

    register_term("first_token_parity")(lambda traj, cfg: 1.0 if traj.token_ids[traj.prompt_len] % 2 else -1.0)
    return {"train.steps": 4, "optim.warmup_steps": 6, "reward.terms": "{first_token_parity = 1.0, correct = 0.0}", **more}


@pytest.mark.parametrize("algo", [{"algo.kl_coef": 0.05, "algo.entropy_coef": 0.01},
                                  {"algo.advantage": "gae", "algo.critic_warmup": 1, "algo.critic_lr": 1e-3}],
                         ids=["grpo-kl-entropy", "ppo-critic"])
def test_resume_continues_exactly(tiny_model_dir, tmp_path, algo):
    """4 steps in one go == 2 steps, a stop, then `tirl train --resume` to 4: the same metrics at
    steps 3 and 4 and the same final weights, so AdamW's moments, the warm-up schedule, the KL
    reference, the data position and the sampling seeds all came back."""
    extra = _resume_extra(**{"train.save_every": 2}, **algo)
    a = train(load_config("demo", _overrides(tiny_model_dir, tmp_path, **extra, **{"train.run_name": "a"})), progress=False)
    b_args = _overrides(tiny_model_dir, tmp_path, **{**extra, "train.steps": 2, "train.run_name": "b"})
    assert main(["train", "--config", "demo", "--no-progress", "--no-report", *b_args]) == 0
    b = tmp_path / "runs" / "b"
    with (b / "metrics.jsonl").open("a") as f:  # as if it had crashed during step 3, after logging it
        f.write(json.dumps({"step": 3, "reward_mean": 123.0}) + "\n")
    assert main(["train", "--resume", str(b), "--no-progress", "--no-report", "train.steps=4"]) == 0
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra[2:], rb[2:]):
        same = {k: v for k, v in x.items() if not k.startswith("time/")}
        assert same == {k: y[k] for k in same}, (x["step"], {k: (v, y.get(k)) for k, v in same.items() if y.get(k) != v})
    assert ra[3]["update/tokens_trained"] > 0 and ra[2]["lr"] != ra[3]["lr"]  # updates happened, warm-up moved
    assert _same_final_weights(a, b)
    events = [json.loads(line)["event"] for line in (b / "events.jsonl").read_text().splitlines()]
    assert "resume" in events


def test_a_checkpoint_from_before_the_dcp_format_still_resumes(tiny_model_dir, tmp_path):
    """A checkpoint in the older single-process format (``trainer.pt`` beside the HF folder, no
    ``trainer/``) resumes exactly: 4 steps in one go == 2 steps saved that way + --resume to 4."""
    import shutil

    import torch

    from tirl.run import resume_config

    extra = _resume_extra(**{"algo.kl_coef": 0.05})
    a = train(load_config("demo", _overrides(tiny_model_dir, tmp_path, **extra, **{"train.run_name": "a"})), progress=False)
    b = train(load_config("demo", _overrides(tiny_model_dir, tmp_path, **{**extra, "train.steps": 2, "train.run_name": "b"})),
              progress=False)
    ckpt = b / "checkpoint"
    trainer = Trainer(resume_config(ckpt, ["train.steps=4"])[0])
    trainer.restore(ckpt)  # then written as the trainer of that time wrote it
    torch.save({"optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
                "ref": trainer.ref_model.state_dict()}, ckpt / "trainer.pt")
    trainer.close()
    shutil.rmtree(ckpt / "trainer")
    assert main(["train", "--resume", str(b), "--no-progress", "--no-report", "train.steps=4"]) == 0
    assert all(r["update/grad_norm"] > 0 for r in _rows(b))  # every step moved the weights
    assert _same_final_weights(a, b)
    assert (b / "checkpoint" / "trainer" / ".metadata").is_file()  # what it writes now is the new format


def test_resume_refuses_what_it_cannot_continue(tiny_model_dir, tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--no-progress"]) == 2
    assert "no resumable checkpoint" in capsys.readouterr().err
    done = tmp_path / "runs" / "done" / "checkpoint"
    done.mkdir(parents=True)
    (done / "trainer_state.json").write_text(json.dumps({"step": 2, "data": {}, "resumable": True}))
    (done / "trainer").mkdir()
    (done / "trainer" / ".metadata").write_bytes(b"")
    (done.parent / "config.toml").write_text('recipe = "demo"\n[train]\nsteps = 2\n')
    assert main(["train", "--resume", str(done.parent), "--no-progress"]) == 2
    assert "nothing left to run" in capsys.readouterr().err
    ckpt = tmp_path / "runs" / "x" / "checkpoint-interrupted"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 3, "data": {}, "resumable": False}))
    (ckpt.parent / "config.toml").write_text('recipe = "demo"\n')
    assert main(["train", "--resume", str(ckpt), "--no-progress", f"model.name={json.dumps(str(tiny_model_dir))}"]) == 2
    err = capsys.readouterr().err
    assert "cannot be resumed exactly" in err and "step 4" in err


def test_resume_after_a_crash_mid_step(tiny_model_dir, tmp_path, monkeypatch):
    """A step that fails before it changed the weights (here: scoring step 3 raises) leaves a
    resumable checkpoint-interrupted at step 2; the resumed run ends where an uninterrupted one does."""
    import tirl.train as T

    extra = _resume_extra(**{"algo.entropy_coef": 0.01})
    a = train(load_config("demo", _overrides(tiny_model_dir, tmp_path, **extra, **{"train.run_name": "a"})), progress=False)
    calls, real = iter(range(1, 100)), T.score

    def crashing(*args, **kw):
        if next(calls) == 3:
            raise RuntimeError("the verifier host went away (simulated)")
        return real(*args, **kw)

    monkeypatch.setattr(T, "score", crashing)
    with pytest.raises(RuntimeError, match="simulated"):
        train(load_config("demo", _overrides(tiny_model_dir, tmp_path, **extra, **{"train.run_name": "c"})), progress=False)
    monkeypatch.setattr(T, "score", real)
    c = tmp_path / "runs" / "c"
    state = json.loads((c / "checkpoint-interrupted" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["resumable"]
    assert main(["train", "--resume", str(c), "--no-progress", "--no-report"]) == 0
    assert _same_final_weights(a, c)
    assert [r["step"] for r in _rows(c)] == [1, 2, 3, 4]


def test_a_crash_in_evaluation_keeps_the_steps_metrics(tiny_model_dir, tmp_path, monkeypatch):
    """Evaluation fails after step 2 completed: step 2's training metrics are still written, the
    checkpoint resumes after step 2, and the resumed run logs each step once."""
    def failing_eval(self, out_dir):
        raise RuntimeError("benchmark file vanished (simulated)")

    monkeypatch.setattr(Trainer, "evaluate", failing_eval)
    cfg = load_config("demo", _overrides(tiny_model_dir, tmp_path, **{"eval.every": 2, "eval.at_start": False}))
    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg, progress=False)
    run = tmp_path / "runs" / "t"
    assert [r["step"] for r in _rows(run)] == [1, 2] and "reward_mean" in _rows(run)[1]
    state = json.loads((run / "checkpoint-interrupted" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["resumable"]
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--no-progress", "--no-report", "train.steps=3"]) == 0
    assert [r["step"] for r in _rows(run)] == [1, 2, 3]


def test_a_crash_while_saving_keeps_the_previous_checkpoint_whole(tiny_model_dir, tmp_path, monkeypatch):
    """A checkpoint is written aside and swapped in: a save that dies half-way (here: while DCP
    writes trainer/ over an existing checkpoint) leaves the old one intact and consistent, and
    --resume never picks the partial one."""
    import torch
    import torch.distributed.checkpoint as dcp

    from tirl.run import RunDir, find_checkpoint

    cfg = load_config("demo", _overrides(tiny_model_dir, tmp_path, **{"train.save_every": 1}))
    run = train(cfg, progress=False)
    before = {p.relative_to(run): p.read_bytes() for p in (run / "checkpoint-1").rglob("*") if p.is_file()}
    trainer = Trainer(cfg)
    with torch.no_grad():  # weights that differ from the checkpoint's, so an overwrite would show
        next(trainer.model.parameters()).add_(1.0)

    def dying_save(*a, **kw):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(dcp, "save", dying_save)
    with pytest.raises(OSError, match="simulated"):
        RunDir(run).save_checkpoint(trainer.model, trainer.tok, {"step": 7, "resumable": True}, "checkpoint-1",
                                    trainer.training_state())
    trainer.close()
    assert {p.relative_to(run): p.read_bytes() for p in (run / "checkpoint-1").rglob("*") if p.is_file()} == before
    assert (run / ".checkpoint-1.partial").is_dir()  # what was written before the failure
    for later in ("checkpoint", "checkpoint-2"):  # step 2: the run's final checkpoints
        (run / later / "trainer" / ".metadata").unlink()
    (run / ".checkpoint-1.partial" / "trainer_state.json").write_text('{"step": 7, "resumable": true}')
    (run / ".checkpoint-1.partial" / "trainer").mkdir()
    (run / ".checkpoint-1.partial" / "trainer" / ".metadata").write_bytes(b"")  # even a partial one that looks whole...
    assert find_checkpoint(run).name == "checkpoint-1"  # ...is never taken


def test_the_sharded_loaders_reader_finds_tensors_and_names_what_is_missing(tiny_model_dir, tmp_path):
    """``CheckpointWeights`` (what each rank reads its shards from under torchrun): a tensor by the
    module's name, a name the file spells without the base model's prefix, a clear error naming
    the missing parameter and the fix, and ``None`` (the whole load then reports it) for a hub id
    no hub can give here."""
    from safetensors.torch import load_file, save_file

    from tirl.models import CheckpointWeights
    from tirl.types import TirlError

    files = load_file(str(tiny_model_dir / "model.safetensors"))
    w = CheckpointWeights.open(str(tiny_model_dir), prefix="model")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(w(name), files[name])
    save_file({k.removeprefix("model."): v.contiguous() for k, v in files.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    bare = CheckpointWeights.open(str(tmp_path), prefix="model")  # (a checkpoint of the bare transformer)
    assert torch.equal(bare(name), files[name])
    with pytest.raises(TirlError, match="no tensor for the model's parameter 'score.weight'.*sharded_load=false"):
        w("score.weight")
    assert CheckpointWeights.open("SomeOrg/some-model-that-is-not-here") is None
