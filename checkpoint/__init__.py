"""Device-agnostic checkpoints: save once, load into any layout, with a report of what was checked.

Public API:
- ``save(model_or_state_dict, path, *, metadata=None, max_shard_size=None)``
- ``load_state_dict(path, *, ema=False, allow_pickle=False) -> dict[str, Tensor]`` (canonical, CPU)
- ``load(path, model, *, strict=True, device=None, ema=False, allow_pickle=False) -> LoadReport``
- ``load_pretrained(model, path, *, skippable_prefixes=()) -> LoadReport`` (strict but for replaced modules)
- ``unwrap(model)``, ``inspect(path)``, ``read_manifest(path)``
- ``buffer_agreement(model)``: whether the ranks' buffer replicas (BatchNorm statistics) agree (collective)
- ``CheckpointManager(directory, keep_last=k)`` with ``OptimizerState`` for name-keyed optimizer state
- CLI: ``python -m checkpoint`` / ``anytopo-ckpt`` (inspect, convert, diff, verify)

This package knows nothing of training; it imports ``models`` only lazily, inside the CLI (``verify``,
``convert --model``).

The names above are imported on first use (PEP 562), and torch only by the code that holds tensors:
``import checkpoint`` is cheap, and the CLI's ``inspect``/``convert`` of safetensors checkpoints never import torch
(a process that imports this torch build peaks at ~0.7 GiB before it has read a byte; a safetensors
convert stays at a few tens of MiB whatever the checkpoint's size).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError

__version__ = "0.1.0"

_EXPORTS = {  # public name -> private submodule that defines it
    "CheckpointManager": "manager", "LoadReport": "_load", "buffer_agreement": "_sharded", "OptimizerState": "manager", "Restored": "manager",
    "inspect": "describe", "load": "_load", "load_pretrained": "_pretrained", "load_state_dict": "_load",
    "read_manifest": "formats",
    "save": "_save", "select_prune": "manager", "should_save": "manager", "unwrap": "_unwrap",
}
__all__ = ["CheckpointError", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from ._load import LoadReport, load, load_state_dict
    from ._pretrained import load_pretrained
    from ._sharded import buffer_agreement
    from ._save import save
    from ._unwrap import unwrap
    from .describe import inspect
    from .formats import read_manifest
    from .manager import CheckpointManager, OptimizerState, Restored, select_prune, should_save


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
