"""Chat templates: the tokenizer's own, or a ChatML-style fallback for tokenizers that ship none (base models)."""

from __future__ import annotations

import copy
import logging

log = logging.getLogger(__name__)
_warned = False  # the fallback is stated once per process, not once per evaluation prompt
_warned_prefix = False  # likewise for templates whose prefixes are not token prefixes

# ChatML layout. The EOS after each assistant turn is what teaches a base model to stop generating; the newline is
# an expression because templates are rendered with trim_blocks, which eats a literal one after a block tag. Tool
# schemas and an assistant's tool calls are written as JSON, so that they are in the text the model learns from
CHATML_TEMPLATE = (
    "{% if tools %}<|im_start|>tools\n{{ tools | tojson }}<|im_end|>{{ '\\n' }}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m['tool_calls'] %}{{ m['tool_calls'] | tojson }}{% endif %}<|im_end|>"
    "{% if m['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def with_chat_template(tokenizer):
    """Return `tokenizer` if it has a chat template, else a copy carrying the ChatML fallback (logged once).

    The copy keeps the caller's tokenizer untouched, so a model saved later is not silently given a template.
    """
    global _warned
    if getattr(tokenizer, "chat_template", None):
        return tokenizer
    if not _warned:
        _warned = True
        log.warning("tokenizer has no chat template; using a ChatML-style fallback (<|im_start|>role ... <|im_end|>)")
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHATML_TEMPLATE
    return tok


def template_name(tokenizer) -> str:
    """'tokenizer' when the tokenizer's own template is used, 'chatml-fallback' otherwise (for stats and logs)."""
    return "tokenizer" if getattr(tokenizer, "chat_template", None) else "chatml-fallback"


def template_text(tokenizer) -> str:
    """The Jinja source of the template conversations are rendered with: the tokenizer's own (its default one, if
    it has several) or the ChatML fallback. Recorded with an adapter, so chat and export use exactly this."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):
        own = own.get("default")
    return own or CHATML_TEMPLATE


class TemplateError(ValueError):
    """The chat template cannot render a conversation (it raised, or its Jinja is broken)."""


class NoAssistantTokens(ValueError):
    """The chat template renders none of a conversation's assistant replies: the loss would be all masked."""


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
           chat_template: str | None = None, tools: list[dict] | None = None) -> str:
    """The template (the tokenizer's, or `chat_template`) applied to `messages` (and the function schemas `tools`)
    as text; special tokens such as BOS come from the template itself. A template that cannot render them raises
    TemplateError, in one line."""
    from jinja2.exceptions import TemplateError as JinjaError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=chat_template, tools=tools)
    except JinjaError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TemplateError(f"the chat template cannot render this conversation ({first}); fix the conversation "
                            "(e.g. roles in the order the template expects) or use a template that accepts it"
                            ) from None


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of rendered text; no special tokens added, since the template already wrote those it wants."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_chat(tokenizer, messages: list[dict], train_on_prompt: bool = False, first: int = 0,
                tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels: the ids on every assistant turn from messages[first] on (a
    prompt/completion record trains its completion only), -100 elsewhere. `tools` go to the template.

    Turn boundaries come from rendering the template prefix by prefix: assistant turn i spans from the end of
    messages[:i] + generation prompt to the end of messages[:i+1], in tokens. Each end is measured as the common
    token prefix with the full conversation; for ordinary templates that is the prefix's own length. A template
    that rewrites earlier turns (e.g. dropping reasoning) breaks that property (logged once); the turn then starts
    after the next occurrence of the generation-prompt tokens, so prompt tokens are never labelled.
    """
    global _warned_prefix
    ids = encode(tokenizer, render(tokenizer, messages, tools=tools))
    if train_on_prompt:
        return ids, list(ids)
    labels = [-100] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first:
            continue
        head = encode(tokenizer, render(tokenizer, messages[:i], True, tools=tools)) if i else []
        upto = ids if i == len(messages) - 1 else encode(tokenizer, render(tokenizer, messages[: i + 1], tools=tools))
        start, end = _common_prefix(ids, head), _common_prefix(ids, upto)
        if start < len(head) or end < len(upto):
            if not _warned_prefix:
                _warned_prefix = True
                log.warning("chat template renders a conversation prefix differently from the full conversation; "
                            "loss masks near turn boundaries may be off by a few tokens")
            if start < len(head):
                start = _after_generation_prompt(tokenizer, messages[:i], head, ids, start, tools)
        labels[start:end] = ids[start:end]
    if all(t == -100 for t in labels):
        raise NoAssistantTokens("the chat template renders no tokens for the assistant replies, so the loss would be "
                                "all masked and nothing would be learnt; use a template that writes each assistant "
                                "turn, or train on every token with train_on_prompt (--train-on-prompt)")
    return ids, labels


def _after_generation_prompt(tokenizer, before: list[dict], head: list[int], ids: list[int], start: int,
                             tools: list[dict] | None = None) -> int:
    """Where the reply begins: after the first generation-prompt tokens in `ids` from `start`; len(ids) if absent."""
    gen = head[_common_prefix(head, encode(tokenizer, render(tokenizer, before, tools=tools))):]  # "<|assistant|>"
    for j in range(start, len(ids) - len(gen) + 1):
        if gen and ids[j: j + len(gen)] == gen:
            return j + len(gen)
    return len(ids)
