"""Unwrap live models by structure: DataParallel, DistributedDataParallel, torch.compile, in any nesting.
FSDP2 (``fully_shard``) keeps the module itself (class-swapped to an FSDPModule): unwrap returns it as is.

torch is imported when a model is unwrapped (a caller holding a model has imported it already)."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def _compiled_type():
    # A model can only be compiled once torch._dynamo is imported; don't pay its import cost otherwise.
    if "torch._dynamo" not in sys.modules:
        return None
    from torch._dynamo.eval_frame import OptimizedModule

    return OptimizedModule


def _peel(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The bare module inside ``model`` and the names of the wrappers around it, outermost first."""
    from torch import nn

    names: list[str] = []
    compiled = _compiled_type()
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            names.append(type(model).__name__)
            model = model.module
        elif compiled is not None and isinstance(model, compiled):
            names.append("OptimizedModule")
            model = model._orig_mod
        else:
            if _is_fsdp(model):  # FSDP2 swaps the module's class in place: nothing to unwrap, but say so
                names.append("FSDP")
            return model, names


def unwrap(model: nn.Module) -> nn.Module:
    """Return the bare module inside any nesting of DataParallel, DistributedDataParallel and
    ``torch.compile`` (OptimizedModule), e.g. ``DDP(compile(m))`` or ``compile(DDP(m))``, and what
    ``accelerate.Accelerator.prepare`` returns (one of those, or the model itself).

    The bare module's ``state_dict()`` keys are the canonical keys of an anytopo checkpoint.

    Example:
        >>> unwrap(torch.nn.DataParallel(net)) is net
        True
    """
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"unwrap expects an nn.Module, got {type(model).__name__}")
    return _peel(model)[0]


def describe_wrapping(model: nn.Module) -> list[str]:
    """Names of the wrappers around ``model``, outermost first (e.g. ``["DistributedDataParallel", "OptimizedModule"]``)."""
    return _peel(model)[1]


def _is_fsdp(model: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and hasattr(fsdp, "FSDPModule") and isinstance(model, fsdp.FSDPModule)
