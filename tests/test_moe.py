"""Mixture-of-experts blocks in 4-bit (qmor.model.moe): the 4-bit experts compute what a dense block of their
dequantised weights computes, only routed experts run, and adapters on experts train, save, merge and export."""

import sys
from pathlib import Path

import pytest
import torch
from archs import MIXTRAL, QWEN3_MOE, make_model
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from qmor.adapters import experts
from qmor.adapters.attach import adapted_layers, attach, find_targets
from qmor.adapters.config import AdapterConfig
from qmor.model import moe
from qmor.model.load import load_4bit
from qmor.model.quant import dequantize, is_4bit, quantize

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

ARCHS = {"qwen3_moe": QWEN3_MOE, "mixtral": MIXTRAL}


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {name: make_model(root / name, spec) for name, spec in ARCHS.items()}


def block(model):
    return model.model.layers[0].mlp


def hidden(n=24, seed=0):
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))  # (T, H)


def dense_twin(quant: moe.QuantExperts, config):
    """transformers' own expert module holding the dequantised weights of `quant` (adapters folded in when set)."""
    from qmor.export.merge import merged_weight

    cls = type(AutoModelForCausalLM.from_config(config).model.layers[0].mlp.experts)
    dense = cls(config)
    maps = {which: [merged_weight(*pair(m), None) for m in getattr(quant, which)] for which in moe.MAPS}
    with torch.no_grad():
        dense.gate_up_proj.copy_(torch.stack(maps["gate_up_proj"]))
        dense.down_proj.copy_(torch.stack(maps["down_proj"]))
    return dense


def pair(module):
    return (module.base, module.adapter) if hasattr(module, "adapter") else (module, None)


def stored_4bit_bytes(model) -> int:
    """Bytes the model's 4-bit linears hold: packed weights plus their (double-quantised) block scales."""
    packed = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                 if "proj" in n and "adapter" not in n)
    absmax = sum(m.weight.quant_state.absmax.numel() + 4 * m.weight.quant_state.state2.absmax.numel()
                 for m in model.modules() if is_4bit(m))
    return packed + absmax


@pytest.mark.parametrize("arch", list(ARCHS))
def test_experts_are_nf4_and_equal_a_dense_block_of_their_dequantised_weights(moe_dirs, arch):
    model = load_4bit(str(moe_dirs[arch]), device="cpu")
    mlp = block(model)
    assert isinstance(mlp.experts, moe.QuantExperts) and all(is_4bit(m) for m in mlp.experts.gate_up_proj)
    assert not is_4bit(mlp.gate) and mlp.gate.weight.dtype == torch.float32  # the router stays unquantised
    # each expert's matrix is the dense layers' NF4 of the checkpoint's (gate; up) rows and down matrix
    with safe_open(str(moe_dirs[arch] / "model.safetensors"), "pt") as f:
        names = {k: moe_dirs[arch] / "model.safetensors" for k in f.keys()}
    W = moe.expert_weight("model.layers.0.mlp.experts.gate_up_proj.1", names, "model")
    assert torch.equal(dequantize(mlp.experts.gate_up_proj[1].weight), dequantize(quantize(W)))
    x = hidden()
    _, weights, index = mlp.gate(x)
    dense = dense_twin(mlp.experts, AutoConfig.from_pretrained(moe_dirs[arch]))
    with torch.no_grad():  # equal up to float rounding: with several threads the two matmuls sum in another order
        torch.testing.assert_close(mlp.experts(x, index, weights), dense(x, index, weights), rtol=1e-5, atol=1e-6)


def test_loading_reads_no_expert_tensor_through_transformers(moe_dirs):
    config = AutoConfig.from_pretrained(moe_dirs["qwen3_moe"])
    with moe.experts_left_out(config):
        model = AutoModelForCausalLM.from_config(config)
    assert not any("experts" in n for n in model.state_dict())  # nothing for the loader to read or allocate
    assert block(model).experts.expert_shape == (4, 64, 64)
    assert block(AutoModelForCausalLM.from_config(config)).experts.gate_up_proj.shape == (4, 128, 64)  # restored


