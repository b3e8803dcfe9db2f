"""The state of a run beside its model and optimizer: the output directory's lock, which checkpoint a
(re)started run resumes, the EMA of the weights, and the ``best`` entry.

Decisions only rank 0 may take (take the lock, write ``ema.pth``, read the best record) go through
``collective.decide``: every rank learns the verdict and stops alike, none waits on a rank that exited.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import checkpoint
import collective

from .config import ConfigError, TrainConfig


def resolve_resume(cfg: TrainConfig, manager: checkpoint.CheckpointManager, log, restart: int) -> Path | None:
    """The checkpoint to resume, the same on every rank (rank 0 resolves, the others check they see it).

    A torchrun restart (``restart`` > 0: ``DistInfo.restart``, agreed by every rank, as nodes' agents count
    restarts differently) resumes the output directory's latest valid entry without any flag, since torchrun
    relaunches the same argv; a first launch resumes only with --resume.
    """
    try:
        if restart > 0 and not cfg.eval_only:
            # this run's own newest entry; before its first save, what the first launch started from
            found = manager.resolve_agreed(None, missing_ok=True)
            if found is not None or cfg.resume in (None, "auto"):
                log.info("restart %d: %s", restart, f"resuming from {found.name}" if found is not None
                         else f"no checkpoint in {manager.directory} yet, starting fresh")
                return found
            log.info("restart %d: no checkpoint in %s yet, resuming --resume %s again", restart, manager.directory,
                     cfg.resume)
        if cfg.resume is None:
            return None
        if cfg.resume == "auto":
            found = manager.resolve_agreed(None, missing_ok=True)
            if found is None:
                log.info("--resume auto: no checkpoint in %s yet, starting fresh", manager.directory)
            return found
        return manager.resolve_agreed(cfg.resume)  # a path, or "best" (rank 0 reads the pointer)
    except checkpoint.CheckpointError as e:
        raise ConfigError(f"--resume {cfg.resume or 'auto'}: {e}" if "shared by all nodes" not in str(e) else str(e)) from None


class RunLock:
    """An exclusive lock on an output directory, so two runs never write the same run at once.

    ``DIR/.lock`` holds ``{"pid", "host", "started"}`` of its holder and an ``fcntl.flock`` that the kernel
    drops when the holder dies, however it dies (SIGKILL included). A lock file whose flock is free but that
    names a process is stale: it is taken over with a warning. Only rank 0 takes it (:func:`acquire_run_lock`).
    """

    NAME = ".lock"

    def __init__(self, directory: Path):
        self.path = Path(directory) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns a warning when a stale lock was taken over. Raises ConfigError if held."""
        import fcntl
        import socket

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"--output-dir {self.path.parent}: cannot create the run lock there "
                              f"({e.strerror or e}); choose a writable --output-dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            who = f"pid {holder.get('pid')} on host {holder.get('host')}" if holder else "another process"
            raise ConfigError(f"--output-dir {self.path.parent} is in use by a running training run ({who}): wait "
                              "for it to finish, or choose another --output-dir") from None
        previous = _read_holder(fd)
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
        self._fd = fd
        if previous:
            return (f"took over the stale lock of pid {previous.get('pid')} on host {previous.get('host')} "
                    f"(started {previous.get('started')}), which no longer holds it: that run ended without "
                    "releasing it")
        return None

    def release(self) -> None:
        """Empty the file (so the next run does not see a stale holder) and drop the flock."""
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def acquire_run_lock(out: Path, log) -> RunLock | None:
    """Rank 0 locks ``out``; every rank learns the verdict, so a refused run exits 2 on every rank."""
    def take() -> RunLock:
        lock = RunLock(out)
        warning = lock.acquire()
        if warning:
            log.warning("%s", warning)
        return lock

    return collective.decide(take, catch=(ConfigError,), value=False,
                             fail=lambda failure, own: own if own is not None else ConfigError(str(failure)))


# ------------------------------------------------------------------------------------------- best entry

def is_new_best(manager: checkpoint.CheckpointManager, metric: str, value: float | None) -> bool:
    """Whether ``value`` beats the run's best entry on ``metric`` (higher is better). Rank 0's reading of the
    ``best`` record decides (other nodes may not share its disk); every rank returns it (saving is collective)."""
    def better() -> bool:
        record = manager.best_record()
        return value is not None and (record is None or record.get("metric") != metric
                                      or checkpoint.is_better(value, record["value"], "max"))

    return bool(collective.decide(better, fail=lambda failure, own: checkpoint.CheckpointError(str(failure))))


# ------------------------------------------------------------------------------------------------ EMA

EMA_FILE = "ema.pth"  # torchvision-reference layout: checkpoint.load(..., ema=True), anytopo-ckpt convert --ema


def build_ema(bare: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An EMA of ``bare``'s parameters AND buffers (BatchNorm running statistics are averaged too, so the EMA
    model is usable without recomputing them). Built on torch.optim.swa_utils.AveragedModel."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(bare, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    # a module compiled in place (--compile) is deep-copied with its compiled call, which is bound to the ORIGINAL
    # module: calling the copy would run the live model. The EMA copy runs eagerly (only evaluated).
    ema.module._compiled_call_impl = None
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def reset_ema(ema: torch.optim.swa_utils.AveragedModel, bare: nn.Module) -> None:
    """Restart the average from ``bare``'s current weights (a resume that adds --ema)."""
    for dst, src in zip(ema.module.state_dict().values(), bare.state_dict().values()):
        dst.copy_(src)
    ema.n_averaged.zero_()


def write_ema_file(path: Path, bare: nn.Module, ema: torch.optim.swa_utils.AveragedModel, *, step: int,
                   epoch: int) -> Path:
    """``{"model": weights, "model_ema": EMA weights + n_averaged, "step", "epoch"}`` (the layout of
    torchvision's reference scripts), written to a temp name and renamed."""
    model_sd = {k: v.detach().cpu().clone() for k, v in bare.state_dict().items()}
    ema_sd = {k: v.detach().cpu().clone() for k, v in ema.module.state_dict().items()}
    ema_sd["n_averaged"] = ema.n_averaged.detach().cpu().clone()
    with checkpoint.atomic_file(path) as f:  # temp name, fsync, rename: never a torn ema.pth
        torch.save({"model": model_sd, "model_ema": ema_sd, "step": step, "epoch": epoch}, f)
    return path


def save_ema_file(out: Path, entry: Path, bare: nn.Module, ema: torch.optim.swa_utils.AveragedModel, *, step: int,
                  epoch: int) -> None:
    """Rank 0 writes ``out/ema.pth`` beside entry ``entry`` (which holds the EMA too); every rank stops alike
    with one line if the disk refuses it."""
    def fail(failure: collective.Failure, own: BaseException | None) -> BaseException:
        cause = getattr(own, "strerror", None) or failure
        return checkpoint.CheckpointError(f"could not write {out / EMA_FILE}: {cause}; {entry} was saved and "
                                          "holds the EMA too; free disk space or choose another --output-dir")

    collective.decide(lambda: write_ema_file(out / EMA_FILE, bare, ema, step=step, epoch=epoch),
                      catch=(OSError,), value=False, fail=fail)
