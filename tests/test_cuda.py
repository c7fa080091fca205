"""On a CUDA GPU (skipped on machines without one, such as CI): the policy, the critic and SFT train
on the GPU with the same numbers as on the CPU, and the whole loop runs there (the Hugging Face
engine generating on the GPU, its sampler log-probs matching the trainer's)."""

import copy

import pytest
import torch

from tirl.config import AlgoConfig, load_config
from tirl.models import load_model, resolve_device
from tirl.types import TirlError

from fakes import tiny_trainer_config
from test_advantage_loss import _grads, _trajs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_device_is_validated_and_resolved():
    with pytest.raises(Exception, match="device"):
        load_config("demo", ["model.device=gpu"])
    assert load_config("demo", ["model.device=cuda:1"]).model.device == "cuda:1"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TirlError, match="Fix: model.device=auto"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@cuda
@pytest.mark.parametrize("algo", [AlgoConfig(), AlgoConfig(ratio_against="recompute", mini_batches=2, kl_coef=0.0, entropy_coef=0.01)])
def test_policy_gradients_match_the_cpu(tiny_model_dir, algo):
    cpu_model, tok = load_model(str(tiny_model_dir))
    gpu_model = copy.deepcopy(cpu_model).to("cuda")
    trajs, adv = _trajs(tok), [1.0, -0.5, 0.3, -0.8, 0.0, 2.0, -1.0, 0.7]
    on_cpu, on_gpu = _grads(cpu_model, trajs, adv, micro=4, algo=algo), _grads(gpu_model, trajs, adv, micro=4, algo=algo)
    assert on_cpu.keys() == on_gpu.keys() and on_cpu
    for k in on_cpu:
        assert on_gpu[k].is_cuda
        assert torch.allclose(on_cpu[k], on_gpu[k].cpu(), atol=1e-5, rtol=1e-3), k


@cuda
def test_hf_engine_generates_on_the_gpu(tiny_model_dir):
    """The HF engine on a CUDA model: greedy tokens equal the CPU's, sampled log-probs equal a
    forward pass on the GPU, and the stop condition cuts each row (its distributions live on the
    GPU while the returned tokens come back to the CPU)."""
    from tirl.update import token_logprobs
    from tirl.rollout.engine import SamplingParams, StopCondition
    from tirl.rollout.hf_engine import HFEngine

    cpu_model, tok = load_model(str(tiny_model_dir))
    gpu_model = copy.deepcopy(cpu_model).to("cuda")
    prompts = [tok("What is 12 * 34?")["input_ids"], tok("def f(x):")["input_ids"], tok("print")["input_ids"]]
    greedy = SamplingParams(temperature=0.0)
    on_cpu = HFEngine(cpu_model, tok, batch_size=4).generate(prompts, [12, 7, 12], greedy)
    on_gpu = HFEngine(gpu_model, tok, batch_size=4).generate(prompts, [12, 7, 12], greedy)
    for c, g in zip(on_cpu, on_gpu):
        assert c.token_ids == g.token_ids and c.finish_reason == g.finish_reason
        assert g.logprobs == pytest.approx(c.logprobs, abs=1e-4)
    torch.manual_seed(0)
    stop = StopCondition(find=lambda text: (text.index("1") + 1) if "1" in text else None)
    gens = HFEngine(gpu_model, tok, batch_size=4).generate(prompts * 3, [24] * 9, SamplingParams(temperature=0.7), stop)
    assert any(g.finish_reason == "tool" for g in gens)
    for p, g in zip(prompts * 3, gens):
        assert ("1" in tok.decode(g.token_ids)) == (g.finish_reason == "tool")
        ids = torch.tensor([p + g.token_ids], device="cuda")
        lp = token_logprobs(gpu_model, ids, torch.ones_like(ids), 0.7)[0, len(p):]
        assert torch.allclose(lp.cpu(), torch.tensor(g.logprobs), atol=1e-4)


@cuda
@pytest.mark.parametrize("params", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.0, 1.0, 30)], ids=["T1", "T0.7-p0.9", "k30"])
def test_hf_engine_on_the_gpu_draws_from_the_distribution_it_records(tiny_model_dir, params):
    """The statistical sampler check of ``test_sampling.py`` on a CUDA model (its own generators
    live on the GPU): 4,000 draws at one position against the exact distribution."""
    import numpy as np

    from sampler_stats import check_draws, exact_probs
    from tirl.rollout.engine import SamplingParams
    from tirl.rollout.hf_engine import HFEngine

    model, tok = load_model(str(tiny_model_dir))
    model = model.to("cuda")
    with torch.no_grad():
        model.model.norm.weight.mul_(5.0)  # a peaked distribution with a long tail (see test_sampling)
    ids = tok("What is 700 * 31?")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1].float().cpu()
    p = SamplingParams(*params)
    n = 4000
    gens = HFEngine(model, tok, batch_size=1000).generate([ids] * n, [1] * n, p, seeds=list(range(n)))
    probs = exact_probs(logits.numpy(), p.temperature, p.top_k, p.top_p)
    check_draws(np.array([g.token_ids[0] for g in gens]), probs, str(p))


@cuda
def test_critic_and_sft_steps_match_the_cpu(tiny_model_dir):
    from tirl.config import OptimConfig
    from tirl.sft import SFTExample, sft_step
    from tirl.update.critic import ValueModel, critic_update, critic_values

    cpu_model, tok = load_model(str(tiny_model_dir))
    gpu_model = copy.deepcopy(cpu_model).to("cuda")
    trajs = _trajs(tok)
    returns = [[1.0 if i % 2 else -1.0] * len(t.token_ids) for i, t in enumerate(trajs)]
    out = {}
    for name, model in (("cpu", cpu_model), ("gpu", gpu_model)):
        critic = ValueModel(model)
        opt = torch.optim.SGD(critic.parameters(), lr=0.1)
        old = critic_values(critic, trajs, OptimConfig(micro_batch_size=4), 0)
        c = critic_update(critic, opt, trajs, returns, old, 0.2, OptimConfig(micro_batch_size=4), 0)
        examples = [SFTExample(t.token_ids, t.mask) for t in trajs]
        s = sft_step(model, torch.optim.SGD(model.parameters(), lr=0.1), examples, OptimConfig(micro_batch_size=4), 0)
        out[name] = (c["critic/value_loss"], c["critic/grad_norm"], s["sft/loss"], s["sft/grad_norm"],
                     critic_values(critic, trajs, OptimConfig(micro_batch_size=4), 0)[0][-1])
    assert out["cpu"] == pytest.approx(out["gpu"], rel=1e-3, abs=1e-5)


@cuda
def test_training_runs_on_the_gpu(tiny_model_dir, tmp_path):
    from tirl.train import Trainer

    cfg = tiny_trainer_config(tiny_model_dir, tmp_path, "rollout.max_tokens_per_turn=24", "rollout.max_response_tokens=48",
                              "optim.lr=1e-3", "algo.kl_coef=0.01", "model.device=\"auto\"")
    t = Trainer(cfg)
    try:
        assert t.model.device.type == "cuda" and t.ref_model is not None and next(t.ref_model.parameters()).is_cuda
        before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        for _ in range(2):
            metrics, trajs = t.step()
            assert trajs and metrics["update/logprob_mismatch"] < 1e-3  # HF engine on the GPU == the trainer
        assert any(not torch.equal(before[n], p) for n, p in t.model.named_parameters())
    finally:
        t.sandbox.close()
        t.verifier.close()
