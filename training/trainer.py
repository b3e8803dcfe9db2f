"""The training loop: ``Trainer`` owns the live objects of one run; ``fit()`` trains, ``evaluate()`` measures.

Built from a ``TrainConfig`` and the ``launcher.DistInfo`` of this process: data (``training.data``), the
model from the ``models`` registry wrapped by ``launcher``, the task's loss and metric (``training.tasks``),
a ``checkpoint.CheckpointManager`` handed the components to save (each supplies its own ``state_dict()``),
and the run's outputs (``training.reporting``). A save, a log row or a preemption happens at a step boundary
and every rank takes part in it.
"""
from __future__ import annotations

import functools
import math
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

import checkpoint
import collective
import launcher
import models
from checkpoint import objstore

from . import data, tasks
from .config import AMP_DTYPES, DTYPES, ConfigError, TrainConfig
from .reporting import OutputDirError, RunLog, check_output_dir
from .run_state import acquire_run_lock, build_ema, is_new_best, reset_ema, resolve_resume, save_ema_file

def resolve_model(cfg: TrainConfig, info: data.DataInfo, manifest: dict[str, Any] | None,
                  log) -> tuple[str, dict[str, Any]]:
    """Model name and options: flags first, then the resumed checkpoint's manifest, then the data."""
    try:
        name, options = cfg.model, models.parse_model_args(cfg.model_args)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    options.pop("weights", None)  # an init file, not a model option: Trainer loads it (checkpoint.load_pretrained)
    explicit = set(options)
    if manifest and manifest.get("model"):
        if name is None:
            name = manifest["model"]
            saved = dict(manifest.get("model_options") or {})
            saved.pop("weights", None)  # older manifests recorded the init file among the options
            options = {**saved, **options}
        elif name != manifest["model"]:
            log.warning("--model %s differs from the checkpoint's model %s", name, manifest["model"])
    if name is None:
        raise ConfigError(f"no --model given: use one of {', '.join(models.list_models())}")
    if name not in models.list_models():
        raise ConfigError(f"unknown model {name!r}: use one of {', '.join(models.list_models())}")
    allowed = {f.name for f in fields(models.get_config(name))}
    derived = {"num_classes": info.num_classes, "in_channels": info.in_channels}
    if info.image_size:
        derived["in_features"] = info.in_channels * info.image_size * info.image_size
        if info.image_size <= 64:
            derived["small_input"] = True
    for k, v in derived.items():
        if k in allowed and k not in options:
            options[k] = v
    try:
        options = asdict(models.get_config(name, **options))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_options_fit_data(cfg, options, explicit, derived)
    if options.get("extra_inputs", 0) not in (0, 1):
        raise ConfigError("the training script feeds one extra feature per image "
                          f"({data.EXTRA_FEATURE}): use --model-arg extra_inputs=1")
    task_of_model = "segmentation" if name == "unet" else "classification"
    if task_of_model != info.task:
        raise ConfigError(f"model {name!r} does {task_of_model} but --data {cfg.data} is a {info.task} dataset; "
                          f"use {'unet' if info.task == 'segmentation' else 'resnet18 or mlp'}")
    return name, options


def _check_options_fit_data(cfg: TrainConfig, options: dict[str, Any], explicit: set[str],
                            derived: dict[str, Any]) -> None:
    """Refuse model options (from --model-arg or the resumed checkpoint) that cannot run on the data, before
    training: a head with fewer classes than the labels, or an input layer of the wrong width."""
    what = {"num_classes": "classes", "in_channels": "image channels", "in_features": "features per sample"}
    for key, want in derived.items():
        have = options.get(key)
        if key not in what or have is None or have == want or (key == "num_classes" and have > want):
            continue  # a wider head than the labels trains fine
        source = f"--model-arg {key}={have}" if key in explicit else f"the checkpoint's model option {key}={have}"
        fix = (f"drop it (it is read from the data) or pass {key}={want}" if key in explicit
               else "resume with the data it was trained on, or start a new run")
        raise ConfigError(f"{source} does not fit --data {cfg.data}, which has {want} {what[key]}: {fix}")


