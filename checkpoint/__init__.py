"""Device-agnostic checkpoints: save once, load into any layout, with a report of what was checked.

Public API:
- ``save(model_or_state_dict, path, *, metadata=None, max_shard_size=None)``
- ``load_state_dict(path, *, ema=False, allow_pickle=False) -> dict[str, Tensor]`` (canonical, CPU)
- ``load(path, model, *, strict=True, device=None, ema=False, allow_pickle=False) -> LoadReport``
- ``unwrap(model)``, ``inspect(path)``, ``read_manifest(path)``
- ``CheckpointManager(directory, keep_last=k)`` with ``OptimizerState`` for name-keyed optimizer state
- CLI: ``python -m checkpoint`` / ``anytopo-ckpt`` (inspect, convert, diff, verify)

This package knows nothing of training; it imports ``models`` only inside the CLI's ``verify``.

The names above are imported on first use, and torch only by the code that holds tensors: ``import
checkpoint`` is cheap, and the CLI's ``inspect``/``convert`` of safetensors checkpoints never import torch
(a process that imports this torch build peaks at ~0.7 GiB before it has read a byte; a safetensors
convert stays at a few tens of MiB whatever the checkpoint's size).
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError

__version__ = "0.1.0"

_EXPORTS = {  # public name -> submodule that defines it
    "CheckpointManager": "manager", "LoadReport": "load", "OptimizerState": "manager", "Restored": "manager",
    "inspect": "describe", "load": "load", "load_state_dict": "load", "read_manifest": "formats",
    "save": "save", "select_prune": "manager", "should_save": "manager", "unwrap": "unwrap",
}
__all__ = ["CheckpointError", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from .describe import inspect
    from .formats import read_manifest
    from .load import LoadReport, load, load_state_dict
    from .manager import CheckpointManager, OptimizerState, Restored, select_prune, should_save
    from .save import save
    from .unwrap import unwrap


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Keeps ``checkpoint.save``/``load``/``unwrap`` the functions.

    Importing a submodule binds it on its package (``import checkpoint.save`` sets ``checkpoint.save`` to
    the module), and three submodules share their name with the function they define; bind the function.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name \
                and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
