"""A sharded model (FSDP2) written into one canonical file, every rank taking part (``GatherPlan``).

Rank 0 decides the entries and their order and broadcasts them; it creates each file and lays it out exactly
as a single process would, and every rank writes its own rows of each dim-0-sharded tensor straight into that
file, in parallel (where it can open the same file; else they are streamed to rank 0). Other layouts are
all-gathered (``full_tensor``) one at a time, so no rank ever holds more than one full tensor beside its shards.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, BinaryIO, Mapping

import collective

from .canonical import dedupe
from .dtensors import dtensor_type, shard_layout
from .errors import CheckpointError
from .safetensors_io import WRITEBACK_CHUNK, SYNC_FILE_RANGE_WRITE, byte_view, dtype_name, sync_file_range

if TYPE_CHECKING:
    import torch


STREAM_CHUNK = 32 << 20  # bytes per point-to-point message while streaming a shard to the writer


# Commands rank 0 (the writer) gives the other ranks while it writes (``GatherPlan.serve``): a tensor of
# three int64 [op, entry index, 0] broadcast from rank 0, on the device of the sharded tensors.
_END, _STREAM, _FILE = 0, 1, 2


def _chunk_rows(n: int, world: int) -> list[int]:
    """Rows each rank holds of a dim of ``n`` split like ``torch.chunk`` (what FSDP2 and Shard(0) do)."""
    c = -(-n // world) if n else 0
    return [max(0, min(c, n - r * c)) for r in range(world)]


def _pwrite_all(fd: int, t: "torch.Tensor", offset: int) -> None:
    """Write a tensor's bytes at ``offset`` of ``fd`` (positional: the descriptor's position is untouched).
    CPU contiguous tensors go straight from their memory; others are copied to CPU a piece at a time."""
    if not t.numel():
        return
    if not (t.is_cpu and t.is_contiguous()):
        rows, row_bytes = (t.shape[0] if t.dim() else 1), _row_bytes(t)
        step = max(1, STREAM_CHUNK // max(1, row_bytes))
        for a in range(0, rows, step):
            piece = _cpu_contiguous(t[a:a + step] if t.dim() else t)
            _pwrite_all(fd, piece, offset + a * row_bytes)
        return
    view = byte_view(t)
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:done + WRITEBACK_CHUNK], offset + done)
        if n <= 0:
            raise OSError(f"short write at byte {offset + done}")
        if sync_file_range is not None and n >= WRITEBACK_CHUNK:  # start a full piece's writeback now, as
            sync_file_range(fd, offset + done, n, SYNC_FILE_RANGE_WRITE)  # EarlyWriteback does (not small ones)
        done += n


class GatherPlan:
    """How a sharded model's tensors reach the checkpoint file(s), every rank taking part.

    The writer (rank 0) writes a file through ``shared_file``: it creates the file, and every other rank
    that can open the same file (same filesystem: checked with a random token rank 0 wrote there) writes
    its own rows of each tensor sharded on dim 0 straight into it at their place (``os.pwrite``), in
    parallel with rank 0, then fsyncs; rank 0 renames the file into place only once every rank reported
    its part written and synced. The file is byte for byte what one process writes. Where a rank cannot
    see the file (nodes without a shared filesystem), that file's shards are streamed to rank 0 instead,
    rank by rank in pieces of at most ``STREAM_CHUNK`` bytes (point-to-point). Other layouts (replicated,
    sharded on another dim) are all-gathered (``full_tensor``) one tensor at a time. Either way a rank
    holds its shards plus at most one piece or one tensor.

    The other ranks follow rank 0's commands in ``serve`` (the file's list of entries, or one tensor to
    stream for ``fetch``) until rank 0 sends the end (``finish``).
    """

    def __init__(self, sd: Mapping[str, "torch.Tensor"], order: list[str]):
        import torch

        self.sd = sd
        self.order = order
        self.index = {k: i for i, k in enumerate(order)}
        dist = collective.group()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)
        dt = dtensor_type()
        first = next((v for v in sd.values() if dt is not None and isinstance(v, dt)), None)
        self.device = first.to_local().device if first is not None else torch.device("cpu")
        self.file: _SharedFile | None = None  # the file rank 0 is writing through shared_file, if any

    # -- the layout of one entry (decided alike on every rank)

    def _rows_sharded(self, t: "torch.Tensor") -> bool:
        """A DTensor sharded on dim 0 only over all ranks: each rank owns one run of whole rows."""
        return (shard_layout(t) is not None and t.dim() > 0 and len(t.placements) == 1
                and type(t.placements[0]).__name__ == "Shard" and t.placements[0].dim == 0
                and t.device_mesh.size() == self.world)

    def _transfer(self, key: str, sink) -> None:
        """Move ``key``'s bytes, in order, to ``sink(tensor)`` on the writer (None: discard); others send."""
        t = self.sd[key].detach()
        if not self._rows_sharded(t):
            full = t.full_tensor() if shard_layout(t) is not None else t  # collective for DTensors
            if sink is not None and self.rank == 0:
                sink(full)
            return
        import torch

        dist = collective.group()
        local = t.to_local()
        rest = tuple(t.shape[1:])
        row_bytes = _row_bytes(t)
        step = max(1, STREAM_CHUNK // max(1, row_bytes))
        failure: BaseException | None = None
        for r, rows in enumerate(_chunk_rows(t.shape[0], self.world)):
            for a in range(0, rows, step):
                b = min(rows, a + step)
                if r == self.rank and self.rank != 0:
                    dist.send(local[a:b].contiguous(), dst=0)
                elif self.rank == 0:
                    piece = local[a:b] if r == 0 else torch.empty((b - a, *rest), dtype=t.dtype, device=local.device)
                    if r != 0:
                        dist.recv(piece, src=r)
                    if sink is not None and failure is None:
                        try:
                            sink(piece)
                        except Exception as e:  # noqa: BLE001 -- keep receiving, or the senders block forever
                            failure = e
        if failure is not None:
            raise failure

    def _command(self, op: int, index: int = 0) -> list[int]:
        """Rank 0's command, on every rank (identity on rank 0)."""
        import torch

        dist = collective.group()
        box = torch.tensor([op, index, 0], dtype=torch.int64, device=self.device)
        dist.broadcast(box, src=0)
        return box.tolist()

    # -- rank 0

    def write(self, key: str, f: BinaryIO) -> None:
        if self.file is not None and self.file.f is f:
            self.file.write(key)
            return
        if self.world > 1:
            self._command(_STREAM, self.index[key])
        self._transfer(key, lambda piece: f.write(byte_view(_cpu_contiguous(piece))))

    def fetch(self, key: str) -> "torch.Tensor":
        import torch

        t = self.sd[key]
        if self.world > 1:
            self._command(_STREAM, self.index[key])
        parts: list = []
        self._transfer(key, lambda piece: parts.append(_cpu_contiguous(piece).clone()))
        if len(parts) == 1:
            return parts[0].reshape(t.shape)
        return torch.cat(parts).reshape(t.shape) if parts else torch.empty(t.shape, dtype=t.dtype)

    def shared_file(self, f: BinaryIO, temp_path: str, entries: list[tuple[str, Any]], offsets: list[int]):
        """Context manager for rank 0 writing ``entries`` (``Gathered`` of this plan, in this order, the
        data of entry i at byte ``offsets[i]``) into ``f``, the open temporary file at ``temp_path``; see the
        class docstring. On leaving without an error every rank's part is written and synced, or it raises."""
        return _SharedFile(self, f, temp_path, [self.index[k] for k, _ in entries], offsets)

    def finish(self) -> None:
        """Release the other ranks from ``serve`` (rank 0, once it is done writing or has failed)."""
        if self.world > 1:
            self._command(_END)

    # -- the other ranks

    def serve(self) -> None:
        """Follow rank 0's commands until it is done: stream a tensor to it, or write this rank's part of
        a file it announces."""
        if self.world == 1:
            return
        while True:
            op, index, _ = self._command(_END)
            if op == _END:
                return
            if op == _STREAM:
                self._transfer(self.order[index], None)
            elif op == _FILE:
                _SharedFile.serve(self)


class _SharedFile:
    """One file written by every rank (``GatherPlan.shared_file``): rank 0's side is this context manager,
    the other ranks' side ``_SharedFile.serve``. Protocol, after the ``_FILE`` command:
    1. rank 0 broadcasts (temp path, token, [(entry index, data offset)]); every rank opens the path and
       checks the token rank 0 wrote at its start; all agree (min over ranks) whether all could.
    2. every rank walks the list in order: a row-sharded tensor's rows are written by their owner with
       ``os.pwrite`` where they belong (shared) or streamed to rank 0 (not shared); other tensors are
       all-gathered and written by rank 0, which keeps its own file position past each entry.
    3. each rank fsyncs and closes its descriptor; rank 0 gathers every rank's outcome and raises the
       first failure, so the file is renamed into place only when all of it is on disk.
    """

    def __init__(self, plan: GatherPlan, f: BinaryIO, temp_path: str, indices: list[int], offsets: list[int]):
        self.plan, self.f, self.temp_path = plan, f, temp_path
        self.items = list(zip(indices, offsets))
        self.pos = 0
        self.shared = False

    def __enter__(self) -> "_SharedFile":
        plan = self.plan
        if plan.world == 1:
            return self
        plan._command(_FILE)
        token = os.urandom(16)  # names this very file: another node's file at the same path lacks it
        try:
            os.pwrite(self.f.fileno(), token, 0)  # overwritten by the header (longer than the token) right after
            mine = True
        except (OSError, AttributeError, ValueError):  # no descriptor: stream everything to rank 0
            mine = False
        collective.broadcast_from_writer((self.temp_path, token, self.items))
        self.shared = _all_agree(plan, mine)
        plan.file = self
        return self

    def write(self, key: str) -> None:
        """Rank 0's turn for ``key`` (the next entry of the list) in ``f``."""
        plan = self.plan
        index, offset = self.items[self.pos] if self.pos < len(self.items) else (None, None)
        if index != plan.index[key]:
            raise CheckpointError(f"internal: tensor {key!r} written out of the announced order")
        self.pos += 1
        t = plan.sd[key].detach()
        f = self.f
        if self.shared and plan._rows_sharded(t):
            f.flush()
            if f.tell() != offset:
                raise CheckpointError(f"internal: tensor {key!r} at byte {f.tell()}, announced at {offset}")
            _pwrite_all(f.fileno(), t.to_local(), offset + shard_layout(t)[1][0] * _row_bytes(t))
            f.seek(offset + t.numel() * t.element_size())
            return
        plan._transfer(key, lambda piece: f.write(byte_view(_cpu_contiguous(piece))))

    def __exit__(self, kind, error, tb) -> None:
        plan = self.plan
        if plan.world == 1:
            return
        plan.file = None
        failed = error is not None
        if failed:  # finish the other ranks' walk: they wait in the transfers still to come
            for index, _ in self.items[self.pos:]:
                if not (self.shared and plan._rows_sharded(plan.sd[plan.order[index]])):
                    plan._transfer(plan.order[index], None)
        outcomes = collective.gather_objects(None)
        bad = [(r, o) for r, o in enumerate(outcomes) if o]
        if bad and not failed:
            rank, why = bad[0]
            # an OSError like the writer's own: the same "choose a writable location" advice on every rank
            raise OSError(f"rank {rank} could not write its part of the file ({why})")

    @staticmethod
    def serve(plan: GatherPlan) -> None:
        """A rank other than 0: its part of the file rank 0 announced (see the class docstring)."""
        temp_path, token, items = collective.broadcast_from_writer(None)
        fd = -1
        try:
            fd = os.open(temp_path, os.O_RDWR)
            mine = os.pread(fd, len(token), 0) == token
        except OSError:
            mine = False
        shared = _all_agree(plan, mine)
        error: str | None = None
        for index, offset in items:
            key = plan.order[index]
            t = plan.sd[key].detach()
            if shared and plan._rows_sharded(t):
                if error is None:
                    try:
                        _pwrite_all(fd, t.to_local(), offset + shard_layout(t)[1][0] * _row_bytes(t))
                    except Exception as e:  # noqa: BLE001 -- reported at the end, after the walk
                        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            else:
                plan._transfer(key, None)
        if fd >= 0:
            try:
                if shared and error is None:
                    os.fsync(fd)
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
            finally:
                os.close(fd)
        collective.gather_objects(error)


def _row_bytes(t: "torch.Tensor") -> int:
    return t.element_size() * (math.prod(t.shape[1:]) if t.dim() > 1 else 1)


def _all_agree(plan: GatherPlan, mine: bool) -> bool:
    """True on every rank when ``mine`` is True on every rank."""
    import torch

    flag = torch.tensor([1 if mine else 0], dtype=torch.int64, device=plan.device)
    dist = collective.group()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _cpu_contiguous(t: "torch.Tensor") -> "torch.Tensor":
    t = t if t.is_cpu else t.cpu()
    return t if t.is_contiguous() else t.contiguous()


class Gathered:
    """A ``TensorSource`` for one entry of a sharded model: its global shape and dtype, bytes on demand."""

    __slots__ = ("plan", "key", "shape", "_dtype")

    def __init__(self, plan: GatherPlan, key: str, t: "torch.Tensor"):
        self.plan = plan
        self.key = key
        self.shape = tuple(t.shape)
        self._dtype = t.dtype

    @property
    def dtype(self) -> "torch.dtype":
        return self._dtype

    @property
    def dtype_name(self) -> str:
        return dtype_name(self._dtype)

    @property
    def nbytes(self) -> int:
        return self._dtype.itemsize * math.prod(self.shape)

    def read(self, out: "torch.Tensor | None" = None) -> "torch.Tensor":
        t = self.plan.fetch(self.key)
        return t if out is None else out.copy_(t)

    def identity(self) -> object:
        return id(self)

    def write_to(self, f: BinaryIO) -> None:
        self.plan.write(self.key, f)


def sharded_plan(sd: Mapping[str, "torch.Tensor"]) -> tuple[dict[str, Gathered], dict[str, str], GatherPlan]:
    """Entries (file order) and aliases of a sharded state dict, agreed by all ranks. Collective."""
    decided: Any
    if collective.is_writer():
        try:
            local = {k: (v.to_local() if hasattr(v, "to_local") else v).detach() for k, v in sd.items()}
            unique, aliases = dedupe(local)  # tied parameters are one DTensor: their local shards share memory
            decided = (list(unique), aliases)
        except Exception as e:  # noqa: BLE001 -- reported on every rank below
            decided = f"{type(e).__name__}: {e}"
    decided = collective.broadcast_from_writer(decided if collective.is_writer() else None)
    if isinstance(decided, str):
        raise CheckpointError(f"cannot plan the save of the sharded model: {decided.splitlines()[0]}")
    order, aliases = decided
    missing = [k for k in order if k not in sd]
    if missing:
        raise CheckpointError(f"ranks hold different models (rank 0 has {missing[:3]}): build the same model on every rank")
    plan = GatherPlan(sd, order)
    return {k: Gathered(plan, k, sd[k]) for k in order}, aliases, plan


def common_plan(entries: list[tuple[str, Any]]) -> GatherPlan | None:
    """The ``GatherPlan`` of a file's entries when all of them are ``Gathered`` from one plan of several
    ranks (the file can then be written by every rank, ``GatherPlan.shared_file``), else None."""
    plans = {id(e.plan): e.plan for _, e in entries if type(e) is Gathered}
    if len(plans) != 1 or any(type(e) is not Gathered for _, e in entries):
        return None
    plan = next(iter(plans.values()))
    return plan if plan.world > 1 else None
