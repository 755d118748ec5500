"""attach / save / load on a tiny 4-bit Llama, for every family."""

import pytest
import torch
from conftest import perturb

from qmor import AdapterConfig, QmorError, attach, load_adapter, save_adapter
from qmor.adapters import ADAPTERS
from qmor.adapters.attach import AdapterMeta, adapted_layers, aux_loss, count_parameters, find_targets
from qmor.model.load import load_4bit
from qmor.model.quant import QuantConfig, is_4bit
from qmor.training.loss import ChunkedLoss, enable_checkpointing

KW = {"r": 4, "alpha": 8.0, "experts": 3, "expert_dropout": 0.0}


def batch(seed=0, n=4, t=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(8, 100, (n, t), generator=g)


def test_attach_wraps_decoder_linears_not_head(tiny_dir):
    model = load_4bit(str(tiny_dir))
    names = attach(model, AdapterConfig.from_dict(KW))
    assert len(names) == 2 * 7  # q k v o gate up down per layer
    assert all(is_4bit(layer.base) for layer in adapted_layers(model).values())
    assert "lm_head" not in names
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if ".adapter." in n)
    assert 0 < trainable < total


def test_targets_by_suffix_and_regex(tiny_dir):
    model = load_4bit(str(tiny_dir))
    assert len(find_targets(model, ["q_proj", "v_proj"])) == 4
    assert find_targets(model, r"model\.layers\.1\..*down_proj") == ["model.layers.1.mlp.down_proj"]
    with pytest.raises(QmorError, match="match no linear layer"):
        find_targets(model, ["query_key_value"])


@pytest.mark.parametrize("family", ADAPTERS)
def test_gradients_reach_adapters_only(tiny_dir, family):
    model = load_4bit(str(tiny_dir))
    attach(model, AdapterConfig.from_dict({"family": family, **KW}))
    perturb(model)
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if ".adapter." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("family", ADAPTERS)
def test_memorisation_loss_falls_on_4bit_base(tiny_dir, family):
    model = load_4bit(str(tiny_dir))
    attach(model, AdapterConfig.from_dict({"family": family, **KW, "r": 8, "alpha": 16.0}))
    params = [p for p in model.parameters() if p.requires_grad]
    lr = 3e-3 if family == "mora" else 1e-2
    opt = torch.optim.AdamW(params, lr=lr)
    ids = batch(n=2, t=16)
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        extra = aux_loss(model)
        (loss + 0.01 * extra if extra is not None else loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("family", ADAPTERS)
def test_gradient_checkpointing_gives_same_gradients(tiny_dir, family):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = load_4bit(str(tiny_dir))
        attach(model, AdapterConfig.from_dict({"family": family, **KW}))
        perturb(model)
        model.train()
        if checkpointing:
            enable_checkpointing(model)
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        ids = batch()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ADAPTERS)
def test_bf16_autocast_step_matches_fp32(tiny_dir, family):
    # the GPU training path (bf16 compute, autocast, checkpointing, chunked loss) on the CPU: every family must run
    # it, keep fp32 adapter gradients and agree with the fp32 step to bf16 precision
    grads, losses = [], []
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = load_4bit(str(tiny_dir), QuantConfig(compute_dtype=dtype), "cpu")
        attach(model, AdapterConfig.from_dict({"family": family, **KW}))
        perturb(model)
        model.train()
        enable_checkpointing(model)
        ids = batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            total, n = ChunkedLoss(model, chunk=16)(ids, ids)
            extra = aux_loss(model)
        loss = total / n + (0.01 * extra if extra is not None else 0)
        loss.backward()
        losses.append(loss.item())
        grads.append({k: p.grad for k, p in model.named_parameters() if p.requires_grad})
    assert losses[1] == pytest.approx(losses[0], rel=0.02)
    for name, g in grads[1].items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
    flat = [torch.cat([g[k].flatten() for k in sorted(g)]) for g in grads]
    assert torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0) > 0.98  # measured 0.990-0.992


@pytest.mark.parametrize("family", ADAPTERS)
def test_save_load_gives_identical_logits(tiny_dir, tmp_path, family):
    model = load_4bit(str(tiny_dir))
    cfg = AdapterConfig.from_dict({"family": family, **KW})
    attach(model, cfg)
    perturb(model)
    model.eval()
    ids = batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter", AdapterMeta(adapter=cfg, base_model=str(tiny_dir)))
    fresh = load_4bit(str(tiny_dir))
    meta = load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        after = fresh(input_ids=ids).logits
    assert meta.adapter == cfg and meta.base_model == str(tiny_dir)
    assert torch.equal(before, after)
    assert not list(tmp_path.glob(".*tmp"))  # nothing half-written left behind


