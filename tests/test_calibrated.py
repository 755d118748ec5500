"""The calibrated init: lower activation-weighted error than LoftQ on every layer at equal rank, a stored base that
is ordinary bitsandbytes NF4, its cache, the one-line refusals, and `qmor train --init calibrated` end to end."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qmor import AdapterConfig, QmorError, QuantConfig
from qmor.adapters import ADAPTERS, build_adapter
from qmor.adapters.attach import adapted_layers, read_meta
from qmor.adapters.lora import FAMILY as LORA
from qmor.adapters.weighted import fit_weighted
from qmor.export.exporter import export_merged, export_peft
from qmor.model import calibrated
from qmor.model.gptq import dampened, round_nf4
from qmor.model.load import attach_trained, load_4bit, load_for_training, load_trained
from qmor.model.loftq import effective_delta, loftq_layer
from qmor.model.quant import block_scales, dequantize, levels, packed_from_state, packed_state, quantize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import finetune_4bit  # noqa: E402

FAMILIES = ["lora", "moslora", "mor", "sira", "mora"]
OPTIONS = {"mor": {"experts": 3}, "sira": {"experts": 3}}


def calibration(n=12, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(8, 100, (length,), generator=g) for _ in range(n)]


def ids(seed=0):
    return torch.randint(8, 100, (2, 12), generator=torch.Generator().manual_seed(seed))


def config(family, **kw):
    return AdapterConfig(family=family, r=4, alpha=8.0, init="calibrated", options=OPTIONS.get(family), **kw)


def weighted_error(E, W, H):
    return (((E @ H) * E).sum() / ((W @ H) * W).sum()).sqrt().item()


def codes_of(packed):
    data = packed.data.view(torch.uint8).flatten()
    return torch.stack([data >> 4, data & 15], 1).flatten().long()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_has_lower_weighted_error_than_loftq_at_equal_rank(tiny_dir, tmp_path, monkeypatch, family):
    """Each layer's init against LoftQ's on the same weight, at the same rank, under the same inputs: those the
    sequential pass gathered for it."""
    cfg = config(family, loftq_iters=2)
    pairs = {}
    layer = calibrated.calibrated_layer

    def both(W, H, adapter, *args):
        packed, errors = layer(W, H, adapter, *args)
        other = build_adapter(cfg, W.shape[1], W.shape[0])
        lq, _, _ = loftq_layer(W, other, QuantConfig(), cfg.loftq_iters)
        lq_err = weighted_error(W - dequantize(lq) - effective_delta(other, W.shape[1]), W, H)
        pairs[len(pairs)] = (errors["act"], lq_err, errors["act_nf4"])
        return packed, errors

    monkeypatch.setattr(calibrated, "calibrated_layer", both)
    load_for_training(str(tiny_dir), cfg, device="cpu", cache_dir=tmp_path, calibration=calibration())
    assert len(pairs) == 14  # every linear of both layers
    for ours, loftq, nf4 in pairs.values():
        assert ours < loftq and ours < nf4


def test_the_stored_base_is_ordinary_nf4_and_dequantises_to_what_was_rounded():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(96, 192, generator=g) * 0.02
    X = torch.randn(500, 192, generator=g) * torch.rand(192, generator=g) * 3
    packed = round_nf4(W, dampened(X.T @ X / 500), QuantConfig())
    plain = quantize(W, QuantConfig())
    # the same scales as bitsandbytes' own quantisation of W: double-quantised absmax, its statistics, the codebook
    for a, b in [(packed.quant_state.absmax, plain.quant_state.absmax), (packed.quant_state.offset,
                 plain.quant_state.offset), (packed.quant_state.state2.absmax, plain.quant_state.state2.absmax)]:
        assert torch.equal(a, b)
    assert not torch.equal(packed.data, plain.data)  # the codes are its own
    rounded_to = (levels(packed)[codes_of(packed)].view(-1, 64) * block_scales(packed)[:, None]).view(96, 192)
    assert torch.equal(dequantize(packed), rounded_to)
    again = packed_from_state(packed_state(packed), "cpu")  # through safetensors' form and back
    assert torch.equal(dequantize(again), rounded_to)
    err_gptq = weighted_error(W - dequantize(packed), W, X.T @ X)
    assert err_gptq < weighted_error(W - dequantize(plain), W, X.T @ X)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_weighted_fit_beats_the_plain_fit_in_the_weighted_norm(family):
    g = torch.Generator().manual_seed(2)
    R = torch.randn(160, 128, generator=g) * 0.01
    X = torch.randn(400, 128, generator=g) * torch.rand(128, generator=g) ** 3 * 4
    H = X.T @ X / 400
    cfg = config(family)
    plain, weighted = build_adapter(cfg, 128, 160), build_adapter(cfg, 128, 160)
    plain.fit(R)
    fit_weighted(weighted, family, R, torch.linalg.cholesky(dampened(H)))
    errors = [weighted_error(R - effective_delta(a, 128), R, H) for a in (plain, weighted)]
    assert errors[1] < 0.95 * errors[0]


def test_the_cache_is_used_on_the_second_run_and_keyed_by_the_calibration_data(tiny_dir, tmp_path, monkeypatch):
    cfg = config("lora")
    first, meta, _ = load_for_training(str(tiny_dir), cfg, device="cpu", cache_dir=tmp_path,
                                       calibration=calibration())
    real = calibrated.initialise

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although the cache holds this key")

    monkeypatch.setattr(calibrated, "initialise", fail)
    again, meta2, _ = load_for_training(str(tiny_dir), cfg, device="cpu", cache_dir=tmp_path,
                                        calibration=calibration())
    assert meta2.base_weights == meta.base_weights
    first.eval()
    again.eval()
    assert torch.equal(first(input_ids=ids()).logits, again(input_ids=ids()).logits)
    calls = []
    monkeypatch.setattr(calibrated, "initialise", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, other, _ = load_for_training(str(tiny_dir), cfg, device="cpu", cache_dir=tmp_path,
                                    calibration=calibration(seed=1))
    assert calls and other.base_weights != meta.base_weights


def test_a_family_without_a_weighted_fit_is_refused_in_one_line(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(ADAPTERS, "plainfit", replace(LORA, input_factor=""))
    with pytest.raises(QmorError, match="cannot fit plainfit") as e:
        load_for_training(str(tiny_dir), AdapterConfig(family="plainfit", r=4, init="calibrated"), device="cpu",
                          cache_dir=tmp_path, calibration=calibration())
    assert "\n" not in str(e.value) and "--init loftq" in str(e.value)
    with pytest.raises(QmorError, match="calibration token ids"):
        load_for_training(str(tiny_dir), config("lora"), device="cpu", cache_dir=tmp_path)


def test_train_with_calibrated_init_end_to_end_and_reload(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QMOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert finetune_4bit.main(["--model", str(tiny_dir), "--family", "lora", "--rank", "4", "--init", "calibrated",
                               "--calibration-samples", "8", "--output", str(out), "--max-steps", "2",
                               "--batch-size", "4", "--num-examples", "16", "--max-len", "96", "--eval-generate", "0",
                               "--device", "cpu"]) == 0
    adapter = out / "adapter"
    meta = read_meta(adapter)
    assert meta.init == "calibrated" and Path(meta.base_weights).is_dir()
    assert (out / "loftq_report.json").is_file()
    model, _ = load_trained(adapter)
    chat = load_4bit(str(tiny_dir), device="cpu")
    attach_trained(chat, adapter, str(tiny_dir))
    plain = load_4bit(str(tiny_dir), device="cpu")
    assert not all(torch.equal(layer.base.weight.data, plain.get_submodule(n).weight.data)
                   for n, layer in adapted_layers(model).items())  # the base is its own Q_T, not nf4(W)
    x = ids(1)
    assert torch.equal(model.eval()(input_ids=x).logits, chat.eval()(input_ids=x).logits)
    with pytest.raises(QmorError, match="calibrated-initialised"):
        export_merged(adapter, tmp_path / "wrong", merge_base="original")
    with pytest.raises(QmorError, match="calibrated-initialised"):
        export_peft(adapter, tmp_path / "peft", with_base=False)
    export_merged(adapter, tmp_path / "merged")  # onto Q_T, checked against the adapter's logits as it writes


def test_a_lost_calibrated_base_is_refused_in_one_line(tiny_dir, tmp_path):
    import shutil

    from qmor import save_adapter

    model, meta, _ = load_for_training(str(tiny_dir), config("lora"), device="cpu", cache_dir=tmp_path / "cache",
                                       calibration=calibration())
    folder = save_adapter(model, tmp_path / "adapter", meta)
    shutil.rmtree(meta.base_weights)
    with pytest.raises(QmorError, match="calibration data"):
        load_trained(folder)
