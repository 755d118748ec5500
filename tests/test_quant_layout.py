"""bitsandbytes' in-place CPU repacking never reaches qmor's layers, and no reader takes a repacked weight for NF4."""

import pytest
import torch
from conftest import Repacked

import qmor
from qmor.adapters.config import AdapterConfig
from qmor.errors import QmorError
from qmor.model.load import load_4bit
from qmor.model.quant import bnb, dequantize, keep_plain_layout, packed_state, quantize, set_packed


def linear_4bit(d_in: int, d_out: int) -> torch.nn.Module:
    layer = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    set_packed(layer, quantize(torch.randn(d_out, d_in) * d_in**-0.5))
    return layer


def eval_forward(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        model(x)


def test_the_trigger_is_what_qmor_guards_against():
    # a raw layer on an AVX512-BF16 CPU (simulated by the conftest fixture) repacks on an eval forward without grad:
    # if bitsandbytes moves its trigger, this fails and keep_plain_layout needs a look
    with pytest.raises(Repacked):
        eval_forward(linear_4bit(256, 128), torch.randn(2, 256))


@pytest.mark.parametrize("d_in", [256, 160])  # 160: not a multiple of the block size, where the repack crashes
def test_kept_layout_survives_eval_forward(d_in):
    layer = linear_4bit(d_in, 64)
    before = dequantize(layer.weight)
    keep_plain_layout(layer)
    eval_forward(layer, torch.randn(2, d_in))
    assert torch.equal(dequantize(layer.weight), before)


def test_loaded_and_attached_models_keep_the_layout(tiny_dir):
    model = load_4bit(str(tiny_dir), device="cpu")  # MLP input width 160
    before = {n: dequantize(m.weight) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    eval_forward(model, torch.tensor([[1, 20, 30, 40]]))
    after = {n: dequantize(m.weight) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_the_public_api_keeps_the_layout_of_a_model_loaded_elsewhere(tmp_path):
    # built by hand, as transformers' BitsAndBytesConfig loads it: qmor.attach / qmor.load_adapter first see it
    cfg = AdapterConfig(family="lora", r=4)
    holder = torch.nn.Sequential(linear_4bit(256, 128))
    qmor.attach(holder, cfg)
    eval_forward(holder, torch.randn(2, 256))
    qmor.save_adapter(holder, tmp_path / "adapter", qmor.AdapterMeta(adapter=cfg))
    fresh = torch.nn.Sequential(linear_4bit(256, 128))
    qmor.load_adapter(fresh, tmp_path / "adapter")
    eval_forward(fresh, torch.randn(2, 256))


def test_readers_refuse_a_repacked_weight():
    layer = linear_4bit(256, 128)
    packed = layer.weight
    packed.data, packed.quant_state = bnb.functional._convert_weight_packed_for_cpu(packed.data, packed.quant_state)
    for read in (dequantize, packed_state, lambda p: set_packed(linear_4bit(256, 128), p)):
        with pytest.raises(QmorError, match="repacked in place"):
            read(packed)


def test_fast_path_kernel_notice_is_dropped(caplog):
    # printed at import on AVX512-BF16 CPUs; it concerns only the repacked layout that qmor switches off
    log = __import__("logging").getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level("WARNING"):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'")
        log.warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]
