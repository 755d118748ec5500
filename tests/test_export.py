"""Merged fp16 and PEFT export on a tiny 4-bit Llama: parity with the 4-bit + adapter model, layout, refusals."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import perturb
from safetensors import safe_open

from qmor import AdapterConfig, NotMergeable, QmorError, attach, cli, save_adapter
from qmor.adapters.attach import AdapterMeta
from qmor.export.exporter import base_checkpoint, export_merged, export_peft
from qmor.export.merge import write_merged
from qmor.export.steps import copy_support
from qmor.model.load import load_4bit, load_for_training, load_trained

KW = {"r": 4, "alpha": 8.0, "experts": 3, "expert_dropout": 0.0}
ROOT = Path(__file__).resolve().parents[1]


def make_adapter(tiny_dir, folder, family, **extra):
    model = load_4bit(str(tiny_dir))
    cfg = AdapterConfig.from_dict({"family": family, **KW, **extra})
    attach(model, cfg)
    perturb(model)
    return save_adapter(model, folder, AdapterMeta(adapter=cfg, base_model=str(tiny_dir)))


def ids(seed=0):
    return torch.randint(8, 100, (2, 16), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_logits(adapter_dir, x):
    model, _ = load_trained(adapter_dir)
    return model.eval()(input_ids=x).logits


@torch.no_grad()
def hf_logits(folder, x, peft_dir=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    if peft_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(peft_dir))
    return model.eval()(input_ids=x).logits


def tol(ref):
    return 0.01 * ref.abs().max().item()  # fp16 weight rounding, nothing more


@pytest.mark.parametrize("family", ["lora", "moslora", "mora"])
def test_merged_export_matches_4bit_model(tiny_dir, tmp_path, family):
    adapter = make_adapter(tiny_dir, tmp_path / "adapter", family)
    out = tmp_path / "merged"
    summary = export_merged(adapter, out, shard_size="40KB")
    x = ids()
    ref, got = reference_logits(adapter, x), hf_logits(out, x)
    assert (ref - got).abs().max() < tol(ref)
    assert summary["max_abs"] < summary["tolerance"]
    # the adapter matters: the base alone is far away, so the parity above is not trivial
    base = load_4bit(str(tiny_dir)).eval()
    with torch.no_grad():
        assert (base(input_ids=x).logits - got).abs().max() > 10 * tol(ref)

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    with safe_open(str(out / shards[0]), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    card = (out / "README.md").read_text()
    assert family in card and "dequantized" in card and "local folder `tiny`" in card
    assert str(tiny_dir) not in card  # a path on this machine means nothing on the Hub
    assert not list(tmp_path.glob(".merged.*"))  # no temporary folder left behind


def test_bf16_export_and_script(tiny_dir, tmp_path):
    adapter = make_adapter(tiny_dir, tmp_path / "run" / "adapter", "lora")
    out = tmp_path / "bf16"
    cmd = [sys.executable, str(ROOT / "scripts" / "export_fp16.py"), str(tmp_path / "run"), "--output", str(out),
           "--dtype", "bf16"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "top-1 agreement" in done.stderr
    with safe_open(str(out / "model-00001-of-00001.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    x = ids(1)
    ref = reference_logits(adapter, x)
    assert (ref - hf_logits(out, x)).abs().max() < 8 * tol(ref)  # bf16 keeps 3 fewer mantissa bits than fp16

    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)  # the folder now exists
    assert again.returncode == 2
    assert again.stderr.startswith("error: ") and "--overwrite" in again.stderr and "Traceback" not in again.stderr


def test_loftq_adapter_merges_onto_qt_not_w(tiny_dir, tmp_path):
    model, meta, _ = load_for_training(str(tiny_dir), AdapterConfig(family="lora", r=4, alpha=8.0, init="loftq"),
                                       cache_dir=tmp_path / "cache")
    perturb(model, size=0.02)
    adapter = save_adapter(model, tmp_path / "adapter", meta)
    out = tmp_path / "merged"
    export_merged(adapter, out)
    x = ids(2)
    ref = reference_logits(adapter, x)
    right = (ref - hf_logits(out, x)).abs().max()
    assert right < tol(ref)

    with pytest.raises(QmorError, match="count that residual twice"):
        export_merged(adapter, tmp_path / "wrong", merge_base="original")
    assert not (tmp_path / "wrong").exists()
    # what the refusal prevents: the same merge written onto the original W drifts far beyond fp16 rounding
    folder, names = base_checkpoint(str(tiny_dir))
    wrong = tmp_path / "forced"
    wrong.mkdir()
    loaded, _ = load_trained(adapter)
    write_merged(loaded, names, wrong, torch.float16, 2**30, merge_base="original")
    copy_support(folder, wrong, torch.float16, False)
    assert (ref - hf_logits(wrong, x)).abs().max() > 20 * right

    with pytest.raises(QmorError, match="LoftQ"):
        export_peft(adapter, tmp_path / "peft", with_base=False)
    export_peft(adapter, tmp_path / "peft")  # over its own dequantised Q_T base
    assert (ref - hf_logits(tmp_path / "peft" / "base", x, tmp_path / "peft")).abs().max() < tol(ref)


def test_original_merge_base_for_default_init(tiny_dir, tmp_path):
    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "lora")
    export_merged(adapter, tmp_path / "orig", merge_base="original", tolerance=1e3)
    export_merged(adapter, tmp_path / "deq")
    x = ids(3)
    ref = reference_logits(adapter, x)
    deq, orig = hf_logits(tmp_path / "deq", x), hf_logits(tmp_path / "orig", x)
    assert (ref - deq).abs().max() < (ref - orig).abs().max()  # W differs from the trained-against dequant(Q)
    assert "original" in (tmp_path / "orig" / "README.md").read_text()


@pytest.mark.parametrize("family", ["lora", "moslora"])
def test_peft_export_parity(tiny_dir, tmp_path, family):
    adapter = make_adapter(tiny_dir, tmp_path / "adapter", family)
    out = tmp_path / "peft"
    export_peft(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert (out / "adapter_model.safetensors").is_file()
    base_config = json.loads((out / "base" / "config.json").read_text())
    assert "quantization_config" not in base_config
    x = ids(4)
    ref = reference_logits(adapter, x)
    assert (ref - hf_logits(out / "base", x, out)).abs().max() < tol(ref)

    if family == "moslora":
        return  # the adapter-only variant below does not depend on the family
    alone = tmp_path / "alone"
    export_peft(adapter, alone, with_base=False)
    assert not (alone / "base").exists()
    assert json.loads((alone / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir)


@pytest.mark.parametrize("family", ["mor", "sira"])
def test_routed_families_are_refused(tiny_dir, tmp_path, family):
    adapter = make_adapter(tiny_dir, tmp_path / "adapter", family)
    with pytest.raises(NotMergeable, match=f"routes each token.*; serve it with qmor chat --adapter {adapter}, or"):
        export_merged(adapter, tmp_path / "merged")
    with pytest.raises(QmorError, match="routes each token"):
        export_peft(adapter, tmp_path / "peft")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "peft").exists()


def test_base_model_is_optional_and_model_is_its_other_name(tiny_dir, tmp_path, capsys):
    """The base is the one the adapter records; --base-model (or --model, the name chat used) names another copy."""
    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "lora")
    copy = shutil.copytree(tiny_dir, tmp_path / "my base")
    assert cli.main(["export", str(adapter), "--output", str(tmp_path / "recorded")]) == 0
    hint = f"chat with it: qmor chat --base-model {tmp_path / 'recorded'} --no-4bit"
    assert capsys.readouterr().err.splitlines()[-1] == hint
    assert cli.main(["export", str(adapter), "--output", str(tmp_path / "other"), "--model", str(copy)]) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"chat with it: qmor chat --base-model {tmp_path / 'other'} --no-4bit"
    assert (tmp_path / "other" / "model.safetensors.index.json").is_file()


def test_mora_refused_for_peft(tiny_dir, tmp_path):
    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "mora")
    with pytest.raises(QmorError, match="not a low-rank adapter"):
        export_peft(adapter, tmp_path / "peft")


def test_existing_output_needs_overwrite(tiny_dir, tmp_path):
    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "lora")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(QmorError, match="already exists"):
        export_merged(adapter, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_merged(adapter, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").is_file()


def test_failed_verification_keeps_nothing(tiny_dir, tmp_path, monkeypatch):
    import qmor.export.merge

    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "lora")
    real = qmor.export.merge.merged_weight
    # a merge that forgets the adapter: the written model is the base alone, which the check must catch
    monkeypatch.setattr(qmor.export.merge, "merged_weight", lambda base, adapter, original: real(base, None, original))
    with pytest.raises(QmorError, match="failed verification"):
        export_merged(adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert not list(tmp_path.glob(".merged*"))


def test_bad_inputs(tiny_dir, tmp_path):
    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "lora")
    with pytest.raises(QmorError, match="qmor_adapter.json"):
        export_merged(tmp_path / "adapter" / "missing", tmp_path / "out")
    with pytest.raises(QmorError, match="shard size"):
        export_merged(adapter, tmp_path / "out", shard_size="lots")
    with pytest.raises(QmorError, match="dtype"):
        export_merged(adapter, tmp_path / "out", dtype="fp8")
    assert not (tmp_path / "out").exists()
