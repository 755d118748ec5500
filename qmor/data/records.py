"""Records -> chat messages: the formats qmor reads, the mapping of a dataset's columns onto them, and the shapes
conversational data comes in.

Formats (detected from the first record's keys, or forced):
  alpaca             {"instruction", "input"?, "output", "system"?}
  messages           {"messages": [turn, ...], "tools"?}
  sharegpt           {"conversations": [turn, ...], "tools"?}
  prompt_completion  {"prompt", "completion"}: two strings, or TRL's conversational form, two lists of turns
  text               {"text"}   (no template; every token trained)
A turn is {"role", "content"} or ShareGPT's {"from", "value"}; content is a string or a list of parts
([{"type": "text", "text": ...}]); roles are system, user, assistant and tool, under their ShareGPT names too.
An assistant turn may carry tool_calls and a tool turn its name / tool_call_id; "tools" (function schemas) go to
the chat template, as in transformers' apply_chat_template.
"""

from __future__ import annotations

import json

from qmor.errors import QmorError

FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")
REQUIRED = {"alpaca": ["instruction", "output"], "messages": ["messages"], "sharegpt": ["conversations"],
            "prompt_completion": ["prompt", "completion"], "text": ["text"]}
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "chatgpt": "assistant", "function_call": "assistant", "tool": "tool",
         "observation": "tool"}
TURN_EXTRAS = ("tool_calls", "name", "tool_call_id")  # passed to the template beside role and content
FIELDS = ("instruction", "input", "output", "system", "prompt", "completion", "messages", "conversations", "text",
          "tools")
ALIASES = ("query", "response")  # LLaMA-Factory's names for alpaca's input and the answer
ALPACA = {"instruction", "input", "query", "output"}


# ---- columns -----------------------------------------------------------------------------------------------------

def parse_columns(value) -> dict[str, str]:
    """{field: column} from a dict or from "field=column,field=column"; unknown fields are refused."""
    if isinstance(value, str):
        pairs = [p.strip() for p in value.split(",") if p.strip()]
        if any("=" not in p for p in pairs):
            raise QmorError(f"columns {value!r} must be field=column pairs separated by commas, e.g. "
                            "--columns prompt=question,completion=answer")
        value = dict(p.split("=", 1) for p in pairs)
    if not isinstance(value, dict):
        raise QmorError(f"columns must map fields to column names, got {value!r}; e.g. {{prompt: question}}")
    out = {str(k).strip(): str(v).strip() for k, v in value.items()}
    if any("," in v or "=" in v for v in out.values()):
        raise QmorError(f"columns {value!r}: a column name with ',' or '=' cannot be mapped; rename the column")
    unknown = sorted(k for k in out if k not in FIELDS and k not in ALIASES)
    if unknown:
        raise QmorError(f"columns names unknown field(s) {unknown}; map the dataset's columns onto "
                        f"{', '.join(FIELDS + ALIASES)}, e.g. --columns prompt=question,completion=answer")
    if any(not v for v in out.values()):
        raise QmorError(f"columns {value!r} leaves a field without a column name; write field=column")
    return out


def renames(columns: dict[str, str]) -> dict[str, str]:
    """{dataset column: qmor field}. LLaMA-Factory's names mean the same there: query is alpaca's input, response
    the answer (output beside an instruction or input, else completion), prompt the instruction beside those."""
    keys = set(columns)
    alpaca = bool(keys & ALPACA)
    target = {"query": "input", "response": "output" if alpaca else "completion",
              "prompt": "instruction" if keys & {"input", "query", "output"} else "prompt"}
    out: dict[str, str] = {}
    for key, column in columns.items():
        field = target.get(key, key)
        if field in out.values():
            raise QmorError(f"columns maps two columns onto {field!r} ({columns}); keep one")
        out[column] = field
    return out


def check_columns(columns: dict[str, str], available, source: str) -> None:
    missing = [(k, c) for k, c in columns.items() if c not in available]
    if missing:
        key, column = missing[0]
        raise QmorError(f"{source} has no column {column!r} (columns {key}={column}); its columns: "
                        f"{', '.join(available)}; fix --columns")


def apply_columns(record: dict, renamed: dict[str, str]) -> dict:
    """The record under qmor's field names; a column already named like a mapped field gives way to the mapping."""
    if not renamed:
        return record
    targets = set(renamed.values())
    out = {k: v for k, v in record.items() if k not in targets}
    out.update({field: record[column] for column, field in renamed.items() if column in record})
    return out


# ---- formats -----------------------------------------------------------------------------------------------------

