"""Per-token log-probs and entropies of sequences under a causal LM, without the ``[B, T, V]`` logits.

The trainer needs, for each token a sequence holds, ``log softmax(logits / T)[token]`` and the
entropy of that distribution (policy update, reference model, recomputed old log-probs, the SFT
loss, the sampler/trainer mismatch). With a 151,936-token vocabulary the full float32 logits of one
16k-token sequence are 10 GB, and a plain ``log_softmax`` keeps several such tensors alive into the
backward. Here the LM head runs *inside* the model's forward (so FSDP2's unsharded weights are the
ones used) on only the positions that predict a token, ``chunk`` tokens at a time, through
:class:`HeadLogprobs`, an autograd function that keeps one ``[chunk, V]`` block alive at a time and
recomputes each block's logits in the backward. ``chunk = 0`` is the plain computation (the
reference the tests compare with).

Sequences reach the model either right-padded (one row each) or **packed** (``pack=True``): one
row holding them end to end, each with its own position ids from 0 and no attention across them.
A packed forward also passes the sequences' bounds (transformers' varlen keywords,
``cu_seq_lens_q/k``): flash-attention uses them as it is; for sdpa, :func:`sdpa_by_sequence` runs
each sequence's causal attention on its own (no ``[L, L]`` mask, no scores across sequences:
one layer's attention over a row of 1,536 + 512 tokens, forward and backward, took 0.60 s with
the mask and 0.26 s this way on this CPU); any other attention uses the block-diagonal mask
transformers builds from the position ids. Either way the result is ``[B, T]`` in the padded layout, column 0 (no context) and padding 0.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from tirl.models import compute_context
from tirl.types import TirlError


def _head_logits(h_KH: torch.Tensor, weight_VH: torch.Tensor, bias_V: torch.Tensor | None, dtype: torch.dtype | None,
                 temperature: float) -> torch.Tensor:
    """float32 ``[K, V]`` logits / temperature, the LM head run in ``dtype`` (what autocast does)."""
    if dtype is not None:
        h_KH, weight_VH = h_KH.to(dtype), weight_VH.to(dtype)
        bias_V = None if bias_V is None else bias_V.to(dtype)
    z = torch.nn.functional.linear(h_KH, weight_VH, bias_V)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return z / temperature if temperature != 1.0 else z


def _grad_logits(logq_KV: torch.Tensor, ent_K: torch.Tensor, target_K: torch.Tensor, g_logp_K: torch.Tensor,
                 g_ent_K: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """d loss / d logits of one block, built in place of its log-softmax ``logq``:
    d logp/dz = onehot - p;  d entropy/dz = -p (log p + H); both divided by the temperature."""
    if g_ent_K is not None:
        p = logq_KV.exp()
        gz = p.mul_(logq_KV.add_(ent_K[:, None]).mul_(-g_ent_K[:, None]).sub_(g_logp_K[:, None]))
    else:  # p in place of log p: one [K, V] block alive, not two
        gz = logq_KV.exp_().mul_(-g_logp_K[:, None])
    gz.scatter_add_(-1, target_K[:, None], g_logp_K[:, None])
    return gz.div_(temperature) if temperature != 1.0 else gz


def _add_grads(gz_KV, s: int, h_MH, weight_VH, bias_V, mm, grads) -> None:
    """Adds one block's gradients into ``grads = (gh [M, H], gw [V, H], gb [V])`` (None: not wanted)."""
    gh, gw, gb = grads
    g = gz_KV.to(mm)  # the forward's matmul dtype, as autocast's backward
    e = s + g.shape[0]
    if gh is not None:
        gh[s:e] = (g @ weight_VH.to(mm)).to(h_MH.dtype)
    if gw is not None and mm == weight_VH.dtype:
        gw.addmm_(g.t(), h_MH[s:e].to(mm))  # in place: no second [V, H] block
    elif gw is not None:
        gw.add_((g.t() @ h_MH[s:e].to(mm)).to(weight_VH.dtype))
    if gb is not None:
        gb.add_(g.sum(0).to(bias_V.dtype))


def _same(got: torch.Tensor | None, predicted: torch.Tensor | None) -> bool:
    if got is None or predicted is None:
        return got is None and predicted is None
    return torch.allclose(got, predicted, rtol=1e-6, atol=0.0)


