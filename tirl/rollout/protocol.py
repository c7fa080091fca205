"""Tool protocols as data: when to stop, which code to run, what to insert.

``TORL`` and ``RETOOL`` are instances of one :class:`ToolProtocol`; what follows describes ToRL's.

* **Stop** on ```` ```output ```` (what ToRL-trained models write) or on the closing fence of a
  ```` ```python ```` block (models that never saw ToRL's format never write ```` ```output ````).
* **Code**: the last closed ```` ```python ```` block of the current turn (stateless, as in ToRL).
* **Insert** ```` ```output\\n{observation}\\n```\\n```` (only the part the model did not write
  itself), where the observation is stdout, plus the last line of the traceback on error,
  cut to head + "..." + tail characters when long.
"""

from __future__ import annotations

import re
import signal as _signal
from dataclasses import dataclass

from tirl.rollout.engine import StopCondition
from tirl.types import ExecResult

EMPTY_OUTPUT = "(no output)"
_PY = r"(?:python3?|py)\b[^\n]*\n"  # the language tag line of a Python fence


@dataclass(frozen=True)
class ToolProtocol:
    """How a protocol marks code, asks for its output, and receives it — as data.

    ``open_re`` finds the start of a code block; ``close_re`` (searched after it) its end, which is
    a tool trigger; ``output_triggers`` are strings that also end a turn (ToRL's models write
    ```` ```output ```` themselves); ``block_re`` matches a whole closed block, group 1 = code.
    The inserted text is ``output_open + observation + output_close``, minus the trigger when the
    model already wrote it."""

    name: str
    open_re: str
    close_re: str
    block_re: str
    output_open: str
    output_close: str
    output_triggers: tuple[str, ...] = ()
    prompt: str = ""  # the paper's prompt (user message or raw template); {problem} is replaced
    json_code_arg: str | None = None  # the block is a JSON tool call; the code is arguments[json_code_arg]
    newline_first: bool = True  # start the inserted text on a new line (not for chat templates)
    stop_strings: tuple[str, ...] = ()  # strings every trigger ends with, for engines that only take strings
    turn_end: str | None = None
    """Chat templates: the end-of-turn text (``<|im_end|>``). The model samples it after its calls
    (mask 1, as SFT trains it); every call of the turn runs when the turn ends, on it or on EOS."""
    response_sep: str = ""  # between two tool responses of one turn (chat)
    tool_name: str | None = None  # a JSON call must name this tool
    stop_ids: tuple[int, ...] = ()  # token ids that end a turn (for engines that match stop strings on text without special tokens)

    def find_stop(self, text: str) -> int | None:
        """Offset just past the first tool trigger in one turn's generated text, or None (chat:
        just past the first end of turn, whether or not the turn called a tool)."""
        if self.turn_end is not None:
            i = text.find(self.turn_end)
            return i + len(self.turn_end) if i >= 0 else None
        ends = []
        for trig in self.output_triggers:
            i = text.find(trig)
            if i >= 0:
                ends.append(i + len(trig))
        m = re.search(self.open_re, text)
        if m:
            close = re.compile(self.close_re, re.M).search(text, m.end())
            if close:
                ends.append(close.end())
        return min(ends) if ends else None

    @property
    def stop(self) -> StopCondition:
        return StopCondition(find=self.find_stop, strings=self.stop_strings, token_ids=self.stop_ids)

    @property
    def final_stop(self) -> StopCondition | None:
        """The stop condition once no call is left: none (code written then is never run), except
        that a chat turn still ends at its end-of-turn token."""
        return self.stop if self.turn_end is not None else None

    def turn_calls(self, turn_text: str, finish_reason: str) -> list[str | None | MalformedToolCall] | None:
        """What one generated turn asks to run, in order, or None when it asks for nothing (the
        trajectory ends). Each item is code, None (a trigger with no block before it), or a
        :class:`MalformedToolCall` whose message is fed back. ToRL/ReTool: the last closed block,
        when the turn ended on the trigger. Chat: every ``<tool_call>`` of a turn that ended (its
        end-of-turn token or EOS), a trailing unclosed one as malformed."""
        if self.turn_end is None:
            if finish_reason != "tool":
                return None
            try:
                return [self.extract_code(turn_text)]
            except MalformedToolCall as e:
                return [e]
        if finish_reason not in ("tool", "eos"):
            return None  # cut by the token budget: a call in it never runs
        calls: list[str | None | MalformedToolCall] = []
        last = 0
        for m in re.compile(self.block_re, re.S).finditer(turn_text):
            calls.append(self._json_call(m.group(1)))
            last = m.end()
        if re.search(self.open_re, turn_text[last:]):
            calls.append(MalformedToolCall(f"Error: the tool call is not closed with {self.close_re}"))
        return calls or None

    def _json_call(self, block: str) -> str | MalformedToolCall:
        try:
            return _code_from_json(block, self.json_code_arg or "code", self.tool_name)
        except MalformedToolCall as e:
            return e

    def insertion_parts(self, turn_text: str, observations: list[str]) -> list[tuple[str, bool]]:
        """What to append after a turn that called tools, as ``(text, is_markup)`` parts: the
        protocol's markup (may hold control tokens) and the observations (plain text, always)."""
        if self.turn_end is None:
            (obs,) = observations
            full = self.insertion(turn_text, obs)
            end = obs + self.output_close
            if not full.endswith(end):  # a protocol with its own insertion format: all of it is data
                return [(full, False)]
            return [(full[: len(full) - len(end)], True), (obs, False), (self.output_close, True)]
        # A turn that ended on EOS instead of the end-of-turn token gets that token inserted (mask 0).
        lead = "" if turn_text.endswith(self.turn_end) else self.turn_end
        parts: list[tuple[str, bool]] = [(lead + self.output_open, True)]
        for k, obs in enumerate(observations):
            parts += ([(self.response_sep, True)] if k else []) + [(obs, False)]
        return parts + [(self.output_close, True)]

    def extract_code(self, turn_text: str) -> str | None:
        """The last closed code block of one turn (None if there is none). For JSON tool calls, a
        call that does not parse raises :class:`MalformedToolCall` (its message goes back to the model)."""
        blocks = re.compile(self.block_re, re.S | re.M).findall(turn_text)
        if not blocks:
            return None
        if self.json_code_arg is None:
            return blocks[-1]
        return _code_from_json(blocks[-1], self.json_code_arg)

    def insertion(self, turn_text: str, obs: str) -> str:
        """The text to append after a turn that ended on a trigger: the output block, minus what
        the model already wrote of it (the trigger itself, a newline)."""
        if self.turn_end is not None:
            return "".join(text for text, _ in self.insertion_parts(turn_text, [obs]))
        sep = "" if turn_text.endswith("\n") or not self.newline_first else "\n"
        last = list(re.compile(self.block_re, re.S | re.M).finditer(turn_text))
        after_block = turn_text[last[-1].end() :] if last else turn_text
        for trig in self.output_triggers:
            if trig in after_block and self.output_open.startswith(trig):
                return f"{sep}{self.output_open[len(trig):].lstrip(chr(10))}{obs}{self.output_close}"
        return f"{sep}{self.output_open}{obs}{self.output_close}"


