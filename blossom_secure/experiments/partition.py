"""Partitions of a data pool over the sites of a benchmark federation (pure NumPy).

* :func:`iid_partition`: a random permutation cut into near-equal parts.
* :func:`dirichlet_partition`: label skew (Hsu et al. 2019, as in BLOSSOM's non-IID
  setting): for every class, the share of its examples that each site receives is drawn
  from ``Dirichlet(alpha, ..., alpha)``; redrawn until every site has ``min_size`` examples.
* :func:`modality_roles`: which sites hold modality A only, B only, or both.

Every function is deterministic in its ``seed`` (NumPy ``default_rng``; the randomness is
not secret, reproducibility is the point).
"""

from __future__ import annotations

import numpy as np

__all__ = ["ROLES", "dirichlet_partition", "iid_partition", "modality_roles"]

#: A site's modality role in a split: modality A only, modality B only, both.
ROLES = ("a", "b", "both")

_MAX_DRAWS = 1000


def iid_partition(n: int, sites: int, *, seed: int) -> list[np.ndarray]:
    """Indices ``0..n-1`` shuffled and cut into ``sites`` parts whose sizes differ by at most 1.

    Raises:
        ValueError: fewer examples than sites, or fewer than one site.
    """
    if sites < 1 or n < sites:
        raise ValueError(f"cannot split {n} examples over {sites} sites")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, sites)]


def dirichlet_partition(labels: np.ndarray, sites: int, *, alpha: float, seed: int, min_size: int = 10
                        ) -> list[np.ndarray]:
    """Label-skewed parts: class ``c``'s examples go to the sites in ``Dirichlet(alpha)`` shares.

    Args:
        labels: Integer class of every example.
        sites: Number of parts.
        alpha: Concentration (smaller: more skew).
        seed: Seed of the draw.
        min_size: Every part gets at least this many examples (the draw is repeated, with
            the same generator, until it does).

    Returns:
        One sorted index array per site; disjoint, covering every example.

    Raises:
        ValueError: bad arguments, or no draw met ``min_size`` in 1000 tries.
    """
    labels = np.asarray(labels)
    n = labels.size
    if sites < 1 or alpha <= 0 or min_size < 1 or n < sites * min_size:
        raise ValueError(f"cannot split {n} examples over {sites} sites with at least {min_size} each")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(_MAX_DRAWS):
        parts: list[list[int]] = [[] for _ in range(sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * idx.size).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet(alpha={alpha}) draw gave every site {min_size} examples")


def modality_roles(a_only: int, b_only: int, both: int) -> list[str]:
    """The role of every site, in site order: ``a_only`` times ``"a"``, then ``"b"``, then ``"both"``.

    Raises:
        ValueError: a negative count or no site at all.
    """
    if min(a_only, b_only, both) < 0 or a_only + b_only + both < 1:
        raise ValueError("modality split counts must be >= 0 and name at least one site")
    return ["a"] * a_only + ["b"] * b_only + ["both"] * both
