from __future__ import annotations

import torch

from tirl.models import compute_context


def token_logprobs(model, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False, entropy_grad: bool = True):
    """``[B, T]`` log-prob of each token given the ones before it, under ``softmax(logits / T)``
    (the distribution the sampler drew from when top-p/top-k are off). Column 0 (no context) is 0.
    With ``with_entropy`` also returns the ``[B, T]`` entropy of that distribution at each position
    (the distribution the token at that position was drawn from); ``entropy_grad=False`` computes it
    outside autograd (a metric only), so its ``[B, T, V]`` intermediates are freed at once instead of
    living until the backward pass."""
    with compute_context(model):
        logits = model(input_ids=input_ids_BT, attention_mask=attention_mask_BT).logits[:, :-1].float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    target = input_ids_BT[:, 1:]
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, target[..., None]).squeeze(-1) - lse
    logp = torch.nn.functional.pad(picked, (1, 0), value=0.0)
    if not with_entropy:
        return logp
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        probs = torch.exp(logits - lse[..., None])
        entropy = lse - (probs * logits).sum(-1)
    return logp, torch.nn.functional.pad(entropy, (1, 0), value=0.0)