TORL = ToolProtocol(
    name="torl",
    open_re=r"```" + _PY,
    close_re=r"^```",
    block_re=r"```" + _PY + r"(.*?)^```",
    output_open="```output\n",
    output_close="\n```\n",
    output_triggers=("```output",),
    stop_strings=("```output", "\n```"),
    prompt=("A conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
            "User: Please integrate natural language reasoning with programs to solve the problem above, and put "
            "your final answer within \\boxed{{}}.\n{problem}\nAssistant:"),
)
RETOOL = ToolProtocol(
    name="retool",
    open_re=r"<code>\s*```" + _PY,
    close_re=r"</code>",
    block_re=r"<code>\s*```" + _PY + r"(.*?)```\s*</code>",
    output_open="<interpreter>\n",
    output_close="\n</interpreter>\n\n",
    stop_strings=("</code>",),
    prompt=("Solve the following problem step by step. You now have the ability to selectively write executable "
            "Python code to enhance your reasoning process. The Python code will be executed by an external sandbox, "
            "and the output (wrapped in `<interpreter>output_str</interpreter>`) can be returned to aid your reasoning "
            "and help you arrive at the final answer. The Python code should be complete scripts, including necessary "
            "imports. \nEach code snippet is wrapped with `<code>\n```python\ncode snippet\n```\n</code>`.\n"
            "The last part of your response should be in the following format:\n<answer>\n\\boxed{{'The final answer "
            "goes here.'}}\n</answer>\n\n*user question:*\n{problem}\n\nRemember to place the final answer in the last "
            "part using the format: \n<answer>\n\\boxed{{'The final answer goes here.'}}\n</answer>"),
)
PROTOCOLS: dict[str, ToolProtocol] = {"torl": TORL, "retool": RETOOL}
_CHAT_BLOCK = r"<tool_call>(.*?)</tool_call>"