def test_adapter_that_does_not_fit_is_refused(tiny_dir, tmp_path):
    model = load_4bit(str(tiny_dir))
    cfg = AdapterConfig(family="lora", r=4, targets=["q_proj"])
    attach(model, cfg)
    save_adapter(model, tmp_path / "a", AdapterMeta(adapter=cfg))
    other = load_4bit(str(tiny_dir))
    attach(other, AdapterConfig(family="lora", r=8, targets=["q_proj"]))
    from qmor.adapters.attach import load_adapter_weights

    with pytest.raises(QmorError, match="does not fit this model.*shape"):
        load_adapter_weights(other, tmp_path / "a")
    with pytest.raises(QmorError, match="holds no qmor_adapter.json"):
        load_adapter(load_4bit(str(tiny_dir)), tmp_path)


def test_missing_model_path_is_one_line(tmp_path):
    with pytest.raises(QmorError, match="does not exist") as err:
        load_4bit(str(tmp_path / "nowhere"))
    assert "\n" not in str(err.value)


def test_lora_matches_peft_lora(tiny_dir):
    from peft import LoraConfig, get_peft_model

    ours = load_4bit(str(tiny_dir))
    attach(ours, AdapterConfig(family="lora", r=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"]))
    perturb(ours)
    theirs = get_peft_model(load_4bit(str(tiny_dir)), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                  target_modules=["q_proj", "v_proj", "down_proj"]))
    layers = adapted_layers(ours)
    copied = 0
    with torch.no_grad():
        for name, module in theirs.named_modules():
            key = name.removeprefix("base_model.model.")
            if key in layers and hasattr(module, "lora_A"):
                module.lora_A["default"].weight.copy_(layers[key].adapter.A)
                module.lora_B["default"].weight.copy_(layers[key].adapter.B)
                copied += 1
    assert copied == len(layers) == 6
    ours.eval()
    theirs.eval()
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_float_storage_holds_the_same_codes(tiny_dir):
    """bfloat16 storage (what FSDP needs to shard 4-bit weights) changes the container, not the model."""
    from qmor import QuantConfig

    plain = load_4bit(str(tiny_dir))
    floaty = load_4bit(str(tiny_dir), QuantConfig(storage="bfloat16"))
    q = floaty.model.layers[0].self_attn.q_proj.weight
    assert q.dtype == torch.bfloat16
    assert torch.equal(q.data.view(torch.uint8).flatten(), plain.model.layers[0].self_attn.q_proj.weight.data.flatten())
    ids = batch()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, floaty(input_ids=ids).logits)
    attach(floaty, AdapterConfig.from_dict(KW))
    perturb(floaty)
    floaty(input_ids=ids, labels=ids).loss.backward()
    attach(plain, AdapterConfig.from_dict(KW))
    assert count_parameters(floaty) == count_parameters(plain)
    with pytest.raises(QmorError, match="quant storage must be"):
        load_4bit(str(tiny_dir), QuantConfig(storage="int4"))


def test_tied_weights_count_once():
    from transformers import LlamaForCausalLM

    from qmor.model.tiny import tiny_config

    cfg = tiny_config(100, hidden=32, layers=1)
    cfg.tie_word_embeddings = True
    model = LlamaForCausalLM(cfg)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert count_parameters(model) == (sum(p.numel() for p in model.parameters() if p.requires_grad),
                                       sum(p.numel() for p in model.parameters()))  # parameters() dedups ties


def test_adapter_metadata_has_a_name_of_its_own_and_old_folders_still_load(tiny_dir, tmp_path):
    import json

    from transformers.utils import find_adapter_config_file

    from qmor.adapters.attach import read_meta

    model = load_4bit(str(tiny_dir))
    cfg = AdapterConfig(family="lora", r=4, targets=["q_proj"])
    attach(model, cfg)
    perturb(model)
    folder = save_adapter(model, tmp_path / "a", AdapterMeta(adapter=cfg, base_model=str(tiny_dir),
                                                            chat_template="{{ messages }}"))
    assert {p.name for p in folder.iterdir()} == {"adapter.safetensors", "qmor_adapter.json"}
    assert find_adapter_config_file(str(folder)) is None  # transformers and PEFT no longer take it for theirs
    assert read_meta(folder).chat_template == "{{ messages }}"
    (folder / "qmor_adapter.json").rename(folder / "adapter_config.json")  # as earlier versions wrote it
    loaded = load_4bit(str(tiny_dir))
    assert load_adapter(loaded, folder).adapter == cfg
    x = torch.randint(8, 100, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(QmorError, match="holds a PEFT adapter.*PeftModel.from_pretrained"):
        read_meta(folder)


def test_metadata_written_with_a_merge_base_still_reads():
    meta = AdapterMeta(adapter=AdapterConfig(family="lora", r=4), base_model="org/base", init="loftq",
                       base_weights="/cache/q")
    assert "merge_base" not in meta.to_json()  # export takes the merge base as an option, never from here
    assert AdapterMeta.from_json({**meta.to_json(), "merge_base": "dequantized"}) == meta  # as earlier versions wrote
