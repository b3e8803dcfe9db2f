"""Asynchronous saves: snapshot on the calling thread, write in ONE background thread, at most one in flight.

``CheckpointManager(..., async_save=True)`` (or ``save(..., blocking=False)``) splits a save in two:

1. On the calling (training) thread, on every rank: everything collective (state_dict() calls, the FSDP
   gathers, the agreement on buffers) and the writer's *snapshot*: every tensor of the entry is copied into
   CPU buffers that are reused from one save to the next (pinned memory when the source is a CUDA tensor,
   so the copy is a DMA), and the non-tensor leaves are copied. After that, training may change its
   parameters and optimizer state: what is written is the snapshot. What a model's snapshot copies (which
   ``state_dict()`` entries are stored, which are tied, into which buffers) is a ``ModelPlan`` kept from one
   save to the next and checked against the live tensors each time (rebuilt when any differs).
2. In one background thread, on the writer only: the manifest (from the snapshot), the files (write,
   fsync, rename), then the ``latest`` pointer, then pruning. ``latest`` therefore moves only once the entry
   is durable.

No collective ever runs on the background thread (gloo collectives from two threads of one process
interleave and deadlock). The outcome of a background write is read by the training thread: the manager's
``failure()`` peeks at it without waiting, so a training loop can fold "my background save failed" into a
collective it already does at every step, and ``flush()`` waits for it and tells every rank.

A new save first waits for the previous one (its buffers are the ones being written): at most one save is
in flight, and entries are written in order.
"""
from __future__ import annotations

import copy
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

from .canonical import canonical_state, dedupe
from .errors import CheckpointError
from .safetensors_io import InMemory, TensorSource
from .storage import inline_hashing

if TYPE_CHECKING:
    import torch
    from torch import nn


class BufferPool:
    """CPU tensors reused across snapshots, matched by position in the snapshot's traversal order.

    A snapshot takes buffers in the same order every time (the same model and optimizer give the same
    tensors in the same order), so the i-th request reuses the i-th buffer when its shape and dtype match,
    and a new one is allocated only when they do not (the first save, or a changed state). A buffer is
    pinned (page-locked) when its source is a CUDA tensor: device-to-host copies into pinned memory are DMA
    transfers that do not stage through pageable memory.
    """

    def __init__(self) -> None:
        self._buffers: list[tuple[torch.Tensor, bool]] = []  # (buffer, pinned): is_pinned() costs ~30 us a call
        self._next = 0
        self._dst: list[torch.Tensor] = []
        self._src: list[torch.Tensor] = []
        self.allocated = 0  # buffers allocated so far (reuse shows as this not growing)

    def start(self) -> None:
        self._next = 0
        self._dst, self._src = [], []

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, *, pin: bool) -> torch.Tensor:
        import torch

        i = self._next
        self._next += 1
        if i < len(self._buffers):
            buf, pinned = self._buffers[i]
            if buf.shape == shape and buf.dtype == dtype and pinned == pin:
                return buf
        buf = torch.empty(shape, dtype=dtype, pin_memory=pin)
        self.allocated += 1
        if i < len(self._buffers):
            self._buffers[i] = (buf, pin)
        else:
            self._buffers.append((buf, pin))
        return buf

    def copy(self, src: torch.Tensor) -> torch.Tensor:
        """The next buffer, which ``finish`` fills with ``src``'s values (CPU, contiguous). ``src`` may require
        grad (a Parameter): ``finish`` copies without recording anything for autograd."""
        buf = self.take(src.shape, src.dtype, pin=src.is_cuda)
        self._dst.append(buf)
        self._src.append(src)
        return buf

    def finish(self, later: DeferredCopy | None = None) -> None:
        """Copy every source taken since ``start`` into its buffer: one ``_foreach_copy_`` call (no Python
        per tensor), asynchronous DMA from CUDA into pinned buffers, then one synchronize. Sources that
        ``later`` defers are handed to it instead, to be copied by the writer thread."""
        if not self._dst:
            return
        dst, src = (self._dst, self._src) if later is None else later.split(self._dst, self._src)
        copy_all(dst, src)
        self._dst, self._src = [], []


def copy_all(dst: list[torch.Tensor], src: list[torch.Tensor], cuda: bool | None = None) -> None:
    """``dst[i] = src[i]`` for every i by one ``_foreach_copy_`` (no autograd record, no Python per tensor);
    from CUDA tensors an asynchronous DMA into pinned buffers, then one synchronize."""
    import torch

    if not dst:
        return
    if cuda is None:
        cuda = any(t.is_cuda for t in src)
    with torch.no_grad():
        torch._foreach_copy_(dst, src, non_blocking=cuda)
    if cuda:
        torch.cuda.synchronize()


