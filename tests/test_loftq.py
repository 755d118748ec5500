"""LoftQ init: lower error than plain NF4 for every family, exact init for any alpha, and the same Q_T everywhere
(init, cache, apply_base_weights, reload, recompute, single file vs shards)."""

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from qmor import AdapterConfig, QmorError, QuantConfig, save_adapter
from qmor.adapters import ADAPTERS, build_adapter, mergeable
from qmor.adapters.attach import WEIGHTS, adapted_layers, adapter_state, attach
from qmor.adapters.layer import AdaptedLinear
from qmor.model.files import local_folder, weight_files
from qmor.model.load import load_4bit, load_for_training, load_trained
from qmor.model.loftq import BASE, apply_base_weights, effective_delta, intact, loftq_layer
from qmor.model.quant import dequantize, quantize

KW = {"r": 4, "alpha": 8.0, "experts": 3, "expert_dropout": 0.0}


def fresh_adapter(cfg, weight):
    """A default-initialised adapter for one (d_out, d_in) weight."""
    return build_adapter(cfg, weight.shape[1], weight.shape[0])


def loftq_init(model_path, cfg, **kwargs):
    """A 4-bit model with LoftQ-initialised adapters for `cfg`, whatever its `init` (the cache key leaves it out)."""
    return load_for_training(model_path, replace(cfg, init="loftq"), **kwargs)


