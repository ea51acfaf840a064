"""Helpers used only by the tests."""

import torch
from torch.distributed.tensor import DTensor


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer unsharded, on every rank (a collective: all ranks must call it).

    It holds the whole model at once: the scripts never call it (weight syncs and checkpoints gather in buckets); the
    tests compare against it.
    """
    return {
        name: (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()
        for name, tensor in model.state_dict().items()
    }
