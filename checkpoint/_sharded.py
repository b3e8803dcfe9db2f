"""Sharded models (FSDP2, any DTensor parameters): every rank writes its own rows into the saved file (or
streams them to rank 0), only each rank's own rows are read on loading, and every rank learns whether the
writer succeeded.

Saving: rank 0 decides the entries and their order and broadcasts them; it creates each file and lays it
out exactly as a single process would, and every rank writes its own rows of each dim-0-sharded tensor
straight into that file, in parallel (where it can open the same file; else they are streamed to rank 0).
Other layouts are all-gathered (``full_tensor``) one at a time, so no rank ever holds more than one full
tensor beside its shards (``GatherPlan``).

Loading: a DTensor sharded on dim 0 (FSDP2's layout) owns a contiguous run of rows of the canonical
tensor, i.e. one contiguous byte range of the file; ``local_slice`` turns the file's ``TensorSlice`` into
that range so the vectored read fills the local shard directly, uneven shards (a dim of 10 at world 3)
included.
"""
from __future__ import annotations

import math
import os
import sys
from typing import TYPE_CHECKING, Any, BinaryIO, Mapping

from ._safetensors_io import (WRITEBACK_CHUNK, _SYNC_FILE_RANGE_WRITE, TensorSlice, _byte_view, _sync_file_range,
                              dtype_name)
from .errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn


def dtensor_type():
    """DTensor's class if torch.distributed.tensor is imported (a model cannot hold DTensors otherwise)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_sharded_state(sd: Mapping[str, Any]) -> bool:
    dt = dtensor_type()
    return dt is not None and any(isinstance(v, dt) for v in sd.values())


def _dist():
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def broadcast_from_writer(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (identity without a process group of several ranks)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class CheckpointWriteError(CheckpointError, OSError):
    """The writer's OSError, worded for users: still an OSError for callers that catch those."""


def agree(error: BaseException | None, path: Any) -> None:
    """After a write: every rank learns rank 0's outcome and fails if it failed (the error's first line).

    Without this a rank other than 0 returned success for a checkpoint that was never written. The writer
    re-raises its own error (an OSError becomes a CheckpointError naming the path and the fix, so scripts
    exit 2 on every rank alike).
    """
    outcome = None
    if error is not None:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        outcome = f"{type(error).__name__}: {first}" if not isinstance(error, CheckpointError) else first
    dist = _dist()
    is_writer = dist is None or dist.get_rank() == 0
    if dist is not None and dist.get_world_size() > 1:
        outcome = broadcast_from_writer(outcome)
        # and every rank past the broadcast before any returns: a root that races ahead to tear down the
        # group while a peer is still receiving aborts that peer in gloo (seen at world 3)
        dist.barrier()
    if is_writer and error is not None:
        if isinstance(error, OSError):
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {error}; choose a writable "
                                  "location (an existing directory you may write to, with free space)") from error
        raise error
    if outcome is not None:
        raise CheckpointError(f"checkpoint {path} was not written: rank 0 failed ({outcome}); fix that and save again")


def buffer_agreement(module: "nn.Module") -> dict[str, Any] | None:
    """Whose buffers (BatchNorm statistics) a checkpoint holds: always rank 0's; and whether every rank had
    the same values (FSDP and DDP keep one replica per rank, which drift apart between syncs). Collective."""
    import torch

    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return None
    bufs = [b.to_local() if hasattr(b, "to_local") else b for b in module.buffers()]
    if not bufs:
        return None
    # exact per-buffer fingerprint: sum and sum of squares in float64 (ints converted exactly below 2**53)
    dev = bufs[0].device
    sig = torch.stack([torch.stack([b.double().sum(), b.double().pow(2).sum()]) for b in bufs]).reshape(-1).to(dev)
    rows = [torch.empty_like(sig) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, sig)
    same = all(torch.equal(rows[0], r) for r in rows[1:])
    return {"from_rank": 0, "identical_on_all_ranks": same, "world_size": dist.get_world_size()}