def warmup_cosine(total_steps: int, warmup: int):
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters (1-D), the usual split.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def seed_step(cfg: TrainConfig, info: launcher.DistInfo, step: int) -> None:
    """Re-seed this rank's random streams (dropout, augmentation) from (seed, step, rank) before each step,
    so a run resumed at step K draws what the uninterrupted run drew at step K (same world size)."""
    launcher.seed_everything(cfg.seed, rank=info.rank, step=step)


class Preempted(Exception):
    """Every rank agreed to stop for a signal; the checkpoint is written. main() exits PREEMPTED_EXIT_CODE."""

    def __init__(self, step: int, path: Path, signals: list[str]):
        super().__init__(f"preempted at step {step}: checkpoint {path}")
        self.step, self.path, self.signals = step, path, signals


@dataclass
class Batch:
    images: torch.Tensor
    targets: torch.Tensor


class Trainer:
    """Owns the live objects of one run; ``fit()`` trains, ``evaluate()`` measures on the test split."""

    def __init__(self, cfg: TrainConfig, info: launcher.DistInfo, log):
        self.cfg, self.info, self.log = cfg, info, log
        self.out = cfg.output_dir
        try:  # on every rank: each stops with the same one line, before anything is built or trained
            check_output_dir(self.out)
        except OutputDirError as e:
            raise ConfigError(str(e)) from None
        self.lock = acquire_run_lock(self.out, log)  # before anything in the directory is read or written
        self.preempt: launcher.Preemption | None = None  # set by main() while the loop may be preempted
        try:
            self._build()
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def _build(self) -> None:
        cfg, info, log = self.cfg, self.info, self.log
        background = cfg.async_save and not cfg.save_sharded  # a sharded save needs every rank: synchronous
        ckpt_dir = cfg.checkpoint_dir or self.out / "checkpoints"
        if objstore.is_url(ckpt_dir):  # bad credentials, bucket or endpoint: now, in seconds
            collective.decide(lambda: objstore.check_access(ckpt_dir),
                              fail=lambda failure, own: ConfigError(f"--checkpoint-dir: {failure}"))
        self.manager = checkpoint.CheckpointManager(ckpt_dir, keep_last=cfg.keep_last,
                                                    every=cfg.save_every, sharded=cfg.save_sharded,
                                                    async_save=background, overlap_snapshot=background)
        if cfg.save_sharded and cfg.async_save:
            log.info("--save-sharded: checkpoints are written synchronously (every rank writes its own file)")
        self.resume_path = resolve_resume(cfg, self.manager, log, info.restart)
        manifest = checkpoint.read_manifest(self.resume_path) if self.resume_path else None
        holds_entries = collective.decide(lambda: bool(self.manager.entries()),
                                          fail=lambda failure, own: checkpoint.CheckpointError(str(failure)))
        if self.resume_path is None and not cfg.eval_only and holds_entries:
            raise ConfigError(f"{self.manager.directory} already holds checkpoints of another run: "
                              "pass --resume auto to continue it, or choose another --output-dir"
                              + (" / --checkpoint-dir" if cfg.checkpoint_dir else ""))
        try:
            self.train_ds, self.test_ds, self.data = data.build_datasets(
                cfg.data, seed=cfg.seed, image_size=cfg.image_size, num_samples=cfg.num_samples, augment=cfg.augment)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.model_name, self.model_options = resolve_model(cfg, self.data, manifest, log)
        self.task = tasks.build_task(self.data)
        self.extra = bool(self.model_options.get("extra_inputs"))
        self.aux = bool(self.model_options.get("aux_output"))

        launcher.seed_everything(cfg.seed)  # identical initial weights on every rank and world size
        model = models.build_model(self.model_name, **self.model_options)
        weights = models.parse_model_args(cfg.model_args).get("weights")  # --model-arg weights=PATH
        if weights is not None:
            checkpoint.load_pretrained(model, weights, skippable_prefixes=getattr(model, "replaced_prefixes", ()))
        self.dtype = DTYPES[cfg.dtype]
        model = model.to(self.dtype)  # before compile and wrapping: every copy (DDP, EMA, optimizer) is in this dtype
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        # the strategy wraps (and compiles where it belongs: the bare model, or each FSDP unit after sharding)
        self.strategy = launcher.strategy_for(info, sync_bn=cfg.sync_bn, compile=cfg.compile,
                                              param_dtype=AMP_DTYPES.get(cfg.amp))
        self.model = self.strategy.wrap(model)
        self.bare = self.strategy.unwrap(self.model)
        decay = cfg.ema
        if decay is None and cfg.eval_only and not self.strategy.shards_parameters and manifest \
                and "ema" in (manifest.get("components") or []):
            decay = 0.5  # the entry holds an EMA: evaluated beside the model (no update uses the decay)
        self.ema = build_ema(self.bare, decay) if decay else None
        launcher.seed_everything(cfg.seed, rank=info.rank)  # per-rank streams for dropout etc.

        self.per_rank = launcher.per_rank_batch(cfg.batch_size, info)
        if self.per_rank % cfg.grad_accum:
            raise ConfigError(f"per-process batch {self.per_rank} (= {cfg.batch_size} / {info.world_size} processes) "
                              f"does not split into --grad-accum {cfg.grad_accum} micro-batches: pick values that divide")
        self.steps_per_epoch = len(self.train_ds) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {len(self.train_ds)} training samples: "
                              "use a smaller batch")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, self.total_steps // 20)
        self.optimizer = build_optimizer(self.bare, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(self.total_steps, warmup))
        device_type = info.device.type
        self.amp_dtype = AMP_DTYPES.get(cfg.amp)
        self.scaler = torch.amp.GradScaler(device_type, enabled=cfg.amp == "fp16")
        self.trainer_state: dict[str, Any] = {}
        self.step = 0
        self.components = {"model": self.model, "optimizer": checkpoint.OptimizerState(self.model, self.optimizer),
                           "scheduler": self.scheduler, "trainer": self.trainer_state}
        if self.scaler.is_enabled():
            self.components["scaler"] = self.scaler
        if self.ema is not None:
            self.components["ema"] = self.ema
        self.grad_norm: float | None = None
        self.best_metric = self.task.primary

        self.sampler = launcher.TrainSampler(len(self.train_ds), info, seed=cfg.seed)
        self.loader = self._loader(self.train_ds, self.sampler, self.per_rank, drop_last=True)
        self.test_loader = self._loader(self.test_ds, launcher.EvalSampler(len(self.test_ds), info),
                                        max(1, self.per_rank), drop_last=False)
        self.runlog = RunLog(self.out, enabled=info.is_main, tensorboard=cfg.tensorboard and not cfg.eval_only)
        self.runlog.config(cfg.to_dict())
        # hung and slow ranks (issue 21): phases marked below, heartbeats and step times from the watchdog
        local = launcher.watchdog.LOCAL - ({"forward"} if self.strategy.shards_parameters else set())  # fsdp gathers
        self.watch = launcher.Watchdog(info, report_dir=self.out / "hangs", timeout_s=cfg.hang_timeout or None,
                                       startup_s=launcher.resolve_timeout(cfg.dist_timeout), local_phases=local, log=log,
                                       on_exit=self.lock.release if self.lock is not None else None)
        self.stragglers = launcher.Stragglers(cfg.straggler_steps)
        self.save_seconds: float | None = None  # the last save's time until durable (rank 0's; see _check_grace)
        self.step_seconds: float | None = None  # rank 0's median step wall time (saves, evals left out), last window
        self._save_started: float | None = None
        self.auto_every: int | None = None  # a save interval shorter than --save-every (_check_grace)
        self._grace_warned = False
        if cfg.hang_timeout != 0:
            if cfg.hang_timeout and cfg.hang_timeout >= self.watch.startup_s and info.is_main:
                log.warning("--hang-timeout %g is not below the collective timeout (%g s): a rank waiting for a stuck "
                            "peer fails with gloo's timeout first, which names neither; lower --hang-timeout or raise "
                            "--dist-timeout", cfg.hang_timeout, self.watch.startup_s)
            self.watch.start()

    def _loader(self, ds, sampler, batch_size: int, drop_last: bool) -> DataLoader:
        # A plain DataLoader: resuming needs no loader state, because the sampler starts each epoch at the
        # checkpoint's sample cursor (TrainSampler.set_start in fit()), whatever the world size.
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=self.cfg.workers, pin_memory=self.info.device.type == "cuda",
                          # the main process owns shutdown: a scheduler's SIGTERM to every process spares the workers
                          worker_init_fn=functools.partial(launcher.leave_signals_to_main, launcher.preemption_signals(
                              [self.cfg.preempt_signal] if self.cfg.preempt_signal else [])) if self.cfg.workers else None,
                          # workers must see each epoch's Augmented.set_epoch: not persistent then
                          persistent_workers=self.cfg.workers > 0 and self.cfg.augment == "none")

    # -- resume

    def restore(self) -> None:
        if self.resume_path is None:
            return
        comps = self.components
        if self.cfg.eval_only:
            comps = {"model": self.model, **({"ema": self.ema} if self.ema is not None else {})}
        restored = self.manager.restore(self.resume_path, comps)
        self.log.info("resumed from %s\n%s", self.resume_path, restored.report)
        if "ema" in restored.absent:  # --ema added on resume: average from the resumed weights on
            reset_ema(self.ema, self.bare)
        if self.cfg.eval_only:
            return
        if "optimizer" in restored.absent:
            raise ConfigError(f"--resume {self.resume_path} holds weights only (no optimizer state); "
                              "to start training from these weights use a checkpoint entry, or evaluate with --eval-only")
        if restored.absent:  # e.g. a GradScaler when switching --amp none -> fp16: starts fresh
            self.log.warning("checkpoint has no %s state: starting %s fresh", ", ".join(restored.absent),
                             "it" if len(restored.absent) == 1 else "them")
        self.step = int(restored.step or 0)
        saved = restored.states.get("trainer", {})
        self._check_grace(saved.get("save_seconds"), saved.get("step_seconds"))  # the same on every rank
        if saved.get("global_batch") not in (None, self.cfg.batch_size) or saved.get("seed") not in (None, self.cfg.seed):
            self.log.warning("resuming with a different --batch-size/--seed than the checkpoint's "
                             f"({saved.get('global_batch')}/{saved.get('seed')}): the sample cursor is approximate")

    # -- steps

    def _to_device(self, images: torch.Tensor, targets: torch.Tensor) -> Batch:
        dev = self.info.device
        images = images.to(dev, dtype=self.dtype if images.is_floating_point() else None, non_blocking=True)
        if self.cfg.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return Batch(images, targets.to(dev, non_blocking=True))

    def _forward(self, model: nn.Module, images: torch.Tensor):
        out = model(images, data.extra_feature(images)) if self.extra else model(images)
        return out if self.aux else (out, None)

    def _settling_loss(self) -> torch.Tensor:
        """The loss of one training sample (the first), for ``Strategy.settle``; draws nothing from the
        sampler, so the data order is untouched."""
        images, targets = self.train_ds[0]
        b = self._to_device(images.unsqueeze(0), torch.as_tensor(targets).unsqueeze(0))
        return self._loss(b)

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype)

    def _loss(self, batch: Batch) -> torch.Tensor:
        with self._autocast():
            logits, features = self._forward(self.model, batch.images)
            wide = torch.promote_types(self.dtype, torch.float32)  # float32 under autocast, float64 with --dtype float64
            loss = self.task.loss_fn(logits.to(wide), batch.targets)
            if features is not None:
                # auxiliary objective on the returned features: an L2 activation penalty
                loss = loss + self.cfg.aux_weight * features.to(wide).pow(2).mean()
        return loss

    def train_step(self, batch: Batch) -> torch.Tensor:
        accum = self.cfg.grad_accum
        seed_step(self.cfg, self.info, self.step)
        total = torch.zeros((), device=self.info.device, dtype=torch.promote_types(self.dtype, torch.float32))
        for i, (x, y) in enumerate(zip(batch.images.chunk(accum), batch.targets.chunk(accum))):
            last = i == accum - 1
            with nullcontext() if last else self.strategy.no_sync(self.model):
                self.watch.phase("forward", self.step + 1)
                loss = self._loss(Batch(x, y))
                self.watch.phase("backward", self.step + 1)
                self.scaler.scale(loss / accum).backward()
            total += loss.detach() / accum
        self.watch.phase("optimizer", self.step + 1)
        self.grad_norm = self._grad_norm()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.bare)
        return total

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm (DDP gradients are already averaged): clip_grad_norm_'s return value with
        --clip-grad, else the same norm (get_total_norm) on the steps that log it, and None on the others."""
        logs = (self.step + 1) % self.cfg.log_every == 0 or self.step + 1 == self.total_steps
        if not (self.cfg.clip_grad or logs):
            return None
        self.scaler.unscale_(self.optimizer)  # no-op without fp16: the norm is of the true gradient
        if self.cfg.clip_grad:
            return nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        return nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])

    def evaluate(self) -> dict[str, float]:
        """The model's metrics, and with --ema the EMA's as ``ema_<metric>``."""
        self.watch.phase("eval", self.step)
        metrics = self._evaluate(self.bare)
        if self.ema is not None:  # _evaluate syncs its buffers from rank 0: the EMA copy checkpoints hold
            metrics.update({f"ema_{k}": v for k, v in self._evaluate(self.ema.module).items()})
        return metrics

    @torch.no_grad()
    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metric sums over this rank's unpadded shard, all-reduced: exact, whatever the world size."""
        self.strategy.sync_buffers(model)  # evaluate rank 0's replica: the one checkpoints hold
        was_training = model.training
        model.eval()
        metric = self.task.make_metric()
        # fsdp: gather the live model once, so ranks may run unequal batch counts (the EMA copy is not sharded)
        with self.strategy.unsharded(self.model) if model is self.bare else nullcontext():
            for images, targets in self.test_loader:
                b = self._to_device(images, targets)
                with self._autocast():
                    logits, _ = self._forward(model, b.images)
                metric.update(logits.float(), b.targets)
        sums = metric.sums().to(self.info.device)
        model.train(was_training)
        return metric.compute(launcher.all_reduce_sum(sums, self.info).cpu())

    def _log_row(self, step: int, **values: Any) -> None:
        """Rank 0 appends a metrics row; if that write fails (a full disk), every rank stops with its line now,
        before training on without a record."""
        self.agreed_write(lambda: self.runlog.log(step, **values))

    def agreed_write(self, write: Callable[[], Any]) -> Any:
        """Rank 0 runs ``write`` (its metrics, curves, summary) and every rank learns whether it failed, so all
        stop together instead of the others waiting for rank 0 at their next collective (one 4-byte all-reduce;
        the message is sent only on failure). A failed write (``OutputDirError``) stops every rank with its one
        line; any other exception is re-raised on rank 0 with its traceback and named on the others."""
        def fail(failure: collective.Failure, own: BaseException | None) -> BaseException:
            if failure.kind == OutputDirError.__name__:
                return ConfigError(str(failure))
            if own is not None:  # a bug: rank 0 shows its traceback, its peers must not hang meanwhile
                return own
            return ConfigError(f"rank 0 failed while writing its outputs ({failure.kind}): see its traceback")

        return collective.decide(write, fail=fail, value=False, cheap=True)

    def _global_mean(self, value: torch.Tensor) -> float:
        return (launcher.all_reduce_sum(value.detach().reshape(1).double(), self.info) / self.info.world_size).item()

    def save(self, epoch: int, *, blocking: bool | None = None) -> Path:
        """Checkpoint the current step (in the background unless --no-async-save, --save-sharded or ``blocking``)."""
        self.watch.phase("save", self.step)
        if self._save_started is not None:  # manager.save waits for the save in flight anyway: measure it first,
            self.manager.wait()  # so that this entry records it (on the writer; immediate elsewhere)
            self._note_save_done()
        self.trainer_state.update(step=self.step, epoch=epoch, global_batch=self.cfg.batch_size, seed=self.cfg.seed,
                                  samples_seen=self.step * self.cfg.batch_size, world_size=self.info.world_size,
                                  save_seconds=self.save_seconds, step_seconds=self.step_seconds)
        metadata = {"model": self.model_name, "model_options": self.model_options, "epoch": epoch,
                    "topology": self.strategy.topology(),
                    "data": self.cfg.data, "config": self.cfg.to_dict()}
        buffers = checkpoint.buffer_agreement(self.bare)  # before the sync: did the ranks' replicas differ?
        if buffers is not None:  # the manifest (and load report) says so, not the post-sync "identical"
            metadata["topology"]["buffers"] = buffers
        self.strategy.sync_buffers(self.bare)  # rank 0's BN statistics: the copy the checkpoint holds
        started = time.monotonic()
        path = self.manager.save(self.step, self.components, metadata=metadata, blocking=blocking)
        self._save_started = started
        if blocking or not self.manager.async_save:
            self._note_save_done()
        if self.ema is not None:
            save_ema_file(self.out, path, self.bare, self.ema, step=self.step, epoch=epoch)
        return path

    def _is_new_best(self, metrics: dict[str, float]) -> bool:
        """Whether ``metrics`` beat the run's best entry on the task's primary metric (rank 0's reading decides)."""
        value = metrics.get(self.best_metric)
        return value is not None and is_new_best(self.manager, self.best_metric, value)

    def _flush_saves(self) -> None:
        """Async saves: wait for the save in flight; every rank raises the writer's line if it failed."""
        self.watch.phase("save", self.step)
        if self.manager.async_save:
            self.manager.flush()
        self._note_save_done()

    def _note_save_done(self) -> None:
        """The writer's save just started is durable: its time from ``save()`` on becomes ``save_seconds``."""
        if self._save_started is not None and not self.manager.in_flight():
            self.save_seconds, self._save_started = time.monotonic() - self._save_started, None

    def _check_grace(self, save_s: float | None, step_s: float | None) -> None:
        """Warn (rank 0) and save more often when a step plus a save would not fit in the grace the scheduler
        gives after its signal (--preempt-grace): the preemption checkpoint would be cut off by SIGKILL. The
        numbers are rank 0's, the same on every rank, so every rank takes the same new interval (saves are
        collective). A save that may first wait for one in flight (asynchronous saves) counts twice. Decided
        once, from the first measurement: more frequent background saves compete with training and measure
        slower, which would tighten the interval again and again."""
        if self._grace_warned or not save_s or not step_s:
            return
        need = step_s + save_s * (2 if self.manager.async_save else 1)
        if need <= self.cfg.preempt_grace:
            return
        every = max(1, math.ceil(4 * save_s / step_s))  # at most about a quarter of the time spent saving
        current = min(x for x in (self.cfg.save_every, self.auto_every, math.inf) if x is not None)
        shorter = every < current
        if shorter:
            self.auto_every = every
        self._grace_warned = True
        if self.info.is_main:
            now = (f"saving every {every} steps instead of " + (f"every {current}" if current != math.inf else
                   "only at the end") + f", so that a cut-off one loses at most about {every * step_s:.3g} s"
                   if shorter else f"--save-every {current} already bounds what a cut-off one loses")
            self.log.warning("a checkpoint takes %.3g s until durable and a step %.3g s, so a preemption needs up to "
                             "%.3g s, more than the %g s the scheduler leaves before SIGKILL (--preempt-grace): the "
                             "preemption checkpoint could be cut off; %s. Give the job more grace (Slurm: "
                             "--signal=B:USR1@SECONDS) or make saves faster", save_s, step_s, need,
                             self.cfg.preempt_grace, now)

    def _at_step_boundary(self, epoch: int, saved_at: int | None, last_path: Path | None) -> None:
        """The ranks agree, in ONE all-reduce, on whether any received a preemption signal and whether the
        writer's background save failed; a failure stops every rank with the writer's line, a signal with a
        checkpoint. No collective runs on the background thread (gloo collectives from two threads deadlock)."""
        self.watch.phase("collective", self.step)
        if self._save_started is not None:
            self._note_save_done()
        if self.preempt is None and not self.manager.async_save:
            return
        failed = self.manager.failure() is not None  # the writer's, without waiting; False elsewhere
        preempted, failed = collective.any_rank(self.preempt is not None and self.preempt.requested, failed)
        if failed:
            self.manager.flush()  # every rank raises the writer's one line (entry, cause, what was kept, fix)
        if preempted:
            self._stop_for_preemption(epoch, saved_at, last_path)

    def _stop_for_preemption(self, epoch: int, saved_at: int | None, last_path: Path | None) -> None:
        """Every rank agreed on a signal at this step boundary: checkpoint it (unless just saved), then stop.
        The checkpoint is durable before the exit: a save just started in the background is flushed, and the
        preemption's own save is synchronous (it first waits for one still in flight)."""
        if saved_at == self.step:
            self._flush_saves()
            path = last_path
        else:
            path = self.save(epoch, blocking=True)
        signals = self.preempt.received if self.preempt is not None else []
        self.log.warning("preempted (%s) at step %d: checkpoint %s written; exiting %d so that the launcher "
                         "restarts or requeues the run", ", ".join(signals) or "signal on another rank", self.step,
                         path, launcher.PREEMPTED_EXIT_CODE)
        raise Preempted(self.step, path, signals)

    def _batches(self):
        """The loader's batches on this rank's device; the watchdog sees the wait for each as phase ``data``."""
        it = iter(self.loader)
        while True:
            self.watch.phase("data", self.step + 1)
            try:
                images, targets = next(it)
            except StopIteration:
                return
            yield self._to_device(images, targets)

    def _step_spread(self) -> dict[str, float]:
        """Every rank's own step times of the window (one all-gather, with rank 0's save and step seconds):
        their spread for metrics.csv, a warning naming a straggler, and the preemption-grace check."""
        own, wall = self.watch.take_step_times()
        rows = launcher.gather_step_times(own + [self.save_seconds or 0.0, statistics.median(wall)], self.info)
        self.step_seconds = rows[0][-1]
        self._check_grace(rows[0][-2], self.step_seconds)
        spread, warnings = self.stragglers.update(self.step - len(own) + 1, [r[:-2] for r in rows])
        for line in warnings if self.info.is_main else []:
            self.log.warning("%s", line)
        return {k: round(v, 6) for k, v in spread.items()}

    def fit(self) -> tuple[float | None, dict[str, float], Path | None]:
        cfg, info = self.cfg, self.info
        self.model.train()
        self.strategy.settle(self.model, self._settling_loss)  # fresh or resumed, the same steps from here
        start = self.step
        if start >= self.total_steps:
            self.log.info("checkpoint is at step %d, the run has %d steps: nothing to train", start, self.total_steps)
        bar = _progress(self.total_steps, start, enabled=info.is_main and cfg.progress)
        final_loss, metrics, saved_at, last_path = None, {}, None, None
        window_t, window_steps = time.perf_counter(), 0
        epoch = start // self.steps_per_epoch
        while self.step < self.total_steps:
            self.sampler.set_epoch(epoch)
            if hasattr(self.train_ds, "set_epoch"):  # data.Augmented: its draws are a function of the epoch
                self.train_ds.set_epoch(epoch)
            self.sampler.set_start(self.step - epoch * self.steps_per_epoch, self.per_rank)
            for batch in self._batches():
                loss = self.train_step(batch)
                self.step += 1
                self.watch.phase("collective", self.step)
                self.watch.step_done()
                window_steps += 1
                last = self.step == self.total_steps
                if self.step % cfg.log_every == 0 or last:
                    final_loss = self._global_mean(loss)
                    elapsed = time.perf_counter() - window_t
                    throughput = window_steps * cfg.batch_size / max(elapsed, 1e-9)
                    spread = self._step_spread()
                    self._log_row(self.step, epoch=epoch, loss=final_loss, lr=self.scheduler.get_last_lr()[0],
                                  throughput=round(throughput, 2),
                                  grad_norm=None if self.grad_norm is None else float(self.grad_norm), **spread)
                    if bar is not None:
                        bar.set_postfix(loss=f"{final_loss:.4f}", img_s=f"{throughput:.0f}")
                    window_t, window_steps = time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)
                if (self.manager.should_save(self.step) or self.auto_every and self.step % self.auto_every == 0) \
                        and not last:
                    last_path, saved_at = self.save(epoch), self.step
                if not last:
                    self._at_step_boundary(epoch, saved_at, last_path)
                if last or self.step % self.steps_per_epoch == 0:
                    break
            metrics = self.evaluate()
            self.watch.phase("collective", self.step)
            self._log_row(self.step, epoch=epoch, **metrics)
            if self._is_new_best(metrics):  # the entry must hold exactly the weights just measured
                if saved_at != self.step:
                    last_path, saved_at = self.save(epoch), self.step
                self._flush_saves()  # the entry must be on disk before `best` names it
                self.manager.update_best(self.step, self.best_metric, metrics[self.best_metric], mode="max")
            self.log.info("epoch %d step %d: %s", epoch,
                          self.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            epoch += 1
        if bar is not None:
            bar.close()
        if start == self.total_steps and self.resume_path is not None:
            last_path = self.resume_path  # nothing trained: the resumed checkpoint is the final one
        elif saved_at != self.step:
            last_path = self.save(epoch=max(0, epoch - 1))
        self._flush_saves()  # the final entry is durable and `latest` before the run reports it
        if not metrics:  # resumed at the end: still report the model's quality
            metrics = self.evaluate()
        return final_loss, metrics, last_path


def _progress(total: int, initial: int, *, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0, file=sys.stderr)


