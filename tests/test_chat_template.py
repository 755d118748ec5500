"""One chat template from training to export (tiny model whose tokenizer has none), and templates that cannot work."""

import json

import pytest

from qmor.adapters.config import AdapterConfig
from qmor.chat import ChatSession
from qmor.data.pipeline import DataConfig, build_datasets
from qmor.data.template import CHATML_TEMPLATE, encode_chat, render, with_chat_template
from qmor.errors import QmorError
from qmor.export.exporter import export_merged, export_peft
from qmor.model.tiny import make_tiny, tiny_tokenizer
from qmor.training.config import TrainConfig
from qmor.training.loop import train

ASK = [{"role": "user", "content": "abc"}]
ALTERNATE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
             "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>"
             "{% endif %}")
USER_ONLY = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>{% endif %}"
             "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory):
    """The tiny model with its chat template taken away, as base models ship."""
    path = make_tiny(tmp_path_factory.mktemp("models") / "bare", seed=0, hidden=64, layers=2)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def bare_run(bare_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    train(TrainConfig(model=str(bare_dir), output=str(out), max_steps=2, batch_size=4, eval_generate=0, device="cpu",
                      adapter=AdapterConfig(family="lora", r=4, init="default"),
                      data=DataConfig(source="reverse", num_examples=8, max_len=96)))
    return out


def test_training_records_the_fallback_and_chat_renders_with_it(bare_dir, bare_run):
    from transformers import AutoTokenizer

    from qmor.adapters.attach import read_meta

    tok = AutoTokenizer.from_pretrained(str(bare_dir))
    assert not tok.chat_template
    assert read_meta(bare_run / "adapter").chat_template == CHATML_TEMPLATE
    session = ChatSession(str(bare_dir), device="cpu")
    session.use_adapter(bare_run)
    ids, labels = encode_chat(with_chat_template(tok), ASK + [{"role": "assistant", "content": "cba"}])
    reply_starts = next(i for i, t in enumerate(labels) if t != -100)
    assert session.encode(ASK)["input_ids"][0].tolist() == ids[:reply_starts]  # not a plain "user: ..." transcript
    session.use_adapter(None)  # the bare base is asked in the same format, so a comparison is like for like
    assert session.template() == CHATML_TEMPLATE


def test_merged_and_peft_exports_carry_the_training_template(bare_run, tmp_path):
    from transformers import AutoTokenizer

    export_merged(bare_run, tmp_path / "merged")
    export_peft(bare_run, tmp_path / "peft")
    for folder in (tmp_path / "merged", tmp_path / "peft" / "base"):
        assert (folder / "chat_template.jinja").read_text() == CHATML_TEMPLATE
        assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == CHATML_TEMPLATE
        tok = AutoTokenizer.from_pretrained(str(folder))
        assert tok.chat_template == CHATML_TEMPLATE
        assert render(tok, ASK, True) == "<|im_start|>user\nabc<|im_end|>\n<|im_start|>assistant\n"
    assert (tmp_path / "peft" / "chat_template.jinja").read_text() == CHATML_TEMPLATE
    assert "chat template | the one training used" in (tmp_path / "merged" / "README.md").read_text()


def test_template_that_cannot_render_is_one_line(tiny_dir, tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = ALTERNATE
    data = tmp_path / "chat.jsonl"
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    data.write_text(json.dumps({"messages": twice}) + "\n" + json.dumps({"messages": twice[1:]}) + "\n")
    with pytest.raises(QmorError, match=r"chat.jsonl line 1: the chat template cannot render this conversation "
                                        r"\(Conversation roles must alternate user/assistant\)") as e:
        build_datasets(tok, DataConfig(source=str(data)))
    assert "\n" not in str(e.value)
    rows, _, stats = build_datasets(tok, DataConfig(source=str(data), skip_bad=True))
    assert (len(rows), stats.n_skipped) == (1, 1)
    session = ChatSession(str(tiny_dir), device="cpu")
    session.tokenizer.chat_template = ALTERNATE
    with pytest.raises(QmorError, match="cannot render this conversation"):
        session.encode(twice[:2])


def test_template_without_assistant_tokens_says_so_instead_of_training_on_nothing(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = USER_ONLY
    for skip_bad in (False, True):  # the template's fault, so skipping records would not help
        with pytest.raises(QmorError, match="task reverse record 1: the chat template renders no tokens for the "
                                            "assistant replies.*--train-on-prompt"):
            build_datasets(tok, DataConfig(source="reverse", num_examples=4, skip_bad=skip_bad))
    rows, _, _ = build_datasets(tok, DataConfig(source="reverse", num_examples=4, train_on_prompt=True))
    assert rows