def test_only_routed_experts_run_and_get_gradients(moe_dirs):
    model = load_4bit(str(moe_dirs["qwen3_moe"]), device="cpu")
    names = attach(model, AdapterConfig(r=4, targets=["experts", "q_proj"]))
    assert sum(experts.is_expert_map(n) for n in names) == 2 * 2 * 4 and any(n.endswith("q_proj") for n in names)
    mlp = block(model)
    x = hidden(3)
    _, weights, index = mlp.gate(x)
    routed = set(index.flatten().tolist())
    assert len(routed) < 4, "pick inputs that leave an expert unrouted"
    for p in mlp.parameters():
        if p.requires_grad and p.dim() == 2 and p.shape[0] != 4:
            p.data.normal_()  # B != 0, so every adapter factor gets a gradient when its expert runs
    mlp.experts(x, index, weights).sum().backward()
    for e in range(4):
        for which in moe.MAPS:
            grad = getattr(mlp.experts, which)[e].adapter.A.grad
            assert (grad is not None and grad.abs().sum() > 0) == (e in routed), (which, e)


def test_all_linear_leaves_experts_out(moe_dirs):
    model = load_4bit(str(moe_dirs["mixtral"]), device="cpu")
    assert not any(experts.is_expert_map(n) for n in find_targets(model, "all-linear"))
    assert len(find_targets(model, r"experts\.down_proj")) == 2 * 4
    attach(model, AdapterConfig(r=4, targets=["experts"]))
    assert len(adapted_layers(model)) == 2 * 2 * 4


def checkpoint_share(folder: Path) -> float:
    """The experts' share of the parameters in a model's checkpoint."""
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    numel = {k: torch.Size(shape).numel() for k, shape in sizes.items()}
    return sum(n for k, n in numel.items() if ".experts." in k) / sum(numel.values())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_training_says_when_the_targets_leave_the_experts_out(moe_dirs, arch, tmp_path, capsys, monkeypatch):
    import finetune_4bit

    monkeypatch.setenv("QMOR_CACHE", str(tmp_path / "cache"))
    fast = ["--dataset", "add", "--num-examples", "4", "--max-len", "48", "--max-steps", "1", "--batch-size", "2",
            "--eval-generate", "0", "--init", "default", "--device", "cpu", "--rank", "4"]
    model = ["--model", str(moe_dirs[arch])]
    assert finetune_4bit.main([*model, "--output", str(tmp_path / "a"), *fast]) == 0  # all-linear, the default
    notes = [ln for ln in capsys.readouterr().out.splitlines() if "MoE experts" in ln]
    share = checkpoint_share(moe_dirs[arch])
    assert notes == [f"note: the MoE experts of {ARCHS[arch][0].replace('Config', 'ForCausalLM')}, {share:.0%} of "
                     "its parameters, get no adapter with --targets all-linear; to adapt them too, pass --targets "
                     "experts,q_proj,k_proj,v_proj,o_proj"]
    assert share > 0.5
    assert finetune_4bit.main([*model, "--output", str(tmp_path / "b"), *fast, "--targets", "experts,q_proj"]) == 0
    assert "MoE experts" not in capsys.readouterr().out


def experts_only(model, tensors=False):
    layers = {n: m for n, m in adapted_layers(model).items() if experts.is_expert_map(n)}
    return {f"{n}.{k}": v.clone() for n, m in layers.items() for k, v in m.adapter.state_dict().items()} \
        if tensors else layers


@torch.no_grad()
def logits(model, x):
    return model.eval()(input_ids=x).logits.float()


IDS = torch.randint(8, 100, (2, 16), generator=torch.Generator().manual_seed(0))  # (B, T)


@pytest.mark.parametrize("layout", ["per-expert", "shared"])
@pytest.mark.parametrize(("arch", "family"), [("qwen3_moe", "lora"), ("mixtral", "moslora"), ("qwen3_moe", "mora")])
def test_expert_adapters_save_load_and_export_to_plain_transformers(moe_dirs, tmp_path, arch, family, layout):
    from conftest import perturb

    from qmor.adapters.attach import AdapterMeta, save_adapter
    from qmor.export.exporter import export_merged
    from qmor.model.load import load_trained

    cfg = AdapterConfig(family=family, r=4, alpha=8.0, targets=["experts", "q_proj", "v_proj"],
                        expert_adapters=layout)
    model = load_4bit(str(moe_dirs[arch]), device="cpu")
    attach(model, cfg)
    perturb(model, size=0.2)
    ref = logits(model, IDS)
    saved = save_adapter(model, tmp_path / "adapter", AdapterMeta(adapter=cfg, base_model=str(moe_dirs[arch])))
    again, meta = load_trained(saved, device="cpu")
    assert meta.adapter.expert_adapters == layout and torch.equal(logits(again, IDS), ref)
    with safe_open(str(saved / "adapter.safetensors"), "pt") as f:  # shared: one set of tensors per block and map
        assert experts.expert_layout(f.keys()) == layout
    expected = experts_only(model, tensors=True)
    assert expected and all(torch.equal(v, experts_only(again, tensors=True)[k]) for k, v in expected.items())

    summary = export_merged(saved, tmp_path / "merged", dtype="fp16", device="cpu")
    got = logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32), IDS)
    assert (got - ref).abs().max() < 0.01 * ref.abs().max() and summary["max_abs"] < summary["tolerance"]
    base = logits(load_4bit(str(moe_dirs[arch]), device="cpu"), IDS)
    assert (base - got).abs().max() > 0.1 * ref.abs().max()  # the expert adapters matter to the parity above
    with safe_open(str(next((tmp_path / "merged").glob("*.safetensors"))), "pt") as f:
        assert not any(k.endswith(("gate_up_proj", "down_proj.3")) for k in f.keys())  # the checkpoint's own names


