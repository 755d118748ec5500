"""The architecture matrix: tiny random models of fourteen transformers architectures (two mixtures of experts)
through the training CLI.

Each trains a few steps, reloads its saved adapter (the run's final eval loss must come back), checks that the
training loss is the model's own loss, and, for the families that merge, exports a merged fp16 model that plain
transformers loads with the 4-bit + adapter model's logits. Architectures qmor cannot train stop in one line.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from archs import FALCON, GPT2, GPT_OSS, SUPPORTED, make_model

from qmor.adapters import mergeable
from qmor.adapters.attach import set_enabled
from qmor.model.load import load_trained
from qmor.training.evaluate import eval_loss
from qmor.training.loss import ChunkedLoss
from qmor.training.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import export_fp16  # noqa: E402
import finetune_4bit  # noqa: E402

# every family on at least one architecture other than Llama
FAMILY = {"llama": "lora", "mistral": "moslora", "qwen2": "mora", "qwen3": "mor", "gemma2": "lora",
          "gemma3_text": "sira", "phi3": "mora", "olmo2": "moslora", "granite": "lora", "gpt_neox": "mora",
          "opt": "sira", "starcoder2": "mor", "mixtral": "moslora", "qwen3_moe": "lora"}
# MoE models adapt every expert's gate/up and down map besides attention. Routing is a discrete top-k: a token
# whose router scores nearly tie may pick another expert once the weights are rounded to fp16, which moves that one
# token's logits far past the export's tolerance (seen at alpha 8, one token of 32); alpha 16 trains to no such tie
TARGETS = {"mixtral": ["--targets", "experts,q_proj,v_proj", "--alpha", "16"],
           "qwen3_moe": ["--targets", "experts,o_proj"]}
FAST = ["--dataset", "add", "--num-examples", "6", "--val-size", "2", "--max-len", "48", "--max-steps", "2",
        "--batch-size", "2", "--lr", "2e-2", "--eval-generate", "0", "--log-steps", "1", "--init", "default",
        "--device", "cpu", "--rank", "4", "--experts", "2"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QMOR_CACHE", str(tmp_path_factory.getbasetemp() / "qmor-cache"))


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return lambda name, spec: make_model(root / name, spec)


def ids(seed=0):
    return torch.randint(8, 100, (2, 16), generator=torch.Generator().manual_seed(seed))  # (B, T)


@torch.no_grad()
def logits(model, x):
    return model.eval()(input_ids=x).logits.float()


def reloaded_eval_loss(run: Path, model) -> float:
    """The run's validation split, rebuilt from its config.json, scored by `model`."""
    from qmor.data.pipeline import build_datasets
    from qmor.model.load import load_tokenizer
    from qmor.training.config import from_json

    cfg = from_json(json.loads((run / "config.json").read_text()))
    tok = load_tokenizer(cfg.model, False)
    _, val, _ = build_datasets(tok, cfg.data)
    return eval_loss(ChunkedLoss(model), val, cfg.batch_size, tok.pad_token_id, "cpu")


@pytest.mark.parametrize("arch", sorted(FAMILY))
def test_architecture_trains_reloads_and_exports(arch, models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    family = FAMILY[arch]
    folder = models(arch, SUPPORTED[arch])
    run = tmp_path / "run"
    extra = TARGETS.get(arch, [])
    assert finetune_4bit.main(["--model", str(folder), "--family", family, "--output", str(run), *FAST, *extra]) == 0
    assert "warning:" not in capsys.readouterr().err  # every layer weight became 4-bit
    events = RunDir(run).read_events()
    assert [e["event"] for e in events][-2:] == ["eval", "done"]

    # the saved adapter brings back the trained model: the same eval loss as at the end of the run
    model, meta = load_trained(run / "adapter", device="cpu")
    assert meta.adapter.family == family
    assert reloaded_eval_loss(run, model) == pytest.approx(events[-1]["eval_loss"], rel=1e-5)

    # what training minimises is the architecture's own loss (logit scaling, soft-capping included)
    x = ids()
    with torch.no_grad():
        total, n = ChunkedLoss(model.eval(), chunk=7)(input_ids=x, labels=x)
        own = model(input_ids=x, labels=x).loss
    torch.testing.assert_close(total / n, own, rtol=1e-5, atol=1e-6)

    # two steps moved the logits well beyond the export's tolerance, so the checks here and below mean something
    trained = logits(model, x)
    tolerance = 0.01 * trained.abs().max().item()  # fp16 weight rounding, nothing more
    set_enabled(model, False)
    assert (logits(model, x) - trained).abs().max().item() > 10 * tolerance
    set_enabled(model, True)
    if family not in mergeable():
        assert export_fp16.main([str(run), "--output", str(tmp_path / "merged")]) == 2
        assert "routes each token" in capsys.readouterr().err
        return

    out = tmp_path / "merged"
    assert export_fp16.main([str(run), "--output", str(out)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert "quantization_config" not in plain.config.to_dict()
    assert (logits(plain, x) - trained).abs().max().item() < tolerance


def test_gpt2_is_refused_before_loading(models, tmp_path, capsys, monkeypatch):
    """Conv1D stores (d_in, d_out); quantised as it is, training died on a shape mismatch deep in a forward."""
    from transformers import AutoModelForCausalLM

    folder = models("gpt2", GPT2)

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the refusal")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_load)
    run = tmp_path / "run"
    assert finetune_4bit.main(["--model", str(folder), "--family", "lora", "--output", str(run), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: GPT2LMHeadModel") and "Conv1D" in err[-1]
    assert not any("Traceback" in line for line in err) and not run.exists()


@pytest.mark.parametrize("init", ["default", "loftq"])
def test_falcon_says_no_layer_could_be_quantised(init, models, tmp_path, capsys):
    """transformers converts only exact nn.Linear; FalconLinear subclasses it and stayed 32-bit everywhere."""
    folder = models("falcon", FALCON)
    run = tmp_path / "run"
    argv = ["--model", str(folder), "--family", "lora", "--output", str(run), *FAST, "--init", init]
    assert finetune_4bit.main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: no layer of FalconForCausalLM could be quantised to 4-bit")
    assert "FalconLinear" in last
    assert not run.exists()


def test_moe_experts_in_another_layout_warn_that_they_stay_unquantised(models, tmp_path, capsys):
    """gpt-oss stores its experts transposed, with biases: qmor.model.moe leaves them as transformers loads them."""
    folder = models("gpt_oss", GPT_OSS)
    run = tmp_path / "run"
    assert finetune_4bit.main(["--model", str(folder), "--family", "lora", "--output", str(run), *FAST]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "GptOssExperts" in warnings[0] and "untransposed and without bias" in warnings[0]
    from safetensors import safe_open

    with safe_open(str(run / "adapter" / "adapter.safetensors"), framework="pt") as f:
        adapted = {k.split(".adapter.")[0] for k in f.keys()}
    assert adapted and all("self_attn" in k for k in adapted)  # the experts got no adapter
