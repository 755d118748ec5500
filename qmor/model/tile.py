"""Sequence tiling: each decoder layer's MLP and attention input projections run over tiles of the sequence.

Why: with checkpointing, the peak of a long-context step is one layer's recompute and backward, and most of it is
per token: the MLP's T x intermediate tensors (gate, up, their product and their gradients, about 9 x T x 14336 x 2
bytes on Llama-3.1-8B) and the norms' fp32 copies of T x hidden. Per-token work can be done a tile at a time: the
forward runs the tiles keeping nothing but the input, the backward recomputes each tile and differentiates it at
once, so those tensors exist for one tile only (unsloth's and Arctic's TiledMLP). Only the attention core sees the
whole sequence, through SDPA's O(T) kernels.

How: `tile(model, tokens)` puts a `_Standing` module in the place of each layer's `mlp` and of the attention's q/k/v
projections: it holds the same parameters and submodules under the same names (state dicts and adapter files are
unchanged) and runs the module through a `Tiles` runner, which also applies the norm in front of it; that norm's
place takes a `_Standing` identity, where the architecture feeds the norm to these modules alone (`FOLD`). A layer
without an `mlp` module (OPT's) runs untiled.
`untile(model)` puts the modules back. Tile after attaching adapters and untile before detaching them: a
projection replaced after tiling would miss the norm it reads.

The runner's autograd Function returns the parameters' gradients itself (one accumulation per step, as DDP's hooks
expect), replays each tile's RNG state and autocast, and hands a routed module that depends on other tokens (SiRA's
capacity and balance loss; such modules define `open_span`) the whole batch's routing, so the result is the
untiled one.
"""

from __future__ import annotations

import torch
from torch import nn

# architectures whose decoder layer feeds (attention norm, MLP norm) to the attention's input projections and the
# MLP alone, so the norms can run inside the tiles; elsewhere the MLP is tiled without its norm
FOLD = dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "granite", "phi3", "starcoder2"],
                     ("input_layernorm", "post_attention_layernorm"))
FOLD |= dict.fromkeys(["gemma2", "gemma3_text"], ("input_layernorm", "pre_feedforward_layernorm"))
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "qkv_proj")
TILE = 4096  # the default tile: large enough that a tile's matmuls run at full speed, while its T x intermediate
# tensors stay about the size of one dequantised MLP weight


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class _Box:
    """Hands the tiles' input to `_Tiled`'s backward: through `_Keep`'s saved tensor, or held as it is when it needs
    no gradient (the first layer's input: the checkpoint holds it anyway)."""

    ctx = None
    held = None

    def input(self) -> torch.Tensor:
        return self.ctx.saved_tensors[0] if self.ctx is not None else self.held


class _Keep(torch.autograd.Function):
    """Saves the input before the tiles run: non-reentrant checkpointing stops its recompute once every saved tensor
    is back, so a recompute ends here instead of running the tiles' forward a second time for nothing."""

    @staticmethod
    def forward(ctx, x, box):
        ctx.save_for_backward(x)
        box.ctx = ctx
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Tiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, box, runner, *params):
        ctx.box, ctx.runner, ctx.params = box, runner, params
        out, aux, ctx.replay = runner.run(x)
        return (out, *aux)

    @staticmethod
    def backward(ctx, grad_out, *grad_aux):
        x = ctx.box.input()
        grad_x, grads = ctx.runner.differentiate(x, grad_out, grad_aux, ctx.params, ctx.replay)
        return grad_x, None, None, *grads


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class Tiles:
    """`fn` (x (B, t, d) -> (B, t, d_out), token by token) run over tiles of `tokens` tokens of the flattened batch.
    `modules`: those whose trainable parameters `fn` uses."""

    def __init__(self, fn, modules: list[nn.Module], tokens: int):
        self.fn, self.modules, self.tokens = fn, modules, tokens

    def params(self) -> list[nn.Parameter]:
        seen = {}  # a shared expert adapter is one parameter in many modules
        for m in self.modules:
            seen.update((id(p), p) for p in m.parameters() if p.requires_grad)
        return list(seen.values())

    def spanned(self) -> list[nn.Module]:
        return [m for top in self.modules for m in top.modules() if hasattr(m, "open_span")]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * x.shape[1] <= self.tokens:
            return self.fn(x)
        params = self.params()
        if not (torch.is_grad_enabled() and (x.requires_grad or params)):
            out, aux, _ = self.run(x)
        else:
            box = _Box()
            if x.requires_grad:
                x = _Keep.apply(x, box)
            else:
                box.held = x
            out, *aux = _Tiled.apply(x, box, self, *params)
        for module, value in zip(self.spanned(), aux, strict=True):
            module.aux_loss = value if module.training else None
        return out

    def bounds(self, n: int) -> list[tuple[int, int]]:
        return [(s, min(s + self.tokens, n)) for s in range(0, n, self.tokens)]

    def run(self, x: torch.Tensor):
        """(output, aux values of the spanned modules, what a replay needs) of the tiles computed in turn."""
        flat = x.reshape(1, -1, x.shape[-1])  # (1, B T, d): tokens in the order an untiled module sees them
        routed = self.spanned()
        spans = [m.open_span(flat.shape[1]) for m in routed]
        states, out = [], None
        with torch.no_grad():
            try:
                for m, span in zip(routed, spans, strict=True):
                    m.span = span
                for s, e in self.bounds(flat.shape[1]):
                    states.append(_rng_state(x.device))
                    y = self.fn(flat[:, s:e])
                    if out is None:
                        out = y.new_empty(1, flat.shape[1], y.shape[-1])
                    out[:, s:e] = y
            finally:
                for m in routed:
                    m.span = None
        aux = [span.finish() for span in spans]
        device = x.device.type
        autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in {device, "cpu"}]
        return out.view(*x.shape[:-1], -1), aux, (states, spans, autocast)

    def differentiate(self, x, grad_out, grad_aux, params, replay):
        """(grad of x, grads of params) by recomputing and differentiating each tile in turn."""
        states, spans, autocast = replay
        routed = self.spanned()
        flat = x.reshape(1, -1, x.shape[-1]).detach()
        g = grad_out.reshape(1, -1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat) if x.requires_grad else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            casts = [torch.autocast(d, dtype=dtype, enabled=on) for d, on, dtype in autocast]
            for c in casts:
                c.__enter__()
            try:
                for m, span in zip(routed, spans, strict=True):
                    m.span = span
                for i, (s, e) in enumerate(self.bounds(flat.shape[1])):
                    _set_rng_state(states[i], x.device)
                    for span in spans:
                        span.tile = i
                    part = flat[:, s:e].detach().requires_grad_(grad_x is not None)
                    y = self.fn(part)
                    outs, seeds = [y], [g[:, s:e]]
                    for m, seed in zip(routed, grad_aux, strict=True):
                        if m.aux_loss is not None:  # this tile's share of the gradient of the batch's aux loss
                            outs.append(m.aux_loss)
                            seeds.append(seed)
                    wrt = ([part] if grad_x is not None else []) + list(params)
                    found = torch.autograd.grad(outs, wrt, seeds, allow_unused=True)
                    if grad_x is not None:
                        grad_x[:, s:e] = found[0]
                        found = found[1:]
                    for j, more in enumerate(found):
                        if more is not None:  # a parameter no tile used (an expert no token chose) keeps None
                            grads[j] = more if grads[j] is None else grads[j] + more
            finally:
                for m in routed:
                    m.span, m.aux_loss = None, None
                for c in reversed(casts):
                    c.__exit__(None, None, None)
        return (None if grad_x is None else grad_x.view_as(x)), grads