def test_loftq_lowers_the_experts_nf4_error(moe_dirs, tmp_path):
    from qmor.model.load import load_for_training

    cfg = AdapterConfig(family="lora", r=8, alpha=16.0, targets=["experts"], init="loftq")
    model, meta, report = load_for_training(str(moe_dirs["mixtral"]), cfg, device="cpu", cache_dir=tmp_path)
    errors = report["layers"]
    assert len(errors) == 2 * 2 * 4 and all(experts.is_expert_map(n) for n in errors)
    assert all(e["loftq"] < e["nf4"] for e in errors.values())
    # the model trains on Q_T, and reloading puts the same Q_T back
    from qmor.adapters.attach import save_adapter
    from qmor.model.load import load_trained

    saved = save_adapter(model, tmp_path / "adapter", meta)
    again, _ = load_trained(saved, device="cpu")
    assert torch.equal(logits(again, IDS), logits(model, IDS))


@pytest.mark.parametrize("family", ["mor", "sira"])
def test_routed_families_are_refused_on_experts(moe_dirs, family):
    from qmor.errors import QmorError

    model = load_4bit(str(moe_dirs["qwen3_moe"]), device="cpu")
    with pytest.raises(QmorError, match=f"{family} cannot adapt MoE experts"):
        attach(model, AdapterConfig(family=family, r=4, targets=["experts"]))
    attach(model, AdapterConfig(family=family, r=4, targets=["q_proj"]))  # attention as before


def test_planner_counts_experts_as_4bit_and_their_adapters(moe_dirs):
    from qmor.adapters.attach import count_parameters
    from qmor.plan import estimate, geometry, nf4_bytes

    config = AutoConfig.from_pretrained(moe_dirs["qwen3_moe"])
    cfg = AdapterConfig(r=4, targets=["experts", "q_proj"])
    model = load_4bit(str(moe_dirs["qwen3_moe"]), device="cpu")
    attach(model, cfg)
    assert estimate(config, 64, 1, cfg, device="cpu").trainable == count_parameters(model)[0]
    assert sum(nf4_bytes(i * o) for i, o in geometry(config).quantized) == stored_4bit_bytes(model)
    assert geometry(config).intermediate == 2 * 64  # two routed experts of width 64 per token


def saved_numels(experts, x, weights, index) -> list[int]:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        experts(x, index, weights).sum().backward()
    return saved


def test_a_forward_keeps_no_dequantised_expert_weight(moe_dirs):
    """Each routed expert's weights are dequantised inside the loop and dropped (backward dequantises them again),
    so a forward saves activations and adapter factors, never an expert matrix: its memory holds at most one
    routed expert's dequantised weights at a time."""
    model = load_4bit(str(moe_dirs["qwen3_moe"]), device="cpu")
    attach(model, AdapterConfig(r=4, targets=["experts"]))
    mlp = block(model)
    x = hidden(16).requires_grad_()  # 16 tokens: any activation is smaller than the smallest expert matrix
    _, weights, index = mlp.gate(x)
    smallest = 64 * 64  # down_proj: (hidden 64, expert width 64)
    assert max(saved_numels(mlp.experts, x, weights.detach(), index)) < smallest
    # the measure sees weights: transformers' dense block of the same experts keeps its weights for backward
    dense = dense_twin(mlp.experts, AutoConfig.from_pretrained(moe_dirs["qwen3_moe"])).requires_grad_(False)
    assert max(saved_numels(dense, x, weights.detach(), index)) >= smallest


# ---------------------------------------------------------------------------------------------- shared adapters


def shared_model(moe_dirs, arch="qwen3_moe", **options):
    model = load_4bit(str(moe_dirs[arch]), device="cpu")
    cfg = AdapterConfig(r=4, targets=["experts"], expert_adapters="shared", **options)
    attach(model, cfg)
    return model, cfg


