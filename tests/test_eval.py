"""Evaluation: scores by hand, reproducible runs, outputs, periodic eval, report page."""

import json
import math
import shutil
from pathlib import Path

import pytest

from tirl.cli import main

REPO = Path(__file__).resolve().parents[1]
from tirl.eval.scores import aggregate, majority_correct, pass_at_k, problem_scores


def test_pass_at_k_by_hand():
    # n=4 samples, c=1 correct: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2; pass@4 = 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 4) == 1.0
    # n=5, c=2, k=3: 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_avg_and_maj_by_hand():
    # answers 7, 7, 8, None; only "8" is right: avg@4 = 1/4; majority is 7 -> maj@4 = 0
    s = problem_scores(["7", "7.0", "8", None], [False, False, True, False], ks=[1, 2])
    assert s == {"avg@4": 0.25, "pass@1": 0.25, "pass@2": pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2)), "maj@4": 0.0}
    # "1,000" and "1000" vote together and win over "999" twice
    assert majority_correct(["1,000", "999", "1000", "999", "1000.0"], [True, False, True, False, True])
    assert not majority_correct([None, None], [False, False])
    # a tie goes to the answer seen first
    assert majority_correct(["5", "6"], [True, False]) and not majority_correct(["6", "5"], [False, True])
    assert aggregate([{"avg@1": 1.0}, {"avg@1": 0.0}]) == {"avg@1": 0.5}


