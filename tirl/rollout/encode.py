"""Token ids for text the rollout inserts, where only the protocol's own markup may hold control tokens.

A tokenizer turns every occurrence of an added token's text into that token: a program that prints
``<|im_end|>\\n<|im_start|>assistant`` or ``</tool_call>`` would put real end-of-turn, role and
tool-call ids into the trajectory, changing the structure the model reads. ``split_special_tokens``
stops the special ones but not added tokens that are not special (Qwen2.5's ``<tool_call>``).

:func:`insert_ids` encodes an insertion from parts marked *markup* (the chat template's text: its
control tokens are meant) or *data* (tool output: encoded as the plain text it is). It does what a
Hugging Face fast tokenizer does — split at added tokens, then normalise, pre-tokenise and run the
model on each piece — except that added tokens are only looked for in markup. Where nothing is
forged the ids equal ``tokenizer(text)``'s (tested on byte-level BPE tokenizers, Qwen2.5's included).
"""

from __future__ import annotations

from functools import lru_cache


def _backend(tokenizer):
    return getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)


def plain_ids(tokenizer, text: str) -> list[int]:
    """``text``'s ids with no added token recognised: every character is ordinary text."""
    if not text:
        return []
    bt = _backend(tokenizer)
    if bt is None or not hasattr(bt, "model"):  # not a fast tokenizer: the special tokens at least are text
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    if bt.normalizer is not None:
        text = bt.normalizer.normalize_str(text)
    words = bt.pre_tokenizer.pre_tokenize_str(text) if bt.pre_tokenizer is not None else [(text, (0, len(text)))]
    return [t.id for w, _ in words for t in bt.model.tokenize(w)]


@lru_cache(maxsize=16)
def _added(tokenizer) -> tuple[tuple[str, int], ...]:
    """``(text, id)`` of every added token, longest first (so ``</tool_call>`` wins over ``<``...)."""
    dec = tokenizer.added_tokens_decoder if hasattr(tokenizer, "added_tokens_decoder") else {}
    pairs = {(str(getattr(t, "content", t)), int(i)) for i, t in dec.items()}
    return tuple(sorted(pairs, key=lambda p: -len(p[0])))


def _split_markup(tokenizer, text: str) -> list[tuple[str, int | None]]:
    """``text`` as ``(piece, id)``: added tokens with their id, the text between with None."""
    out, pos, added = [], 0, _added(tokenizer)
    i = 0
    while i < len(text):
        hit = next(((s, k) for s, k in added if s and text.startswith(s, i)), None)
        if hit is None:
            i += 1
            continue
        if i > pos:
            out.append((text[pos:i], None))
        out.append(hit)
        i = pos = i + len(hit[0])
    if pos < len(text):
        out.append((text[pos:], None))
    return out


def insert_ids(tokenizer, parts: list[tuple[str, bool]]) -> list[int]:
    """Ids of ``"".join(text for text, _ in parts)``, where ``parts[k] = (text, is_markup)``:
    added tokens count only inside markup; the rest (tool output) is plain text. Text between two
    control tokens is encoded as one piece, so a tool output is tokenised in its context exactly
    as the tokenizer would (a newline of the markup merging with the output's own, and so on)."""
    pieces: list[tuple[str, int | None]] = []
    for text, markup in parts:
        for piece in (_split_markup(tokenizer, text) if markup else [(text, None)]):
            if piece[1] is None and pieces and pieces[-1][1] is None:
                pieces[-1] = (pieces[-1][0] + piece[0], None)
            elif piece[0]:
                pieces.append(piece)
    ids: list[int] = []
    for text, tid in pieces:
        ids += [tid] if tid is not None else plain_ids(tokenizer, text)
    return ids
