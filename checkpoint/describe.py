"""``inspect(path)``: what a checkpoint holds, without a model."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from .readers import read_source
from .sources import check_integrity, group_tied
from .keys import WRAPPER_PREFIXES, wrapper_prefix


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


def inspect(path: str | Path, *, ema: bool = False, allow_pickle: bool = False, verify: bool = True,
            keep_prefix: bool = False) -> dict[str, Any]:
    """Describe a checkpoint: format, tensors, element count, bytes, dtypes, key prefixes, non-tensor
    entries, manifest, integrity. Plain JSON-able dict.

    Tensors are listed under the keys ``convert`` writes: without the prefix that wrappers put on every
    key (``module.``, ``_orig_mod.``, the format's own wrapper attribute such as a LightningModule's only
    child), which ``prefix_stripped`` names and ``prefix_reasons`` explains. ``keep_prefix=True`` lists the
    keys exactly as the file holds them.

    Example:
        >>> checkpoint.inspect("run/checkpoints/step-100")["num_tensors"]
        62
    """
    src = read_source(path, ema=ema, allow_pickle=allow_pickle)
    integrity = check_integrity(src, hashes=verify)
    prefix, reasons = ("", []) if keep_prefix else wrapper_prefix(src.tensors, src.format)
    tensors = []
    dtypes: Counter[str] = Counter()
    for k, t in src.tensors.items():
        dt = t.dtype_name
        tensors.append({"name": k[len(prefix):], "dtype": dt, "shape": list(t.shape)})
        dtypes[dt] += 1
    stored, _ = group_tied(src.tensors)  # tied entries count once
    return {
        "path": str(path),
        "format": src.format,
        "num_tensors": len(tensors),
        "num_elements": sum(math.prod(t.shape) for t in stored.values()),
        "bytes": sum(t.nbytes for t in stored.values()),
        "dtypes": dict(dtypes),
        "prefix_stripped": prefix,
        "prefix_reasons": reasons,
        "prefixes": _prefixes([t["name"] for t in tensors]),
        "other_entries": src.other,
        "files": [str(f) for f in src.files],
        "integrity": integrity,
        "notes": src.notes,
        "manifest": src.manifest,
        "tensors": tensors,
    }
