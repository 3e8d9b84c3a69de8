"""Per-sample gradients layer by layer, from one forward and one weight-free backward pass.

For the layers of a UNet, one image's weight gradient is a product of two tensors autograd already has: the
layer's input ``a_i`` and the gradient ``b_i`` of the loss with respect to the layer's output (Conv2d: ``b_i``
against the patches of ``a_i``; Linear: ``b_i^T a_i``; GroupNorm: ``sum(b_i * normalised a_i)``). So:

1. one forward pass, saving every parametrised layer's input and output;
2. one backward pass to those outputs only (``torch.autograd.grad``), which skips every weight gradient;
3. per layer, the per-image weight gradients from ``(a, b)``.

Step 3 costs about what the skipped weight gradients would have, so a step costs about one non-private step plus
the per-sample bookkeeping. Opacus' ``hooks`` mode computes the summed weight gradients as well and builds
convolution patches with ``unfold``, which is slow on CPU for large feature maps; here large maps use a grouped
convolution (one group per image) instead. The result has the layout of :func:`~medfed.privacy.dp_sgd.per_sample_grads`
and goes to Opacus' ``DPOptimizer`` the same way, which clips and noises it.

Noise multiplicity K: the K rows of one image (``x_t`` flattened from (B, K, ...)) are one sample, so each
per-image gradient sums over its K rows before Opacus takes its norm, and the sensitivity stays the clipping norm.

Class embedding (``nn.Embedding``, class-conditional models): one image's weight gradient is zero except in the row
of its label, which gets the sum of its output gradients over its K draws: a scatter-add of ``b_i`` into row
``y_i`` of a (B, classes + 1, dim) tensor.

Supported layers: ``nn.Conv2d`` (groups 1, zero padding), ``nn.Linear``, ``nn.GroupNorm`` and ``nn.Embedding``
(no ``max_norm``): every parametrised layer of MONAI's ``DiffusionModelUNet``, conditional or not.
:func:`check_supported` names any other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medfed.diffusion.ddpm import denoising_error, predict_noise
from medfed.errors import ConfigError

SUPPORTED = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.Embedding)
UNFOLD_MAX_POSITIONS = 64
"""Conv2d outputs with at most this many positions per image (8x8) use im2col + bmm, larger ones a grouped
convolution: on CPU im2col is the faster of the two only for small maps (benchmarks/bench_privacy.py)."""


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def check_supported(model: nn.Module) -> None:
    """Raise :class:`ConfigError` naming the first parametrised layer this engine cannot handle."""
    for name, module in model.named_modules():
        if not _trainable(module):
            continue
        if type(module) not in SUPPORTED:
            raise ConfigError(f"config key 'privacy.per-sample-grads': 'layers' cannot handle layer '{name}' "
                              f"({type(module).__name__}); use 'vmap'")
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                              or isinstance(module.padding, str)):
            raise ConfigError(f"config key 'privacy.per-sample-grads': 'layers' needs Conv2d layers with groups=1 "
                              f"and numeric zero padding; '{name}' has groups={module.groups}, "
                              f"padding={module.padding!r}; use 'vmap'")
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            raise ConfigError(f"config key 'privacy.per-sample-grads': 'layers' cannot handle embedding '{name}' "
                              "with max_norm (it renormalises rows in place); use 'vmap'")


def _rows_by_image(x: torch.Tensor, images: int) -> torch.Tensor:
    """(B*K, C, ...) -> (B, C, K * positions): each image's K rows side by side along the last axis."""
    draws, channels = x.shape[0] // images, x.shape[1]
    x = x.reshape(images, draws, channels, -1)
    return x.transpose(1, 2).reshape(images, channels, -1)


def _conv_grads(m: nn.Conv2d, a: torch.Tensor, b: torch.Tensor, images: int) -> torch.Tensor:
    """Per-image weight gradients (B, C_out, C_in, kh, kw) of a Conv2d with input ``a`` and output gradient ``b``."""
    if b.shape[2] * b.shape[3] <= UNFOLD_MAX_POSITIONS or m.kernel_size == (1, 1):
        patches = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        grads = _rows_by_image(b, images) @ _rows_by_image(patches, images).transpose(1, 2)
        return grads.view(images, *m.weight.shape)
    # Fold the images into channels, (K, B*C_in, H, W), and take the weight gradient of a convolution with one
    # group per image: it is (B*C_out, C_in, kh, kw), each image's own, summed over its K draws.
    draws = a.shape[0] // images
    a_folded = a.view(images, draws, *a.shape[1:]).transpose(0, 1).reshape(draws, -1, *a.shape[2:])
    b_folded = b.view(images, draws, *b.shape[1:]).transpose(0, 1).reshape(draws, -1, *b.shape[2:])
    _, grads, _ = torch.ops.aten.convolution_backward(
        b_folded, a_folded, m.weight.detach().repeat(images, 1, 1, 1), None, list(m.stride), list(m.padding),
        list(m.dilation), False, [0, 0], images, [False, True, False])
    return grads.view(images, *m.weight.shape)


