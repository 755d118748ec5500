"""Before training on packed rows: check that the model really keeps the packed documents apart.

Packed rows rely on the attention implementation turning restarting position ids into a per-document mask
(qmor/data/pipeline.py `pack`). transformers does this for its own models; a model whose code ignores it would let every
document attend to the ones before it in its row, training on a wrong context without any error. Two short random
documents are run packed and alone; their hidden states must agree.
"""

from __future__ import annotations

import torch
from torch import nn

from qmor.errors import QmorError


@torch.no_grad()
def check_documents_apart(model: nn.Module, seed: int = 0) -> float:
    """Largest relative difference between the second document's hidden states packed and alone; a QmorError when
    it shows that attention crosses documents (measured: ~1e-6 when apart, 0.3-1 when not)."""
    was_training = model.training
    model.eval()
    device = model.get_input_embeddings().weight.device
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    first, second = torch.randint(vocab, (1, 6), generator=g), torch.randint(vocab, (1, 5), generator=g)
    ids = torch.cat([first, second], 1).to(device)  # (1, 11)
    positions = torch.cat([torch.arange(6), torch.arange(5)]).unsqueeze(0).to(device)  # (1, 11)
    decoder = model.get_decoder()
    packed = decoder(input_ids=ids, position_ids=positions).last_hidden_state[:, 6:].float()  # (1, 5, d)
    alone = decoder(input_ids=second.to(device)).last_hidden_state.float()  # (1, 5, d)
    model.train(was_training)
    diff = ((packed - alone).abs().max() / alone.abs().max().clamp_min(1e-6)).item()
    half = model.get_input_embeddings().weight.dtype != torch.float32
    if diff > (0.1 if half else 1e-3):
        raise QmorError(f"this model's attention does not keep packed documents apart (a packed document's hidden "
                        f"states differ by {diff:.2g} of their size from running it alone), so packing would let "
                        "documents see each other; train without --packing")
    return diff