def realistic(d_out, d_in, seed=0, outliers=4):
    """Decaying singular values (s_k ~ k^-0.6) plus a few columns 25x larger, like LLM projection weights."""
    g = torch.Generator().manual_seed(seed)
    k = min(d_out, d_in)
    u, _ = torch.linalg.qr(torch.randn(d_out, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(d_in, k, generator=g))
    w = (u * torch.arange(1, k + 1, dtype=torch.float32) ** -0.6) @ v.T
    w[:, torch.randperm(d_in, generator=g)[:outliers]] *= 25
    return w * 0.02 / w.std()


def weights(kind):
    return torch.randn(128, 256, generator=torch.Generator().manual_seed(3)) * 0.02 if kind == "random" else \
        realistic(128, 256)


def packed_bits(linear):
    """Everything that defines an NF4 weight, as plain tensors to compare bit for bit."""
    qs = linear.weight.quant_state
    return [linear.weight.data, qs.absmax, qs.state2.absmax, qs.state2.code, qs.code, qs.offset.reshape(-1)]


def same_bits(a, b):
    return all(torch.equal(x, y) for x, y in zip(packed_bits(a), packed_bits(b), strict=True))


def bases(model):
    return {n: layer.base for n, layer in adapted_layers(model).items()}


def ids(seed=0):
    return torch.randint(8, 100, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("loftq-cache")


@pytest.mark.parametrize("kind", ["random", "realistic"])
@pytest.mark.parametrize("family", mergeable())
def test_loftq_error_below_plain_nf4(family, kind):
    W = weights(kind)
    adapter = fresh_adapter(AdapterConfig(family=family, r=8, alpha=16.0), W)
    errors = []
    for iters in (1, 3):
        packed, plain, err = loftq_layer(W, adapter, QuantConfig(), iters)
        # the reported error is the real one for the returned Q and the fitted adapter
        real = (W - dequantize(packed) - adapter.delta_weight()).norm() / W.norm()
        assert err == pytest.approx(real.item(), rel=1e-5)
        assert plain == pytest.approx(((W - dequantize(quantize(W))).norm() / W.norm()).item(), rel=1e-6)
        assert err < 0.97 * plain, (family, kind, iters, plain, err)
        errors.append(err)
    assert errors[1] <= errors[0] + 1e-6  # more alternations never hurt on these weights


@pytest.mark.parametrize("alpha", [1.0, 8.0, 64.0])
@pytest.mark.parametrize("family", ["lora", "moslora", "mor", "sira"])
def test_any_alpha_gives_the_rank_r_svd_of_the_residual(family, alpha):
    """T = 1: Q = nf4(W) and ΔW must be the best rank-r approximation of W - deq(Q), whatever alpha / r is."""
    W = realistic(96, 160, seed=1)
    r = 6
    adapter = fresh_adapter(AdapterConfig.from_dict({"family": family, "r": r, "alpha": alpha, "experts": 3}), W)
    packed, _, _ = loftq_layer(W, adapter, QuantConfig(), 1)
    Q = dequantize(packed)
    u, s, vh = torch.linalg.svd(W - Q, full_matrices=False)
    intended = (u[:, :r] * s[:r]) @ vh[:r]
    x = torch.randn(5, 160)
    adapter.eval()
    torch.testing.assert_close(x @ Q.T + adapter(x), x @ (Q + intended).T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["mor", "sira"])
def test_routed_families_start_independent_of_routing(family):
    W = realistic(64, 96, seed=2)
    adapter = fresh_adapter(AdapterConfig.from_dict({"family": family, **KW, "experts": 4}), W)
    loftq_layer(W, adapter, QuantConfig(), 2)
    adapter.eval()
    x = torch.randn(7, 96) * 3
    before = adapter(x)
    with torch.no_grad():
        adapter.router.copy_(torch.randn_like(adapter.router) * 10)  # a very different routing
    torch.testing.assert_close(adapter(x), before, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(before, x @ effective_delta(adapter, 96).T, rtol=1e-4, atol=1e-6)
    assert before.abs().max() > 0


@pytest.mark.parametrize("family", list(ADAPTERS))
def test_fit_sets_only_the_parameters_its_family_declares(family):
    """LoftQ's cache holds the declared `fitted` tensors only: a parameter fit set undeclared would be lost on a
    cache hit, one declared but never set would carry the computing run's random init into every later run."""
    W = realistic(64, 96, seed=4)
    adapter = fresh_adapter(AdapterConfig.from_dict({"family": family, **KW}), W)
    fitted = ADAPTERS[family].fitted
    before = {k: v.detach().clone() for k, v in adapter.named_parameters()}
    adapter.fit(W - dequantize(quantize(W, QuantConfig())))
    after = dict(adapter.named_parameters())
    assert set(fitted) <= set(after)
    assert all(torch.equal(before[k], after[k]) for k in after if k not in fitted)
    assert any(not torch.equal(before[k], after[k]) for k in fitted)


def test_iters_must_be_positive():
    W = weights("random")
    with pytest.raises(QmorError, match="loftq_iters"):
        loftq_layer(W, fresh_adapter(AdapterConfig(), W), QuantConfig(), 0)


@pytest.mark.parametrize("family", ["lora", "mora", "mor"])
def test_tiny_llama_logits_closer_than_plain_nf4(tiny_dir, cache, family):
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)(input_ids=ids()).logits
    plain = load_4bit(str(tiny_dir))(input_ids=ids()).logits
    model, meta, report = loftq_init(str(tiny_dir), AdapterConfig(family=family, r=8, alpha=16.0, loftq_iters=2),
                                     cache_dir=cache)
    model.eval()
    loftq = model(input_ids=ids()).logits
    assert (loftq - ref).norm() < 0.9 * (plain - ref).norm()
    assert meta.init == "loftq" and meta.base_weights and report["mean_loftq"] < report["mean_nf4"]
    assert len(report["layers"]) == 14 and report["gain"] > 1


def test_q_t_is_the_same_in_init_cache_apply_reload_and_recompute(tiny_dir, tmp_path):
    cfg = AdapterConfig(family="lora", r=4, alpha=32.0, init="loftq", loftq_iters=2)
    model, meta, _ = load_for_training(str(tiny_dir), cfg, cache_dir=tmp_path / "cache")
    first = bases(model)
    plain = load_4bit(str(tiny_dir))
    assert not any(same_bits(first[n], plain.get_submodule(n)) for n in first)  # Q_T really differs from nf4(W)

    # a training step moves the adapter, never the base
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids(), labels=ids()).loss.backward()
    opt.step()
    assert all(same_bits(first[n], b) for n, b in bases(model).items())

    cached, _, _ = load_for_training(str(tiny_dir), cfg, cache_dir=tmp_path / "cache")
    assert all(same_bits(first[n], b) for n, b in bases(cached).items())

    apply_base_weights(plain, meta.base_weights)  # not attached
    assert all(same_bits(first[n], plain.get_submodule(n)) for n in first)

    save_adapter(model, tmp_path / "adapter", meta)
    reloaded, _ = load_trained(tmp_path / "adapter")
    assert all(same_bits(first[n], b) for n, b in bases(reloaded).items())
    model.eval()
    reloaded.eval()
    assert torch.equal(model(input_ids=ids(1)).logits, reloaded(input_ids=ids(1)).logits)

    shutil.rmtree(meta.base_weights)
    recomputed, _ = load_trained(tmp_path / "adapter")
    assert all(same_bits(first[n], b) for n, b in bases(recomputed).items())
    assert torch.equal(model(input_ids=ids(1)).logits, recomputed.eval()(input_ids=ids(1)).logits)


def test_cache_is_reused_only_for_the_same_key(tiny_dir, tmp_path, monkeypatch):
    cfg = AdapterConfig(family="moslora", r=4, loftq_iters=1)
    _, meta, _ = loftq_init(str(tiny_dir), cfg, cache_dir=tmp_path)
    with safe_open(str(tmp_path / meta.base_weights / BASE), framework="pt") as f:
        assert any(k.endswith("|weight") for k in f.keys())

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although the cache holds this key")

    monkeypatch.setattr("qmor.model.loftq.initialise", fail)
    _, again, _ = loftq_init(str(tiny_dir), AdapterConfig(family="moslora", r=4, loftq_iters=1, dropout=0.1),
                             cache_dir=tmp_path)
    assert again.base_weights == meta.base_weights
    for other in (AdapterConfig(family="moslora", r=2), AdapterConfig(family="moslora", r=4, loftq_iters=2),
                  AdapterConfig(family="lora", r=4)):
        with pytest.raises(AssertionError, match="recomputed"):
            loftq_init(str(tiny_dir), other, cache_dir=tmp_path)


@pytest.mark.parametrize("damaged", [BASE, WEIGHTS])
def test_a_damaged_cache_is_said_in_one_line_and_computed_again(tiny_dir, tmp_path, capsys, damaged):
    """A cache file cut short (a failing disk, a copy cut short) is derived data: training and a reload of the
    adapter say so in one line and compute the same init again, instead of a safetensors traceback."""
    cfg = AdapterConfig(family="lora", r=4, loftq_iters=1, init="loftq")
    model, meta, _ = load_for_training(str(tiny_dir), cfg, cache_dir=tmp_path / "cache")
    first = bases(model)
    save_adapter(model, tmp_path / "adapter", meta)
    file = Path(meta.base_weights) / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    capsys.readouterr()

    again, _, _ = load_for_training(str(tiny_dir), cfg, cache_dir=tmp_path / "cache")
    warned = [line for line in capsys.readouterr().err.splitlines() if "is damaged" in line]
    assert len(warned) == 1 and warned[0].startswith(f"warning: the LoftQ cache {meta.base_weights} is damaged")
    assert all(same_bits(first[n], b) for n, b in bases(again).items())
    assert intact(Path(meta.base_weights))  # written again, whole

    file.write_bytes(file.read_bytes()[:100])
    reloaded, _ = load_trained(tmp_path / "adapter")
    assert all(same_bits(first[n], b) for n, b in bases(reloaded).items())


@pytest.mark.parametrize("family", ["mor", "sira"])
def test_a_cached_init_gives_the_model_a_computed_one_does(tiny_dir, tmp_path, family):
    """A router is no part of LoftQ's result: a run with seed 1 whose init another run (seed 0) cached gets the
    router of seed 1, the same adapters as when it computes the init itself."""
    cfg = AdapterConfig(family=family, r=4, options={"experts": 3}, loftq_iters=1)

    def adapters(seed, cache_dir):
        torch.manual_seed(seed)
        return adapter_state(loftq_init(str(tiny_dir), cfg, cache_dir=cache_dir)[0])

    first = adapters(0, tmp_path / "shared")
    cached, computed = adapters(1, tmp_path / "shared"), adapters(1, tmp_path / "own")
    assert cached.keys() == computed.keys() and all(torch.equal(cached[k], computed[k]) for k in cached)
    routers = [k for k in cached if k.endswith(".router")]
    assert routers and all(not torch.equal(cached[k], first[k]) for k in routers)
    assert all(torch.equal(cached[k], first[k]) for k in cached if k.endswith((".A", ".B")))


def test_sharded_checkpoint_gives_the_same_init(tiny_dir, tmp_path):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(tiny_dir)).save_pretrained(sharded, max_shard_size="100KB")
    files = set(weight_files(local_folder(str(sharded))).values())
    assert len(files) > 3
    cfg = AdapterConfig(family="lora", r=4, loftq_iters=2)
    one, _, rep_one = loftq_init(str(tiny_dir), cfg, cache_dir=tmp_path / "a")
    many, _, rep_many = loftq_init(str(sharded), cfg, cache_dir=tmp_path / "b")
    assert all(same_bits(b, bases(many)[n]) for n, b in bases(one).items())
    for n, layer in adapted_layers(one).items():
        assert torch.equal(layer.adapter.A, adapted_layers(many)[n].adapter.A)
    assert rep_one["layers"] == rep_many["layers"]