def test_a_shared_adapter_is_one_module_that_every_routed_expert_trains(moe_dirs):
    model, _ = shared_model(moe_dirs)
    mlp = block(model)
    shared = {which: getattr(mlp.experts, which)[0].adapter for which in moe.MAPS}
    assert all(isinstance(a, experts.SharedAdapter) for a in shared.values())
    assert all(m.adapter is shared[which] for which in moe.MAPS for m in getattr(mlp.experts, which))
    for p in mlp.parameters():
        if p.requires_grad and p.dim() == 2 and p.shape[0] != 4:
            p.data.normal_()  # B != 0, so A gets a gradient wherever an expert runs
    x = hidden(24)
    _, weights, index = mlp.gate(x)
    routed = sorted(set(index.flatten().tolist()))
    assert len(routed) >= 2

    def grads(w):
        model.zero_grad()
        mlp.experts(x, index, w).sum().backward()
        return {which: a.adapter.A.grad.clone() for which, a in shared.items()}

    total = grads(weights)
    # the gradient of the one adapter is the sum of what each routed expert alone gives it (the others' output
    # weights zeroed), and each routed expert gives it something
    alone = [grads(torch.where(index == e, weights, torch.zeros_like(weights))) for e in routed]
    for which in moe.MAPS:
        assert all(g[which].abs().sum() > 0 for g in alone), which
        torch.testing.assert_close(sum(g[which] for g in alone), total[which], rtol=1e-4, atol=1e-6)


def test_shared_adapters_count_once_per_block_in_the_model_and_the_planner(moe_dirs):
    from qmor.adapters.attach import count_parameters
    from qmor.plan import estimate

    config = AutoConfig.from_pretrained(moe_dirs["qwen3_moe"])
    model, cfg = shared_model(moe_dirs)
    per_block = 4 * (64 + 128) + 4 * (64 + 64)  # LoRA r=4 on gate/up (64 -> 128) and on down (64 -> 64)
    trainable = count_parameters(model)[0]
    assert trainable == config.num_hidden_layers * per_block
    assert estimate(config, 64, 1, cfg, device="cpu").trainable == trainable
    per_expert = estimate(config, 64, 1, AdapterConfig(r=4, targets=["experts"]), device="cpu").trainable
    assert per_expert == config.num_experts * trainable


def test_a_shared_adapter_merges_the_same_delta_into_every_expert(moe_dirs, tmp_path):
    from conftest import perturb

    from qmor.adapters.attach import AdapterMeta, save_adapter
    from qmor.export.exporter import export_merged

    model, cfg = shared_model(moe_dirs)
    perturb(model, size=0.2)
    saved = save_adapter(model, tmp_path / "adapter", AdapterMeta(adapter=cfg, base_model=str(moe_dirs["qwen3_moe"])))
    export_merged(saved, tmp_path / "merged", dtype="fp16", device="cpu")
    experts = block(model).experts
    delta = experts.down_proj[0].adapter.delta_weight()
    with safe_open(str(next((tmp_path / "merged").glob("*.safetensors"))), "pt") as f:
        for e in range(4):
            merged = f.get_tensor(f"model.layers.0.mlp.experts.{e}.down_proj.weight").float()
            torch.testing.assert_close(merged - dequantize(experts.down_proj[e].base.weight), delta,
                                       rtol=0, atol=2e-3)  # fp16 rounding of the merged weight


@pytest.mark.parametrize(("saved_as", "attached_as"), [("shared", "per-expert"), ("per-expert", "shared")])
def test_an_adapter_loads_only_in_the_expert_layout_it_was_saved_in(moe_dirs, tmp_path, saved_as, attached_as):
    from qmor.adapters.attach import CONFIG, AdapterMeta, load_adapter_weights, save_adapter
    from qmor.errors import QmorError
    from qmor.files import load_json, save_json
    from qmor.model.load import load_trained

    model = load_4bit(str(moe_dirs["qwen3_moe"]), device="cpu")
    cfg = AdapterConfig(r=4, targets=["experts"], expert_adapters=saved_as)
    attach(model, cfg)
    saved = save_adapter(model, tmp_path / "adapter", AdapterMeta(adapter=cfg, base_model=str(moe_dirs["qwen3_moe"])))
    other = load_4bit(str(moe_dirs["qwen3_moe"]), device="cpu")
    attach(other, AdapterConfig(r=4, targets=["experts"], expert_adapters=attached_as))
    message = f"holds {saved_as} expert adapters but {attached_as} ones are attached here"
    with pytest.raises(QmorError, match=message):
        load_adapter_weights(other, saved)
    meta = load_json(saved / CONFIG)  # a qmor_adapter.json that says the other layout is refused the same way
    meta["adapter"]["expert_adapters"] = attached_as
    save_json(meta, saved / CONFIG)
    with pytest.raises(QmorError, match=message):
        load_trained(saved, device="cpu")


