"""Model weights as the ordered list of NumPy arrays that Flower's legacy wire format carries."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """The model's ``state_dict`` values, in key order, as float32 CPU arrays."""
    return [v.detach().cpu().numpy().astype(np.float32, copy=True) for v in model.state_dict().values()]


def check_arrays(model: nn.Module, arrays: list[np.ndarray], what: str) -> None:
    """Raise ``ValueError`` unless ``arrays`` match the model's tensors in number, shape and finiteness."""
    expected = model.state_dict()
    if len(arrays) != len(expected):
        raise ValueError(f"{what}: {len(arrays)} arrays, the model has {len(expected)} tensors")
    for (key, tensor), array in zip(expected.items(), arrays):
        if tuple(array.shape) != tuple(tensor.shape):
            raise ValueError(f"{what}: '{key}' has shape {tuple(array.shape)}, expected {tuple(tensor.shape)}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{what}: '{key}' contains NaN or Inf")


def set_weights(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Load ``arrays`` (from :func:`get_weights`) into ``model``, checking count, shapes and finiteness."""
    check_arrays(model, arrays, "weights")
    keys = list(model.state_dict().keys())
    model.load_state_dict(OrderedDict((k, torch.from_numpy(np.asarray(a))) for k, a in zip(keys, arrays)))
