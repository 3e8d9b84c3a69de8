"""Splitting one dataset across simulated hospital sites: IID, or Dirichlet(beta) over class labels."""

from __future__ import annotations

import numpy as np

from medfed.errors import ConfigError


def iid_partition(num_items: int, num_sites: int, seed: int) -> list[np.ndarray]:
    """Shuffle and deal the items into ``num_sites`` near-equal shards (sorted indices per site)."""
    if num_items < num_sites:
        raise ConfigError(f"config key 'federation.num-sites': {num_sites} sites but only {num_items} images")
    order = np.random.default_rng(seed).permutation(num_items)
    return [np.sort(shard) for shard in np.array_split(order, num_sites)]


def dirichlet_partition(labels: np.ndarray, num_sites: int, beta: float, seed: int,
                        min_per_site: int = 1) -> list[np.ndarray]:
    """Label-skewed split (Hsu et al. 2019): for each class, site shares are drawn from Dirichlet(beta).

    Small ``beta`` (0.1) gives sites few classes each; large ``beta`` (5) is close to IID. Draws are repeated
    (same seed stream) until every site holds at least ``min_per_site`` images.
    """
    labels = np.asarray(labels).reshape(-1)
    if (labels < 0).any():
        raise ConfigError("federation.partition 'dirichlet' needs class labels; this dataset has none (use 'iid')")
    if len(labels) < num_sites * min_per_site:
        raise ConfigError(f"config key 'federation.num-sites': {num_sites} sites but only {len(labels)} images")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(num_sites)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_sites, beta))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for site, part in enumerate(np.split(members, cuts)):
                shards[site].extend(part.tolist())
        if min(len(s) for s in shards) >= min_per_site:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
    raise ConfigError(f"could not give each of {num_sites} sites {min_per_site} images with Dirichlet beta={beta}")


def partition(labels: np.ndarray, num_sites: int, scheme: str, beta: float, seed: int) -> list[np.ndarray]:
    """Indices of each site's images, for ``scheme`` ``iid`` or ``dirichlet``."""
    if scheme == "iid":
        return iid_partition(len(labels), num_sites, seed)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, num_sites, beta, seed)
    raise ConfigError(f"config key 'federation.partition': unknown scheme '{scheme}' (iid or dirichlet)")