# ------------------------------------------------------------------------------------------------ save

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
    view = _byte_view(t)
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:done + WRITEBACK_CHUNK], offset + done)
        if n <= 0:
            raise OSError(f"short write at byte {offset + done}")
        if _sync_file_range is not None and n >= WRITEBACK_CHUNK:  # start a full piece's writeback now, as
            _sync_file_range(fd, offset + done, n, _SYNC_FILE_RANGE_WRITE)  # EarlyWriteback does (not small ones)
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
        dist = _dist()
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

        dist = _dist()
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

        dist = _dist()
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
        self._transfer(key, lambda piece: f.write(_byte_view(_cpu_contiguous(piece))))

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
        _dist().broadcast_object_list([[self.temp_path, token, self.items]], src=0)
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
        plan._transfer(key, lambda piece: f.write(_byte_view(_cpu_contiguous(piece))))

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
        outcomes = _gather_outcomes(plan, None)
        bad = [(r, o) for r, o in enumerate(outcomes) if o]
        if bad and not failed:
            rank, why = bad[0]
            # an OSError like the writer's own: the same "choose a writable location" advice on every rank
            raise OSError(f"rank {rank} could not write its part of the file ({why})")

    @staticmethod
    def serve(plan: GatherPlan) -> None:
        """A rank other than 0: its part of the file rank 0 announced (see the class docstring)."""
        box = [None]
        _dist().broadcast_object_list(box, src=0)
        temp_path, token, items = box[0]
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
        _gather_outcomes(plan, error)


def _row_bytes(t: "torch.Tensor") -> int:
    return t.element_size() * (math.prod(t.shape[1:]) if t.dim() > 1 else 1)


def _all_agree(plan: GatherPlan, mine: bool) -> bool:
    """True on every rank when ``mine`` is True on every rank."""
    import torch

    flag = torch.tensor([1 if mine else 0], dtype=torch.int64, device=plan.device)
    _dist().all_reduce(flag, op=_dist().ReduceOp.MIN)
    return bool(flag.item())


def _gather_outcomes(plan: GatherPlan, error: str | None) -> list[str | None]:
    """Every rank's outcome for the file (None: written and synced), on every rank."""
    dist = _dist()
    outcomes: list = [None] * plan.world
    dist.all_gather_object(outcomes, error)
    return outcomes


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
    from ._save import dedupe

    decided: Any
    if _dist() is None or _dist().get_rank() == 0:
        try:
            local = {k: (v.to_local() if hasattr(v, "to_local") else v).detach() for k, v in sd.items()}
            unique, aliases = dedupe(local)  # tied parameters are one DTensor: their local shards share memory
            decided = (list(unique), aliases)
        except Exception as e:  # noqa: BLE001 -- reported on every rank below
            decided = f"{type(e).__name__}: {e}"
    decided = broadcast_from_writer(decided if _dist() is None or _dist().get_rank() == 0 else None)
    if isinstance(decided, str):
        raise CheckpointError(f"cannot plan the save of the sharded model: {decided.splitlines()[0]}")
    order, aliases = decided
    missing = [k for k in order if k not in sd]
    if missing:
        raise CheckpointError(f"ranks hold different models (rank 0 has {missing[:3]}): build the same model on every rank")
    plan = GatherPlan(sd, order)
    return {k: Gathered(plan, k, sd[k]) for k in order}, aliases, plan


# ------------------------------------------------------------------------------------------------ load

def shard_layout(t: "torch.Tensor") -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(local shape, global offset) of a DTensor on this rank; None for a plain tensor."""
    if not hasattr(t, "device_mesh") or not hasattr(t, "placements"):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)


def local_slice(s: TensorSlice, local_shape: tuple[int, ...], offset: tuple[int, ...]) -> TensorSlice | None:
    """The byte range of ``s`` holding rows ``offset[0] : offset[0] + local_shape[0]`` when that is the whole
    shard (sharded on dim 0 only), else None (the caller reads the tensor and slices)."""
    if any(o for o in offset[1:]) or tuple(local_shape[1:]) != tuple(s.shape[1:]):
        return None
    rows = s.shape[0] if s.shape else 1
    row_bytes = s.nbytes // rows if rows else 0
    return TensorSlice(s.path, s.offset + offset[0] * row_bytes, local_shape[0] * row_bytes, s.code,
                       tuple(local_shape))


def local_part(full: "torch.Tensor", local_shape: tuple[int, ...], offset: tuple[int, ...]) -> "torch.Tensor":
    """This rank's block of a full tensor (a view)."""
    view = full
    for dim, (o, n) in enumerate(zip(offset, local_shape)):
        view = view.narrow(dim, o, n)
    return view


