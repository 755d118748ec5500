"""Sequence tiling (qmor.model.tile): tiled and untiled training give the same loss and gradients for every family,
on a dense and a mixture-of-experts model, packed or not, checkpointed or not; a checkpoint's recompute does not run
the tiles twice; dropout is replayed tile by tile."""

import sys
from pathlib import Path

import pytest
import torch
from archs import MIXTRAL, SUPPORTED, make_model

from qmor.adapters import ADAPTERS
from qmor.adapters.attach import attach, aux_loss
from qmor.adapters.config import AdapterConfig
from qmor.adapters.sira import SiRA, SiRAOptions
from qmor.model import tile as tiling
from qmor.model.load import load_4bit
from qmor.training.loss import ChunkedLoss, enable_checkpointing

sys.path.insert(0, str(Path(__file__).parent))

ROUTED = {"mor", "sira"}  # refused on experts: on an MoE model they adapt the attention
TOLERANCE = 1e-5  # relative error in fp32


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_dir):
    return {"dense": tiny_dir, "moe": make_model(tmp_path_factory.mktemp("tile") / "mixtral", MIXTRAL)}


def adapter(family: str, kind: str, dropout: float = 0.0) -> AdapterConfig:
    # capacity 1.0 makes SiRA drop tokens, so the batch-wide capacity is exercised; dropout off for exact equality
    options = SiRAOptions(capacity_factor=1.0, expert_dropout=0.0) if family == "sira" else None
    targets = "all-linear" if kind == "dense" or family in ROUTED else ["experts", "q_proj", "v_proj", "o_proj"]
    return AdapterConfig(family=family, r=4, targets=targets, dropout=dropout,
                         **({"options": options} if options else {}))


