"""Checkpoint policy for training runs: ``step-{N}`` entries, verified ``latest`` and ``best`` pointers, pruning.

The manager knows nothing of training. It is handed components and treats each as stateful: a model
(``nn.Module``, saved as canonical weights), anything with ``state_dict()``/``load_state_dict()``
(scheduler, GradScaler, ``OptimizerState``), or a plain dict (trainer counters). The step is stored in
the entry's manifest, never parsed from a directory name. Policy is the pure functions ``should_save``
and ``select_prune``; the class only does I/O around them.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ._safetensors_io import CODE_OF_NAME, InMemory, dtype_name
from .errors import CheckpointError
from .formats import FORMAT_TAG, MANIFEST, POINTER, read_json, read_pointer, sha256_file, verify_files
from ._load import LoadReport, load
from ._save import (_process_group, atomic_write_text, build_manifest, is_writer,
                    write_collectively, write_directory)
from ._states import STATE_PICKLE, read_states, state_files
from ._unwrap import unwrap

BEST_POINTER = "best"  # JSON record next to ``latest``: the entry with the best metric
MODEL_COMPONENT = "model"


# ------------------------------------------------------------------------------------------- policy

def should_save(step: int, every: int | None, *, last: bool = False) -> bool:
    """Save at every ``every``-th step (step > 0) and always at the last step."""
    return last or bool(every and every > 0 and step > 0 and step % every == 0)


def is_better(value: float, best: float, mode: str) -> bool:
    """``value`` strictly improves on ``best`` for ``mode`` "max" (accuracy, Dice) or "min" (a loss)."""
    return value > best if mode == "max" else value < best


def select_prune(steps: Sequence[int], keep_last: int | None, protect: Iterable[int] = ()) -> list[int]:
    """Steps to delete so that the newest ``keep_last`` (and every protected step) remain.

    ``keep_last`` of None or 0 keeps everything.
    """
    ordered = sorted(set(steps))
    if not keep_last or keep_last <= 0:
        return []
    keep = set(ordered[-keep_last:]) | set(protect)
    return [s for s in ordered if s not in keep]


# Entries whose sha256 were checked in this process, keyed by path and manifest mtime, so that choosing an
# entry (latest) and then loading it reads each file once for hashing, not twice.
_VERIFIED: set[tuple[str, int]] = set()


def _verification_key(path: Path) -> tuple[str, int]:
    try:
        return str(path.resolve()), (path / MANIFEST).stat().st_mtime_ns
    except OSError:
        return str(path), -1


def entry_name(step: int) -> str:
    return f"step-{step}"


# --------------------------------------------------------------------------------- stateful adapters

class OptimizerState:
    """An optimizer seen as a component whose state is keyed by parameter NAME, not index.

    Names are those of the bare model (``unwrap(model).named_parameters()``), so the state survives
    wrapping changes (DDP <-> DP <-> single <-> compiled) and parameter-group regrouping. Built on
    ``torch.distributed.checkpoint.state_dict.get/set_optimizer_state_dict``.

    For a sharded model (FSDP2) ``state_dict`` gathers full tensors on rank 0 (the writer; other ranks
    get an empty dict) and ``load_state_dict`` takes full tensors into each rank's shards, so it is the same
    name-keyed state a single process or DDP saves and loads: runs move between FSDP, DDP and one process at
    any world size with their AdamW moments intact. ``local_state_dict`` is the state a sharded entry writes:
    each rank's own shards (DTensors), never gathered; ``load_state_dict`` also takes that state back as read
    from such an entry (each FSDP rank reading only its own block).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer
        self._names: tuple[tuple[int, ...], list[str]] | None = None  # (param ids in group order, their names)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        model = unwrap(self.model)
        options = self._options(model, saving=True)
        if options is None:
            fast = self._renamed_state_dict()
            if fast is not None:
                return fast
        sd = get_optimizer_state_dict(model, self.optimizer, options=options)
        if options is None:
            self._learn_names(sd)
        return sd

    def _ids(self) -> tuple[int, ...]:
        return tuple(id(p) for group in self.optimizer.param_groups for p in group["params"])

    def _learn_names(self, sd: dict[str, Any]) -> None:
        """Remember the name torch's helper gave each parameter (it knows every wrapper's naming), so the next
        calls can rename ``optimizer.state_dict()`` themselves: the helper costs ~15 ms a call on ResNet-18,
        most of a snapshot's overhead over its bare copy (bench/ckpt_stall.py)."""
        names = [n for group in sd.get("param_groups", []) for n in group.get("params", [])]
        ids = self._ids()
        self._names = (ids, names) if len(names) == len(ids) and len(set(names)) == len(names) else None

    def _renamed_state_dict(self) -> dict[str, Any] | None:
        """What ``get_optimizer_state_dict`` returns for an unsharded model (the optimizer's own state_dict,
        indices replaced by parameter names, same order), built from the names it gave last time; None when
        they are not known for the current parameter groups, or the state is still empty (torch's helper then
        initialises it)."""
        if self._names is None or not self.optimizer.state or self._names[0] != self._ids():
            return None
        names = self._names[1]
        sd = self.optimizer.state_dict()
        sd["state"] = {names[pid]: v for pid, v in sd["state"].items()}
        for group in sd["param_groups"]:
            group["params"] = [names[pid] for pid in group["params"]]
        return sd

    def local_state_dict(self) -> dict[str, Any]:
        """This rank's part of the state, never gathered: DTensor moments for a sharded model (what
        ``CheckpointManager(sharded=True)`` writes rank by rank); ``state_dict()`` for any other model."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        from ._sharded import is_sharded_state

        model = unwrap(self.model)
        if not is_sharded_state(dict(model.named_parameters())):
            return self.state_dict()
        return get_optimizer_state_dict(model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load(state, sources=None)

    def _load(self, state: dict[str, Any], *, sources: bool | None) -> None:
        """``load_state_dict``; ``sources`` False when the caller knows ``state`` holds only tensors (read from
        an entry that is not sharded), which spares walking it (~1 ms for ResNet-152's AdamW state); None
        looks."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        from ._sharded import has_sources, is_sharded_state, local_optimizer_state, materialize_sources

        model = unwrap(self.model)
        params = dict(model.named_parameters())  # one walk of the modules, shared by the checks below
        options = self._options(model, saving=False, params=params)
        if sources is not False and has_sources(state):  # read from a sharded entry: tensors still on disk
            if is_sharded_state(params):  # each rank reads its own block, loaded as sharded state
                state, options = local_optimizer_state(state, params), StateDictOptions(full_state_dict=False)
            else:
                state = materialize_sources(state)
        if options is None and self._load_by_index(params, state):
            return
        set_optimizer_state_dict(model, self.optimizer, state, options=options)

    def _load_by_index(self, params: dict[str, nn.Parameter], state: dict[str, Any]) -> bool:
        """The common case without torch.distributed.checkpoint's per-parameter name resolution (a fifth of a
        ResNet-152 + AdamW restore): when the saved groups list exactly the live groups' parameter names, in
        order, the name-keyed state maps onto ``Optimizer.load_state_dict``'s indices one to one. Anything
        else (regrouped parameters, names DCP spells differently) returns False: DCP's path handles it."""
        groups = state.get("param_groups") if isinstance(state, dict) else None
        saved_state = state.get("state") if isinstance(state, dict) else None
        if not isinstance(groups, list) or not isinstance(saved_state, dict) \
                or len(groups) != len(self.optimizer.param_groups):
            return False
        names = {id(p): n for n, p in params.items()}
        index: dict[str, int] = {}
        for live, saved in zip(self.optimizer.param_groups, groups):
            live_names = [names.get(id(p)) for p in live["params"]]
            if not isinstance(saved, dict) or saved.get("params") != live_names:
                return False
            for n in live_names:
                index[n] = len(index)
        if len(index) != sum(len(g["params"]) for g in groups):
            return False
        # exactly the trainable parameters carry state, as torch's path requires: it drops saved state of a
        # frozen parameter and refuses a trainable one without state; those cases take its path
        trainable = {n for n, p in params.items() if p.requires_grad and n in index}
        if set(saved_state) != trainable:
            return False
        self.optimizer.load_state_dict({
            "state": {index[n]: v for n, v in saved_state.items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups]})
        return True

    @staticmethod
    def _options(model: nn.Module, *, saving: bool, params: dict[str, nn.Parameter] | None = None):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        from ._sharded import is_sharded_state

        if not is_sharded_state(params if params is not None else dict(model.named_parameters())):
            return None
        return StateDictOptions(full_state_dict=True, cpu_offload=saving)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


@dataclass
class Restored:
    """What ``CheckpointManager.restore`` brought back."""

    path: Path
    step: int | None
    epoch: int | None
    report: LoadReport
    restored: list[str] = field(default_factory=list)  # components loaded in place
    absent: list[str] = field(default_factory=list)  # components the checkpoint did not have
    states: dict[str, Any] = field(default_factory=dict)  # plain-dict components, returned as saved
    manifest: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- manager

class CheckpointManager:
    """Saves ``step-{N}`` entries under ``directory``, keeps the newest ``keep_last``, points ``latest`` at
    the last complete one, and finds the newest entry that verifies when the pointer's does not.

    Example:
        >>> mgr = CheckpointManager("run/checkpoints", keep_last=3, every=100)
        >>> if mgr.should_save(step):
        ...     mgr.save(step, {"model": model, "optimizer": OptimizerState(model, opt),
        ...                     "scheduler": sched, "trainer": {"epoch": epoch}})
        >>> restored = mgr.restore(mgr.latest(), {"model": model, "optimizer": OptimizerState(model, opt)})
    """

    def __init__(self, directory: str | Path, *, keep_last: int | None = 3, every: int | None = None,
                 sharded: bool = False, async_save: bool = False, overlap_snapshot: bool = False):
        """``sharded``: every rank writes its own shards (FSDP2 parameters, and an ``OptimizerState``'s moments
        via ``local_state_dict``: never gathered) to its own file in parallel, plus one manifest listing them
        with sha256; such entries load into any layout and world size like the others (default False: one
        canonical file written by rank 0).

        ``async_save``: ``save`` returns once the entry's state is snapshotted into reused CPU buffers (pinned
        for CUDA tensors); the writer writes files, fsyncs, renames, moves ``latest`` and prunes in one
        background thread. At most one save is in flight (a new save waits for the previous one). A failed
        background write is reported by ``failure()`` (no waiting) and raised by ``flush()`` on every rank,
        or by the next ``save`` (see ``checkpoint/_async.py``). Not with ``sharded`` (every rank writes).

        ``overlap_snapshot`` (with ``async_save``): the tensors of each ``OptimizerState`` component (the
        parameters its optimizer updates, and its state: AdamW's moments) are copied by the background thread
        while training runs on, and that optimizer's next ``step()`` waits until they are (a step pre-hook):
        ``save`` stalls only for the rest (buffers, other components). For loops that change parameters and
        optimizer state only through ``optimizer.step()`` between a save and the next step, as
        ``scripts/train.py`` does; call ``wait_snapshot()`` before changing them any other way."""
        if sharded and async_save:
            raise CheckpointError("async_save with sharded=True is not supported (every rank writes its own file, "
                                  "which needs collectives after the write): use one or the other")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.every = every
        self.sharded = sharded
        self.async_save = async_save
        self.overlap_snapshot = overlap_snapshot
        self._step_hooks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> its step pre-hook
        self._background: Any = None  # _async.BackgroundWriter, on the writer, from the first asynchronous save

    def should_save(self, step: int, *, last: bool = False) -> bool:
        return should_save(step, self.every, last=last)

    # -- writing

    def save(self, step: int, components: Mapping[str, Any], *, metadata: Mapping[str, Any] | None = None,
             blocking: bool | None = None) -> Path:
        """Write entry ``step-{step}`` atomically, then move ``latest`` to it, then prune.

        Every rank must call this (component state_dicts may be collective); rank 0 writes. ``blocking``
        (default: not ``async_save``) False returns once the state is snapshotted and leaves the writing to
        the background thread (``flush()`` waits for it); True writes before returning. Either way a save
        still in flight is waited for first, and if it failed this save raises its error instead.
        """
        if MODEL_COMPONENT not in components or not isinstance(components[MODEL_COMPONENT], nn.Module):
            raise CheckpointError("components need a 'model' entry holding the nn.Module to save")
        for name, comp in components.items():
            if isinstance(comp, torch.optim.Optimizer):
                raise CheckpointError(f"component {name!r} is a bare optimizer (index-keyed state); "
                                      "wrap it as OptimizerState(model, optimizer)")
        background = not (blocking if blocking is not None else not self.async_save)
        if background and self.sharded:
            raise CheckpointError("a background save of a sharded manager is not supported: save with blocking=True")
        if background or self.async_save:
            # the save in flight must end first (its buffers are reused), and if it failed every rank stops
            # here with the writer's own line (flush is collective; so is save)
            self.flush()
        # Every rank asks (state_dict() may be collective); only the writer copies tensors to CPU, as it writes.
        states = {name: self._state_of(comp) for name, comp in components.items() if name != MODEL_COMPONENT}
        path = self.directory / entry_name(step)

        def write(entries, aliases, info) -> None:  # on the writer only, while a sharded model is gathered
            previous = self._background.take_failure() if self._background is not None else None
            if previous:  # the save before this one failed in the background: say so, write nothing more
                raise CheckpointError(previous)
            if background:
                self._save_in_background(path, step, components, states, metadata, entries, aliases, info)
                return
            try:
                self._write_entry(path, step, components, states, metadata, entries, aliases, info)
            except OSError as e:
                raise CheckpointError(self._write_failure(path, e)) from None

        if background:
            self._snapshot_collectively(components[MODEL_COMPONENT], write, path)
        elif self.sharded:
            self._save_sharded(path, step, components, states, metadata)
        else:
            write_collectively(components[MODEL_COMPONENT], write, path)
        return path

    def _state_of(self, comp: Any) -> Any:
        """A component's state to save: a sharded entry takes each rank's own part where the component
        offers one (``OptimizerState.local_state_dict``), so no rank gathers the full optimizer state."""
        if isinstance(comp, dict) or not hasattr(comp, "state_dict"):
            return comp
        if self.sharded and hasattr(comp, "local_state_dict"):
            return comp.local_state_dict()
        return comp.state_dict()

    def _save_sharded(self, path: Path, step: int, components: Mapping[str, Any], states: dict[str, Any],
                      metadata: Mapping[str, Any] | None) -> None:
        """Each rank writes its rank file into one temp directory; rank 0 then writes state and manifest
        (sha256 of every file) and renames the directory into place. Every rank learns the outcome."""
        from . import _sharded
        from ._safetensors_io import write_file
        from ._save import atomic_file, fsync_dir, is_writer
        from ._unwrap import describe_wrapping

        dist = _sharded._dist()
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist is not None else (1, 0)
        model = unwrap(components[MODEL_COMPONENT])
        buffers = _sharded.buffer_agreement(model)
        error: BaseException | None = None
        tmp: str | None = None
        if is_writer():
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._clean_temps()
                tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.directory)
            except Exception as e:  # noqa: BLE001 -- told to every rank by agree()
                error = CheckpointError(self._write_failure(path, e)) if isinstance(e, OSError) else e
        tmp = _sharded.broadcast_from_writer(tmp)
        sd = model.state_dict(keep_vars=True)
        states, state_shards = _sharded.split_state_shards(states)  # sharded optimizer moments: per rank too
        mine: dict[str, Any] = {}
        if tmp is not None:
            try:
                entries, pieces = _sharded.rank_entries({**sd, **state_shards}, rank)
                name = _sharded.SHARD_FILE.format(rank=rank, world=world)
                # hashed while written (a helper thread, overlapping the copies and the fsync): not a second
                # pass over the finished file, which cost as much as the write itself
                with atomic_file(Path(tmp) / name, sha256=True) as f:
                    write_file(f, entries, {"format": "pt", "anytopo_rank": f"{rank}/{world}"})
                mine = {"name": name, "bytes": (Path(tmp) / name).stat().st_size, "sha256": f.hexdigest(),
                        "pieces": pieces}
            except Exception as e:  # noqa: BLE001
                mine = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        reports = [mine]
        if dist is not None and world > 1:
            reports = [None] * world
            dist.all_gather_object(reports, mine)
        if is_writer() and error is None:
            try:
                failed = [(r, rep["error"]) for r, rep in enumerate(reports) if "error" in rep]
                if failed:
                    raise CheckpointError(f"rank {failed[0][0]} could not write its shard file ({failed[0][1]})")
                table: dict[str, Any] = {}
                state_table: dict[str, Any] = {}
                for r, rep in enumerate(reports):
                    for key, (offset, shape) in rep["pieces"].items():
                        t, where = (sd[key], table) if key in sd else (state_shards[key], state_table)
                        entry = where.setdefault(key, {"shape": list(t.shape), "dtype": CODE_OF_NAME[dtype_name(t.dtype)],
                                                       "pieces": []})
                        entry["pieces"].append([r, offset, shape])
                info = {"wrappers": describe_wrapping(components[MODEL_COMPONENT]),
                        "device_type": next(iter(sd.values())).device.type if sd else "cpu"}
                if buffers is not None:
                    info["buffers"] = buffers
                if any(_sharded.shard_layout(v) is not None for v in sd.values()):
                    info["sharded_state_dict"] = True
                aliases = _sharded.tied_keys(sd)  # tied weights: stored once, re-tied on load
                manifest = build_manifest({k: InMemory(v.detach()) for k, v in sd.items() if k not in aliases},
                                          aliases, info, {**(metadata or {}), "step": step})
                manifest["topology"]["world_size"] = world
                manifest.update(kind="entry", components=sorted(components), layout="sharded",
                                sharded={"world_size": world, "files": [rep["name"] for rep in reports],
                                         "tensors": table, **({"states": state_table} if state_table else {})})
                files = {rep["name"]: {"bytes": rep["bytes"], "sha256": rep["sha256"]} for rep in reports}
                for name, data in state_files(states).items():
                    with atomic_file(Path(tmp) / name, sha256=True) as f:
                        data(f)
                    files[name] = {"bytes": (Path(tmp) / name).stat().st_size, "sha256": f.hexdigest()}
                manifest["files"] = files
                atomic_write_text(Path(tmp) / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
                fsync_dir(Path(tmp))
                if path.exists():
                    shutil.rmtree(path)  # an older entry of the same step (a re-run): replaced by the complete one
                os.replace(tmp, path)
                fsync_dir(self.directory)
                atomic_write_text(self.directory / POINTER, entry_name(step) + "\n")
                self._prune(protect=step)
            except Exception as e:  # noqa: BLE001
                error = CheckpointError(self._write_failure(path, e)) if isinstance(e, OSError) else e
                shutil.rmtree(tmp, ignore_errors=True)
        _sharded.agree(error, path)

    # -- asynchronous saves (checkpoint/_async.py)

    def _snapshot_collectively(self, model: nn.Module, write, path: Path) -> None:
        """``write_collectively(model, write, path, to_cpu=False)`` for an asynchronous save, with the writer's
        snapshot plan kept between saves: ``write(LiveState(sd), {}, info)`` on the writer takes the model's
        tensors from its ``ModelPlan`` (checked against the live ``state_dict``, rebuilt when it differs), instead of
        unwrapping, canonicalising and looking for ties again at every save. A sharded model (FSDP2) takes
        ``write_collectively``'s own path (gathered tensor by tensor, every rank taking part)."""
        from . import _sharded
        from ._async import LiveState

        bare = unwrap(model)
        sd = bare.state_dict(keep_vars=True)  # the same call canonical_state makes: hooks and all
        if _sharded.is_sharded_state(sd):
            write_collectively(model, write, path, to_cpu=False)
            return
        buffers = _sharded.buffer_agreement(bare)  # collective: before anything can fail on one rank only
        error: BaseException | None = None
        if is_writer():
            try:
                write(LiveState(sd), {}, {"buffers": buffers} if buffers is not None else {})
            except Exception as e:  # noqa: BLE001 -- told to every rank by agree()
                error = e
        _sharded.agree(error, path)

    def _save_in_background(self, path: Path, step: int, components: Mapping[str, Any], states: dict[str, Any],
                            metadata: Mapping[str, Any] | None, entries: dict[str, Any],
                            aliases: dict[str, str], info: dict[str, Any]) -> None:
        """The writer's part of an asynchronous save: snapshot now (this thread), write later (the background
        thread). Runs inside ``_snapshot_collectively``, so a failing snapshot is told to every rank.
        ``entries`` is a ``LiveState`` (a non-sharded model's bare ``state_dict(keep_vars=True)``, snapshotted
        through the writer's ``ModelPlan``) or the sources ``write_collectively`` handed over (FSDP2)."""
        from ._async import BackgroundWriter, LiveState, snapshot_entries, snapshot_tree
        from ._save import _check_json, _topology

        if self._background is None:
            self._background = BackgroundWriter()
        bg = self._background
        later = self._deferred_copy(components) if self.overlap_snapshot else None
        if isinstance(entries, LiveState):
            plan = bg.model_plan
            entries = plan.snapshot(components[MODEL_COMPONENT], entries, bg.model_pool, later)
            aliases, info = plan.aliases, {**plan.info, **info}
        else:
            entries = snapshot_entries(entries, bg.model_pool)  # gathered shards: copied now
        states = snapshot_tree(states, bg.state_pool, later)
        # What the manifest needs from this moment is taken now: the metadata (checked, and frozen against
        # later changes by the caller) and the topology (it reads the process group, which may be gone when
        # the thread runs); the rest of it is built in the background, from the snapshot.
        meta = _check_json(metadata) if metadata else {}
        meta["topology"] = {**_topology(info), **meta.get("topology", {})}
        names = sorted(components)

        def job() -> None:
            try:
                manifest = self._entry_manifest(step, names, meta, entries, aliases, info)
                self._commit_entry(path, step, manifest, entries, states)
            except OSError as e:
                raise CheckpointError(self._write_failure(path, e)) from None

        bg.submit(str(path), job, later if later else None)

    def _deferred_copy(self, components: Mapping[str, Any]) -> Any:
        """``overlap_snapshot``: what the writer thread copies (every ``OptimizerState``'s parameters and
        state tensors), with a step pre-hook on each such optimizer that waits for that copy."""
        from ._async import DeferredCopy

        owned: set[int] = set()
        for comp in components.values():
            if isinstance(comp, OptimizerState):
                opt = comp.optimizer
                if opt not in self._step_hooks:
                    self._step_hooks[opt] = opt.register_step_pre_hook(self._before_step)
                owned.update(id(p) for group in opt.param_groups for p in group["params"])
                owned.update(id(v) for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))
        return DeferredCopy(owned)

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.wait_snapshot()

    def wait_snapshot(self) -> None:
        """Wait until the save in flight has its snapshot (``overlap_snapshot``: the deferred copy of parameters
        and optimizer state is made); after it, they may change. Optimizers saved as ``OptimizerState`` call it
        themselves before each ``step()``. Non-collective; immediate when nothing is pending."""
        if self._background is not None:
            self._background.wait_snapshot()

    def failure(self) -> str | None:
        """The one-line error of a background save that has FAILED, without waiting (None otherwise, and
        on every rank but the writer). Non-collective: a training loop all-reduces it (see scripts/train.py)."""
        return self._background.failure(wait=False) if self._background is not None else None

    def in_flight(self) -> bool:
        """Whether a background save is still being written (on the writer)."""
        return self._background is not None and self._background.in_flight()

    def wait(self) -> str | None:
        """Wait for the save in flight (on this rank; non-collective) and return its error line, if it failed.
        The outcome stays pending for ``flush``."""
        return self._background.failure(wait=True) if self._background is not None else None

    def flush(self) -> None:
        """Wait for the background save in flight, then make every rank learn its outcome: if it failed, every
        rank raises the same one-line CheckpointError (which names the entry, the cause, what was kept and the
        fix). Every rank must call this. A no-op without asynchronous saves apart from that agreement."""
        from . import _sharded

        message = self._background.take_failure() if self._background is not None else None
        dist = _sharded._dist()
        if dist is not None and dist.get_world_size() > 1:
            message = _sharded.broadcast_from_writer(message)
            dist.barrier()  # nobody races ahead to tear the group down while a peer still receives
        if message:
            raise CheckpointError(message)

    def _settle(self) -> None:
        """Readers see the last save: wait for one in flight (its outcome stays pending for ``flush``)."""
        if self._background is not None and not self._background.on_worker_thread():
            self._background.wait()

    def _write_entry(self, path: Path, step: int, components: Mapping[str, Any], states: dict[str, Any],
                     metadata: Mapping[str, Any] | None, entries: dict[str, Any], aliases: dict[str, str],
                     info: dict[str, Any]) -> None:
        """The writer's part of ``save``: the entry directory (model, then states), the pointer, pruning."""
        self._commit_entry(path, step, self._entry_manifest(step, components, metadata, entries, aliases, info),
                           entries, states)

    @staticmethod
    def _entry_manifest(step: int, components: Mapping[str, Any], metadata: Mapping[str, Any] | None,
                        entries: dict[str, Any], aliases: dict[str, str], info: dict[str, Any]) -> dict[str, Any]:
        manifest = build_manifest(entries, aliases, info, {**(metadata or {}), "step": step})
        manifest["kind"] = "entry"
        manifest["components"] = sorted(components)
        return manifest

    def _commit_entry(self, path: Path, step: int, manifest: dict[str, Any], entries: dict[str, Any],
                      states: dict[str, Any]) -> None:
        """Files (written, fsynced, renamed into place), then ``latest``, then pruning: no collective here."""
        self._clean_temps()
        write_directory(path, list(entries.items()), manifest, extra_files=state_files(states))
        atomic_write_text(self.directory / POINTER, entry_name(step) + "\n")
        self._prune(protect=step)

    def _write_failure(self, path: Path, e: OSError) -> str:
        """One line for a save the filesystem refused: what happened, that nothing was lost, the fix."""
        fix = {errno.ENOSPC: "free disk space or save to a larger disk",
               errno.EDQUOT: "free space within your disk quota or save elsewhere",
               errno.EFBIG: "raise the file-size limit (ulimit -f) or save elsewhere",
               errno.EROFS: "save to a writable directory",
               errno.EACCES: "make the directory writable or save elsewhere"}.get(e.errno, "check the directory, "
                                                                                      "then save again")
        previous = read_pointer(self.directory / POINTER)
        kept = f"`latest` still points to {previous}, intact" if previous else "nothing earlier was changed"
        return f"could not write checkpoint {path}: {e.strerror or e}; {kept}; {fix}"

    def _clean_temps(self) -> None:
        """Remove what an interrupted save left: entry temp dirs and pointer temp files."""
        if self.directory.is_dir():
            for pattern in (".step-*", f".{POINTER}.*.tmp"):
                for p in self.directory.glob(pattern):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def _prune(self, protect: int) -> None:
        entries = dict(self.entries())
        best = self.best_record()
        protected = [protect] + ([best["step"]] if best else [])  # the best entry is never pruned while best
        for step in select_prune(list(entries), self.keep_last, protect=protected):
            shutil.rmtree(entries[step], ignore_errors=True)

    # -- best entry (by a metric the caller names; the manager knows nothing of training)

    def best_record(self) -> dict[str, Any] | None:
        """The ``best`` pointer's record ``{"entry", "step", "metric", "value", "mode"}``, or None."""
        path = self.directory / BEST_POINTER
        if not path.is_file():
            return None
        try:
            record = read_json(path)
        except CheckpointError:
            return None
        ok = isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get("value"), (int, float))
        return record if ok else None

    def update_best(self, step: int, metric: str, value: float, *, mode: str = "max") -> bool:
        """Point ``best`` at entry ``step-{step}`` (which must exist) when ``value`` beats the recorded best
        (``mode`` "max" or "min"), or when the recorded best entry is gone. Returns whether it moved.

        Every rank must call this; rank 0 writes, and every rank learns whether it could (a failure raises on
        all). Entries ``best`` points to are never pruned.
        """
        if mode not in ("max", "min"):
            raise CheckpointError(f"mode {mode!r}: use 'max' or 'min'")
        current = self.best_record()
        better = (current is None or current.get("metric") != metric
                  or not (self.directory / str(current.get("entry"))).is_dir()
                  or is_better(value, current["value"], mode))
        from . import _sharded

        error: BaseException | None = None
        if better and is_writer():
            try:
                if not (self.directory / entry_name(step) / MANIFEST).is_file():
                    raise CheckpointError(f"update_best: no entry {entry_name(step)} in {self.directory}; save it first")
                record = {"entry": entry_name(step), "step": step, "metric": metric, "value": value, "mode": mode}
                atomic_write_text(self.directory / BEST_POINTER, json.dumps(record) + "\n")
                self._prune(protect=step)  # the former best, if kept only for being best, goes now
            except Exception as e:  # noqa: BLE001 -- told to every rank by agree(), so none waits on a dead writer
                error = e
        _sharded.agree(error, self.directory / BEST_POINTER)
        return better

    def best(self) -> Path | None:
        """The entry ``best`` points to, if it verifies (sha256 of every file); else None."""
        self._settle()
        record = self.best_record()
        if record is None:
            return None
        target = self.directory / str(record.get("entry"))
        if target.parent == self.directory and self._verifies(target):
            return target
        return None

    # -- reading

    def entries(self) -> list[tuple[int, Path]]:
        """(step, path) of every entry with a readable manifest, oldest first. Step comes from the manifest."""
        self._settle()
        out = []
        if not self.directory.is_dir():
            return out
        for p in self.directory.iterdir():
            m = p / MANIFEST
            if p.name.startswith(".") or not m.is_file():
                continue
            try:
                manifest = read_json(m)
            except CheckpointError:
                continue
            if isinstance(manifest, dict) and manifest.get("format") == FORMAT_TAG and isinstance(manifest.get("step"), int):
                out.append((manifest["step"], p))
        return sorted(out)

    def _verifies(self, path: Path) -> bool:
        try:
            manifest = read_json(path / MANIFEST)
            verify_files(path, manifest, hashes=True)
        except (CheckpointError, OSError):
            return False
        if not manifest.get("files"):
            return False
        _VERIFIED.add(_verification_key(path))
        return True

    def latest(self) -> Path | None:
        """The entry ``latest`` points to if it verifies (sha256 of every file), else the newest entry
        that does; None when there is none."""
        self._settle()
        pointer = self.directory / POINTER
        name = read_pointer(pointer)  # None for a missing, torn or binary pointer: fall back to the scan
        if name:
            target = self.directory / name
            if target.parent == self.directory and self._verifies(target):
                return target
        for _, path in reversed(self.entries()):
            if self._verifies(path):
                return path
        return None

    def resolve(self, path: str | Path | None = None) -> Path:
        """The checkpoint to restore: ``path`` itself, or for None this manager's verified latest entry,
        or for another manager's directory that one's verified latest entry."""
        if path is None:
            found = self.latest()
            if found is None:
                raise CheckpointError(f"no checkpoint in {self.directory}; start without --resume or point at one")
            return found
        path = Path(path)
        if path.is_dir() and (path / POINTER).is_file() and not (path / MANIFEST).is_file():
            found = CheckpointManager(path).latest()
            if found is None:
                raise CheckpointError(f"{path}: no entry verifies (all damaged or incomplete); point at a good entry")
            return found
        return path

    def resolve_agreed(self, path: str | Path | None = None, *, missing_ok: bool = False) -> Path | None:
        """``resolve(path)`` decided by rank 0 and checked by every rank: the one way to pick the checkpoint
        to resume under a process group (without one it is ``latest()``/``resolve(path)`` plus the check
        that an explicit entry verifies).

        Rank 0 alone resolves the entry (for ``path`` None: this manager's verified latest; None when
        there is none and ``missing_ok``), checks the sha256 of every file, and broadcasts the entry's
        path, step and manifest sha256 (or its error). Every other rank then checks that it sees that
        same entry, in ITS manager directory when rank 0's entry lies in rank 0's, without re-hashing the
        files: the manifest, which holds every file's sha256, must hash the same. Any rank that does not
        makes every rank raise the same one-line CheckpointError, so no rank trains from another step.
        """
        dist = _process_group()
        claim = self._claim(path, missing_ok) if dist is None or dist.get_rank() == 0 else None
        if dist is not None and dist.get_world_size() > 1:
            box = [claim]
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
            dist.broadcast_object_list(box, src=0, device=device)
            claim = box[0]
        if claim["error"]:
            raise CheckpointError(claim["error"])
        rank = dist.get_rank() if dist is not None else 0
        mine, problem = self._check_claim(claim, rank, auto=path is None)
        if dist is not None and dist.get_world_size() > 1:
            problems = [None] * dist.get_world_size()
            dist.all_gather_object(problems, problem)
            problem = next((p for p in problems if p), None)
        if problem:
            raise CheckpointError(problem)
        if mine is not None and claim["manifest_sha256"]:
            _VERIFIED.add(_verification_key(mine))  # rank 0 hashed every file; the manifests match
        return mine

    def _claim(self, path: str | Path | None, missing_ok: bool) -> dict[str, Any]:
        """Rank 0's resolution of ``path``, as plain values to broadcast."""
        claim: dict[str, Any] = {"error": None, "path": None, "in_directory": False, "directory": str(self.directory),
                                 "step": None, "manifest_sha256": None, "size": None}
        try:
            if path is not None and path != "best" and not Path(path).exists():
                raise CheckpointError(f"{path}: no such file or directory; point at a checkpoint entry, a run's "
                                      "checkpoints/ directory or a weights file")
            if path == "best":  # resolved here, on rank 0 alone, like "latest": the others check the claim
                found = self.best()
                if found is None:
                    why = "has no best entry yet" if self.best_record() is None else \
                        "has a best pointer whose entry does not verify"
                    raise CheckpointError(f"{self.directory} {why}; use --resume auto or a checkpoint path")
            else:
                found = self.latest() if path is None else self.resolve(path)
            if found is None and not missing_ok:
                raise CheckpointError(f"no checkpoint in {self.directory}; start without --resume or point at one")
        except CheckpointError as e:
            return {**claim, "error": str(e)}
        if found is None:
            return claim
        claim.update(path=str(found), in_directory=found.parent == self.directory)
        manifest = found / MANIFEST if found.is_dir() else None
        if manifest is not None and manifest.is_file():
            if _verification_key(found) not in _VERIFIED and not self._verifies(found):
                return {**claim, "error": f"{found}: a file is missing or fails its sha256 in the manifest (damaged "
                                          "or incomplete entry); resume another entry or the run's checkpoints/ directory"}
            claim.update(step=read_json(manifest).get("step"), manifest_sha256=sha256_file(manifest))
        elif found.is_file():
            claim["size"] = found.stat().st_size
        return claim

    def _check_claim(self, claim: dict[str, Any], rank: int, *, auto: bool) -> tuple[Path | None, str | None]:
        """The entry this rank resumes for rank 0's ``claim``, and the problem if it does not see the same one."""
        shared = "the checkpoint directory must be shared by all nodes (a shared filesystem, same --output-dir)"
        if claim["path"] is None:
            if auto and rank != 0 and self.entries():
                return None, (f"rank {rank} finds checkpoints in {self.directory} but rank 0 finds none in "
                              f"{claim['directory']}: {shared}")
            return None, None
        theirs = Path(claim["path"])
        mine = self.directory / theirs.name if claim["in_directory"] else theirs
        if rank == 0:
            return mine, None
        where = f"rank 0 resumes {theirs}" + (f" (step {claim['step']})" if claim["step"] is not None else "")
        if claim["manifest_sha256"] is not None:
            if not (mine / MANIFEST).is_file():
                return mine, f"rank {rank} does not see {mine} ({where}): {shared}"
            if sha256_file(mine / MANIFEST) != claim["manifest_sha256"]:
                return mine, f"rank {rank} sees a different {mine} than rank 0 ({where}): {shared}"
        elif not mine.is_file() or mine.stat().st_size != claim["size"]:
            return mine, f"rank {rank} does not see the same file {mine} ({where}): {shared}"
        return mine, None

    def restore(self, path: str | Path | None, components: Mapping[str, Any], *, strict: bool = True,
                allow_pickle: bool = False) -> Restored:
        """Load ``path`` (see ``resolve``: an entry, a manager directory, or any weights file) into components.

        The model is loaded strictly through ``checkpoint.load`` (any source topology); stateful
        components get ``load_state_dict``; plain-dict components come back in ``Restored.states``.
        Entries are sha256-verified once: not again when ``latest()`` just verified them.
        """
        self._settle()
        path = self.resolve(path)
        entry = path.is_dir() and (path / MANIFEST).is_file()
        verified = entry and _verification_key(path) in _VERIFIED
        # The entry's other states (none to read for the model alone) are read in a helper thread while the
        # model loads: each side's preadv (GIL released) overlaps the other's per-tensor Python work. Nothing
        # is applied before both end; if the model's load (or its verification, when due) fails, its error is
        # the one raised and what the helper read is dropped.
        pool = ThreadPoolExecutor(1, thread_name_prefix="anytopo-read-states") \
            if entry and len(components) > 1 else None
        try:
            states_read = pool.submit(read_states, path) if pool is not None else None
            report = load(path, components[MODEL_COMPONENT], strict=strict, allow_pickle=allow_pickle,
                          verify=entry and not verified)
            states = (states_read.result() if states_read is not None else None) or {}
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        if verified:
            report.checks.insert(0, "sha256 verified for every file when the entry was chosen (by rank 0 under a "
                                    "process group)")
        manifest = read_json(path / MANIFEST) if path.is_dir() and (path / MANIFEST).is_file() else {}
        result = Restored(path, manifest.get("step", report.step), manifest.get("epoch", report.epoch), report,
                          restored=[MODEL_COMPONENT], manifest=manifest)
        if manifest.get("sharded"):  # sharded optimizer moments: sources read whole or by each rank's block
            from ._sharded import attach_state_shards, materialize_sources

            states = attach_state_shards(path, manifest, states)
        for name, comp in components.items():
            if name == MODEL_COMPONENT:
                continue
            if name not in states:
                result.absent.append(name)
                continue
            state = states[name]
            if manifest.get("sharded") and not isinstance(comp, OptimizerState):
                state = materialize_sources(state)
            if isinstance(comp, dict):
                result.states[name] = state
            elif isinstance(comp, OptimizerState):  # only a sharded entry's states hold on-disk sources
                comp._load(state, sources=None if manifest.get("sharded") else False)
            else:
                comp.load_state_dict(state)
            result.restored.append(name)
        return result