def _eval(args, tmp_path, name):
    out = tmp_path / name
    assert main(["eval", *args, "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text()), out


def test_eval_outputs_and_reproducibility_tiny(tiny_model_dir, tmp_path, capsys):
    args = ["--model", str(tiny_model_dir), "--bench", "aime24,gsm8k", "--limit", "3", "--n", "4", "--temperature", "1.0",
            "rollout.max_tokens_per_turn=24", "rollout.max_response_tokens=48"]
    a, out = _eval(args, tmp_path, "a")
    b, _ = _eval(args, tmp_path, "b")
    def strip_time(r):
        return {k: {kk: vv for kk, vv in v.items() if kk != "seconds"} for k, v in r["benches"].items()}

    assert strip_time(a) == strip_time(b)  # same seed, same results
    assert set(a["benches"]) == {"aime24", "gsm8k"} and a["benches"]["gsm8k"]["problems"] == 3
    assert {"avg@4", "pass@1", "pass@2", "pass@4", "maj@4"} <= set(a["average"])
    assert {"config", "versions", "seed", "model"} <= set(a)
    lines = (out / "trajectories" / "gsm8k.jsonl").read_text().splitlines()
    assert len(lines) == 12 and {"segments", "reward_info", "mask"} <= set(json.loads(lines[0]))
    table = capsys.readouterr().out
    assert "| Model | AIME24 | gsm8k | Avg |" in table
    c, _ = _eval(args + ["--seed", "1"], tmp_path, "c")
    assert c["seed"] == 1
    json.loads((out / "results.json").read_text(), parse_constant=lambda x: pytest.fail(f"non-JSON constant {x}"))


def test_unknown_benchmark_is_clear(tiny_model_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--bench", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "benchmark 'nope'" in capsys.readouterr().err


@pytest.mark.embedded
def test_eval_embedded_model_on_a_subset_is_reproducible(tmp_path):
    args = ["--bench", "gsm8k", "--limit", "2", "rollout.max_tokens_per_turn=64", "rollout.max_response_tokens=128"]
    a, _ = _eval(args, tmp_path, "a")
    b, _ = _eval(args, tmp_path, "b")
    assert a["model"] == "smollm2-135m-instruct"
    assert a["average"] == b["average"] and a["benches"]["gsm8k"]["tool"] == b["benches"]["gsm8k"]["tool"]


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """A 3-step run of the tiny model with periodic eval every 2 steps and TensorBoard on."""
    root = tmp_path_factory.mktemp("run")
    data = root / "toy.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(6)))
    assert main(["train", "--no-progress", f"model.name={json.dumps(str(tiny_model_dir))}", f"data.source={json.dumps(str(data))}", "rollout.engine=hf",
                 f"train.output_dir={json.dumps(str(root))}", "train.run_name=r", "train.steps=3", "rollout.prompts_per_step=2",
                 "rollout.group_size=3", "rollout.max_tokens_per_turn=24", "rollout.max_response_tokens=48",
                 "eval.every=2", 'eval.benches=["gsm8k"]', "eval.limit=2", 'train.loggers=["jsonl", "tensorboard"]']) == 0
    return root / "r"


def test_periodic_eval_and_tensorboard(trained_run):
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert "eval/gsm8k/avg@1" in rows[1] and "eval/gsm8k/avg@1" not in rows[0]
    assert (trained_run / "eval" / "step_000002" / "results.json").is_file()
    assert list((trained_run / "tensorboard").glob("events.out.tfevents.*"))


def test_report_files(trained_run, tmp_path):
    assert main(["report", str(trained_run)]) == 0
    html = (trained_run / "report.html").read_text()
    assert "<script src" not in html and "http://" not in html.split("<script")[0]  # self-contained
    assert {p.name for p in (trained_run / "plots").glob("*.png")} >= {"reward_and_accuracy.png", "tool_use.png", "time_per_step.png"}


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")), reason="needs Debian's chromium and chromium-driver")
def test_report_page_in_headless_chromium(trained_run, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    assert main(["report", str(trained_run), "--out", str(tmp_path / "report.html")]) == 0
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1600"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get((tmp_path / "report.html").as_uri())
        trajs = [json.loads(line) for f in sorted((trained_run / "trajectories").glob("step_*.jsonl")) for line in f.read_text().splitlines()]
        count = driver.find_element(By.ID, "traj-count")
        assert count.text == f"{len(trajs)} trajectories"
        assert len(driver.find_elements(By.CSS_SELECTOR, "#charts svg")) >= 4
        Select(driver.find_element(By.ID, "filter-step")).select_by_value("2")
        assert count.text == f"{sum(1 for line in (trained_run / 'trajectories' / 'step_000002.jsonl').read_text().splitlines())} trajectories"
        Select(driver.find_element(By.ID, "filter-step")).select_by_value("all")
        Select(driver.find_element(By.ID, "filter-correct")).select_by_value("incorrect")
        assert count.text == f"{sum(not t['reward_info']['correct'] for t in trajs)} trajectories"
        Select(driver.find_element(By.ID, "filter-calls")).select_by_value("0")
        n0 = sum(not t["reward_info"]["correct"] and not t["tool_calls"] for t in trajs)
        assert count.text == f"{n0} trajectories"
        cards = driver.find_elements(By.CSS_SELECTOR, "#traj-list details.traj")
        assert len(cards) == min(n0, 20)
        if cards:
            cards[0].find_element(By.TAG_NAME, "summary").click()
            assert "verdict:" in cards[0].text
        driver.save_screenshot(str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 10_000
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
    finally:
        driver.quit()


def test_wandb_logger_offline(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(4)))
    assert main(["train", "--no-progress", f"model.name={json.dumps(str(tiny_model_dir))}", f"data.source={json.dumps(str(data))}", "rollout.engine=hf",
                 f"train.output_dir={json.dumps(str(tmp_path))}", "train.run_name=w", "train.steps=1", "rollout.prompts_per_step=2",
                 "rollout.group_size=2", "rollout.max_tokens_per_turn=12", "rollout.max_response_tokens=24",
                 'train.loggers=["jsonl", "wandb"]']) == 0
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))


def test_hub_dataset_names_fail_clearly_without_a_hub(tiny_model_dir, tmp_path, capsys):
    # a hub dataset id is tried through `datasets`; here (no hub, no package) it must say so in one line
    assert main(["eval", "--model", str(tiny_model_dir), "--bench", "SomeOrg/some-math-set:test", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "could not be loaded from the hub" in err and "Traceback" not in err


def test_eval_reads_verls_parquet_and_scores_each_data_source(tiny_model_dir, tmp_path):
    """ToRL's own test file (verl's layout: prompt messages, reward_model.ground_truth,
    data_source): --limit takes the first N of each source and each is scored on its own."""
    from tirl.eval.runner import bench_file

    path = REPO.parent / "shared" / "data" / "formats" / "verl_format_torl_test.parquet"
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    probs = bench_file(path, limit=2)
    assert sorted(p.source for p in probs) == ["aime24", "aime24", "aime25", "aime25", "math500", "math500"]
    assert probs[0].answer == "204" and "Aya" in probs[0].problem
    res, out = _eval(["--model", str(tiny_model_dir), "--bench", str(path), "--limit", "1", "--no-tools",
                      "rollout.max_tokens_per_turn=8", "rollout.max_response_tokens=8"], tmp_path, "verl")
    assert sorted(res["benches"]) == ["aime24", "aime25", "math500"]  # (in the file's order)
    assert all(b["problems"] == 1 for b in res["benches"].values())
    assert sorted(p.name for p in (out / "trajectories").iterdir()) == ["aime24.jsonl", "aime25.jsonl", "math500.jsonl"]


def test_eval_grades_minervas_scientific_notation_golds(tmp_path):
    """Synthetic responses to minerva_math's own problems: each gold written another way (the
    integer, \\times 10^{}) is graded right, and a wrong exponent wrong; before #24 every one of
    these sci-notation golds failed."""
    from tirl.eval.runner import resolve_benchmark
    from tirl.reward import Verifier, extract_answer
    from tirl.reward.verify import scientific

    probs = [p for p in resolve_benchmark("minerva_math", None, None) if scientific(p.answer)]
    assert len(probs) >= 50
    pairs, want = [], []
    for p in probs:
        value, figs = scientific(p.answer)
        mantissa, exp = p.answer.lower().split("e")
        pairs += [(p.answer, extract_answer(f"So the answer is $\\boxed{{{mantissa} \\times 10^{{{int(exp)}}}}}$.")),
                  (p.answer, extract_answer(f"\\boxed{{{mantissa} \\times 10^{{{int(exp) + 1}}}}}"))]
        want += [True, False]
    with Verifier(workers=2) as v:
        got = [x.correct for x in v.verify_batch(pairs)]
    assert got == want, [(g, w, pr) for g, w, pr in zip(got, want, pairs) if g != w][:5]


def test_mixed_task_is_scored_per_kind(tiny_model_dir, tmp_path):
    """The mixed task's held-out set reaches the metrics by kind: one benchmark part per kind, each
    with its accuracy and code ratio (issue #23)."""
    res, _ = _eval(["--model", str(tiny_model_dir), "--bench", "synthetic:easy+product@20000", "--limit", "8",
                    "--config", "mini-mixed", "rollout.engine=hf", "rollout.max_tokens_per_turn=8",
                    "rollout.max_response_tokens=8"], tmp_path, "mixed")
    assert sorted(res["benches"]) == ["synthetic:easy", "synthetic:product"]
    assert sum(b["problems"] for b in res["benches"].values()) == 8
    assert all("code_ratio" in b["tool"] for b in res["benches"].values())


def test_per_source_metrics_split_a_mixed_batch_by_kind():
    """During training the mixed task's batch is reported per kind (accuracy, code ratio); a batch of
    one source adds nothing. Trajectories built by hand (no model)."""
    from tirl.eval import per_source_metrics
    from tirl.types import Problem, Segment, Trajectory

    def traj(src, code, ok):
        text = "```python\nprint(1)\n```" if code else "1 + 1 = 2"
        t = Trajectory(problem=Problem(id="p", problem="q", answer="2", source=src), group=0, token_ids=[1], mask=[1],
                       logprobs=[0.0], prompt_len=0, segments=[Segment(kind="model", text=text, start=0, end=1)])
        t.reward_info = {"correct": ok}
        return t

    batch = [traj("synthetic:easy", False, True), traj("synthetic:easy", True, True),
             traj("synthetic:product", True, True), traj("synthetic:product", True, False)]
    m = per_source_metrics(batch)
    assert m == {"synthetic:easy/accuracy": 1.0, "synthetic:easy/code_ratio": 0.5,
                 "synthetic:product/accuracy": 0.5, "synthetic:product/code_ratio": 1.0}
    assert per_source_metrics(batch[:2]) == {}