class HeadLogprobs(torch.autograd.Function):
    """``(logp [M], entropy [M])`` of ``target [M]`` under ``softmax(head(h [M, H]) / T)``, ``chunk``
    rows of logits at a time. Gradients flow into ``h``, the head's weight and bias, from either
    output (the entropy's only when it is used).

    The backward recomputes each block's logits (4 matmuls per block in all). With ``predict``
    (``(logp [M], entropy [M]) -> (d loss/d logp [M], d loss/d entropy [M] or None)``, exact for
    the entries computed so far: a loss whose gradient at a token depends on that token alone),
    the forward computes the gradients while each block's logits are at hand (3 matmuls); the
    backward uses them if the gradients that arrive are the predicted ones, and recomputes
    otherwise, so the result never depends on the prediction being right."""

    @staticmethod
    def forward(ctx, h_MH, weight_VH, bias_V, target_M, temperature: float, chunk: int, dtype, want_entropy: bool,
                predict=None):
        m = h_MH.shape[0]
        logp = h_MH.new_zeros(m, dtype=torch.promote_types(h_MH.dtype, torch.float32))
        ent, lse = torch.zeros_like(logp), torch.zeros_like(logp)
        need = ctx.needs_input_grad
        ahead = predict is not None and any(need[:3])
        if ahead:
            grads = (torch.zeros_like(h_MH) if need[0] else None, torch.zeros_like(weight_VH) if need[1] else None,
                     torch.zeros_like(bias_V) if bias_V is not None and need[2] else None)
            g_logp_M, g_ent_M = torch.zeros_like(logp), None
            mm = weight_VH.dtype if dtype is None else dtype
        with torch.autocast(h_MH.device.type, enabled=False):
            for s in range(0, m, chunk):
                e = min(s + chunk, m)
                z = _head_logits(h_MH[s:e], weight_VH, bias_V, dtype, temperature)
                lse[s:e] = l = torch.logsumexp(z, dim=-1)
                logp[s:e] = z.gather(-1, target_M[s:e, None]).squeeze(-1) - l
                if want_entropy:  # H = lse - sum p z, with p built in place of a second [K, V] block
                    ent[s:e] = l - z.sub(l[:, None]).exp_().mul_(z).sum(-1)
                if ahead:
                    g_lp, g_en = predict(logp, ent)
                    g_logp_M[s:e] = g_lp[s:e]
                    if g_en is not None:
                        g_ent_M = torch.zeros_like(logp) if g_ent_M is None else g_ent_M
                        g_ent_M[s:e] = g_en[s:e]
                    g_en_K = None if g_en is None or not bool(g_en[s:e].any()) else g_en[s:e]
                    gz = _grad_logits(z.sub_(l[:, None]), ent[s:e], target_M[s:e], g_lp[s:e], g_en_K, temperature)
                    _add_grads(gz, s, h_MH, weight_VH, bias_V, mm, grads)
                del z
        ctx.save_for_backward(h_MH, weight_VH, bias_V, target_M, lse, ent)
        ctx.settings = (temperature, chunk, dtype, want_entropy)
        ctx.ahead = (g_logp_M, g_ent_M, grads) if ahead else None
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, weight, bias, target, lse, ent = ctx.saved_tensors
        temperature, chunk, dtype, want_entropy = ctx.settings
        if g_ent is not None and not want_entropy:
            raise RuntimeError("HeadLogprobs: a gradient reached the entropy, which was not computed")
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.to(lse.dtype)
        g_ent = None if g_ent is None or not bool(g_ent.any()) else g_ent.to(lse.dtype)
        ahead, ctx.ahead = ctx.ahead, None
        if ahead is not None:
            pred_logp, pred_ent, grads = ahead
            pred_ent = None if pred_ent is None or not bool(pred_ent.any()) else pred_ent
            if _same(g_logp, pred_logp) and _same(g_ent, pred_ent):
                return (*grads, None, None, None, None, None, None)
            del grads  # the loss was not what the prediction assumed: recompute below
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grads = (torch.zeros_like(h) if need_h else None, torch.zeros_like(weight) if need_w else None,
                 torch.zeros_like(bias) if need_b else None)
        mm = weight.dtype if dtype is None else dtype
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                e = s + chunk
                logq = _head_logits(h[s:e], weight, bias, dtype, temperature).sub_(lse[s:e, None])  # log softmax
                gz = _grad_logits(logq, ent[s:e], target[s:e], g_logp[s:e],
                                  None if g_ent is None else g_ent[s:e], temperature)
                del logq
                _add_grads(gz, s, h, weight, bias, mm, grads)
        return (*grads, None, None, None, None, None, None)


