"""Cold-start SFT (ReTool stage 1): supervised fine-tuning on code-integrated traces with the
interpreter output masked out of the loss.

Examples are built like rollouts build trajectories: the prompt, each model-written span and
each interpreter span are tokenised separately and concatenated, with mask 1 only on what the
model should learn to write (its text and the end-of-turn token) and mask 0 on the prompt and
the interpreter output (the ``<interpreter>`` block, or ToRL's ```` ```output ```` block).

Accepted rows (JSONL or Parquet):

* ReTool-SFT: ``{"messages": [{"role": "user", ...}, {"role": "assistant", "content": "...<code>...</code>
  <interpreter>...</interpreter>...<answer>...</answer>"}]}``;
* chat messages with tool turns: ``{"messages": [system?, user, assistant, tool, assistant, ...]}``
  (tool messages masked, rendered by the chat template);
* ``{"prompt": str, "response": str}`` with interpreter spans inside ``response``.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tirl.config import Config
from tirl.dist import Dist
from tirl.models import return_freed_memory
from tirl.rollout.protocol import ToolProtocol, get_protocol
from tirl.types import TirlError
from tirl.update.logprobs import check_packing, logprobs_of_sequences
from tirl.update.step import SINGLE, device_of, dummy_pass, micro_batches, pad_tokens


@dataclass
class SFTExample:
    token_ids: list[int]  # [T]
    mask: list[int]  # [T] 1 = learn to write, 0 = given (prompt, interpreter output)


def output_span_re(protocol: ToolProtocol) -> re.Pattern[str]:
    """The inserted-output spans of a protocol inside a trace, with the whitespace around them
    (the rollout inserts that whitespace too)."""
    open_tag, close_tag = re.escape(protocol.output_open.strip()), re.escape(protocol.output_close.strip())
    return re.compile(r"\s*" + open_tag + r".*?" + close_tag + r"\s*", re.S)


def split_response(response: str, protocol: ToolProtocol) -> list[tuple[str, int]]:
    """``[(text, mask), ...]``: model-written spans (1) and interpreter spans (0), in order."""
    out, pos = [], 0
    for m in output_span_re(protocol).finditer(response):
        if m.start() > pos:
            out.append((response[pos : m.start()], 1))
        out.append((m.group(0), 0))
        pos = m.end()
    if pos < len(response):
        out.append((response[pos:], 1))
    return out


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] if text else []


def example_from_text(tok, prompt_text: str, response: str, protocol: ToolProtocol) -> SFTExample:
    ids, mask = _encode(tok, prompt_text), []
    mask = [0] * len(ids)
    for text, m in split_response(response, protocol) + [(tok.eos_token or "", 1)]:
        piece = _encode(tok, text)
        ids += piece
        mask += [m] * len(piece)
    return SFTExample(ids, mask)


def _render(tok, messages: list[dict[str, Any]], gen: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def example_from_messages(tok, messages: list[dict[str, Any]], protocol: ToolProtocol) -> SFTExample:
    """Chat messages: everything the template adds and every non-assistant message is mask 0; an
    assistant message's content and its end-of-turn token are mask 1 (interpreter spans inside
    an assistant message, ReTool-SFT style, are mask 0)."""
    if not getattr(tok, "chat_template", None):
        raise TirlError("messages rows need a tokenizer with a chat template")
    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for k, msg in enumerate(messages):
        if msg.get("role") == "assistant":
            head = _render(tok, messages[:k], gen=True)
            full = _render(tok, messages[: k + 1])
            if not head.startswith(done) or not full.startswith(head):
                raise TirlError("the chat template is not append-only (a later message changes earlier text); "
                                "convert the data to {prompt, response} rows")
            pieces = [(head[len(done):], 0)] + split_response(full[len(head):].rstrip("\n"), protocol) + [("\n" * (len(full) - len(full.rstrip("\n"))), 0)]
            done = full
        else:
            full = _render(tok, messages[: k + 1])
            if not full.startswith(done):
                raise TirlError("the chat template is not append-only; convert the data to {prompt, response} rows")
            pieces, done = [(full[len(done):], 0)], full
        for text, m in pieces:
            piece = _encode(tok, text)
            ids += piece
            mask += [m] * len(piece)
    return SFTExample(ids, mask)


def load_examples(path: str, tok, protocol: ToolProtocol, max_len: int) -> list[SFTExample]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise TirlError(f"SFT data {p} does not exist. Fix: sft.data = a .jsonl or .parquet file of traces, "
                        "or synthetic:code / synthetic:text")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = list(enumerate(pq.read_table(p).to_pylist(), 1))
    else:
        rows = [(i, json.loads(line)) for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    return examples_from_rows(rows, tok, protocol, max_len, str(p))


def examples_from_rows(rows: list[tuple[int, dict]], tok, protocol: ToolProtocol, max_len: int, where: str) -> list[SFTExample]:
    """``rows``: ``(line number, row)``; errors name ``where:line``."""
    out = []
    for lineno, row in rows:
        try:
            if "messages" in row:
                ex = example_from_messages(tok, list(row["messages"]), protocol)
            elif "prompt" in row and "response" in row:
                ex = example_from_text(tok, row["prompt"], row["response"], protocol)
            else:
                raise TirlError(f"row has neither 'messages' nor 'prompt'/'response' (keys: {sorted(row)})")
        except TirlError as e:
            raise TirlError(f"{where}:{lineno}: {e}") from None
        if len(ex.token_ids) > max_len:  # keep the start: prompt and first turns (mask still exact)
            ex = SFTExample(ex.token_ids[:max_len], ex.mask[:max_len])
        if sum(ex.mask):
            out.append(ex)
    if not out:
        raise TirlError(f"{where}: no example with tokens to learn")
    return out


def synthetic_traces(cfg: Config, say=print) -> list[dict]:
    """``sft.data = "synthetic:code"`` or ``"synthetic:text"``: cold-start traces on product problems
    ``0 .. sft.num_traces-1`` (RL and evaluation take disjoint ranges), with the recipe's prompt."""
    from tirl.traces import traces_for

    style = cfg.sft.data.split(":", 1)[1] if cfg.sft.data else ""
    if style not in ("code", "text", "mixed"):
        raise TirlError(f"unknown sft.data {cfg.sft.data!r}; synthetic traces are synthetic:code, synthetic:text "
                        "or synthetic:mixed")
    what = f"{cfg.sft.num_traces} cold-start traces ({style}" + (
        f", code on {cfg.sft.code_fraction:.0%} of them" if style == "mixed" else "") + ")"
    say(f"[tirl] writing {what}; their programs run in the sandbox")
    t0 = time.perf_counter()
    rows = traces_for(cfg, style, cfg.sft.num_traces, seed=cfg.data.seed)  # type: ignore[arg-type]
    say(f"[tirl] {len(rows)} traces in {time.perf_counter() - t0:.1f} s")
    return rows


