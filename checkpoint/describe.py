"""``inspect(path)``: what a checkpoint holds, without a model."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from .formats import check_integrity, read_source
from .keys import WRAPPER_PREFIXES


def _prefixes(keys: list[str]) -> dict[str, int]:
    """Leading key components shared by at least half the keys, plus wrapper prefixes anywhere at the front."""
    counts: Counter[str] = Counter()
    for k in keys:
        parts = k.split(".")
        prefix = ""
        for part in parts[:-1]:
            if part + "." not in WRAPPER_PREFIXES:
                break
            prefix += part + "."
        if prefix:
            counts[prefix] += 1
    first = Counter(k.split(".")[0] + "." for k in keys if "." in k)
    for p, n in first.items():
        if n >= max(2, len(keys) // 2) and n == len(keys):
            counts.setdefault(p, n)
    return dict(counts)


def inspect(path: str | Path, *, ema: bool = False, allow_pickle: bool = False, verify: bool = True) -> dict[str, Any]:
    """Describe a checkpoint: format, tensors, element count, bytes, dtypes, key prefixes, non-tensor
    entries, manifest, integrity. Plain JSON-able dict.

    Example:
        >>> checkpoint.inspect("run/checkpoints/step-100")["num_tensors"]
        62
    """
    src = read_source(path, ema=ema, allow_pickle=allow_pickle)
    integrity = check_integrity(src, hashes=verify)
    tensors = []
    dtypes: Counter[str] = Counter()
    numel = nbytes = 0
    seen: set[int] = set()
    for k, t in src.tensors.items():
        dt = t.dtype_name
        tensors.append({"name": k, "dtype": dt, "shape": list(t.shape)})
        dtypes[dt] += 1
        if id(t) not in seen:  # tied entries count once
            seen.add(id(t))
            numel += math.prod(t.shape)
            nbytes += t.nbytes
    keys = list(src.tensors)
    return {
        "path": str(path),
        "format": src.format,
        "num_tensors": len(tensors),
        "num_elements": numel,
        "bytes": nbytes,
        "dtypes": dict(dtypes),
        "prefixes": _prefixes(keys),
        "other_entries": src.other,
        "files": [str(f) for f in src.files],
        "integrity": integrity,
        "notes": src.notes,
        "manifest": src.manifest,
        "tensors": tensors,
    }
