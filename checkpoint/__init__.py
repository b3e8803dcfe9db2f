"""Device-agnostic checkpoints: save once, load into any layout, with a report of what was checked.

Public API:
- ``save(model_or_state_dict, path, *, metadata=None, max_shard_size=None)``
- ``load_state_dict(path, *, ema=False, allow_pickle=False) -> dict[str, Tensor]`` (canonical, CPU)
- ``load(path, model, *, strict=True, device=None, ema=False, allow_pickle=False) -> LoadReport``
- ``load_pretrained(model, path, *, skippable_prefixes=()) -> LoadReport`` (strict but for replaced modules)
- ``unwrap(model)``, ``inspect(path)``, ``read_manifest(path)``
- ``buffer_agreement(model)``: whether the ranks' buffer replicas (BatchNorm statistics) agree (collective)
- ``CheckpointManager(directory, keep_last=k)`` with ``OptimizerState`` for name-keyed optimizer state; the
  policy it applies: ``should_save``, ``select_prune``, ``is_better``
- ``atomic_file(path)``: a file written to a temp name, fsynced and renamed (never a torn file)
- CLI: ``python -m checkpoint`` / ``anytopo-ckpt`` (inspect, convert, diff, verify)

This package knows nothing of training; it imports ``models`` only lazily, inside the CLI (``verify``,
``convert --model``).

Modules, bottom to top (each imports only those above it in this list; tests/test_layering.py enforces
README's table of them): errors, storage, safetensors_io, keys, wrappers, manifest, sources, torchfiles,
dtensors, canonical, states, gather, rank_files, dcp, readers, writer, plan, saving, entry, async_save, policy,
resume, loading, optimizer_state, manager, describe, pretrained, cli.

The names above are imported on first use (PEP 562), and torch only by the code that holds tensors:
``import checkpoint`` is cheap, and the CLI's ``inspect``/``convert`` of safetensors checkpoints never import torch
(a process that imports this torch build peaks at ~0.7 GiB before it has read a byte; a safetensors
convert stays at a few tens of MiB whatever the checkpoint's size).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError

__version__ = "0.1.0"  # also recorded in every manifest (checkpoint/manifest.py: VERSION)

_EXPORTS = {  # public name -> the submodule that defines it (imported on first use)
    "CheckpointManager": "manager", "OptimizerState": "optimizer_state", "Restored": "manager",
    "LoadReport": "plan", "load": "loading", "load_state_dict": "loading", "load_pretrained": "pretrained",
    "inspect": "describe", "read_manifest": "readers", "save": "saving", "unwrap": "wrappers",
    "buffer_agreement": "dtensors", "select_prune": "policy", "should_save": "policy", "is_better": "policy",
    "atomic_file": "storage",
}
__all__ = ["CheckpointError", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from .describe import inspect
    from .dtensors import buffer_agreement
    from .loading import load, load_state_dict
    from .manager import CheckpointManager, Restored
    from .optimizer_state import OptimizerState
    from .plan import LoadReport
    from .policy import is_better, select_prune, should_save
    from .pretrained import load_pretrained
    from .readers import read_manifest
    from .saving import save
    from .storage import atomic_file
    from .wrappers import unwrap


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