def describe_layout(model: "nn.Module") -> str | None:
    """'fsdp x3: 12 tensors sharded on dim 0 (8 uneven), 4 replicated' for a model holding DTensors."""
    sd = model.state_dict(keep_vars=True)
    dt = dtensor_type()
    if dt is None:
        return None
    sharded = [v for v in sd.values() if isinstance(v, dt)]
    if not sharded:
        return None
    mesh = sharded[0].device_mesh
    dims: dict[str, int] = {}
    uneven = 0
    for v in sharded:
        for p in v.placements:
            d = getattr(p, "dim", None)
            name = f"dim {d}" if d is not None else type(p).__name__.lower()
            dims[name] = dims.get(name, 0) + 1
            if d is not None and v.shape[d] % mesh.size():
                uneven += 1
    how = ", ".join(f"{n} on {d}" for d, n in sorted(dims.items()))
    return (f"fsdp x{mesh.size()}: {len(sharded)} tensors sharded ({how}; {uneven} uneven), "
            f"{len(sd) - len(sharded)} replicated")


# --------------------------------------------------------------------------------- sharded checkpoints
#
# CheckpointManager(sharded=True): every rank writes the shards it holds to its own safetensors file
# (``rank-00001-of-00003.safetensors``: canonical key names, local shapes), in parallel; rank 0 adds the
# replicated tensors to its file and writes manifest.json last, listing every rank file with its sha256 and,
# per tensor, its global shape and where each piece sits ("pieces": [[file index, global offset, local shape]]).
# Reading assembles a tensor from its pieces on demand (``ShardedEntry``), so load into any layout, inspect,
# verify and convert work as for any other checkpoint, one tensor at a time.

SHARD_FILE = "rank-{rank:05d}-of-{world:05d}.safetensors"


