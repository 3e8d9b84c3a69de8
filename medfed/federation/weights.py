"""Model weights as an ordered list of NumPy arrays (one per ``state_dict`` tensor), and their wire form.

On the wire (Flower messages between coordinator and sites) the arrays travel as **one** flat float32 vector
(:func:`to_wire`, :func:`from_wire`). Flower stores and transfers every array of a message as separate objects,
one request each (a request is signed by the site, and retried after 1 s, 2 s, ... when not yet available): a
UNet's 183 tensors made each model transfer hundreds of round trips. SecAgg+ masks the vector element by element
exactly as it masked the separate arrays.
"""

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


def to_wire(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """``arrays`` flattened and concatenated in order into one float32 vector of shape (sum of sizes,)."""
    return [np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays])] if arrays else []


def from_wire(wire: list[np.ndarray], shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The arrays of ``shapes`` back from :func:`to_wire`'s vector (views into it).

    Raises:
        ValueError: ``wire`` is not one vector of exactly the shapes' total size.
    """
    sizes = [int(np.prod(shape)) for shape in shapes]
    if len(wire) != 1 or wire[0].ndim != 1 or wire[0].size != sum(sizes):
        got = ", ".join(str(tuple(a.shape)) for a in wire) or "nothing"
        raise ValueError(f"expected one vector of {sum(sizes)} values on the wire, got {got}")
    ends = np.cumsum(sizes)
    return [wire[0][end - size:end].reshape(shape) for size, end, shape in zip(sizes, ends, shapes)]


def shapes_of(arrays: list[np.ndarray]) -> list[tuple[int, ...]]:
    """The shapes of ``arrays`` (e.g. of the global model, to read a site's update off the wire)."""
    return [tuple(a.shape) for a in arrays]


def set_weights(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Load ``arrays`` (from :func:`get_weights`) into ``model``, checking count, shapes and finiteness."""
    check_arrays(model, arrays, "weights")
    keys = list(model.state_dict().keys())
    model.load_state_dict(OrderedDict((k, torch.from_numpy(np.asarray(a))) for k, a in zip(keys, arrays)))