def test_bad_sources_and_mismatched_bases(tiny_dir, tmp_path):
    with pytest.raises(QmorError, match="Hugging Face cache"):
        local_folder("no-such-org/no-such-model-qmor")
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    shutil.copy(tiny_dir / "config.json", bin_only / "config.json")
    with pytest.raises(QmorError, match="safetensors"):
        weight_files(bin_only)
    _, meta, _ = loftq_init(str(tiny_dir), AdapterConfig(r=4), cache_dir=tmp_path / "cache")
    from qmor.model.tiny import make_tiny

    other = load_4bit(str(make_tiny(tmp_path / "wide", seed=0, hidden=32, layers=2)))
    attach(other, AdapterConfig(r=4))
    with pytest.raises(QmorError, match="shape"):
        apply_base_weights(other, meta.base_weights)
    with pytest.raises(QmorError, match="does not exist"):
        apply_base_weights(other, tmp_path / "nowhere")
    assert all(isinstance(m, AdaptedLinear) for m in adapted_layers(other).values())

    # a cache folder whose adapter tensors do not match (edited by hand, or written by another version) is refused
    fitted = Path(meta.base_weights) / "adapter.safetensors"
    save_file({k: v for k, v in load_file(fitted).items() if not k.endswith(".B")}, fitted)
    with pytest.raises(QmorError, match=r"LoftQ cache .* does not fit these adapters \(e\.g\. .*\.B\); delete"):
        loftq_init(str(tiny_dir), AdapterConfig(r=4), cache_dir=tmp_path / "cache")