def tied_keys(sd: Mapping[str, "torch.Tensor"]) -> dict[str, str]:
    """alias -> stored key for entries that are the same tensor object (tied parameters: one Parameter, or
    one DTensor under FSDP2, registered under several names); the first key in sorted order is stored.
    Decided from object identity, so every rank decides alike."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for k in sorted(sd):
        if sd[k].numel():
            aliases.update({k: first[id(sd[k])]} if id(sd[k]) in first else {})
            first.setdefault(id(sd[k]), k)
    return aliases


def rank_entries(sd: Mapping[str, "torch.Tensor"], rank: int) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """This rank's (key, local tensor source) list and its pieces table {key: [global offset, local shape]}.
    Tied entries (``tied_keys``) are written once, under their stored key."""
    from ._safetensors_io import InMemory

    entries, pieces = [], {}
    aliases = tied_keys(sd)
    for k in sorted(sd):
        if k in aliases:
            continue
        t = sd[k].detach()
        layout = shard_layout(t)
        if layout is None:
            if rank != 0:
                continue  # replicated: rank 0's copy
            local, (shape, offset) = t, (tuple(t.shape), (0,) * t.dim())
        else:
            local = t.to_local()
            shape, offset = layout
            if not local.numel() and t.numel():
                continue  # an uneven split left this rank nothing of k
        local = local.cpu() if not local.is_cpu else local
        entries.append((k, InMemory(local if local.is_contiguous() else local.contiguous())))
        pieces[k] = [list(offset), list(shape)]
    return entries, pieces


class ShardedEntry:
    """One tensor of a sharded checkpoint, assembled from its pieces (``TensorSlice`` of rank files)."""

    __slots__ = ("key", "shape", "code", "pieces")

    def __init__(self, key: str, shape: tuple[int, ...], code: str, pieces: list[tuple[TensorSlice, tuple, tuple]]):
        self.key = key
        self.shape = shape
        self.code = code
        self.pieces = sorted(pieces, key=lambda p: tuple(p[1]))  # (slice, global offset, local shape)

    @property
    def dtype(self) -> "torch.dtype":
        return self.pieces[0][0].dtype

    @property
    def dtype_name(self) -> str:
        return self.pieces[0][0].dtype_name

    @property
    def nbytes(self) -> int:
        return sum(p[0].nbytes for p in self.pieces)

    def identity(self) -> object:
        return id(self)

    def _rows_only(self) -> bool:
        return all(not any(off[1:]) and tuple(shape[1:]) == tuple(self.shape[1:]) for _, off, shape in self.pieces)

    def read(self, out: "torch.Tensor | None" = None) -> "torch.Tensor":
        import torch

        if out is None:
            out = torch.empty(self.shape, dtype=self.dtype)
        self.read_block(out, tuple(self.shape), (0,) * len(self.shape))
        return out

    def read_block(self, dst: "torch.Tensor", shape: tuple, offset: tuple) -> None:
        """Fill ``dst`` (CPU contiguous) with the block at ``offset`` of ``shape``, reading only the pieces'
        byte ranges that overlap it when both are runs of whole rows."""
        from ._safetensors_io import read_slices

        if not dst.numel():
            return
        if self._rows_only() and not any(offset[1:]) and tuple(shape[1:]) == tuple(self.shape[1:]) and dst.is_contiguous():
            lo, hi = offset[0] if offset else 0, (offset[0] + shape[0]) if offset else 1
            by_file: dict[Any, list] = {}
            for s, off, pshape in self.pieces:
                if not self.shape:  # a scalar: one piece, all of it
                    by_file.setdefault(s.path, []).append((s, dst))
                    continue
                a, b = max(lo, off[0]), min(hi, off[0] + pshape[0])
                if a >= b:
                    continue
                part = local_slice(s, (b - a, *pshape[1:]), (a - off[0], *([0] * (len(pshape) - 1))))
                by_file.setdefault(s.path, []).append((part, dst.narrow(0, a - lo, b - a)))
            for path, items in by_file.items():
                read_slices(path, items)
            return
        import torch

        full = torch.empty(self.shape, dtype=self.dtype)
        for s, off, pshape in self.pieces:
            local_part(full, pshape, off).copy_(s.read())
        dst.copy_(local_part(full, shape, offset))

    def write_to(self, f: BinaryIO) -> None:
        if not self._rows_only():
            f.write(_byte_view(self.read()))
            return
        for s, _, _ in self.pieces:  # whole rows in offset order: their bytes concatenated are the tensor's
            s.write_to(f)


def read_sharded(directory, manifest: dict[str, Any], table_name: str = "tensors") -> dict[str, ShardedEntry]:
    """The tensors of a sharded checkpoint directory, from its manifest and its rank files' headers
    (``table_name`` "states": the sharded optimizer-state tensors, keyed ``STATE_SHARD + path``)."""
    from pathlib import Path

    from ._safetensors_io import read_header

    directory = Path(directory)
    table = manifest.get("sharded") or {}
    files, world = table.get("files") or [], table.get("world_size")
    if not files or world != len(files) or (manifest.get("topology") or {}).get("world_size", world) != world:
        raise CheckpointError(f"{directory}: sharded entry mixes world sizes (manifest world {world}, "
                              f"{len(files)} rank files); it was not written by one run: use another entry")
    expect = {SHARD_FILE.format(rank=r, world=world) for r in range(world)}
    if set(files) != expect:
        raise CheckpointError(f"{directory}: rank files {sorted(files)} do not match a world of {world} "
                              f"(expected {sorted(expect)}); the entry mixes runs, use another entry")
    headers = []
    for name in files:
        p = directory / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing rank file of this sharded checkpoint; re-copy the whole directory "
                                  "or use an earlier checkpoint")
        headers.append(read_header(p)[0])
    out: dict[str, ShardedEntry] = {}
    for key, info in (table.get(table_name) or {}).items():
        pieces = []
        for index, offset, shape in info["pieces"]:
            s = headers[index].get(key)
            if s is None or tuple(s.shape) != tuple(shape):
                raise CheckpointError(f"{directory / files[index]}: lacks its piece of {key!r} (or has the wrong "
                                      "shape); the file belongs to another checkpoint, use an earlier one")
            pieces.append((s, tuple(offset), tuple(shape)))
        out[key] = ShardedEntry(key, tuple(info["shape"]), info["dtype"], pieces)
    return out


# ---------------------------------------------------------------------------- sharded optimizer state
#
# In a sharded entry the optimizer state stays sharded too: each DTensor leaf of a component's state (AdamW's
# exp_avg / exp_avg_sq of a sharded parameter) is written by every rank to its own rank file, under the key
# ``STATE_SHARD + path in the state tree`` (model keys never start with '~'), and the state tree in state.json
# holds ``{"__shard__": key}`` in its place; the manifest's "sharded" table lists each such tensor's global
# shape and pieces under "states", exactly as for the model's tensors. No rank ever gathers the full state.
# Reading puts a ``ShardedEntry`` where the placeholder was: an FSDP model reads only its own block of it
# (``OptimizerState.load_state_dict``), any other layout reads the whole tensor.

STATE_SHARD = "~state/"
SHARD_REF = "__shard__"


def split_state_shards(states: Any, path: str = "") -> tuple[Any, dict[str, "torch.Tensor"]]:
    """``states`` with every DTensor leaf replaced by ``{SHARD_REF: key}``, and those DTensors by key.
    Keys depend only on the tree's structure, so every rank names the same tensor alike."""
    dt = dtensor_type()
    found: dict[str, Any] = {}

    def walk(node: Any, where: str) -> Any:
        if dt is not None and isinstance(node, dt):
            key = STATE_SHARD + where
            found[key] = node
            return {SHARD_REF: key}
        if type(node) is dict:
            return {k: walk(v, f"{where}/{k}" if where else str(k)) for k, v in node.items()}
        if type(node) in (list, tuple):
            return type(node)(walk(v, f"{where}/{i}") for i, v in enumerate(node))
        return node

    return walk(states, path), found