def _layer_grads(m: nn.Module, a: torch.Tensor, b: torch.Tensor, images: int) -> dict[str, torch.Tensor]:
    """Per-image gradients of one layer's parameters, ``{"weight": (B, *shape), "bias": (B, *shape)}``."""
    if isinstance(m, nn.Conv2d):
        grads = {"weight": _conv_grads(m, a, b, images)}
        bias = _rows_by_image(b, images).sum(2)
    elif isinstance(m, nn.Linear):
        a3 = a.reshape(images, -1, a.shape[-1])  # (B, K * tokens, in)
        b3 = b.reshape(images, -1, b.shape[-1])
        grads = {"weight": b3.transpose(1, 2) @ a3}
        bias = b3.sum(1)
    elif isinstance(m, nn.Embedding):
        # a: (B*K,) indices, b: (B*K, dim). Row (image i, draw k) adds its output gradient to image i's row a.
        draws = a.shape[0] // images
        image = torch.arange(images, device=a.device).repeat_interleave(draws)
        grads = torch.zeros(images * m.num_embeddings, m.embedding_dim, device=b.device, dtype=b.dtype)
        grads.index_add_(0, image * m.num_embeddings + a.flatten(), b.reshape(-1, m.embedding_dim))
        if m.padding_idx is not None:  # the padding row never receives a gradient
            grads.view(images, m.num_embeddings, -1)[:, m.padding_idx] = 0
        return {"weight": grads.view(images, *m.weight.shape)}
    elif isinstance(m, nn.GroupNorm):
        normalised = F.group_norm(a, m.num_groups, eps=m.eps)
        grads = {"weight": _rows_by_image(normalised * b, images).sum(2)}
        bias = _rows_by_image(b, images).sum(2)
    else:
        raise TypeError(f"per-sample-grads 'layers' has no rule for {type(m).__name__} (see check_supported)")
    if m.bias is not None:
        grads["bias"] = bias
    return grads


def per_layer_grads(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
                    labels: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-sample gradients of each image's loss (mean over its K draws and pixels), layer by layer.

    Args:
        model: the plain UNet; every parametrised layer must pass :func:`check_supported` and run once per forward.
        x_t, t, target: (B, K, C, H, W), (B, K), (B, K, C, H, W) from ``draw_noisy_inputs`` (noise or velocity).
        labels: (B, K) class labels of a conditional model (each image's label, per draw), else None.

    Returns:
        ``{parameter name: (B, *parameter shape)}`` gradients and the (B,) losses, as ``per_sample_grads``.
    """
    images = x_t.shape[0]
    # (layer name, layer, input, output, (input, output) versions when saved)
    records: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor, tuple[int, int]]] = []

    def saver(name: str):
        def save(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            records.append((name, module, inputs[0].detach(), output, (inputs[0]._version, output._version)))
        return save

    handles = [m.register_forward_hook(saver(name)) for name, m in model.named_modules() if _trainable(m)]
    try:
        pred = predict_noise(model, x_t.flatten(0, 1), t.flatten(), None if labels is None else labels.flatten())
    finally:
        for h in handles:
            h.remove()
    if len({name for name, *_ in records}) != len(records):
        raise ValueError("per-sample-grads 'layers' needs every layer to run once per forward pass")
    for name, _, a, out, version in records:
        if (a._version, out._version) != version:  # a later in-place op changed what the per-sample rule reads
            raise ValueError(f"per-sample-grads 'layers': the input or output of layer '{name}' is modified in place "
                             "later in the forward pass; use 'vmap'")
    losses = denoising_error(pred, target.flatten(0, 1)).view(images, -1).mean(1)
    output_grads = torch.autograd.grad(losses.sum(), [out for _, _, _, out, _ in records])
    grads: dict[str, torch.Tensor] = {}
    for (name, m, a, _, _), b in zip(records, output_grads, strict=True):
        for param, grad in _layer_grads(m, a, b, images).items():
            grads[f"{name}.{param}"] = grad
    return grads, losses.detach()