class MalformedToolCall(ValueError):
    pass


def _code_from_json(block: str, arg: str, tool: str | None = None) -> str:
    """``arguments[arg]`` of a JSON tool call; ``tool``: the one tool there is (another name is an error)."""
    import json

    name = tool or "code_interpreter"
    try:
        call = json.loads(block.strip())
        args = call.get("arguments", {}) if isinstance(call, dict) else {}
        if isinstance(args, str):
            args = json.loads(args)
        code = args.get(arg) if isinstance(args, dict) else None
    except (json.JSONDecodeError, AttributeError) as e:
        raise MalformedToolCall(f"Error: the tool call is not valid JSON ({e})") from None
    if not isinstance(call, dict):
        raise MalformedToolCall(f'Error: the tool call must be a JSON object {{"name": "{name}", "arguments": {{...}}}}')
    if tool is not None and call.get("name") != tool:
        raise MalformedToolCall(f"Error: there is no tool named {json.dumps(call.get('name'))}; the only tool is {json.dumps(tool)}")
    if not isinstance(code, str):
        raise MalformedToolCall(f'Error: the tool call needs {{"name": "{name}", "arguments": {{"{arg}": "..."}}}}')
    return code


def chat_protocol(tokenizer, tool_name: str = "code_interpreter") -> ToolProtocol:
    """Chat-template tool calls (Qwen/hermes style): the model writes one or more
    ``<tool_call>{"name": "code_interpreter", "arguments": {"code": ...}}</tool_call>`` and ends
    its turn (``<|im_end|>``, sampled); all of the turn's calls run, and the inserted text adds
    their tool messages and opens the next assistant turn, exactly as the tokenizer's own chat
    template renders them (derived once from a placeholder conversation with two tool messages)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("rollout.protocol = 'chat' needs a tokenizer with a chat template")
    a_mark, o1, o2 = "\u0000ASSISTANT\u0000", "\u0000OUTPUT1\u0000", "\u0000OUTPUT2\u0000"
    user = {"role": "user", "content": "u"}
    msgs = [user, {"role": "assistant", "content": a_mark}, {"role": "tool", "content": o1}, {"role": "tool", "content": o2}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if not all(m in text for m in (a_mark, o1, o2)):
        raise ValueError("this chat template does not render tool messages; use rollout.protocol = 'torl' or 'retool'")
    plain = tokenizer.apply_chat_template([user, {"role": "assistant", "content": a_mark}, user], tokenize=False)
    turn_end = plain[plain.index(a_mark) + len(a_mark):].split("\n")[0].strip()  # what closes an assistant turn
    head, rest = text[text.index(a_mark) + len(a_mark):].split(o1, 1)
    sep, tail = rest.split(o2, 1)
    if not turn_end or not head.startswith(turn_end):
        raise ValueError("cannot find the chat template's end-of-turn marker after an assistant message; "
                         "use rollout.protocol = 'torl' or 'retool'")
    ids = tokenizer(turn_end, add_special_tokens=False)["input_ids"]
    return ToolProtocol(name="chat", open_re=r"<tool_call>", close_re=r"</tool_call>", block_re=_CHAT_BLOCK,
                        output_open=head[len(turn_end):], output_close=tail, json_code_arg="code", newline_first=False,
                        stop_strings=(turn_end,), turn_end=turn_end, response_sep=sep, tool_name=tool_name,
                        stop_ids=tuple(ids) if len(ids) == 1 else (), prompt="{problem}")


def get_protocol(name: str, tokenizer=None) -> ToolProtocol:
    if name == "chat":
        return chat_protocol(tokenizer)
    return PROTOCOLS[name]

# ToRL's functions under their historical names.
OUTPUT_TRIGGER = "```output"
find_stop = TORL.find_stop
extract_code = TORL.extract_code
insertion = TORL.insertion
TORL_STOP = TORL.stop


_ALL_BLOCKS = [p.block_re for p in PROTOCOLS.values()] + [_CHAT_BLOCK]


def strip_code(text: str) -> str:
    """``text`` without the closed code blocks of any protocol (where a final answer never counts)."""
    for pat in _ALL_BLOCKS:
        text = re.sub(pat, "", text, flags=re.S | re.M)
    return text


_TOOL_OUTPUTS = (
    r"^```output\b.*?(?:^```|\Z)",  # ToRL (an unclosed block runs to the end: a cut transcript)
    r"<interpreter>.*?(?:</interpreter>|\Z)",  # ReTool
    r"<tool_response>.*?(?:</tool_response>|\Z)",  # chat templates (Qwen2.5, hermes)
    r"<\|im_start\|>tool\b.*?(?:<\|im_end\|>|\Z)",  # a ChatML tool message
)


def strip_tool_output(text: str) -> str:
    """``text`` without what a tool wrote into it, in any protocol's form: ToRL's ```output blocks,
    ReTool's <interpreter> spans, chat tool messages. Training never sees these as the policy's
    (they are inserted segments); a transcript from elsewhere has them inline."""
    for pat in _TOOL_OUTPUTS:
        text = re.sub(pat, "", text, flags=re.S | re.M)
    return text


def has_code(text: str) -> bool:
    return any(re.search(pat, text, re.S | re.M) for pat in _ALL_BLOCKS)


def count_code_lines(text: str) -> int:
    """Non-empty lines inside closed code blocks (ReTool's "code lines")."""
    n = 0
    for pat in _ALL_BLOCKS:
        for block in re.findall(pat, text, re.S | re.M):
            try:
                code = _code_from_json(block, "code") if pat == _CHAT_BLOCK else block
            except MalformedToolCall:
                continue
            n += sum(1 for ln in code.splitlines() if ln.strip())
    return n


def truncate_middle(text: str, head: int, tail: int) -> str:
    """Keep the first ``head`` and last ``tail`` characters around "..." when ``text`` is longer."""
    if len(text) <= head + tail:
        return text
    return text[:head] + "..." + text[len(text) - tail :]


def _error_line(res: ExecResult) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    if lines:
        return lines[-1].strip()
    if res.returncode is not None and res.returncode < 0:
        try:
            name = _signal.Signals(-res.returncode).name
        except ValueError:
            name = f"signal {-res.returncode}"
        return f"Error: the program was killed by {name}"
    return f"Error: the program exited with status {res.returncode}"


def observation(res: ExecResult, head: int = 128, tail: int = 128) -> str:
    """What the model sees of one execution. Never empty; never raises."""
    out = res.stdout.rstrip()
    if res.error is not None:
        err = f"SandboxError: {res.error}"
    elif res.timed_out:
        err = "TimeoutError: the program ran past the time limit and was stopped"
    elif res.returncode != 0:
        err = _error_line(res)
    else:
        err = ""
    body = "\n".join(p for p in (out, err) if p) or EMPTY_OUTPUT
    return truncate_middle(body, head, tail)


def print_last_expression(code: str) -> str:
    """If the program ends with a bare expression (not a ``print(...)`` call), print its value
    when it is not None, as a REPL would (verl's recipe wraps the last line in ``print``).
    Code that does not parse is returned unchanged (the sandbox reports the SyntaxError)."""
    import ast

    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return code
    node = tree.body[-1]
    value = node.value
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "print":
        return code
    lines = code.splitlines(keepends=True)
    head = "".join(lines[: node.lineno - 1]) + lines[node.lineno - 1][: node.col_offset]
    expr = ast.get_source_segment(code, value) or ast.unparse(value)
    tail_line = lines[node.end_lineno - 1][node.end_col_offset :] if node.end_lineno else ""
    rest = tail_line + "".join(lines[node.end_lineno :]) if node.end_lineno else ""
    return f"{head}__tirl_last__ = ({expr})\nif __tirl_last__ is not None:\n    print(__tirl_last__)\n{rest.lstrip(';')}"


def with_replay(history: list[str], code: str) -> str:
    """Run the trajectory's earlier successful blocks first, silently, then ``code`` (Qwen-Math /
    ToRA style state). Their output is discarded and an error in them is ignored."""
    if not history:
        return code
    cells = ",\n".join(repr(h) for h in history)
    return (
        "import contextlib as __tirl_cl, io as __tirl_io\n"
        f"for __tirl_cell in [{cells}]:\n"
        "    try:\n"
        "        with __tirl_cl.redirect_stdout(__tirl_io.StringIO()), __tirl_cl.redirect_stderr(__tirl_io.StringIO()):\n"
        "            exec(compile(__tirl_cell, '<previous cell>', 'exec'), globals())\n"
        "    except BaseException:\n"
        "        pass\n"
        "del __tirl_cl, __tirl_io, __tirl_cell\n" + code
    )
