"""Chat templates for local models: tools in the system turn, tool calls that round-trip.

SmolLM2's own template ignores ``tools`` and ``tool_calls`` (it renders only ``content``).
It shares ChatML's special tokens (``<|im_start|>``, ``<|im_end|>``) with Qwen2.5, so TRL's
Qwen2.5 template (``trl.chat_template_utils.qwen2_5_chat_template``) fits it unchanged: tool
schemas go into the system turn inside ``<tools>``, assistant calls render as
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` and tool results as a user
turn of ``<tool_response>`` blocks. TRL recognises this exact template, so
``get_training_chat_template`` (assistant-only loss) and ``add_response_schema`` work on it.

The template renders ``arguments`` with ``tojson``: keep them as dicts in messages. A JSON
string would be rendered as a quoted string.

Compact tools (the default for templates that cannot render tools): the Qwen2.5 template with
one line per tool, ``- name(arg, ...): description``, instead of the ``<tools>`` block of JSON
schemas and its instructions. SmolLM2's tokenizer spends ~85 tokens on each JSON schema line;
the compact block costs about a quarter of that, in every prompt of every turn. The system
prompt already says how to call a tool. :func:`training_template` returns the matching
training variant (TRL's Qwen2.5 training template, same substitution), whose
``{% generation %}`` markers give the assistant-only loss.
"""

from __future__ import annotations

from collections.abc import Sequence

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
TEMPLATE_MODES = ("auto", "compact", "qwen2_5", "keep")
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
DEFAULT_SYSTEM = "You are a helpful assistant."  # the compact template's system turn when a conversation has none

_COMPACT_TOOLS = """\
    {{- "\\n\\nTools:" }}
    {%- for tool in tools %}
        {%- set spec = tool.function if tool.function is defined else tool %}
        {{- "\\n- " + spec.name + "(" + (spec.parameters.properties | list | join(", ")) + "): " + spec.description }}
    {%- endfor %}
    {{- "<|im_end|>\\n" }}
"""


def qwen2_5_template() -> str:
    from trl.chat_template_utils import qwen2_5_chat_template

    return qwen2_5_chat_template


def _with_compact_tools(template: str) -> str:
    """``template`` (TRL's Qwen2.5 template or its training variant) with the compact tool block."""
    start = template.rfind("\n", 0, template.index("# Tools")) + 1
    end = template.index("{%- else %}", start)
    return (template[:start] + _COMPACT_TOOLS + template[end:]).replace(QWEN_DEFAULT_SYSTEM, DEFAULT_SYSTEM)


def compact_template() -> str:
    return _with_compact_tools(qwen2_5_template())


def training_template(template: str) -> str | None:
    """The training variant (with ``{% generation %}`` markers) of the compact template; None for others."""
    if template != compact_template():
        return None
    from trl.chat_template_utils import qwen2_5_training_chat_template

    return _with_compact_tools(qwen2_5_training_chat_template)


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's template shows tool schemas, tool calls and tool results."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    probe = [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "probe_tool_zq", "arguments": {"probe_arg_zq": 1}}}]},
        {"role": "tool", "name": "probe_tool_zq", "content": "probe_result_zq"},
    ]
    schema = [{"type": "function", "function": {
        "name": "probe_schema_zq", "description": "d", "parameters": {"type": "object", "properties": {}}}}]
    try:
        text = tokenizer.apply_chat_template(probe, tools=schema, tokenize=False)
    except Exception:  # noqa: BLE001 - any template failure means "does not render tools"
        return False
    return all(s in text for s in ("probe_tool_zq", "probe_arg_zq", "probe_result_zq", "probe_schema_zq"))


def ensure_tool_chat_template(tokenizer, mode: str = "auto"):
    """Give ``tokenizer`` a tool-capable template, in place; returns the tokenizer.

    ``mode``: ``"auto"`` keeps a template that already renders tools and otherwise installs
    the compact one (ChatML tokenizers only); ``"compact"`` and ``"qwen2_5"`` (JSON schemas)
    always install theirs; ``"keep"`` never changes anything.
    """
    if mode not in TEMPLATE_MODES:
        raise ValueError(f"unknown chat template mode {mode!r}; use {', '.join(TEMPLATE_MODES)}")
    if mode == "keep" or (mode == "auto" and renders_tools(tokenizer)):
        return tokenizer
    vocab = tokenizer.get_vocab()
    missing = [token for token in CHATML_TOKENS if token not in vocab]
    if missing:
        raise ValueError(
            f"the tokenizer lacks the ChatML tokens {missing}; the Qwen2.5 tool template needs them. "
            "Use a model whose own chat template renders tools."
        )
    tokenizer.chat_template = qwen2_5_template() if mode == "qwen2_5" else compact_template()
    return tokenizer


def render_prompt(tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                  generation_prompt: bool = True) -> str:
    """The prompt text for the next assistant turn (``generation_prompt=False``: the
    conversation alone, without the next assistant header)."""
    return tokenizer.apply_chat_template(
        list(messages), tools=list(tools) if tools else None, add_generation_prompt=generation_prompt, tokenize=False
    )


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: EOS plus ``<|im_end|>``/``<|endoftext|>`` if present."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += [vocab[token] for token in ("<|im_end|>", "<|endoftext|>") if token in vocab]
    return list(dict.fromkeys(ids))


def turn_end_token_id(tokenizer) -> int:
    """The token the chat template closes every turn with: ``<|im_end|>`` if present, else EOS."""
    return tokenizer.get_vocab().get("<|im_end|>", tokenizer.eos_token_id)
