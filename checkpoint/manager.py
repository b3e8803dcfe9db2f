"""``CheckpointManager``: the checkpoints of a training run -- ``step-{N}`` entries, ``latest`` and ``best``,
pruning, synchronous, background and sharded saves, and resuming.

The manager knows nothing of training. It is handed components and treats each as stateful: a model
(``nn.Module``, saved as canonical weights), anything with ``state_dict()``/``load_state_dict()`` (scheduler,
GradScaler, ``OptimizerState``), or a plain dict (trainer counters). It owns the policy around them and
delegates the rest, one concern per module: the rules and the pointers (``policy``), which entry to resume
(``resume``), the entry on disk (``entry``: every save path commits through ``storage.commit_dir``), the
background writer (``async_save``), the states' files (``states``) and loading (``loading``).
"""
from __future__ import annotations

import errno
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

import collective

from . import policy, resume
from .async_save import BackgroundWriter, DeferredCopy, LiveState, snapshot_entries, snapshot_tree
from .dtensors import buffer_agreement, is_sharded_state
from .entry import MODEL_COMPONENT, entry_manifest, write_entry, write_sharded_entry
from .errors import CheckpointError, agree_written
from .loading import load
from .plan import LoadReport
from .manifest import MANIFEST, POINTER, TOPOLOGY, check_json, read_pointer, topology_of
from .objstore import as_path, is_url
from .optimizer_state import OptimizerState
from .rank_files import attach_state_shards, materialize_sources
from .saving import write_collectively
from .states import read_states
from .storage import read_json
from .wrappers import unwrap


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
        or by the next ``save`` (see ``checkpoint/async_save.py``). Not with ``sharded`` (every rank writes).

        ``overlap_snapshot`` (with ``async_save``): the tensors of each ``OptimizerState`` component (the
        parameters its optimizer updates, and its state: AdamW's moments) are copied by the background thread
        while training runs on, and that optimizer's next ``step()`` waits until they are (a step pre-hook):
        ``save`` stalls only for the rest (buffers, other components). For loops that change parameters and
        optimizer state only through ``optimizer.step()`` between a save and the next step, as
        ``scripts/train.py`` does; call ``wait_snapshot()`` before changing them any other way."""
        if sharded and async_save:
            raise CheckpointError("async_save with sharded=True is not supported (every rank writes its own file, "
                                  "which needs collectives after the write): use one or the other")
        self.directory = as_path(directory)  # a local/shared directory, or s3://bucket/prefix (objstore)
        self.keep_last = keep_last
        self.every = every
        self.sharded = sharded
        self.async_save = async_save
        self.overlap_snapshot = overlap_snapshot
        self._step_hooks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> its step pre-hook
        self._background: Any = None  # async_save.BackgroundWriter, on the writer, from the first asynchronous save

    def should_save(self, step: int, *, last: bool = False) -> bool:
        return policy.should_save(step, self.every, last=last)

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
        path = self.directory / policy.entry_name(step)

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
        """Every rank writes its rank file into one temporary directory; rank 0 then writes state and
        manifest (sha256 of every file), commits the entry, moves ``latest`` and prunes (``entry``)."""
        write_sharded_entry(path, step, components[MODEL_COMPONENT], sorted(components), states, metadata,
                            prepare=lambda: policy.clean_temps(self.directory),
                            on_commit=lambda: self._after_commit(step),
                            failure=lambda e: self._write_failure(path, e))

    # -- asynchronous saves (checkpoint/async_save.py)

    def _snapshot_collectively(self, model: nn.Module, write, path: Path) -> None:
        """``write_collectively(model, write, path, to_cpu=False)`` for an asynchronous save, with the writer's
        snapshot plan kept between saves: ``write(LiveState(sd), {}, info)`` on the writer takes the model's
        tensors from its ``ModelPlan`` (checked against the live ``state_dict``, rebuilt when it differs), instead of
        unwrapping, canonicalising and looking for ties again at every save. A sharded model (FSDP2) takes
        ``write_collectively``'s own path (gathered tensor by tensor, every rank taking part)."""
        bare = unwrap(model)
        sd = bare.state_dict(keep_vars=True)  # the same call canonical_state makes: hooks and all
        if is_sharded_state(sd):
            write_collectively(model, write, path, to_cpu=False)
            return
        buffers = buffer_agreement(bare)  # collective: before anything can fail on one rank only
        error: BaseException | None = None
        if collective.is_writer():
            try:
                write(LiveState(sd), {}, {"buffers": buffers} if buffers is not None else {})
            except Exception as e:  # noqa: BLE001 -- told to every rank by agree_written()
                error = e
        agree_written(error, path)

    def _save_in_background(self, path: Path, step: int, components: Mapping[str, Any], states: dict[str, Any],
                            metadata: Mapping[str, Any] | None, entries: dict[str, Any],
                            aliases: dict[str, str], info: dict[str, Any]) -> None:
        """The writer's part of an asynchronous save: snapshot now (this thread), write later (the background
        thread). Runs inside ``_snapshot_collectively``, so a failing snapshot is told to every rank.
        ``entries`` is a ``LiveState`` (a non-sharded model's bare ``state_dict(keep_vars=True)``, snapshotted
        through the writer's ``ModelPlan``) or the sources ``write_collectively`` handed over (FSDP2)."""
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
        meta = check_json(metadata) if metadata else {}
        meta[TOPOLOGY] = {**topology_of(info), **meta.get(TOPOLOGY, {})}
        names = sorted(components)

        def job() -> None:
            try:
                manifest = entry_manifest(step, names, meta, entries, aliases, info)
                self._commit_entry(path, step, manifest, entries, states)
            except OSError as e:
                raise CheckpointError(self._write_failure(path, e)) from None

        bg.submit(str(path), job, later if later else None)

    def _deferred_copy(self, components: Mapping[str, Any]) -> Any:
        """``overlap_snapshot``: what the writer thread copies (every ``OptimizerState``'s parameters and
        state tensors), with a step pre-hook on each such optimizer that waits for that copy."""
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
        message = self._background.take_failure() if self._background is not None else None
        failure = collective.share_outcome(CheckpointError(message) if message else None)
        if failure is not None:
            raise CheckpointError(str(failure))

    def _settle(self) -> None:
        """Readers see the last save: wait for one in flight (its outcome stays pending for ``flush``)."""
        if self._background is not None and not self._background.on_worker_thread():
            self._background.wait()

    def _write_entry(self, path: Path, step: int, components: Mapping[str, Any], states: dict[str, Any],
                     metadata: Mapping[str, Any] | None, entries: dict[str, Any], aliases: dict[str, str],
                     info: dict[str, Any]) -> None:
        """The writer's part of a synchronous ``save``: the entry, the pointer, pruning."""
        self._commit_entry(path, step, entry_manifest(step, components, metadata, entries, aliases, info),
                           entries, states)

    def _commit_entry(self, path: Path, step: int, manifest: dict[str, Any], entries: dict[str, Any],
                      states: dict[str, Any]) -> None:
        """The entry (files written, fsynced, committed in one step), then ``latest``, then pruning: no
        collective here (the background writer runs it too)."""
        policy.clean_temps(self.directory)
        write_entry(path, manifest, entries, states)
        self._after_commit(step)

    def _after_commit(self, step: int) -> None:
        policy.point_latest(self.directory, step)
        policy.prune(self.directory, self.keep_last, protect=step)

    def _write_failure(self, path: Path, e: OSError) -> str:
        """One line for a save the filesystem refused: what happened, that nothing was lost, the fix."""
        fix = {errno.ENOSPC: "free disk space or save to a larger disk",
               errno.EDQUOT: "free space within your disk quota or save elsewhere",
               errno.EFBIG: "raise the file-size limit (ulimit -f) or save elsewhere",
               errno.EROFS: "save to a writable directory",
               errno.EACCES: "make the directory writable or save elsewhere"}.get(e.errno, "check the directory, "
                                                                                      "then save again")
        if is_url(self.directory):
            newest = policy.scan_entries(self.directory)
            kept = (f"the newest committed entry, {newest[-1][1].name}, stays the latest" if newest else
                    "nothing earlier was changed")
        else:
            previous = read_pointer(self.directory / POINTER)
            kept = f"`latest` still points to {previous}, intact" if previous else "nothing earlier was changed"
        return f"could not write checkpoint {path}: {e.strerror or e}; {kept}; {fix}"

    # -- best entry (by a metric the caller names; the manager knows nothing of training)

    def best_record(self) -> dict[str, Any] | None:
        """The ``best`` pointer's record ``{"entry", "step", "metric", "value", "mode"}``, or None."""
        return policy.best_record(self.directory)

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
                  or policy.is_better(value, current["value"], mode))
        error: BaseException | None = None
        if better and collective.is_writer():
            try:
                policy.point_best(self.directory, step, metric, value, mode)
                policy.prune(self.directory, self.keep_last, protect=step)  # the former best, if kept only for being best, goes now
            except Exception as e:  # noqa: BLE001 -- told to every rank by agree_written(), so none waits on a dead writer
                error = e
        agree_written(error, self.directory / policy.BEST_POINTER)
        return better

    def best(self) -> Path | None:
        """The entry ``best`` points to, if it verifies (sha256 of every file); else None."""
        self._settle()
        return resume.best(self.directory)

    # -- reading

    def entries(self) -> list[tuple[int, Path]]:
        """(step, path) of every entry with a readable manifest, oldest first. Step comes from the manifest."""
        self._settle()
        return policy.scan_entries(self.directory)

    def latest(self) -> Path | None:
        """The entry ``latest`` points to if it verifies (sha256 of every file), else the newest entry
        that does; None when there is none."""
        self._settle()
        return resume.latest(self.directory)

    def resolve(self, path: str | Path | None = None) -> Path:
        """The checkpoint to restore: ``path`` itself, or for None this manager's verified latest entry,
        or for another manager's directory that one's verified latest entry."""
        self._settle()
        return resume.resolve(self.directory, path)

    def resolve_agreed(self, path: str | Path | None = None, *, missing_ok: bool = False) -> Path | None:
        """``resolve(path)`` decided by rank 0 and checked by every rank (``resume.resolve_agreed``): the one
        way to pick the checkpoint to resume under a process group. A collective."""
        self._settle()
        return resume.resolve_agreed(self.directory, path, missing_ok=missing_ok)

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
        verified = entry and path in resume.VERIFIED
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
