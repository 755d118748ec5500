"""An Ollama Modelfile for an exported GGUF file: FROM, the chat template in Ollama's Go-template form, the default
system prompt, stop tokens and the generation defaults.

Ollama formats conversations with Go templates, not with the Jinja template transformers and llama.cpp read. Each
known layout below is a Go template and the same layout written in Python. The template training used is rendered
on sample conversations and compared with each layout's Python form, so TEMPLATE is written only when it formats
exactly as training did; otherwise the Modelfile leaves it out, says so, and Ollama derives a template from the
GGUF file's own chat template.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qmor.data.template import TemplateError, render

MARK = "\x00system\x00"  # stands for the default system prompt while finding it in a rendering


@dataclass(frozen=True)
class Layout:
    name: str
    go: str  # Ollama's TEMPLATE; "{eos}" stands for the tokenizer's EOS text
    turn: Callable[[str, str, str], str]  # (role, content, eos) -> one message as the layout writes it
    prompt: str  # what opens the assistant's reply
    stop: str  # the token that ends a turn

    def render(self, messages: list[dict], eos: str) -> str:
        return "".join(self.turn(m["role"], m["content"], eos) for m in messages) + self.prompt


LAYOUTS = [
    Layout("chatml", "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
           "<|im_start|>assistant\n",
           lambda r, c, e: f"<|im_start|>{r}\n{c}<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>"),
    # qmor's ChatML fallback for tokenizers without a template: EOS after each assistant turn
    Layout("chatml+eos", '{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>'
           '{{ if eq .Role "assistant" }}{eos}{{ end }}\n{{ end }}<|im_start|>assistant\n',
           lambda r, c, e: f"<|im_start|>{r}\n{c}<|im_end|>{e if r == 'assistant' else ''}\n",
           "<|im_start|>assistant\n", "<|im_end|>"),
    Layout("llama3", "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
           "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
           lambda r, c, e: f"<|start_header_id|>{r}<|end_header_id|>\n\n{c}<|eot_id|>",
           "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    Layout("phi3", "{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
           lambda r, c, e: f"<|{r}|>\n{c}<|end|>\n", "<|assistant|>\n", "<|end|>"),
    # qmor's built-in tiny model
    Layout("tiny", "{{ range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|assistant|>",
           lambda r, c, e: f"<|{r}|>{c}<|end|>", "<|assistant|>", "<|end|>"),
]

SAMPLES = [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3 + 3?"}],
]
# generation_config.json key -> Ollama PARAMETER
PARAMETERS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}


def match(template: str, tokenizer) -> tuple[Layout, str | None] | None:
    """The layout that formats every sample conversation exactly as `template` does, and the system prompt the
    template adds when a conversation has none (None if it adds none); None when no layout matches."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""

    def jinja(messages: list[dict]) -> str | None:
        try:
            return render(tokenizer, messages, add_generation_prompt=True, chat_template=template)
        except TemplateError:
            return None

    rendered = [(text, m) for m in SAMPLES if (text := jinja(m)) is not None]
    # a template that writes BOS itself matches without it: GGUF readers add BOS as the file says
    for texts in ([(t, m) for t, m in rendered], [(t.removeprefix(bos), m) for t, m in rendered]):
        for layout in LAYOUTS:
            if texts and all(t == layout.render(m, eos) for t, m in texts if m[0]["role"] == "system"):
                system = default_system(layout, [(t, m) for t, m in texts if m[0]["role"] != "system"], eos)
                if system is not False:
                    return layout, system
        if not bos:
            break
    return None


def default_system(layout: Layout, plain: list[tuple[str, list[dict]]], eos: str) -> str | None | bool:
    """For conversations without a system message: None if the template renders them as the layout does, the system
    prompt it adds if it adds one, False if it renders them some other way."""
    found = None
    for text, messages in plain:
        if text == layout.render(messages, eos):
            continue
        head, _, tail = layout.render([{"role": "system", "content": MARK}, *messages], eos).partition(MARK)
        if not (text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail)):
            return False
        found = text[len(head):len(text) - len(tail)]
    return found


def modelfile(gguf_name: str, template: str | None, tokenizer_folder: str | Path, generation: dict) -> str:
    """The Modelfile text: FROM the GGUF file beside it, TEMPLATE/SYSTEM/stop when the chat template is a known
    layout, and the generation defaults as PARAMETER lines."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_name}"]
    found = match(template, tokenizer) if template else None
    stops = []
    if found is not None:
        layout, system = found
        lines.append(f'TEMPLATE """{layout.go.replace("{eos}", tokenizer.eos_token or "")}"""')
        if system and '"""' not in system:
            lines.append(f'SYSTEM """{system}"""')
        stops.append(layout.stop)
    elif template:
        print("note: the chat template is none of the layouts qmor writes for Ollama (ChatML, Llama 3, Phi-3); the "
              "Modelfile has no TEMPLATE, so Ollama derives one from the GGUF file's chat template", file=sys.stderr)
        lines.insert(1, "# no TEMPLATE: Ollama derives one from the chat template inside the GGUF file")
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER {name} {generation[key]}" for key, name in PARAMETERS.items()
              if generation.get(key) is not None]
    return "\n".join(lines) + "\n"