def detect_format(records: list[dict], source: str) -> str:
    """The format named by the first record's keys; a QmorError listing its keys when none matches."""
    if not records:
        raise QmorError(f"{source} holds no records; add at least one JSON object (one per line for .jsonl)")
    keys = {k for k, v in records[0].items() if v is not None}  # a table's missing fields are None
    for fmt in ("messages", "sharegpt", "alpaca", "prompt_completion", "text"):
        if set(REQUIRED[fmt]) <= keys:
            return fmt
    raise QmorError(f"{source}: cannot tell the format from the first record's fields {sorted(keys)}; expected "
                    f"one of {REQUIRED} (or pass format explicitly, or map columns with --columns)")


def check_fields(record: dict, fmt: str) -> None:
    missing = [k for k in REQUIRED[fmt] if k not in record]
    if missing:
        raise ValueError(f"record has fields {sorted(record)} but format {fmt!r} needs {REQUIRED[fmt]}")


def field_text(record: dict, key: str) -> str:
    """A string field of a record; None and a missing field are "", another type a ValueError."""
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def content_text(value) -> str:
    """A turn's content as text: a string, or the concatenated text of a list of parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError(f"a turn's content must be a string or a list of text parts, got {type(value).__name__}")
    texts = []
    for part in value:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"a content part of type {kind!r} is not text; qmor trains language models on text "
                             "parts ({'type': 'text', 'text': ...}) only")
    return "".join(texts)


def _no_nulls(value):
    """Drop the None fields a table adds to structs that other rows have (tool calls of different shapes)."""
    if isinstance(value, dict):
        return {k: _no_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_no_nulls(v) for v in value]
    return value


def turns(items) -> list[dict]:
    """A list of turns ({"role", "content"} or {"from", "value"}) as chat messages."""
    if not isinstance(items, list) or not items:
        raise ValueError("the conversation must be a non-empty list of turns")
    out = []
    for t in items:
        if not isinstance(t, dict):
            raise ValueError("every turn must be an object with 'role' and 'content' (or 'from' and 'value')")
        role_key, text_key = ("role", "content") if t.get("role") is not None else ("from", "value")
        if t.get(role_key) is None or (text_key not in t and not t.get("tool_calls")):
            raise ValueError("every turn needs 'role' and 'content' (or ShareGPT's 'from' and 'value')")
        role = ROLES.get(t[role_key]) if isinstance(t[role_key], str) else None
        if role is None:
            raise ValueError(f"unknown role {t[role_key]!r}; use one of {sorted(ROLES)}")
        message = {"role": role, "content": content_text(t.get(text_key))}
        for key in TURN_EXTRAS:
            if t.get(key):
                message[key] = _no_nulls(t[key])
        out.append(message)
    return out


def conversation(record: dict, fmt: str) -> tuple[list[dict], int]:
    """The record as chat messages, and the index of the first message whose assistant turns are trained (the
    completion's, for prompt/completion records; 0 otherwise). Raises ValueError on a malformed record."""
    if fmt == "messages":
        return turns(record["messages"]), 0
    if fmt == "sharegpt":
        return turns(record["conversations"]), 0
    system = field_text(record, "system")
    head = [{"role": "system", "content": system}] if system else []
    if fmt == "alpaca":
        user = field_text(record, "instruction")
        if field_text(record, "input"):
            user += "\n\n" + field_text(record, "input")
        reply = {"role": "assistant", "content": field_text(record, "output")}
        return head + [{"role": "user", "content": user}, reply], 0
    prompt, completion = record["prompt"], record["completion"]  # prompt_completion
    asked = (turns(prompt) if isinstance(prompt, list)
             else head + [{"role": "user", "content": field_text(record, "prompt")}])
    answer = (turns(completion) if isinstance(completion, list)
              else [{"role": "assistant", "content": field_text(record, "completion")}])
    return asked + answer, len(asked)


def to_messages(record: dict, fmt: str) -> list[dict]:
    """The record as chat messages (role/content, plus tool fields). Raises ValueError on a malformed record."""
    return conversation(record, fmt)[0]


def tools_of(record: dict) -> list[dict] | None:
    """The function schemas a record offers the model (a list, or its JSON text), or None."""
    tools = record.get("tools")
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise ValueError(f"field 'tools' is not valid JSON ({e.msg})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("field 'tools' must be a list of function schemas (objects)")
    return [_no_nulls(t) for t in tools]


def empty_response(record: dict, fmt: str) -> bool:
    """Whether every trained reply is empty (text, or no text and no tool call)."""
    if fmt == "text":
        return not field_text(record, "text").strip()
    messages, first = conversation(record, fmt)
    return not any(m["content"].strip() or m.get("tool_calls") for m in messages[first:] if m["role"] == "assistant")
