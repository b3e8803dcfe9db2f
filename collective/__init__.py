"""Collective verdicts: "rank 0 decides, every rank learns", in one place.

Under a process group, a decision that only one process may take (take the run's lock, write a file, pick
the checkpoint to resume) must reach every rank, or the ranks that did not take it wait in their next
collective until the group times out while the one that did has exited. Every such decision in anytopo goes
through this module:

- :func:`group` -- ``torch.distributed`` when a process group of this process is up, else None;
- :func:`is_writer` -- the process that decides and writes: global rank 0, or the only process;
- :func:`decide` -- the writer runs a function; every rank returns its value or raises its error;
- :func:`conclude` -- after the writer's own work, every rank raises alike if it failed (:func:`share_outcome`
  only tells);
- :func:`broadcast_from_writer`, :func:`any_rank`, :func:`first_problem` -- the primitives under them.

It sits below ``launcher`` and ``checkpoint`` (both use it) and knows nothing of either. It never imports
torch by itself: without torch there is no process group, and ``checkpoint``'s torch-free commands stay so.
Every function is a collective when a group of more than one rank is up: every rank calls it at the same
point of the program.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

__all__ = ["WRITER", "Failure", "any_rank", "barrier", "broadcast_from_writer", "conclude", "decide", "first_problem",
           "gather_objects", "group", "is_writer", "rank", "share_outcome", "world_size"]

T = TypeVar("T")

WRITER = 0
"""The global rank that decides and writes files."""


def group():
    """``torch.distributed`` if this process is in an initialized process group, else None (never imports torch)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    dist = group()
    return dist.get_world_size() if dist is not None else 1


def rank() -> int:
    dist = group()
    return dist.get_rank() if dist is not None else 0


def is_writer() -> bool:
    """True in the process that decides and writes: the only process, or global rank 0."""
    return rank() == WRITER


def _several():
    """The group when it has more than one rank (the only case where anything must be exchanged)."""
    dist = group()
    return dist if dist is not None and dist.get_world_size() > 1 else None


def _device(dist) -> Any:
    """Where collectives of tensors and objects run: the current CUDA device under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        import torch

        return torch.device("cuda", torch.cuda.current_device())
    return None


def broadcast_from_writer(obj: Any) -> Any:
    """The writer's ``obj`` (any picklable value) on every rank; ``obj`` itself without a group of several."""
    dist = _several()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=WRITER, device=_device(dist))
    return box[0]


def any_rank(*flags: bool) -> list[bool]:
    """For each flag, whether ANY rank set it: one all-reduce of ``len(flags)`` numbers, so a step boundary
    can fold several stop reasons (a signal, a failed background write) into one collective."""
    dist = _several()
    if dist is None:
        return [bool(f) for f in flags]
    import torch

    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=_device(dist))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [bool(v > 0) for v in t.tolist()]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), indexed by rank, on every rank; ``[obj]`` without a group of several."""
    dist = _several()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def first_problem(problem: str | None) -> str | None:
    """Each rank's own finding (None when it has none); every rank returns the lowest rank's problem, so all
    raise the same line when any rank cannot go on (e.g. does not see the checkpoint rank 0 chose)."""
    return next((p for p in gather_objects(problem) if p), None)


def barrier() -> None:
    dist = _several()
    if dist is not None:
        dist.barrier()


@dataclass(frozen=True)
class Failure:
    """The writer's failure as every rank learns it: the exception's class name and its first line."""

    kind: str
    line: str

    @classmethod
    def of(cls, error: BaseException) -> "Failure":
        text = str(error)
        return cls(type(error).__name__, (text.splitlines()[0] if text else "") or type(error).__name__)

    def __str__(self) -> str:
        return self.line


def share_outcome(error: BaseException | None, *, cheap: bool = False, settle: bool = True) -> Failure | None:
    """Every rank learns the writer's outcome: its :class:`Failure`, or None on success.

    Only the writer's ``error`` counts (the others pass None). ``cheap``: on success exchange one flag (a
    4-byte all-reduce) instead of a broadcast of the message, for calls made every few steps. ``settle``:
    every rank passes a barrier before any returns, so a writer that then tears the group down never aborts
    a peer that is still receiving (seen in gloo at world 3)."""
    failure = Failure.of(error) if error is not None and is_writer() else None
    dist = _several()
    if dist is None:
        return failure
    if not cheap or any_rank(failure is not None)[0]:
        failure = broadcast_from_writer(failure)
    if settle:
        dist.barrier()
    return failure


def conclude(error: BaseException | None, *,
             fail: Callable[[Failure, BaseException | None], BaseException], cheap: bool = False,
             settle: bool = True) -> None:
    """After work only the writer did (``error``: its exception, None elsewhere or on success), every rank
    raises ``fail(failure, own)`` when it failed, ``own`` being the writer's exception on the writer and None
    on the others. A collective, like :func:`share_outcome` (whose ``cheap`` and ``settle`` it takes)."""
    failure = share_outcome(error, cheap=cheap, settle=settle)
    if failure is not None:
        raise fail(failure, error if is_writer() else None)


def decide(fn: Callable[[], T], *, fail: Callable[[Failure, BaseException | None], BaseException],
           catch: tuple[type[BaseException], ...] = (Exception,), value: bool = True, cheap: bool = False,
           settle: bool = True) -> T | None:
    """The writer runs ``fn()``; every rank returns its value, or every rank raises when it failed.

    Args:
        fn: runs on the writer only.
        fail: builds what each rank raises from the writer's :class:`Failure`; on the writer it also gets
            the writer's own exception (to re-raise it, or wrap it), elsewhere None.
        catch: the exceptions of ``fn`` that become a verdict; any other propagates on the writer alone.
        value: broadcast ``fn``'s return value (False: the others get None; with ``cheap`` only a flag is
            exchanged on success).
        cheap, settle: as in :func:`share_outcome`.

    Example:
        >>> lock = decide(take_lock, fail=lambda failure, own: ConfigError(str(failure)))   # refused on every rank alike
    """
    result, error = None, None
    if is_writer():
        try:
            result = fn()
        except catch as e:
            error = e
    if not (value and _several() is not None):
        conclude(error, fail=fail, cheap=cheap, settle=settle)
        return result
    result, failure = broadcast_from_writer((result, Failure.of(error) if error is not None else None))
    if settle:
        barrier()
    if failure is not None:
        raise fail(failure, error)
    return result
