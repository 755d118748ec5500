"""Where a reply ends: the token a chat template writes after the assistant's words, which a model trained on that
template learns to emit; an export that does not stop on it talks on past its answer (the most common complaint
about GGUF and Ollama models)."""

from __future__ import annotations

from qmor.data.template import encode, render
from qmor.errors import QmorError

PROBE = "Fine, thanks."  # a reply to render; any words work that the template leaves as they are


def end_of_turn(tokenizer, template: str) -> int:
    """The id of the first token the template writes after an assistant reply (ChatML's <|im_end|>)."""
    asked = [{"role": "user", "content": "How are you?"}]
    head = encode(tokenizer, render(tokenizer, asked, add_generation_prompt=True, chat_template=template))
    full = encode(tokenizer, render(tokenizer, [*asked, {"role": "assistant", "content": PROBE}],
                                    chat_template=template))
    if full[:len(head)] != head:
        raise QmorError("the chat template renders a reply's prompt differently from the whole conversation, so its "
                        "end-of-turn token cannot be found")
    reply = full[len(head):]
    for i in range(len(reply)):  # the reply's words come first; the token after them ends the turn
        if tokenizer.decode(reply[:i]).strip().endswith(PROBE):
            return reply[i]
    raise QmorError("the chat template writes nothing after an assistant reply, so a model trained on it never learnt "
                    "where to stop")


def token_text(tokenizer, token: int) -> str:
    return tokenizer.convert_ids_to_tokens(token)


def modelfile_stops(text: str) -> list[str]:
    """The `PARAMETER stop` strings of an Ollama Modelfile."""
    stops = []
    for line in text.splitlines():
        words = line.split(None, 2)
        if len(words) == 3 and words[0].upper() == "PARAMETER" and words[1] == "stop":
            stops.append(words[2].strip().strip('"'))
    return stops
