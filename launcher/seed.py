"""Seeds: one derived value per (seed, rank, step), applied to python, numpy and torch."""
from __future__ import annotations

import random

import numpy as np
import torch

_SEED_LIMIT = 2**63
_INDEX_LIMIT = 2**32


def derive_seed(seed: int, *, rank: int = 0, step: int = 0) -> int:
    """A deterministic 32-bit seed for ``(seed, rank, step)``.

    Uses ``numpy.random.SeedSequence(seed, spawn_key=(rank, step))``: well mixed (neighbouring ranks or steps
    give unrelated values) and the same on every machine and Python run. ``rank`` differs per process so
    augmentations differ across ranks; ``step`` lets a resumed run re-seed exactly where it stopped.

    Args:
        seed: the run's base seed, 0 <= seed < 2**63.
        rank: the process's global rank, 0 <= rank < 2**32.
        step: e.g. the global step or epoch a stream starts at, 0 <= step < 2**32.

    Returns:
        An int in [0, 2**32).

    Example:
        >>> derive_seed(0, rank=1) != derive_seed(0, rank=0)
        True
    """
    for name, value, limit in (("seed", seed, _SEED_LIMIT), ("rank", rank, _INDEX_LIMIT),
                               ("step", step, _INDEX_LIMIT)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < limit:
            raise ValueError(f"{name} must be an int in [0, {limit}), got {value!r}")
    # Bounded so each part has a fixed width in the entropy words: distinct triples stay distinct inputs.
    ss = np.random.SeedSequence(int(seed), spawn_key=(int(rank), int(step)))
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def seed_everything(seed: int, *, rank: int = 0, step: int = 0) -> int:
    """Seed ``random``, ``numpy`` and ``torch`` (CPU and every CUDA device) with :func:`derive_seed`.

    Returns:
        The derived seed that was applied.
    """
    derived = derive_seed(seed, rank=rank, step=step)
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)  # also seeds all CUDA devices (lazily when CUDA is not initialised yet)
    return derived