def step(folder, cfg: AdapterConfig, tokens: int, checkpointing=True, packed=False, seed=5):
    """(loss, {parameter: gradient}) of one training step, tiled in tiles of `tokens` (0: untiled)."""
    torch.manual_seed(0)
    model = load_4bit(str(folder), device="cpu")
    model.config.use_cache = False
    attach(model, cfg)
    with torch.no_grad():  # B = 0 at init would leave A without gradient; make every factor matter
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    model.train()
    if checkpointing:
        enable_checkpointing(model)
    if tokens:
        assert tiling.tile(model, tokens) > 0
    ids = torch.randint(8, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    inputs = {"position_ids": torch.cat([torch.arange(15), torch.arange(25)]).repeat(2, 1)} if packed else {}
    torch.manual_seed(seed)
    total, n = ChunkedLoss(model, 16)(input_ids=ids, labels=ids, **inputs)
    loss = total / n
    extra = aux_loss(model)
    if extra is not None:
        loss = loss + extra
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("family", list(ADAPTERS))
def test_tiled_training_gives_the_untiled_loss_and_gradients(models, family, kind, packed):
    cfg = adapter(family, kind)
    loss, grads = step(models[kind], cfg, 0, packed=packed)
    tiled_loss, tiled_grads = step(models[kind], cfg, 7, packed=packed)  # 80 tokens: 12 tiles, the last short
    assert relative(tiled_loss, loss) <= TOLERANCE
    assert tiled_grads.keys() == grads.keys()  # an expert no token chose gets no gradient either way
    assert sum(g.abs().sum() > 0 for g in grads.values()) > len(grads) // 2
    for name, g in grads.items():
        assert relative(tiled_grads[name], g) <= TOLERANCE, name


def test_sira_capacity_and_balance_loss_are_the_whole_batch(models):
    """Capacity is first come, first served over the batch and the balance loss uses its means: with a per-tile
    capacity the result would change, so tiles must carry the batch's routing."""
    cfg = adapter("sira", "dense")
    model = load_4bit(str(models["dense"]), device="cpu")
    attach(model, cfg)
    model.train()
    sira = next(m for m in model.modules() if isinstance(m, SiRA))
    x = torch.randn(1, 80, sira.router.shape[1])
    whole = sira.gates(x[0]).detach()
    balance = sira.aux_loss.detach()
    span = sira.open_span(80)
    sira.span = span
    tiles = [sira.gates(x[0, s:s + 7]).detach() for s in range(0, 80, 7)]
    sira.span = None
    assert torch.equal(torch.cat(tiles), whole)
    assert (whole > 0).sum() < 80 * sira.top_k  # capacity 1.0 dropped some token's expert
    torch.testing.assert_close(span.finish(), balance)
    alone = [sira.gates(x[0, s:s + 7]).detach() for s in range(0, 80, 7)]  # each tile on its own
    assert not torch.equal(torch.cat(alone), whole)


def test_a_checkpoint_recompute_does_not_run_the_tiles_again(models, monkeypatch):
    calls = []
    real = tiling.Tiles.run

    def counting(self, x):
        calls.append(x.shape)
        return real(self, x)

    monkeypatch.setattr(tiling.Tiles, "run", counting)
    step(models["dense"], adapter("lora", "dense"), 7, checkpointing=True)
    layers = 2
    # the MLP's tiles run once forward; the q, k, v projections run again in the recompute (attention needs them)
    assert len(calls) == layers * (1 + 3 * 2)


def test_dropout_is_replayed_in_each_tile(models):
    """With dropout the tiles draw their own masks; the backward recompute must draw the same ones, with or without
    the layer's checkpoint around it."""
    cfg = adapter("lora", "dense", dropout=0.3)
    loss, grads = step(models["dense"], cfg, 7, checkpointing=False)
    again, regrads = step(models["dense"], cfg, 7, checkpointing=True)
    torch.testing.assert_close(again, loss, rtol=0, atol=0)
    for name, g in grads.items():
        assert relative(regrads[name], g) <= TOLERANCE, name
    plain, _ = step(models["dense"], adapter("lora", "dense"), 7)
    assert relative(loss, plain) > 1e-4  # dropout was on


def test_tiling_keeps_names_and_adapters_and_survives_train_eval_switches(models):
    """A tiled model has the same parameter names and adapted layers (saving, aux losses and switching adapters see
    every one), computes what it computed before, also after the train/eval switches that make transformers
    re-kernelize its norms, and `untile` puts every module back."""
    from qmor.adapters.attach import adapted_layers

    model = load_4bit(str(models["dense"]), device="cpu")
    attach(model, adapter("lora", "dense"))
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    names, layers = [n for n, _ in model.named_parameters()], adapted_layers(model)
    modules = dict(model.named_modules())
    ids = torch.randint(8, model.config.vocab_size, (2, 6))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert tiling.tile(model, 4096) == 2 * 4 and tiling.tiled(model) == 4096
    assert [n for n, _ in model.named_parameters()] == names and adapted_layers(model) == layers
    for mode in (True, False):
        model.train(mode)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)  # 12 tokens: one tile
    tiling.untile(model)
    assert tiling.tiled(model) is None and dict(model.named_modules()) == modules


@pytest.mark.parametrize("arch", [a for a in SUPPORTED if a not in ("llama", "mixtral", "opt")])
def test_other_architectures_tile_exactly(tmp_path, arch):
    """Every other supported architecture: those whose norms fold into the tiles (qwen3's q/k norms, gemma's
    pre-feedforward norm, phi3's fused projections) and those whose MLP is tiled alone (gpt_neox's parallel
    attention, olmo2's norms after the modules). OPT's layers have no `mlp` module: it runs untiled, and the
    planner plans it untiled."""
    folder = make_model(tmp_path / arch, SUPPORTED[arch])
    cfg = AdapterConfig(family="lora", r=4)
    loss, grads = step(folder, cfg, 0)
    tiled_loss, tiled_grads = step(folder, cfg, 7)
    assert relative(tiled_loss, loss) <= TOLERANCE
    for name, g in grads.items():
        assert relative(tiled_grads[name], g) <= TOLERANCE, name


def test_a_model_without_mlp_modules_runs_and_plans_untiled(tmp_path, models):
    from qmor.plan import estimate, geometry

    model = load_4bit(str(make_model(tmp_path / "opt", SUPPORTED["opt"])), device="cpu")
    assert tiling.tile(model, 7) == 0
    g = geometry(model.config)
    assert not g.tileable and geometry(load_4bit(str(models["dense"]), device="cpu").config).tileable
    cfg = AdapterConfig(family="lora", r=4)
    assert estimate(g, 512, 1, cfg, tile=64).total_bytes == estimate(g, 512, 1, cfg).total_bytes
