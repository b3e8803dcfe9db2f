"""Device-agnostic checkpoints: save once, load into any layout, with a report of what was checked.

Public API:
- ``save(model_or_state_dict, path, *, metadata=None, max_shard_size=None)``
- ``load_state_dict(path, *, ema=False, allow_pickle=False) -> dict[str, Tensor]`` (canonical, CPU)
- ``load(path, model, *, strict=True, device=None, ema=False, allow_pickle=False) -> LoadReport``
- ``unwrap(model)``, ``inspect(path)``, ``read_manifest(path)``
- ``CheckpointManager(directory, keep_last=k)`` with ``OptimizerState`` for name-keyed optimizer state
- CLI: ``python -m checkpoint`` / ``anytopo-ckpt`` (inspect, convert, diff, verify)

This package knows nothing of training; it imports ``models`` only inside the CLI's ``verify``.
"""
__version__ = "0.1.0"

from .describe import inspect
from .errors import CheckpointError
from .formats import read_manifest
from .load import LoadReport, load, load_state_dict
from .manager import CheckpointManager, OptimizerState, Restored, select_prune, should_save
from .save import save
from .unwrap import unwrap

__all__ = [
    "CheckpointError", "CheckpointManager", "LoadReport", "OptimizerState", "Restored", "inspect", "load",
    "load_state_dict", "read_manifest", "save", "select_prune", "should_save", "unwrap",
]
