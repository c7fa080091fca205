"""Problem -> prompt text and token ids.

``chat`` style renders the tokenizer's chat template (system + user, generation prompt added);
``raw`` style uses the template as the whole prompt, as ToRL does for base models
(``A conversation between User and Assistant. ... User: ... {problem}\\nAssistant:``).
The prompt is tokenised once, here; later stages only append token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from tirl.types import Problem, TirlError

TORL_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
    "User: Please integrate natural language reasoning with programs to solve the problem above, "
    "and put your final answer within \\boxed{{}}.\n{problem}\nAssistant:"
)


CODE_INTERPRETER_TOOL = {
    "type": "function",
    "function": {"name": "code_interpreter", "description": "Run a Python program; returns what it prints.",
                 "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "The program."}},
                                "required": ["code"]}},
}


@dataclass(frozen=True)
class Prompt:
    text: str
    token_ids: list[int]


def render_prompt(problem: Problem, tokenizer, style: str, template: str, system: str | None,
                  tools: list[dict] | None = None) -> Prompt:
    """``tools``: JSON tool schemas for chat-template tool calling (rendered by templates that support them)."""
    try:
        body = template.format(problem=problem.problem)
    except (KeyError, IndexError) as e:
        raise TirlError(f"prompt.template has an unknown placeholder {e}; only {{problem}} is replaced (write {{{{ for a brace)") from None
    if style == "raw":
        text = body
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    elif style == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise TirlError("prompt.style='chat' but the tokenizer has no chat template. Fix: prompt.style='raw'.")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": body}]
        kw = {"tools": tools} if tools else {}
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        raise TirlError(f"unknown prompt.style {style!r}; use 'chat' or 'raw'")
    return Prompt(text=tokenizer.decode(ids), token_ids=list(ids))  # the text the ids are (NFC, special tokens)