def test_loftq_leaves_shared_expert_adapters_at_zero_and_fits_the_rest(moe_dirs, tmp_path):
    from qmor.errors import QmorError
    from qmor.model.load import load_for_training

    cfg = AdapterConfig(r=4, targets=["experts", "q_proj"], init="loftq", expert_adapters="shared")
    model, _, report = load_for_training(str(moe_dirs["mixtral"]), cfg, device="cpu", cache_dir=tmp_path)
    assert report["layers"] and all(n.endswith("q_proj") for n in report["layers"])
    plain = load_4bit(str(moe_dirs["mixtral"]), device="cpu")
    experts = block(model).experts
    assert torch.equal(experts.gate_up_proj[2].base.weight, block(plain).experts.gate_up_proj[2].weight)  # NF4(W)
    assert not experts.gate_up_proj[2].adapter.delta_weight().any()
    with pytest.raises(QmorError, match="LoftQ has nothing to fit"):
        load_for_training(str(moe_dirs["mixtral"]), AdapterConfig(r=4, targets=["experts"], init="loftq",
                                                                   expert_adapters="shared"), device="cpu",
                          cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------------ dense layers


@pytest.mark.parametrize("dense", [{"mlp_only_layers": [0]}, {"decoder_sparse_step": 2}])
def test_planner_counts_qwen3_moe_dense_layers_as_dense(tmp_path, dense):
    """Qwen3-MoE's mlp_only_layers (and decoder_sparse_step) give some layers a dense MLP of intermediate_size:
    the planner counts their linears, adapters and activations as a dense layer's."""
    from archs import make_model

    from qmor.adapters.attach import count_parameters
    from qmor.plan import estimate, geometry, nf4_bytes

    name, sizes = QWEN3_MOE
    folder = make_model(tmp_path / "mixed", (name, {**sizes, "intermediate_size": 96, **dense}))
    config = AutoConfig.from_pretrained(folder)
    model = load_4bit(str(folder), device="cpu")
    assert not isinstance(block(model), type(model.model.layers[1].mlp))  # layer 0 dense, layer 1 experts
    cfg = AdapterConfig(r=4, targets=["experts", "gate_proj", "down_proj"])
    attach(model, cfg)
    assert estimate(config, 64, 1, cfg, device="cpu").trainable == count_parameters(model)[0]
    g = geometry(config, cfg.targets)
    assert sum(nf4_bytes(i * o) for i, o in g.quantized) == stored_4bit_bytes(model)
    kinds = sorted((k.count, k.intermediate, len(k.targets)) for k in g.kinds)
    assert kinds == [(1, 96, 2), (1, 2 * 64, 2 * 4)]  # dense: gate_proj, down_proj; sparse: 4 experts' two maps
    sparse = next(k for k in g.kinds if len(k.targets) == 8)
    assert {share for *_, share in sparse.targets} == {2 / 4}  # each expert sees the tokens routed to it


@pytest.mark.parametrize("layout", ["per-expert", "shared"])
def test_planner_predicts_what_expert_adapters_save_for_backward(moe_dirs, layout):
    """Each routed expert's adapter keeps its own tokens' input: k tokens' worth per token in all, whichever layout
    (a shared adapter is one set of weights, not one input). The MoE block's own tensors (router, expert loop) are
    left out of both sides: the adapters' increment is compared."""
    from test_plan import saved_bytes

    from qmor.plan import geometry, layer_activation

    def per_token(targets):
        cfg = AdapterConfig(r=4, targets=targets, expert_adapters=layout)
        model = load_4bit(str(moe_dirs["qwen3_moe"]), device="cpu")
        attach(model, cfg)
        measured = (saved_bytes(model.train(), 256, False) - saved_bytes(model, 64, False)) / 192
        return measured, layer_activation(geometry(model.config, targets, layout), cfg, 4, 1, 1, "sdpa", False)

    (without, predicted_without), (with_experts, predicted) = per_token(["q_proj"]), per_token(["experts", "q_proj"])
    assert with_experts - without == pytest.approx(predicted - predicted_without, rel=0.02)