class DeferredCopy:
    """The part of an asynchronous save's snapshot that the writer thread copies, overlapping training.

    Parameters and optimizer state change only in the optimizer's ``step()`` (the forward and backward
    passes read them; BatchNorm's running statistics, which the forward pass does change, are buffers and
    stay in the synchronous copy). So the copy of those tensors need not stall the training thread: the
    writer makes it first thing, while the next forward and backward run, and the optimizer's next
    ``step()`` waits for it (a step pre-hook the manager registers: ``wait``). What is deferred is given by
    ``owned``, the ids of the optimizer's parameters and state tensors; CPU tensors only (a CUDA source is
    a DMA into pinned memory already, left as it is).
    """

    def __init__(self, owned: set[int]) -> None:
        self._owned = owned
        self._dst: list[torch.Tensor] = []
        self._src: list[torch.Tensor] = []
        self._done = threading.Event()

    def split(self, dst: list[torch.Tensor], src: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keep the (buffer, source) pairs whose source is deferred; return the others, to copy now."""
        now_dst, now_src = [], []
        owned = self._owned
        for d, t in zip(dst, src):
            if id(t) in owned and t.device.type == "cpu":
                self._dst.append(d)
                self._src.append(t)
            else:
                now_dst.append(d)
                now_src.append(t)
        return now_dst, now_src

    def __len__(self) -> int:
        return len(self._dst)

    def run(self) -> None:
        """On the writer thread, before anything reads the buffers: copy, then release ``wait``."""
        try:
            copy_all(self._dst, self._src, False)
        finally:
            self._dst, self._src = [], []
            self._done.set()

    def wait(self) -> None:
        self._done.wait()


def snapshot_entries(entries: dict[str, TensorSource], pool: BufferPool) -> dict[str, InMemory]:
    """The model's tensors (as handed over by ``write_collectively``) copied into ``pool``'s buffers.

    ``InMemory`` sources are copied straight from where they are (a GPU tensor into a pinned buffer);
    other sources (an FSDP parameter gathered from its shards, which is collective) are read into the
    buffer. Returns the same keys, in the same order, over the buffers.
    """
    pool.start()
    out: dict[str, InMemory] = {}
    for k, e in entries.items():
        if type(e) is InMemory:
            out[k] = InMemory(pool.copy(e.tensor))
        else:
            buf = pool.take(tuple(e.shape), e.dtype, pin=False)
            e.read(out=buf)
            out[k] = InMemory(buf)
    pool.finish()
    return out


def snapshot_tree(obj: Any, pool: BufferPool, later: DeferredCopy | None = None) -> Any:
    """A copy of a nested state (dicts, lists, tuples; an optimizer's or a scheduler's ``state_dict()``, a
    trainer's counters) whose tensors are in ``pool``'s buffers and whose other leaves are copies, so that
    nothing training does afterwards reaches it."""
    import torch

    pool.start()
    tensor, strided = torch.Tensor, torch.strided
    take = pool.copy
    scalars = {type(None), bool, int, float, str, bytes}

    def walk(x: Any) -> Any:
        kind = type(x)
        if kind in scalars:
            return x
        if kind is dict or kind is OrderedDict:
            out = kind([(k, walk(v)) for k, v in x.items()]) if kind is OrderedDict else {k: walk(v) for k, v in x.items()}
            if hasattr(x, "_metadata"):  # a Module.state_dict's versions, which its load_state_dict reads
                out._metadata = copy.deepcopy(x._metadata)
            return out
        if kind is tensor:
            return take(x) if x.layout == strided else x.detach().clone()  # a sparse tensor: copied, not pooled
        if kind is list:
            return [walk(v) for v in x]
        if kind is tuple:
            return tuple(walk(v) for v in x)
        if isinstance(x, tensor):
            return x.detach().clone()  # rare (a Parameter or another subclass): copied, not pooled
        return copy.deepcopy(x)

    out = walk(obj)
    pool.finish(later)
    return out


class LiveState(dict):
    """A bare module's ``state_dict(keep_vars=True)`` handed to the writer as it is (live tensors), for its
    ``ModelPlan`` to check and copy."""


class ModelPlan:
    """What an asynchronous save of a (non-sharded) model copies, kept from one save to the next.

    Building it is the synchronous save's own work (``canonical_state``: unwrapping, the bare module's
    ``state_dict``; ``dedupe``: tied weights stored once), plus a buffer per stored tensor. A later save only
    checks it: the same wrapper object, the same ``state_dict(keep_vars=True)`` keys in the same order, each
    the same tensor object with the same data pointer, shape, stride and dtype (which also keeps the ties,
    defined by memory, and the source device unchanged). Any difference, or an entry whose stored tensor is
    not its live tensor's own memory (``dedupe`` cloned overlapping views), rebuilds it.
    """

    def __init__(self) -> None:
        self._model: weakref.ref | None = None
        self._checks: list[tuple[str, torch.Tensor, int, tuple[int, ...], tuple[int, ...], torch.dtype]] = []
        self._sources: list[torch.Tensor] = []  # the stored tensors, live, in the entry's order
        self._buffers: list[torch.Tensor] = []
        self._cuda = False
        self.entries: dict[str, InMemory] = {}  # over the buffers
        self.aliases: dict[str, str] = {}
        self.info: dict[str, Any] = {}
        self.builds = 0  # how often it was (re)built: reuse shows as this not growing

    def matches(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> bool:
        if self._model is None or self._model() is not model or len(sd) != len(self._checks):
            return False
        for (key, t), (k, ref, ptr, shape, stride, dtype) in zip(sd.items(), self._checks):
            if t is not ref or key != k or t.data_ptr() != ptr or t.shape != shape or t.stride() != stride \
                    or t.dtype != dtype:
                return False
        return True

    def snapshot(self, model: nn.Module, sd: dict[str, torch.Tensor], pool: BufferPool,
                 later: DeferredCopy | None = None) -> dict[str, InMemory]:
        """Copy the stored tensors of ``sd`` (the bare module's ``state_dict(keep_vars=True)``, just taken) into
        the plan's buffers (those ``later`` defers: by the writer thread), rebuilding the plan first if it does
        not match; returns the entries (stored key -> ``InMemory`` over its buffer). ``aliases`` and ``info``
        describe the same snapshot."""
        if not self.matches(model, sd):
            self._build(model, sd, pool)
        if later is None:
            copy_all(self._buffers, self._sources, self._cuda)
        else:
            copy_all(*later.split(self._buffers, self._sources), self._cuda)
        return self.entries

    def _build(self, model: nn.Module, sd: dict[str, torch.Tensor], pool: BufferPool) -> None:
        canonical, info = canonical_state(model, to_cpu=False)
        unique, aliases = dedupe(canonical)
        pool.start()
        self._sources = [sd[k] for k in unique]
        self._buffers = [pool.take(tuple(t.shape), t.dtype, pin=t.is_cuda) for t in self._sources]
        self._cuda = any(t.is_cuda for t in self._sources)
        self.entries = {k: InMemory(b) for k, b in zip(unique, self._buffers)}
        self.aliases, self.info = aliases, info
        self.builds += 1
        own = all(unique[k].data_ptr() == sd[k].data_ptr() for k in unique)
        self._model = weakref.ref(model) if own else None  # not own memory (a clone): rebuilt every save
        self._checks = [(k, t, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) for k, t in sd.items()]


class BackgroundWriter:
    """One background thread that runs one job (a save's file writes) at a time, and remembers how the
    last one ended. Only the writer rank has one. The executor's thread is joined at interpreter exit, so
    a job submitted just before the program ends still completes."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future | None = None
        self._what: str = ""
        self._thread: threading.Thread | None = None
        self.model_pool = BufferPool()
        self.state_pool = BufferPool()
        self.model_plan = ModelPlan()
        self.deferred: DeferredCopy | None = None  # the copy the job in flight makes first, if any

    def wait_snapshot(self) -> None:
        """Block until the snapshot of the save in flight is complete (its deferred copy made): from then on
        training may change parameters and optimizer state. Immediate when nothing is deferred."""
        later = self.deferred
        if later is not None and not self.on_worker_thread():
            later.wait()  # returns at once when the copy is made

    def submit(self, what: str, job: Callable[[], None], later: DeferredCopy | None = None) -> None:
        """Run ``job`` in the background, after ``later``'s copy if given; the previous job must have been
        waited for (``take_failure``)."""
        if self._future is not None:
            raise CheckpointError("internal: a save was submitted while another is in flight")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anytopo-ckpt")

        def run() -> None:
            self._thread = threading.current_thread()
            if later is not None:
                later.run()
            with inline_hashing():  # nobody waits for this write: no hashing thread beside it (see there)
                job()

        self._what = what
        self.deferred = later
        try:
            self._future = self._executor.submit(run)
        except BaseException:
            if later is not None:
                later.run()  # nothing will run it: copy here, so no optimizer step waits forever
            raise

    def in_flight(self) -> bool:
        return self._future is not None and not self._future.done()

    def on_worker_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def wait(self) -> None:
        """Block until the job in flight (if any) has finished; its outcome is kept."""
        if self._future is not None and not self.on_worker_thread():
            try:
                self._future.exception()
            except BaseException:  # noqa: BLE001 -- a cancelled future; the outcome is read by failure()
                pass

    def failure(self, *, wait: bool) -> str | None:
        """The finished job's error as one line (None: it succeeded, none ran, or it is still running and
        ``wait`` is false). The outcome is kept until ``take_failure``."""
        if self._future is None:
            return None
        if wait:
            self.wait()
        elif not self._future.done():
            return None
        error = self._future.exception()
        if error is None:
            return None
        text = str(error).splitlines()[0] if str(error) else ""
        if isinstance(error, CheckpointError):
            return text
        return f"could not write checkpoint {self._what} in the background: {type(error).__name__}: {text}"

    def take_failure(self) -> str | None:
        """Wait for the job in flight, forget it, and return its error line (None if it succeeded)."""
        message = self.failure(wait=True)
        self._future = None
        self.deferred = None
        return message
