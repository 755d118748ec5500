"""A family is its file plus one registry line: a seventh family defined only here trains, plans, saves, loads,
merges and exports to PEFT through qmor's own entry points; its options travel through the adapter config."""

import dataclasses
import json
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from qmor.adapters import ADAPTERS, build_adapter, check_family, merge_refusal, mergeable, option_fields
from qmor.adapters.attach import AdapterMeta
from qmor.adapters.config import AdapterConfig
from qmor.adapters.factor import low_rank
from qmor.adapters.family import Family, NoOptions, check_options, check_rank, option
from qmor.adapters.lora import LoRA
from qmor.config import from_dict, to_dict
from qmor.data.pipeline import DataConfig
from qmor.errors import QmorError
from qmor.export.exporter import export_merged, export_peft
from qmor.model.load import load_trained
from qmor.plan import estimate, load_config
from qmor.training.config import TrainConfig, from_json
from qmor.training.loop import train


@dataclass
class ScaledOptions:
    gain: float = option(2.0, "scaled LoRA: output gain, in place of alpha / r", 2.0, low=0.0, open_low=True)
    noise: float = option(0.0, "scaled LoRA: std of noise on the output while training", 0.0, low=0.0,
                          training_only=True)

    def __post_init__(self) -> None:
        check_options(self)


class ScaledLoRA(nn.Module):
    """Δy = gain · U V x: a LoRA whose scale is its own option, not alpha / r."""

    def __init__(self, d_in: int, d_out: int, cfg: AdapterConfig):
        super().__init__()
        self.gain, self.noise, self.peft_scale = cfg.options.gain, cfg.options.noise, cfg.alpha / cfg.r
        self.V = nn.Parameter(torch.randn(cfg.r, d_in) / math.sqrt(d_in))  # (r, d_in)
        self.U = nn.Parameter(torch.zeros(d_out, cfg.r))  # (d_out, r)

    @staticmethod
    def num_params(d_in: int, d_out: int, cfg: AdapterConfig) -> int:
        return cfg.r * (d_in + d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.V.T) @ self.U.T * self.gain
        return y + self.noise * torch.randn_like(y) if self.training and self.noise else y

    def delta_weight(self) -> torch.Tensor:
        return self.gain * self.U @ self.V

    @torch.no_grad()
    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.V.float().cpu(), (self.U * (self.gain / self.peft_scale)).float().cpu()  # PEFT scales alpha / r

    @torch.no_grad()
    def fit(self, residual: torch.Tensor) -> None:
        U, V = low_rank(residual / self.gain, self.V.shape[0])
        self.U.copy_(U)
        self.V.copy_(V)


TOY = Family(module=ScaledLoRA, options=ScaledOptions, scaled=False, merges=True, peft=ScaledLoRA.peft_factors,
             why_not="", keeps_input=True, saved_per_token=lambda d_in, d_out, cfg: cfg.r, check_shape=check_rank,
             fitted=("U", "V"), lr=3e-4, rank_means="the rank of U and V",
             input_factor="V")


@pytest.fixture(autouse=True)
def toy(monkeypatch, tmp_path_factory):
    monkeypatch.setitem(ADAPTERS, "toy", TOY)  # the one registry line
    monkeypatch.setenv("QMOR_CACHE", str(tmp_path_factory.getbasetemp() / "qmor-cache"))