def _is_ref(node: Any) -> bool:
    return type(node) is dict and len(node) == 1 and isinstance(node.get(SHARD_REF), str)


def attach_state_shards(directory, manifest: dict[str, Any], states: Any) -> Any:
    """``states`` read from a sharded entry with each ``{SHARD_REF: key}`` replaced by its ``ShardedEntry``
    (read lazily: whole, or only one rank's block). Unchanged for entries without sharded state."""
    table = (manifest.get("sharded") or {}).get("states")
    if not table:
        return states
    sources = read_sharded(directory, manifest, "states")

    def walk(node: Any) -> Any:
        if _is_ref(node):
            key = node[SHARD_REF]
            if key not in sources:
                raise CheckpointError(f"{directory}: state.json names sharded tensor {key!r}, which the manifest "
                                      "does not list; the entry is damaged, use an earlier checkpoint")
            return sources[key]
        if type(node) is dict:
            return {k: walk(v) for k, v in node.items()}
        if type(node) in (list, tuple):
            return type(node)(walk(v) for v in node)
        return node

    return walk(states)


def materialize_sources(node: Any) -> Any:
    """``node`` with every ``ShardedEntry`` read whole (CPU tensors): the state any layout loads."""
    if isinstance(node, ShardedEntry):
        return node.read()
    if type(node) is dict:
        return {k: materialize_sources(v) for k, v in node.items()}
    if type(node) in (list, tuple):
        return type(node)(materialize_sources(v) for v in node)
    return node


def has_sources(node: Any) -> bool:
    if isinstance(node, ShardedEntry):
        return True
    if type(node) is dict:
        return any(has_sources(v) for v in node.values())
    if type(node) in (list, tuple):
        return any(has_sources(v) for v in node)
    return False


def local_optimizer_state(state: dict[str, Any], params: Mapping[str, "torch.Tensor"]) -> dict[str, Any]:
    """A name-keyed optimizer state whose per-parameter tensors are ``ShardedEntry`` sources, as the sharded
    state ``set_optimizer_state_dict`` takes for an FSDP model: each rank reads only its block of every
    tensor shaped like its (DTensor) parameter and wraps it as a DTensor of that parameter's layout;
    other tensors (AdamW's ``step``) are read whole."""
    from torch.distributed.tensor import DTensor
    import torch

    out = dict(state)
    per_param = {}
    for name, entry in (state.get("state") or {}).items():
        p = params.get(name)
        layout = shard_layout(p) if p is not None else None
        d = {}
        for k, v in entry.items():
            if isinstance(v, ShardedEntry) and layout is not None and tuple(v.shape) == tuple(p.shape):
                local = torch.empty(layout[0], dtype=v.dtype)
                v.read_block(local, *layout)
                d[k] = DTensor.from_local(local.to(p.device), p.device_mesh, p.placements, run_check=False,
                                          shape=p.shape, stride=p.stride())
            else:
                d[k] = materialize_sources(v)
        per_param[name] = d
    out["state"] = per_param
    return materialize_sources(out)


def common_plan(entries: list[tuple[str, Any]]) -> GatherPlan | None:
    """The ``GatherPlan`` of a file's entries when all of them are ``Gathered`` from one plan of several
    ranks (the file can then be written by every rank, ``GatherPlan.shared_file``), else None."""
    plans = {id(e.plan): e.plan for _, e in entries if type(e) is Gathered}
    if len(plans) != 1 or any(type(e) is not Gathered for _, e in entries):
        return None
    plan = next(iter(plans.values()))
    return plan if plan.world > 1 else None
