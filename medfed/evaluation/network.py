"""The base of every feature network (pixels to features), in a module of its own so that the networks
(:mod:`medfed.evaluation.features`, :mod:`medfed.evaluation.classifier`) can import it without importing each other."""

from __future__ import annotations

import torch
from torch import nn

from medfed.errors import MedfedError


class FeatureNetworkUnavailable(MedfedError):
    """A feature network cannot be loaded here (missing weights file or package); the message says what is missing."""


class FeatureNetwork(nn.Module):
    """Base of the feature networks: ``forward`` maps uint8 (N, C, H, W) pixels to (N, num_features) features.

    Attributes:
        name: stable identifier reported beside every number computed from this network.
        num_features: feature dimension D (torchmetrics reads it instead of running a dummy image).
        score_name: ``inception-score`` or ``classifier-score`` for networks with logits, else ``""``.
    """

    name: str
    num_features: int
    score_name: str = ""

    def features_and_logits(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, D) features and (N, K) logits (None when the network has none) in one pass."""
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(pixels)[0]
