"""Checkpointed layer inputs kept in pinned host memory and copied back one layer ahead of the backward pass.

Why: with checkpointing, every decoder layer's input (T x hidden) waits on the GPU for the backward pass: 32 x T x
4096 x 2 bytes on an 8B model, 1 GiB per 4k tokens. torch's `save_on_cpu` moves them out, but it copies in and out
on the compute stream, when the tensor is saved and when the recompute asks for it, so the GPU waits for every copy.
Here the copy out runs on a side stream, and unpacking one layer's input starts the copy back of the one saved
before it (the next one backward needs), so that copy overlaps this layer's recompute and backward: two layer inputs
are on the GPU at a time, the rest in host RAM (`qmor.plan` reports how much).

Used as saved-tensor hooks around the decoder's forward (`qmor.training.loss.ChunkedLoss`): inside a checkpointed
layer the checkpoint's own hooks apply, so what reaches these are the layer inputs (and the final norm's input).
Tensors under `min_bytes` stay where they are. On a CPU there is nothing to move; the bookkeeping runs the same.
"""

from __future__ import annotations

import torch
from torch.autograd.graph import saved_tensors_hooks

MIN_BYTES = 1 << 20  # smaller saved tensors stay on the device: copying them costs more than they hold


class Offload(saved_tensors_hooks):
    def __init__(self, min_bytes: int | None = None):
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self.host: list[torch.Tensor] = []  # every offloaded tensor's host copy, in the order they were saved
        self.device: list[torch.device] = []
        self.back: dict[int, torch.Tensor] = {}  # copies on their way back to (or already on) the device
        self.ready: dict[int, torch.cuda.Event] = {}
        self.stream = None  # the side stream of the copies (CUDA only)
        self.fetched: list[int] = []  # the order in which copies back started (tests read it)
        super().__init__(self.pack, self.unpack)

    def pack(self, t: torch.Tensor):
        if t.numel() * t.element_size() < self.min_bytes:
            return t
        if t.device.type == "cuda":
            if self.stream is None:
                self.stream = torch.cuda.Stream(t.device)
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # page-locked: the copies run async
            self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is complete
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # its memory is not reused before the copy is done
        else:
            host = t  # already in host memory
        self.host.append(host)
        self.device.append(t.device)
        return len(self.host) - 1

    def fetch(self, i: int) -> None:
        """Start copying tensor `i` back to its device."""
        if i < 0 or i in self.back:
            return
        self.fetched.append(i)
        host, device = self.host[i], self.device[i]
        if device.type != "cuda":
            self.back[i] = host
            return
        current = torch.cuda.current_stream(device)
        back = torch.empty_like(host, device=device)  # allocated on the compute stream that will use it
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            back.copy_(host, non_blocking=True)
            self.ready[i] = torch.cuda.Event()
            self.ready[i].record(self.stream)
        back.record_stream(self.stream)
        self.back[i] = back

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        i = packed
        self.fetch(i)
        back = self.back.pop(i)  # the device copy lives only as long as the backward uses it
        if i in self.ready:
            torch.cuda.current_stream(back.device).wait_event(self.ready.pop(i))
        if i - 1 not in self.fetched:  # the one backward needs next, copied while this one is used
            self.fetch(i - 1)
        return back