def head_logprobs(h_MH: torch.Tensor, head: torch.nn.Module, target_M: torch.Tensor, temperature: float, chunk: int,
                  with_entropy: bool, entropy_grad: bool, predict=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp [M], entropy [M])`` for the hidden states ``h`` through the linear ``head``, in the
    ambient autocast dtype; ``chunk = 0``: the plain computation over all ``M`` rows at once.
    ``predict``: see :class:`HeadLogprobs` (chunked only)."""
    device = h_MH.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    t = temperature if temperature > 0 else 1.0
    if chunk > 0:
        logp, ent = HeadLogprobs.apply(h_MH, head.weight, head.bias, target_M, t, chunk, dtype, with_entropy,
                                       predict if torch.is_grad_enabled() else None)
        return logp, ent if entropy_grad else ent.detach()
    with torch.autocast(device, enabled=False):
        return logits_logprobs(_head_logits(h_MH, head.weight, head.bias, dtype, t), target_M, with_entropy,
                               entropy_grad)


def logits_logprobs(z_MV: torch.Tensor, target_M: torch.Tensor, with_entropy: bool,
                    entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp [M], entropy [M])`` from float logits (already divided by the temperature), all at
    once: the plain computation (entropy 0 without ``with_entropy``)."""
    lse = torch.logsumexp(z_MV, dim=-1)
    logp = z_MV.gather(-1, target_M[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return logp, lse - (torch.exp(z_MV - lse[:, None]) * z_MV).sum(-1)


def _sdpa_original():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def sdpa_by_sequence(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                     **kwargs):
    """transformers' sdpa attention, except in a packed forward (``cu_seq_lens_q`` given, query and
    key the same tokens, ``[1, heads, L, d]``): there each sequence's causal attention alone, the
    block-diagonal mask left unused. Everything else (generation, caches, sliding windows,
    position biases) goes to transformers' function unchanged."""
    sdpa = _sdpa_original()
    cu = kwargs.get("cu_seq_lens_q")
    plain = (cu is None or kwargs.get("cu_seq_lens_k") is not cu or query.shape[0] != 1
             or query.shape[2] != key.shape[2] or any(kwargs.get(k) is not None for k in _NOT_BY_SEQUENCE))
    if plain:
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                    **kwargs)
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != query.shape[2]:
        raise TirlError(f"packed attention: sequence bounds {bounds[:3]}... do not cover the row of "
                        f"{query.shape[2]} tokens (a bug in tirl's packed layout)")
    parts = [sdpa(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, dropout=dropout, scaling=scaling,
                  is_causal=is_causal)[0] for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, 1), None  # [1, L, heads, d], as transformers' function returns it


# attention features a per-sequence split would ignore: those forwards keep transformers' path
_NOT_BY_SEQUENCE = ("sliding_window", "position_bias", "cache", "s_aux", "softcap")


def _by_sequence_installed() -> None:
    """Once per process: transformers' "sdpa" entry becomes :func:`sdpa_by_sequence`, which is
    transformers' own function unless a packed forward passes the sequences' bounds."""
    from transformers.modeling_utils import AttentionInterface

    if AttentionInterface._global_mapping.get("sdpa") is not sdpa_by_sequence:
        AttentionInterface.register("sdpa", sdpa_by_sequence)


@dataclass
class Layout:
    """Where ``B`` sequences sit in the forward's ``[R, L]`` rows and in the ``[B, T]`` result.
    ``src[k]``: flat index (into ``R * L``) of the hidden state that predicts the token ``target[k]``,
    which the result holds at the flat index ``dst[k]`` (into ``B * T``)."""

    input_ids: torch.Tensor  # [R, L]
    attention_mask: torch.Tensor | None  # [R, L]; None when packed
    position_ids: torch.Tensor | None  # [R, L]; per-sequence positions when packed
    src: torch.Tensor  # [M]
    target: torch.Tensor  # [M]
    dst: torch.Tensor  # [M]
    shape: tuple[int, int]  # (B, T)
    bounds: torch.Tensor | None = None  # [B + 1] int32: where each packed sequence starts in the row, then L

    def varlen(self) -> dict:
        """transformers' varlen keywords for a packed row (none when padded)."""
        if self.bounds is None:
            return {}
        longest = int((self.bounds[1:] - self.bounds[:-1]).max())
        return dict(cu_seq_lens_q=self.bounds, cu_seq_lens_k=self.bounds, max_length_q=longest, max_length_k=longest)

    def only(self, mask_BT: torch.Tensor | None) -> "Layout":
        """The same rows, predicting only the tokens where ``mask_BT [B, T]`` is set (the sampled
        ones): the LM head then runs on those positions alone (not on the prompt or the tool
        outputs, whose log-probs nothing reads), and the result is 0 elsewhere."""
        if mask_BT is None:
            return self
        keep = mask_BT.reshape(-1).index_select(0, self.dst) != 0
        return replace(self, src=self.src[keep], target=self.target[keep], dst=self.dst[keep])


def padded_layout(input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> Layout:
    """One row per sequence; a token is predicted where it and the one before it are attended."""
    b, t = input_ids_BT.shape
    keep = (attention_mask_BT[:, 1:] != 0) & (attention_mask_BT[:, :-1] != 0)  # [B, T-1]
    rows, cols = keep.nonzero(as_tuple=True)
    src = rows * t + cols
    return Layout(input_ids_BT, attention_mask_BT, None, src, input_ids_BT[rows, cols + 1], src + 1, (b, t))


def packed_layout(token_ids: list[list[int]], device=None) -> Layout:
    """All sequences end to end in one row, position ids restarting at 0 for each."""
    lens = [len(s) for s in token_ids]
    flat = torch.tensor([x for s in token_ids for x in s], dtype=torch.long)
    pos = torch.cat([torch.arange(n) for n in lens])
    starts = torch.tensor([0] + lens[:-1]).cumsum(0)
    width = max(lens)
    src = torch.cat([s + torch.arange(n - 1) for s, n in zip(starts.tolist(), lens)])
    dst = torch.cat([i * width + torch.arange(1, n) for i, n in enumerate(lens)])
    bounds = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return Layout(flat[None].to(device), None, pos[None].to(device), src.to(device), flat[src + 1].to(device),
                  dst.to(device), (len(lens), width), bounds.to(device))


@contextmanager
def _head_replaced(model, fn):
    """Within the block, the model's LM head module computes ``fn(hidden [R, L, H])`` instead."""
    head = model.get_output_embeddings()
    before = head.__dict__.get("forward")  # an instance-level forward someone else set (a hook library)
    head.forward = fn
    try:
        yield head
    finally:
        if before is None:
            del head.forward
        else:
            head.forward = before


def _unsupported_head(model) -> str | None:
    """Why the LM head's output is not the logits for this model (post-processed), or None."""
    cfg = getattr(model, "config", None)
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            return f"its config sets {key}"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return "its output embedding is not a plain Linear"
    return None


def layout_logprobs(model, lay: Layout, temperature: float = 1.0, with_entropy: bool = False,
                    entropy_grad: bool = True, chunk: int = 256, loss_hint=None):
    """``logp [B, T]`` (and ``entropy [B, T]`` with ``with_entropy``) for the sequences of ``lay``.
    ``entropy_grad = False`` computes the entropy outside autograd (a metric only).
    ``loss_hint``: the scalar loss the caller will build, as a function ``(logp [B, T], entropy
    [B, T]) -> loss``, when its gradient at each token depends on that token's values alone (every
    per-token policy loss, KL and entropy term, with any aggregation): the chunked head then
    computes its gradients in the forward, one matmul per block fewer (see :class:`HeadLogprobs`).
    A hint that does not match the real loss costs time, never correctness."""
    got: dict[str, torch.Tensor] = {}
    why = _unsupported_head(model) if chunk > 0 else None
    predict = None if loss_hint is None else _per_token_grads(loss_hint, lay, with_entropy and entropy_grad)

    def head_forward(hidden_RLH: torch.Tensor) -> torch.Tensor:
        h = hidden_RLH.reshape(-1, hidden_RLH.shape[-1]).index_select(0, lay.src)
        got["logp"], got["ent"] = head_logprobs(h, head, lay.target, temperature, chunk, with_entropy, entropy_grad,
                                                predict)
        return torch.stack([got["logp"][None], got["ent"][None]], -1)  # [1, M, 2], not a view: FSDP hooks it

    kwargs = model_inputs(model, lay)
    if why is None:
        with _head_replaced(model, head_forward) as head, compute_context(model):
            model(**kwargs)
    else:  # the plain logits, post-processing included
        with compute_context(model):
            logits = model(**kwargs).logits.float()
        z = logits.reshape(-1, logits.shape[-1]).index_select(0, lay.src)
        z = z / temperature if temperature > 0 and temperature != 1.0 else z
        got["logp"], got["ent"] = logits_logprobs(z, lay.target, with_entropy, entropy_grad)
    b, t = lay.shape
    out = [torch.zeros(b * t, device=lay.src.device).index_put((lay.dst,), got[k]).view(b, t) for k in ("logp", "ent")]
    return (out[0], out[1]) if with_entropy else out[0]


def _per_token_grads(loss_of, lay: Layout, with_entropy_grad: bool):
    """``(logp [M], entropy [M]) -> (d loss/d logp [M], d loss/d entropy [M] or None)`` through
    ``loss_of`` on the ``[B, T]`` layout (the entries not computed yet are 0)."""
    b, t = lay.shape

    def predict(logp_M: torch.Tensor, ent_M: torch.Tensor):
        with torch.enable_grad():
            x = [logp_M.detach().requires_grad_()] + ([ent_M.detach().requires_grad_()] if with_entropy_grad else [])
            spread = [torch.zeros(b * t, dtype=v.dtype, device=v.device).index_put((lay.dst,), v).view(b, t) for v in x]
            loss = loss_of(spread[0], spread[1] if with_entropy_grad else ent_M.new_zeros(b, t))
            g = torch.autograd.grad(loss, x, allow_unused=True)
        g = [torch.zeros_like(v) if gv is None else gv for v, gv in zip(x, g)]
        return g[0], g[1] if with_entropy_grad else None

    return predict


def model_inputs(model, lay: Layout) -> dict:
    """The keywords of a forward of ``model`` over the rows of ``lay``: ids, mask, position ids,
    and for a packed layout the sequences' bounds (where the model's forward takes them)."""
    kwargs = dict(input_ids=lay.input_ids, attention_mask=lay.attention_mask, position_ids=lay.position_ids,
                  use_cache=False)
    if lay.bounds is not None and _takes_varlen(model):
        _by_sequence_installed()
        kwargs |= lay.varlen()
    return kwargs


def _takes_varlen(model) -> bool:
    """Whether the model's forward hands extra keywords down to its attention (transformers'
    models do, through ``**kwargs``); a model that does not gets the mask alone."""
    import inspect

    fwd = inspect.signature(type(model).forward).parameters.values()
    return any(p.kind is p.VAR_KEYWORD for p in fwd)


def token_logprobs(model, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False, entropy_grad: bool = True, chunk: int = 256):
    """``[B, T]`` log-prob of each token given the ones before it, under ``softmax(logits / T)``
    (the distribution the sampler drew from when top-p/top-k are off); column 0 and padding are 0.
    With ``with_entropy`` also the ``[B, T]`` entropy of the distribution each token was drawn from."""
    return layout_logprobs(model, padded_layout(input_ids_BT, attention_mask_BT), temperature, with_entropy,
                           entropy_grad, chunk)


def logprobs_of_sequences(model, token_ids: list[list[int]], pad_id: int, temperature: float = 1.0, *,
                          with_entropy: bool = False, entropy_grad: bool = True, chunk: int = 256, pack: bool = False,
                          mask_BT: torch.Tensor | None = None, loss_hint=None):
    """:func:`token_logprobs` of a list of sequences, packed into one row (``pack``) or right-padded;
    with ``mask_BT`` (right-padded, as ``pad_tokens`` makes it), of the tokens where it is set alone
    (0 elsewhere; see :meth:`Layout.only`). ``loss_hint``: see :func:`layout_logprobs`."""
    device = next(model.parameters()).device
    if pack:
        check_packing(model)
        lay = packed_layout(token_ids, device)
    else:
        width = max(map(len, token_ids))
        ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, s in enumerate(token_ids):
            ids[i, : len(s)], attn[i, : len(s)] = torch.tensor(s), 1
        lay = padded_layout(ids.to(device), attn.to(device))
    return layout_logprobs(model, lay.only(mask_BT), temperature, with_entropy, entropy_grad, chunk, loss_hint)


def check_packing(model) -> None:
    """Once per model: packed log-probs of two short sequences equal their separate ones, i.e. the
    architecture's attention honours per-sequence position ids (transformers' masking utilities).
    Every rank runs it at the same first packed forward, so under FSDP it stays in step."""
    if getattr(model, "_tirl_packing_checked", False):
        return
    vocab = model.get_input_embeddings().num_embeddings
    seqs = [[(7 * i + 3) % vocab for i in range(6)], [(11 * i + 5) % vocab for i in range(4)]]
    device = next(model.parameters()).device
    with torch.no_grad():
        packed = layout_logprobs(model, packed_layout(seqs, device), chunk=0)
        alone = [layout_logprobs(model, packed_layout([s], device), chunk=0)[0] for s in seqs]
    compute = getattr(model, "tirl_compute_dtype", None) or next(model.parameters()).dtype
    tol = 1e-3 if compute == torch.float32 else 5e-2
    for i, (s, ref) in enumerate(zip(seqs, alone)):
        err = float((packed[i, : len(s)] - ref[: len(s)]).abs().max())
        if err > tol:
            raise TirlError(f"packed sequences leak into each other in {type(model).__name__} (log-prob off by "
                            f"{err:.3g}): its attention ignores per-sequence position ids. Fix: optim.pack=false.")
    model._tirl_packing_checked = True
