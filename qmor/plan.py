"""Predict the peak GPU memory of a 4-bit + adapter training step before loading anything.

The model is built on the meta device (shapes only, no weights), so the linear shapes, the adapter parameter
counts (each family's `num_params`) and the target selection are exactly those `qmor.adapters.attach` would produce.

The peak of a step, for checkpointed training, comes at one of two moments, and only the larger one counts:
- the loss phase: every layer's checkpointed input is alive and the logits (or one chunk of them) are being
  differentiated: fp32 log-probs, their gradient and the incoming gradient, 12 bytes per logit;
- the layer phase: the backward pass recomputes one decoder layer and holds all its activations plus the
  gradients flowing through it.
Without checkpointing every layer's activations are alive during the loss phase.

Activations assume a Llama-style decoder layer (pre-norm attention + gated MLP, as in transformers) with SDPA's
flash or memory-efficient kernel: O(T) memory per head. `attention="eager"` adds the T x T score matrix (fp32
softmax + its compute-dtype copy). Other architectures get the same per-token formula from their config sizes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch

from qmor.adapters import check_family
from qmor.adapters.attach import find_targets
from qmor.adapters.config import AdapterConfig
from qmor.adapters.experts import adapter_owner
from qmor.errors import QmorError
from qmor.model.files import expand_builtin, is_local
from qmor.model.moe import QuantExperts, meta_experts
from qmor.model.tile import ATTENTION_INPUTS, FOLD, TILE, decoder_layers

GIB = 1024**3
CUDA_CONTEXT = 512 * 1024**2  # CUDA context, cuBLAS workspace and kernels: ~0.5 GiB, outside max_memory_allocated
ALLOCATOR_SLACK = 0.10  # the caching allocator reserves about this much more than the live tensors need
LOGIT_BYTES = 12  # at the softmax backward: fp32 log-probs + incoming fp32 gradient + outgoing fp32 gradient
ADAM_BYTES = {"adamw": 8.0, "paged-adamw-8bit": 2.0 + 8 / 256}  # state bytes per trainable parameter
ADAPTER_BYTES = 4  # adapters train in fp32: parameter and gradient are 4 bytes each


@dataclass(frozen=True)
class Layer:
    """One kind of decoder layer (an MoE model may mix dense and expert layers): what it computes per token."""

    count: int  # decoder layers of this kind
    intermediate: int  # MLP width m (MoE: top-k x expert width, what one token's routed experts compute)
    targets: tuple[tuple[int, int, float], ...]  # (d_in, d_out, share of the tokens it sees) of each adapted linear:
    # 1, or k/E for one of E experts of which a token's router picks k
    inputs: tuple[tuple[int, float], ...]  # (width, share) of each distinct tensor its adapted linears read
    target_parts: tuple[str, ...] = ()  # where each target sits: "mlp", "input" (q/k/v: reads the attention norm)
    # or "other" (o_proj); tiling runs "mlp" and, where the norm folds in, "input" a tile at a time
    input_parts: tuple[str, ...] = ()  # the same for each of `inputs`


@dataclass(frozen=True)
class Geometry:
    """The shapes that memory depends on, read from a model config."""

    layers: int  # decoder layers
    hidden: int  # residual stream width d
    heads: int  # attention heads
    q_dim: int  # heads x head_dim
    kv_dim: int  # key/value heads x head_dim
    vocab: int  # vocabulary size V
    tied: bool  # lm_head shares the embedding matrix
    quantized: tuple[tuple[int, int], ...]  # (d_in, d_out) of every 4-bit linear (all but the head)
    adapters: tuple[tuple[int, int], ...]  # (d_in, d_out) of every trainable adapter (a shared expert one once)
    kinds: tuple[Layer, ...]  # the decoder layers, grouped by what they compute
    other_params: int  # 16-bit parameters that are not linears: embeddings, norms (head counted separately)
    folded: bool = False  # tiling runs the norms inside the tiles (qmor.model.tile.FOLD)
    tileable: bool = True  # its layers have an `mlp` that tiling can run (OPT's have none: it runs untiled)

    @property
    def intermediate(self) -> int:
        """The widest MLP of any layer."""
        return max(k.intermediate for k in self.kinds)


@dataclass
class Plan:
    """Predicted peak memory of one training step; `parts` add up to `total_bytes`."""

    parts: dict[str, int]  # what is alive at the peak, by kind
    seq_len: int  # tokens per sequence
    batch: int  # sequences per step
    trainable: int  # adapter parameters
    peak_phase: str  # "loss" or "layer": which moment of the step is the peak
    phases: dict[str, int] = field(default_factory=dict)  # size of each phase's transient memory
    notes: list[str] = field(default_factory=list)  # assumptions worth printing
    host_bytes: int = 0  # host RAM (pinned) holding offloaded activations, outside the GPU total

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    def fits(self, gpu_gb: float) -> bool:
        return self.total_bytes <= gpu_gb * GIB

    def verdict(self, gpu_gb: float) -> str:
        spare = gpu_gb - self.total_bytes / GIB
        if self.fits(gpu_gb):
            return f"fits: {self.total_bytes / GIB:.2f} GiB of {gpu_gb:g} GiB ({spare:.2f} GiB spare)"
        return f"does not fit: {self.total_bytes / GIB:.2f} GiB needed, {gpu_gb:g} GiB available"

    def table(self) -> str:
        width = max(len(k) for k in self.parts)
        rows = [f"{'part':<{width}}  {'GiB':>8}  {'share':>6}"]
        for name, value in self.parts.items():
            rows.append(f"{name:<{width}}  {value / GIB:>8.3f}  {value / max(self.total_bytes, 1):>6.1%}")
        rows.append(f"{'total':<{width}}  {self.total_bytes / GIB:>8.3f}")
        rows.append(f"peak at the {self.peak_phase} phase (loss phase {self.phases['loss'] / GIB:.3f} GiB, "
                    f"layer phase {self.phases['layer'] / GIB:.3f} GiB); trainable parameters {self.trainable:,}")
        if self.host_bytes:
            rows.append(f"host RAM for the offloaded activations (pinned): {self.host_bytes / GIB:.2f} GiB")
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)

    def to_json(self) -> dict:
        return {"total_bytes": self.total_bytes, "parts": self.parts, "seq_len": self.seq_len, "batch": self.batch,
                "trainable": self.trainable, "peak_phase": self.peak_phase, "phases": self.phases,
                "host_bytes": self.host_bytes, "notes": self.notes}


def load_config(source: str):
    """A model config from a folder holding config.json, a config.json path, a hub id or a built-in name."""
    from transformers import AutoConfig

    source = expand_builtin(source)  # a built-in name is built once into the cache, like training does
    path = Path(source).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise QmorError(f"{source} is not valid JSON ({e.msg}); pass a model's config.json") from None
        if "model_type" not in data:
            raise QmorError(f"{source} has no model_type, so it is not a model config.json")
        try:
            return AutoConfig.for_model(data.pop("model_type"), **data)
        except ValueError as e:
            raise QmorError(f"{source}: {str(e).splitlines()[0]}") from None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QmorError(f"{source} has no config.json; pass a model folder, a config.json or a hub id")
        return AutoConfig.from_pretrained(str(path))
    if is_local(source) or source.endswith(".json") or source.count("/") > 1:
        raise QmorError(f"{source} does not exist; pass a model folder, a config.json or a hub id")
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise QmorError(f"could not read the config of {source!r} ({first}); offline, pass a local folder or "
                        "config.json instead") from None


# linears that read one tensor (the normalised attention or MLP input): their adapters save it once between them
INPUT_GROUPS = dict.fromkeys(["q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn"], "attn")
INPUT_GROUPS |= dict.fromkeys(["gate_proj", "up_proj", "gate_up_proj", "w1", "w3", "c_fc", "fc1"], "mlp")
LAYER_INDEX = re.compile(r"\.(\d+)\.")  # the decoder layer of a module name: its first numbered part


def part_of(name: str) -> str:
    """Where a linear (or an input group) sits in its layer, for tiling: "mlp", "input" or "other"."""
    if name == "mlp" or ".mlp." in name:
        return "mlp"
    return "input" if name == "attn" or name.rsplit(".", 1)[-1] in ATTENTION_INPUTS else "other"


def shared_inputs(names: list[str], linears: dict, share: dict[str, float]) -> dict[str, tuple[int, float]]:
    """{input: (width, share)} of the distinct tensors that the linears `names` (one layer's) read; each expert
    reads a tensor of its own, the tokens routed to it."""
    return {n if share[n] < 1 else INPUT_GROUPS.get(n.rsplit(".", 1)[-1], n): (linears[n].in_features, share[n])
            for n in names}


def _layer_of(name: str) -> int:
    match = LAYER_INDEX.search(name)
    return int(match[1]) if match else -1


def _targets_key(targets) -> str:
    return json.dumps(targets)


@lru_cache(maxsize=32)
def _geometry(config_json: str, targets_json: str, expert_adapters: str) -> Geometry:
    from transformers import AutoConfig, AutoModelForCausalLM

    data = json.loads(config_json)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    top_k = getattr(text, "num_experts_per_tok", 1)
    routed = meta_experts(model, top_k)  # MoE: experts become 4-bit linears
    head = model.get_output_embeddings()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    names = find_targets(model, json.loads(targets_json))
    # a tied head's weight is the embedding, which stays among the other parameters (and the head then adds none)
    untied_head = head is not None and head.weight is not model.get_input_embeddings().weight
    linear_params = {id(m.weight) for m in linears.values()} | ({id(head.weight)} if untied_head else set())
    other = sum(p.numel() for p in model.parameters() if id(p) not in linear_params)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    # MoE: the layers whose MLP is routed experts (Qwen3-MoE's mlp_only_layers and decoder_sparse_step leave others
    # dense), each expert map seeing k/E of the tokens
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, QuantExperts)}
    sparse = {_layer_of(n) for n in blocks}
    share = {n: next((top_k / m.num_experts for b, m in blocks.items() if n.startswith(b + ".")), 1.0) for n in names}
    dense_width = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    by_layer: dict[int, list[str]] = {}
    for n in names:
        by_layer.setdefault(_layer_of(n), []).append(n)
    kinds: dict[Layer, int] = {}
    for i in range(text.num_hidden_layers):
        own = by_layer.get(i, [])
        inputs = shared_inputs(own, linears, share)
        kind = Layer(1, routed if i in sparse else dense_width,
                     tuple((linears[n].in_features, linears[n].out_features, share[n]) for n in own),
                     tuple(inputs.values()), tuple(part_of(n) for n in own), tuple(part_of(n) for n in inputs))
        kinds[kind] = kinds.get(kind, 0) + 1
    owners = {adapter_owner(n, expert_adapters): linears[n] for n in names}  # a shared expert adapter counts once
    return Geometry(
        layers=text.num_hidden_layers, hidden=text.hidden_size, heads=heads,
        q_dim=heads * head_dim, kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        vocab=text.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)),
        quantized=tuple((m.in_features, m.out_features) for m in linears.values()),
        adapters=tuple((m.in_features, m.out_features) for m in owners.values()),
        kinds=tuple(replace(kind, count=n) for kind, n in kinds.items()),
        other_params=other, folded=text.model_type in FOLD,
        tileable=any(getattr(layer, "mlp", None) is not None for layer in decoder_layers(model)),
    )


def geometry(model_config, targets="all-linear", expert_adapters: str = "per-expert") -> Geometry:
    """Shapes of `model_config` (a transformers config or its dict) with the adapted linears for `targets`, MoE
    experts' adapters in the `expert_adapters` layout (AdapterConfig's)."""
    data = model_config if isinstance(model_config, dict) else model_config.to_dict()
    return _geometry(json.dumps(data, sort_keys=True, default=str), _targets_key(targets), expert_adapters)


def nf4_bytes(numel: int, double_quant: bool = True, blocksize: int = 64) -> int:
    """Packed NF4 codes (half a byte each) plus the block scales: uint8 + one fp32 per 256 blocks with double
    quantisation, else one fp32 per block."""
    blocks = -(-numel // blocksize)
    scales = blocks + 4 * -(-blocks // 256) if double_quant else 4 * blocks
    return numel // 2 + scales


def _adapters(g: Geometry, cfg: AdapterConfig, a: int, autocast: bool, layer: Layer, parts: set[str]) -> float:
    """Bytes per token that the adapters of `parts` of a layer keep for backward."""
    # a frozen 4-bit linear needs no input for backward, only its adapter does
    adapter_bytes = a if autocast else 4
    spec = check_family(cfg.family)
    target_parts = layer.target_parts or ("other",) * len(layer.targets)
    input_parts = layer.input_parts or ("other",) * len(layer.inputs)
    total = 0.0
    if spec.keeps_input:
        if adapter_bytes == a:  # once, however many read it
            total += a * sum(w * share for (w, share), p in zip(layer.inputs, input_parts, strict=True) if p in parts)
        else:  # without autocast each adapter keeps an fp32 copy
            total += 4 * sum(d_in * share for (d_in, _, share), p in zip(layer.targets, target_parts, strict=True)
                             if p in parts)
    for (d_in, d_out, share), p in zip(layer.targets, target_parts, strict=True):
        if p in parts:
            total += adapter_bytes * spec.saved_per_token(d_in, d_out, cfg.hyperparams) * share
    return total


ALL_PARTS = {"mlp", "input", "other"}
NORM = 4  # bytes per hidden unit an RMSNorm keeps: its fp32 input (plus 4 bytes of 1/rms per token)


def layer_activation(g: Geometry, cfg: AdapterConfig, a: int, tokens: int, batch: int, attention: str,
                     autocast: bool = True, layer: Layer | None = None) -> int:
    """Bytes one decoder layer of kind `layer` (None: the kind that saves most) saves for backward (what a
    checkpoint recomputes), for `tokens` tokens in all, untiled. `autocast`: the adapters run in the compute dtype
    (bf16 autocast); otherwise they compute in their own fp32."""
    if layer is None:
        return max(layer_activation(g, cfg, a, tokens, batch, attention, autocast, k) for k in g.kinds)
    d, m = g.hidden, layer.intermediate
    per_token = 2 * (NORM * d + 4)  # two RMSNorms: fp32 input and 1/rms (the frozen scale saves no output)
    per_token += a * (2 * g.q_dim + 2 * g.kv_dim) + 4 * g.heads  # attention: rotated q, k, v, output, logsumexp
    per_token += 3 * a * m  # MLP: gate, silu(gate), up
    per_token += _adapters(g, cfg, a, autocast, layer, ALL_PARTS)
    total = int(per_token * tokens)
    if attention == "eager":
        total += batch * g.heads * (tokens // batch) ** 2 * (4 + a)  # fp32 softmax + compute-dtype copy
    return total


def tiled_layer(g: Geometry, cfg: AdapterConfig, a: int, tokens: int, batch: int, attention: str, autocast: bool,
                layer: Layer, tile: int, checkpointing: bool) -> tuple[int, int]:
    """(bytes the layer keeps for the whole sequence, bytes of its tile's working set and of the gradients in
    flight) of a layer run in tiles of `tile` tokens (qmor.model.tile): only the attention core, what its output
    projection keeps and the inputs of the tiled parts are per sequence."""
    d, m = g.hidden, layer.intermediate
    per_token = a * (2 * g.q_dim + 2 * g.kv_dim) + 4 * g.heads  # attention core: rotated q, k, v, output, logsumexp
    per_token += a * d  # the MLP's input, kept by its tiles (the q/k/v tiles keep the layer input, the checkpoint's)
    per_token += _adapters(g, cfg, a, autocast, layer, {"other"} if g.folded else {"other", "input"})
    if not g.folded:
        per_token += 2 * (NORM * d + 4)
    if not checkpointing and g.folded:
        per_token += a * d  # the layer input, which a checkpoint would have kept
    whole = int(per_token * tokens)
    if attention == "eager":
        whole += batch * g.heads * (tokens // batch) ** 2 * (4 + a)
    flight = tokens * 2 * a * d  # gradients beside the tiles: the layer output's (incoming) and its input's
    # a tile: what its MLP (or q/k/v projections) keep, and the gradient of its widest tensor in flight
    norm = NORM * d + 4 if g.folded else 0
    mlp = norm + 3 * a * m + _adapters(g, cfg, a, autocast, layer, {"mlp"}) + a * m
    inputs = norm + a * d + _adapters(g, cfg, a, autocast, layer, {"input"}) + a * (g.q_dim + 2 * g.kv_dim) \
        if g.folded else 0
    return whole, flight + int(min(tile, tokens) * max(mlp, inputs))


def check_step(seq_len: int, batch: int, checkpointing: bool, offload: bool, optimizer: str, attention: str) -> None:
    """Refuse, in one line, a step the planner cannot describe."""
    if seq_len < 1 or batch < 1:
        raise QmorError(f"sequence length and batch must be positive, got seq {seq_len}, batch {batch}")
    if offload and not checkpointing:
        raise QmorError("offloading moves checkpointed activations to CPU RAM, so it needs checkpointing; "
                        "drop --no-gradient-checkpointing or --offload-activations")
    if optimizer not in ADAM_BYTES:
        raise QmorError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(ADAM_BYTES)}")
    if attention not in ("sdpa", "eager"):
        raise QmorError(f"attention must be 'sdpa' or 'eager', got {attention!r}")


def resident(g: Geometry, adapter_cfg: AdapterConfig, a: int, optimizer: str, double_quant: bool
             ) -> tuple[dict[str, int], int]:
    """What stays in memory through the step whatever its length (weights, the adapters, their gradients and
    optimizer states), by part, and the number of trainable parameters."""
    module = check_family(adapter_cfg.family).module
    trainable = sum(module.num_params(d_in, d_out, adapter_cfg.hyperparams) for d_in, d_out in g.adapters)
    head = 0 if g.tied else g.vocab * g.hidden
    parts = {
        "4-bit weights": sum(nf4_bytes(i * o, double_quant) for i, o in g.quantized),
        "16-bit embeddings + head": (g.other_params + head) * a,
        "adapter parameters": trainable * ADAPTER_BYTES,
        "adapter gradients": trainable * ADAPTER_BYTES,
        "optimizer states": int(trainable * ADAM_BYTES[optimizer]),
    }
    return parts, trainable


def estimate(
    model_config,
    seq_len: int,
    batch: int,
    adapter_cfg: AdapterConfig,
    checkpointing: bool = True,
    offload: bool = False,
    loss_chunk: int | None = 1024,
    optimizer: str = "adamw",
    param_dtype_bytes: int = 2,
    attention: str = "sdpa",
    device: str = "cuda",
    double_quant: bool = True,
    autocast: bool = True,
    tile: int = 0,
) -> Plan:
    """Peak memory of one training step. `loss_chunk` None or 0 means logits for the whole sequence at once;
    `param_dtype_bytes` is the compute dtype's size (2 for bf16 on CUDA, 4 on the fp32 CPU path), used for
    embeddings, head and activations; `device="cpu"` drops the CUDA context and allocator slack; `autocast`
    False is 16-bit compute without autocast (a GPU without bf16), where every adapter keeps an fp32 copy of its
    input. `tile`: tokens per tile of each layer's MLP and attention input projections (qmor.model.tile; 0:
    untiled); a batch of at most `tile` tokens runs untiled."""
    check_step(seq_len, batch, checkpointing, offload, optimizer, attention)
    g = model_config if isinstance(model_config, Geometry) else geometry(model_config, adapter_cfg.targets,
                                                                         adapter_cfg.expert_adapters)
    a, tokens = param_dtype_bytes, seq_len * batch
    parts, trainable = resident(g, adapter_cfg, a, optimizer, double_quant)

    boundary = tokens * g.hidden * a  # one layer's input: what a checkpoint keeps
    largest = max(i * o for i, o in g.quantized)
    dequant = largest * a  # a 4-bit matmul dequantises its weight, one layer at a time (the backward uses a view)
    if device == "cpu" and a < 4:
        dequant += largest * 4  # bitsandbytes' CPU path dequantises to fp32 before casting to the compute dtype
    kept, working = {}, {}  # per kind: what the layer keeps for backward, and its recompute's working set
    for k in g.kinds:
        if tile and tokens > tile and g.tileable:
            kept[k], working[k] = tiled_layer(g, adapter_cfg, a, tokens, batch, attention, autocast, k, tile,
                                              checkpointing)
        else:  # what the layer keeps, and the gradient of the MLP's T x intermediate tensor in flight (backward
            # frees each saved tensor as it goes: measured, the peak is what is kept plus about one such gradient)
            kept[k] = layer_activation(g, adapter_cfg, a, tokens, batch, attention, autocast, k)
            working[k] = tokens * a * k.intermediate
    host = 0
    if not checkpointing:
        saved = sum(k.count * kept[k] for k in g.kinds)
    elif offload:
        saved = 2 * boundary  # the layer being computed and the copy on its way back from host memory
        host = g.layers * boundary + tokens * g.hidden * 4  # every layer input + the final norm's fp32 input
    else:
        saved = g.layers * boundary
    chunk = min(loss_chunk, tokens) if loss_chunk else tokens
    loss_phase = chunk * g.vocab * LOGIT_BYTES + tokens * g.hidden * 4  # + fp32 gradient of the hidden states
    # the backward runs one layer at a time: the kind whose recompute and gradients in flight are largest counts
    layer_phase = max((kept[k] if checkpointing else 0) + dequant + working[k] for k in g.kinds)
    phase = "loss" if loss_phase >= layer_phase else "layer"

    parts["activations (saved)"] = saved
    parts["activations (recompute + gradients)"] = layer_phase if phase == "layer" else 0
    parts["logits + loss"] = loss_phase if phase == "loss" else 0
    kernel = "SDPA flash/memory-efficient kernel, O(T) per head" if attention == "sdpa" else "eager, T x T scores"
    notes = [f"attention: {kernel}", f"loss: {f'chunks of {chunk} tokens' if chunk < tokens else 'whole sequence'}",
             f"layers: {f'tiles of {tile} tokens' if tile and tokens > tile and g.tileable else 'untiled'}"]
    if device == "cuda":
        parts["allocator slack"] = int(ALLOCATOR_SLACK * (saved + max(loss_phase, layer_phase)))
        parts["CUDA context"] = CUDA_CONTEXT
    return Plan(parts=parts, seq_len=seq_len, batch=batch, trainable=trainable, peak_phase=phase,
                phases={"loss": loss_phase, "layer": layer_phase}, notes=notes, host_bytes=host)


def longest_sequence(model_config, gpu_gb: float, batch: int, adapter_cfg: AdapterConfig, step: int = 256,
                     limit: int = 1 << 21, **kwargs) -> int:
    """The longest multiple of `step` tokens whose plan fits in `gpu_gb` GiB (0 if not even `step` fits)."""
    g = model_config if isinstance(model_config, Geometry) else geometry(model_config, adapter_cfg.targets,
                                                                         adapter_cfg.expert_adapters)

    def fits(n: int) -> bool:
        return estimate(g, n * step, batch, adapter_cfg, **kwargs).fits(gpu_gb)

    top = limit // step  # the most it can be, in steps
    lo, hi = 0, 1  # fits(lo * step) holds (or lo == 0); find the first hi that does not fit
    while hi <= top and fits(hi):
        lo, hi = hi, hi * 2
    if hi > top:  # doubling passed the limit: what lies between lo and the limit is still to search
        if fits(top):
            return top * step
        hi = top
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


SMALLEST_TILE = 512  # below this a tile's matmuls are too small to keep a GPU busy, and each tile dequantises again


def pick_tile(model_config, seq_len: int, batch: int, adapter_cfg: AdapterConfig, gpu_gb: float, tile: int = TILE,
              **kwargs) -> int | None:
    """The largest tile, `tile` or a power-of-two fraction of it down to SMALLEST_TILE, whose plan fits in `gpu_gb`
    GiB (larger tiles run faster); None if none does."""
    g = model_config if isinstance(model_config, Geometry) else geometry(model_config, adapter_cfg.targets,
                                                                         adapter_cfg.expert_adapters)
    while tile >= SMALLEST_TILE:
        if estimate(g, seq_len, batch, adapter_cfg, tile=tile, **kwargs).fits(gpu_gb):
            return tile
        tile //= 2
    return None