def test_toy_family_trains_plans_saves_loads_merges_and_exports(tiny_dir, tmp_path):
    cfg = AdapterConfig(family="toy", r=4, alpha=8.0, init="loftq", options={"gain": 3.0, "noise": 0.01})
    models = []
    run = train(TrainConfig(model=str(tiny_dir), output=str(tmp_path / "run"), adapter=cfg, lr=5e-3, max_steps=4,
                            batch_size=4, log_steps=1, eval_generate=0, save_steps=0, device="cpu",
                            data=DataConfig(source="uuid", num_examples=8, max_len=80)),
                on_step=lambda step, model: models.append(model))
    assert run["step"] == 4 and math.isfinite(run["loss"])
    saved = json.loads((tmp_path / "run" / "adapter" / "qmor_adapter.json").read_text())["adapter"]
    assert saved["family"] == "toy" and saved["options"] == {"gain": 3.0, "noise": 0.01}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["adapter"] == saved

    # loads: the saved adapter on its LoftQ base gives the trained model's logits
    trained = models[-1].eval()
    loaded, meta = load_trained(tmp_path / "run" / "adapter", device="cpu")
    assert meta.adapter == cfg and isinstance(loaded.model.layers[0].self_attn.q_proj.adapter, ScaledLoRA)
    ids = torch.randint(8, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, trained(input_ids=ids).logits)

    # plans: the same parameters and saved activations as a LoRA of the same rank, which it declares
    config = load_config(str(tiny_dir))
    plan = estimate(config, 256, 2, cfg, device="cpu")
    assert plan.trainable == sum(p.numel() for p in loaded.parameters() if p.requires_grad)
    assert plan.parts == estimate(config, 256, 2, AdapterConfig(family="lora", r=4), device="cpu").parts

    # merges (the export checks its logits against the 4-bit model before it keeps the folder) and goes to PEFT
    # (checked the same way through peft's own loader)
    merged = export_merged(tmp_path / "run", tmp_path / "merged", device="cpu")
    assert merged["max_abs"] <= merged["tolerance"]
    peft = export_peft(tmp_path / "run", tmp_path / "peft", device="cpu")
    assert peft["targets"] and (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["lora_alpha"] == 8.0


def test_toy_options_travel_through_the_config_and_the_messages():
    cfg = AdapterConfig(family="toy", options={"gain": 3.0})
    assert from_dict(AdapterConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    # flat keys, as CLI flags give them and older files wrote them (with every other family's keys beside)
    flat = {"family": "toy", "r": 8, "gain": 3.0, "mora_kind": "auto", "experts": 4, "top_k": 2}
    assert from_dict(AdapterConfig, flat) == cfg
    assert from_json({"adapter": {"family": "toy", "gain": 3.0}}).adapter.options == ScaledOptions(gain=3.0)
    with pytest.raises(QmorError, match=r"gain must be > 0, got 0; pass e\.g\. --gain 2\.0"):
        from_dict(AdapterConfig, {"family": "toy", "gain": 0})
    with pytest.raises(QmorError, match=r"unknown AdapterConfig field\(s\) \['gian'\]; valid fields: .*'gain'"):
        from_dict(AdapterConfig, {"family": "toy", "gian": 3.0})
    with pytest.raises(QmorError, match=r"unknown toy option\(s\) \['kind'\]; its options are \['gain', 'noise'\]"):
        AdapterConfig(family="toy", options={"kind": "rope"})

    # what a flag table reads
    toy = {f.name: f for f in option_fields() if f.family == "toy"}
    assert toy["gain"].flag == "--gain" and toy["gain"].type is float and toy["gain"].default == 2.0
    assert toy["gain"].spec.help.startswith("scaled LoRA") and toy["noise"].spec.training_only

    # LoftQ's cache key: a training-only option leaves it alone, the others change it
    key = cfg.fit_settings()
    assert AdapterConfig(family="toy", options={"gain": 3.0, "noise": 0.5}, dropout=0.1).fit_settings() == key
    assert AdapterConfig(family="toy", options={"gain": 2.0}).fit_settings() != key

    # the messages that list families read the registry
    assert mergeable() == ("lora", "moslora", "mora", "toy")
    assert merge_refusal("sira", "chat with it").endswith("or train lora, moslora, mora or toy to merge")
    with pytest.raises(QmorError, match="choose one of lora, moslora, mora, mor, sira or toy"):
        AdapterConfig(family="dora")


def declaration(**change) -> dict:
    fields = {f.name: getattr(TOY, f.name) for f in dataclasses.fields(Family)}
    return {**fields, **change}


def test_a_family_that_declares_too_little_fails_where_it_is_declared():
    fields = declaration()
    del fields["merges"]
    with pytest.raises(TypeError, match="merges"):
        Family(**fields)

    class NoFit(nn.Module):
        forward = delta_weight = ScaledLoRA.forward
        num_params = ScaledLoRA.num_params

    with pytest.raises(TypeError, match="lacks fit"):
        Family(**declaration(module=NoFit))

    @dataclass
    class Bare:
        gain: float = 2.0  # a plain field: no help or example for the CLI and the app

    with pytest.raises(TypeError, match="option gain must be declared with option"):
        Family(**declaration(options=Bare))
    with pytest.raises(TypeError, match="must say why_not"):
        Family(**declaration(merges=False))
    with pytest.raises(TypeError, match="lr must be a positive float"):
        Family(**declaration(lr=0.0))
    assert Family(**declaration(options=NoOptions)).options is NoOptions


def test_a_registry_entry_that_is_not_a_declaration_is_refused(monkeypatch):
    monkeypatch.setitem(ADAPTERS, "bare", LoRA)
    with pytest.raises(TypeError, match="not a Family declaration"):
        check_family("bare")


def test_files_of_older_versions_still_load():
    """qmor_adapter.json and config.json before options were nested: every family's knobs, flat."""
    old = {"family": "sira", "r": 4, "alpha": 8.0, "dropout": 0.0, "targets": "all-linear", "mora_kind": "auto",
           "experts": 3, "top_k": 1, "capacity_factor": 1.5, "expert_dropout": 0.0, "aux_loss_weight": 0.02,
           "init": "default", "loftq_iters": 1}
    meta = AdapterMeta.from_json({"adapter": old, "base_model": "tiny"})
    assert (meta.adapter.options.experts, meta.adapter.options.top_k, meta.adapter.options.capacity_factor) == \
        (3, 1, 1.5)
    mora = from_json({"adapter": {**old, "family": "mora", "mora_kind": "rope"}}).adapter
    assert mora.options.kind == "rope" and not hasattr(mora.options, "experts")
    # another family's flat key is still checked (a bad value is refused whichever family runs)
    with pytest.raises(QmorError, match="experts must be >= 1"):
        from_dict(AdapterConfig, {**old, "family": "lora", "experts": 0})
    # a run's config for one family, another family picked: the default's options do not carry over
    assert from_json({"adapter": {"family": "sira", "top_k": 3}}).adapter.options.top_k == 3


def test_every_family_declares_the_checks_build_adapter_runs():
    """MoRA's r_hat check and the shared rank check are declarations, reached through build_adapter."""
    with pytest.raises(QmorError, match=r"MoRA rank r=40 gives a 72x72 matrix, larger than q \(48->80\)"):
        build_adapter(AdapterConfig(family="mora", r=40), 48, 80, "q")
    with pytest.raises(QmorError, match=r"rank r=49 is larger than q allows \(48->80, so at most 48\)"):
        build_adapter(AdapterConfig(family="toy", r=49), 48, 80, "q")
    assert [name for name, spec in ADAPTERS.items() if spec.peft] == ["lora", "moslora", "toy"]