def sft_loss(logp_BT: torch.Tensor, mask_BT: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Masked next-token cross-entropy from the tokens' log-probs (``logp[:, t] = log p(token t |
    tokens < t)``, column 0 = 0), summed over learnable tokens / ``num_tokens`` (the whole batch's
    count, so gradient accumulation is exact). Masked tokens contribute exactly 0."""
    return -(logp_BT * mask_BT)[:, 1:].sum() / max(num_tokens, 1)


def sft_step(model, optimizer, batch: list[SFTExample], optim, pad_id: int, dist: Dist = SINGLE) -> dict[str, float]:
    """One optimizer step on ``batch`` (the whole step's; under data parallelism every rank passes
    the same batch and trains on its contiguous share, the loss normalised by the whole batch's
    token count and the gradients summed, so N ranks take the single-process step). Micro-batches,
    packing and the chunked LM head follow ``optim`` as in the RL update."""
    n_tok = sum(sum(e.mask[1:]) for e in batch)
    mine = [batch[i] for i in dist.block(len(batch))]
    total = 0.0
    model.train()
    if optim.pack:
        check_packing(model)
    optimizer.zero_grad(set_to_none=True)
    for idx in micro_batches(mine, list(range(len(mine))), optim, dist):
        if idx is None:
            dummy_pass(model, pad_id, backward=True)
            continue
        part = [mine[i] for i in idx]
        _, _, mask = pad_tokens([e.token_ids for e in part], [e.mask for e in part], pad_id, device_of(model))
        logp = logprobs_of_sequences(model, [e.token_ids for e in part], pad_id, chunk=optim.logprob_chunk,
                                     pack=optim.pack, mask_BT=mask,  # (the head on mask-1 tokens alone)
                                     loss_hint=lambda lp, _: sft_loss(lp, mask, n_tok))  # gradients in the forward
        loss = sft_loss(logp, mask, n_tok)
        loss.backward()
        total += float(loss.detach())
        return_freed_memory(device_of(model))
    (total,) = dist.sum([total])
    gn = dist.clip_grad_norm(model.parameters(), optim.grad_clip)
    optimizer.step()
    return {"sft/loss": total, "sft/tokens": float(n_tok), "sft/grad_norm": gn}


def run_sft(cfg: Config, progress: bool = True, model=None, tok=None,
            dist: Dist = SINGLE) -> tuple[Any, Any, list[dict[str, float]]]:
    """SFT ``model`` (loaded from ``cfg.model`` if not given) on ``cfg.sft.data``; returns the model,
    tokenizer and per-step metrics. The caller saves (``tirl sft`` writes a run folder). With a
    ``dist`` of several ranks (``tirl sft`` under torchrun) the model it loads is sharded and each
    step's batch split between the ranks."""
    from tqdm.auto import tqdm

    from tirl.models import load_policy, resolve_device

    s = cfg.sft
    if not s.data:
        raise TirlError("sft.data is not set: pass sft.data=traces.jsonl")
    if model is None:  # (sharded under torchrun)
        model, tok = load_policy(cfg.model, dist, dist.device(resolve_device(cfg.model.device)))
    protocol = get_protocol(cfg.rollout.protocol, tok)
    if s.data.startswith("synthetic:"):
        rows = synthetic_traces(cfg, dist.say if progress else (lambda _msg: None))
        examples = examples_from_rows(list(enumerate(rows, 1)), tok, protocol, s.max_len, s.data)
    else:
        examples = load_examples(s.data, tok, protocol, s.max_len)
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    rng = random.Random(cfg.train.seed)
    steps_per_epoch = max(1, len(examples) // s.batch_size)
    total = s.steps or s.epochs * steps_per_epoch
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    log, order = [], []
    bar = tqdm(range(1, total + 1), desc=f"sft ({len(examples)} traces)", disable=not (progress and dist.writer))
    for step in bar:
        if len(order) < s.batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch, order = [examples[i] for i in order[: s.batch_size]], order[s.batch_size :]
        t0 = time.perf_counter()
        row = {"step": step, **sft_step(model, opt, batch, cfg.optim, pad, dist)}
        row["time/step"] = time.perf_counter() - t0
        bar.set_postfix(loss=f"{row['sft/loss']:.3f}")
        log.append(row)
    return model, tok, log