class _Standing(nn.Module):
    """Stands where `module` stood, holding the very same parameters, buffers and submodules under the same names
    (state dicts, adapter names and `.to()` see no change), and runs `run` instead of `module`'s forward.

    A new module in the tree rather than a forward replaced on the instance: transformers re-kernelizes modules of
    hub-kernel classes (its RMSNorms) when the model switches between train and eval, which drops an instance-level
    forward. Attributes that are not parameters or submodules are read from `module`, which `stands_for` names
(qmor.adapters.attach.adapted_layers looks through it)."""

    def __init__(self, module: nn.Module, run):
        super().__init__()
        self._parameters, self._buffers, self._modules = module._parameters, module._buffers, module._modules
        self._non_persistent_buffers_set = module._non_persistent_buffers_set
        object.__setattr__(self, "stands_for", module)  # not a submodule: its parameters are already ours
        object.__setattr__(self, "run", run)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.stands_for.training = self.training  # `module`'s own forward may read it (an MoE block's jitter)
        return self.run(x)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["stands_for"], name)


def _tile_module(parent: nn.Module, name: str, norm: nn.Module | None, tokens: int) -> None:
    module = getattr(parent, name)
    plain = type(module).forward.__get__(module)
    if norm is None:
        setattr(parent, name, _Standing(module, Tiles(plain, [module], tokens)))
        return
    normed = type(norm).forward.__get__(norm)
    setattr(parent, name, _Standing(module, Tiles(lambda x: plain(normed(x)), [module, norm], tokens)))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return list(getattr(decoder, "layers", []))


def tile(model: nn.Module, tokens: int) -> int:
    """Run every decoder layer's MLP (and, where `FOLD` allows, its norms and the attention's input projections)
    over tiles of `tokens` tokens; a batch of at most `tokens` tokens runs untiled. Returns the modules tiled."""
    untile(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    fold = FOLD.get(config.model_type)
    count = 0
    for layer in decoder_layers(model):
        if getattr(layer, "mlp", None) is None:
            continue
        if fold is None:
            _tile_module(layer, "mlp", None, tokens)
            count += 1
            continue
        attention_norm, mlp_norm = (getattr(layer, name) for name in fold)
        _tile_module(layer, "mlp", mlp_norm, tokens)
        # every projection reading the attention norm must apply it, adapted or not
        for name in ATTENTION_INPUTS:
            if getattr(layer.self_attn, name, None) is not None:
                _tile_module(layer.self_attn, name, attention_norm, tokens)
                count += 1
        for name in fold:  # their work is done in the tiles of the modules they feed
            setattr(layer, name, _Standing(getattr(layer, name), _identity))
        count += 1
    return count


def untile(model: nn.Module) -> None:
    """Put back every module `tile` stood in for."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _Standing):
                setattr(parent, name, child.stands_for)


def tiled(model: nn.Module) -> int | None:
    """The tile size `tile` set on `model` (None: untiled)."""
    for m in model.modules():
        if isinstance(m, _Standing) and isinstance(m.run, Tiles):
            return m.run.tokens
    return None
