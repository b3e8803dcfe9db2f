"""Train a ResNet/MLP classifier or a U-Net segmenter on any topology, with the same script.

    python scripts/train.py --model resnet18 --data digits --strategy single|dp
    torchrun --standalone --nproc_per_node=N scripts/train.py --strategy ddp ...
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --master_port=P --nproc_per_node=N scripts/train.py --strategy ddp ...
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N --num_machines 1 scripts/train.py --strategy ddp ...

``--batch-size`` is the GLOBAL batch: each of W processes reads batch/W samples per step (split further
into ``--grad-accum`` micro-batches), so every topology takes the same steps over the same samples, and a
checkpoint saved by any topology resumes on any other at the same step and sample cursor. The arithmetic is
the same up to float rounding only without BatchNorm (or with ``--sync-bn``) and without dropout; README,
"Global batch", says what holds where.

Options come from the flags below, or from ``--config FILE`` (YAML, TOML or JSON; keys are the option names
with ``_``) with flags given on the command line overriding the file. ``--print-config`` prints the resolved
options in that format and exits; every run records them in config.json and in each checkpoint's manifest.

Outputs in --output-dir: checkpoints/ (step-N entries, ``latest``), config.json, metrics.csv, tensorboard/,
curves.png, summary.json. Bad input exits 2 with one line on stderr (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, under every launcher

import checkpoint  # noqa: E402
import data  # noqa: E402
import launcher  # noqa: E402
import models  # noqa: E402
import tasks  # noqa: E402
from reporting import OutputDirError, RunLog, check_output_dir  # noqa: E402

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = {"float32": torch.float32, "float64": torch.float64}  # --dtype
AUGMENTS = data.AUGMENTS  # (TrainConfig's field `data` shadows the module inside the class body)


class ConfigError(ValueError):
    """A bad flag or flag combination; the message names the fix."""


# --------------------------------------------------------------------------------------------- config
#
# TrainConfig is the ONE source of the run's options: get_args_parser() is generated from its fields, and
# --config files, --print-config, output-dir/config.json and the checkpoint manifest ("config") all use
# its field names as keys.
#
# To add an option (say --ema-decay), add ONE field to TrainConfig and nothing else here:
#
#     ema_decay: float | None = option(None, "keep an EMA of the weights with this decay")
#
#   - the flag is the field name with '-' for '_' (--ema-decay); its type (int, float, str, Path, X | None,
#     bool, tuple[str, ...]) gives the argparse type and the type checked in --config files;
#   - a bool field is a switch: default False -> --name (store_true), default True -> --no-name (store_false)
#     and a hidden --name (the default, accepted so scripts written before it became the default still run);
#   - tuple[str, ...] is a repeatable flag: pass flag="--model-arg" to name its single form;
#   - choices=[...] restricts the values (on the command line and in files), metavar= names the value;
#   - an optional field (X | None) must default to None (a config file omits unset options);
#   - checks that need a number range or another field go in __post_init__ and raise ConfigError with a
#     message that names the flag and the fix (cli() prints it as one line and exits 2); they apply to
#     flags and config files alike.
# Then read it as ``cfg.ema_decay`` where it is used. --help, --config, --print-config and config.json follow.


def option(default: Any, help: str, *, choices: list[str] | tuple[str, ...] | None = None,
           metavar: str | None = None, flag: str | None = None):
    """A TrainConfig field that is also a command-line flag (see the comment above)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "metavar": metavar,
            "flag": flag}
    return field(default=default, metadata=meta)


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """The run's settings, validated once in ``__post_init__``; each field is a flag of the same name."""

    model: str | None = option(None, f"one of {', '.join(models.list_models())} "
                                     "(default: the model named in the --resume checkpoint)")
    model_args: tuple[str, ...] = option((), "model option, value parsed as a Python literal (repeatable)",
                                         flag="--model-arg", metavar="KEY=VALUE")
    data: str = option("digits", "digits | mnist5k | shapes[:N] | imagefolder:PATH | segfolder:PATH")
    image_size: int | None = option(None, "resize images to this side (default: per dataset)")
    num_samples: int | None = option(None, "use a fixed subset of this many samples")
    epochs: int = option(1, "passes over the training split")
    max_steps: int | None = option(None, "stop after this many optimizer steps in total")
    batch_size: int = option(64, "GLOBAL batch size, the same for every world size")
    grad_accum: int = option(1, "micro-batches per step on each process")
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(0.01, "weight decay of the weights (not of biases and norms)")
    optimizer: str = option("adamw", "optimizer", choices=["sgd", "adamw"])
    momentum: float = option(0.9, "SGD momentum")
    warmup_steps: int | None = option(None, "linear warmup (default: 5% of the steps)")
    amp: str | None = option(None, "autocast dtype (fp16 uses a GradScaler); default: accelerate's setting, else none",
                             choices=["bf16", "fp16", "none"])
    channels_last: bool = option(False, "NHWC memory format for model and inputs")
    dtype: str = option("float32", "dtype of the weights, inputs and loss; float64 is for exact parity checks across "
                                   "topologies (float32 rounding grows along an ill-conditioned trajectory; README)",
                        choices=list(DTYPES))
    sync_bn: bool = option(False, "BatchNorm over the global batch under ddp (torch's SyncBatchNorm on CUDA, "
                                  "launcher.syncbn over gloo elsewhere)")
    # -- features (issue 12): see the "features" section below
    ema: float | None = option(None, "keep an exponential moving average of the weights with this decay in (0, 1); "
                                     "saved in each entry and as ema.pth, evaluated beside the model")
    augment: str = option("none", "train-split augmentation (imagefolder/segfolder), seeded per sample and epoch",
                          choices=list(AUGMENTS))
    compile: bool = option(False, "torch.compile the bare model before wrapping (fsdp: each unit after sharding); "
                                  "checkpoints stay canonical")
    clip_grad: float | None = option(None, "clip the global gradient norm to this value")
    aux_weight: float = option(0.01, "weight of the auxiliary loss on the features of models built with aux_output=True")
    strategy: str = option("single", "how the processes share the work", choices=launcher.STRATEGIES)
    dist_timeout: float | None = option(None, "seconds to wait for the other processes at start-up and in each "
                                              "collective (default: $ANYTOPO_DIST_TIMEOUT, which anytopo-launch "
                                              "sets to its --join-timeout, else 300)", metavar="SECONDS")
    output_dir: Path = option(Path("runs/train"), "checkpoints, metrics, curves and summary go here")
    save_every: int | None = option(None, "save a checkpoint every N steps (and at the end)")
    keep_last: int = option(3, "checkpoints kept (0 keeps all)")
    save_sharded: bool = option(False, "every rank writes its own shard file (fsdp), plus one manifest")
    async_save: bool = option(True, "write each checkpoint synchronously: training waits for the whole durable "
                                    "write (default: a background thread writes it while training goes on; the "
                                    "weights and optimizer state are copied before the next optimizer step, "
                                    "pending saves are flushed at exit and at preemption, a failed write stops "
                                    "every rank at the next step with exit 2; --save-sharded is always synchronous)")
    resume: str | None = option(None, "a checkpoint entry, a run's checkpoints/ directory, any weights file, "
                                      "'auto' (latest) or 'best' (best by the task's metric)",
                                metavar="PATH|auto|best")
    seed: int = option(0, "seed of the weights, the sampling order and per-rank randomness")
    preempt_signal: str | None = option(None, "also take this signal as a preemption notice, e.g. SIGUSR1 for SLURM's "
                                              "--signal (SIGTERM always is): checkpoint at the next step, exit 143",
                                        metavar="SIGNAL")
    eval_only: bool = option(False, "evaluate the --resume checkpoint and exit")
    log_every: int = option(10, "metrics.csv row every N steps")
    workers: int = option(0, "DataLoader worker processes per rank")
    tensorboard: bool = option(True, "no TensorBoard event files")
    progress: bool = option(True, "no progress bar")

    def __post_init__(self) -> None:
        # normalise what argparse and config files hand over (lists, strings), so equal configs compare equal
        object.__setattr__(self, "model_args", tuple(self.model_args))
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        if self.amp is None:  # `accelerate launch --mixed_precision bf16` sets this for its children
            amp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
            object.__setattr__(self, "amp", amp if amp in AMP_DTYPES else "none")
        for f in fields(self):  # config.json and the manifest are strict JSON: no inf/nan
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number, got {v}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "log_every": self.log_every}
        for name, v in positive.items():
            if v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        for name in ("max_steps", "save_every", "warmup_steps"):
            v = getattr(self, name)
            if v is not None and v < (0 if name == "warmup_steps" else 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {v}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ConfigError(f"--ema {self.ema} is outside (0, 1): use a decay such as 0.999")
        if self.dtype != "float32" and self.amp != "none":
            raise ConfigError(f"--dtype {self.dtype} with --amp {self.amp}: autocast would compute in {self.amp} "
                              "anyway; use --amp none with --dtype float64")
        if self.ema is not None and self.strategy == "fsdp":
            raise ConfigError("--ema with --strategy fsdp is not supported yet (the EMA copy would be sharded): "
                              "use --strategy ddp, or drop --ema")
        if self.preempt_signal is not None:
            try:
                launcher.parse_signal(self.preempt_signal)
            except launcher.LaunchError as e:
                raise ConfigError(f"--preempt-signal: {e}") from None
        if self.dist_timeout is not None and self.dist_timeout <= 0:
            raise ConfigError(f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.eval_only and not self.resume:
            raise ConfigError("--eval-only needs the checkpoint to evaluate: add --resume PATH")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        """The config of a namespace from get_args_parser() (whose dests are the field names)."""
        if getattr(args, "config", None) and not getattr(args, "_config_applied", False):
            # e.g. get_args_parser(add_help=False) used as a parent of a plain ArgumentParser
            raise ConfigError(f"--config {args.config} was not read: parse with get_args_parser() (or "
                              "build_parser()), whose parser applies the file before the flags")
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (str, int, float, bool, None, list), keyed by field name."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
        return out


def _field_kind(cls: type, f) -> type:
    """The value type of a config field: int | None -> int; tuple[str, ...] -> tuple. Refuses types with no flag."""
    hint = typing.get_type_hints(cls)[f.name]
    optional = type(None) in typing.get_args(hint)
    base = [a for a in typing.get_args(hint) if a is not type(None)][0] if optional else typing.get_origin(hint) or hint
    if base not in (int, float, str, bool, Path, tuple):
        raise TypeError(f"{cls.__name__}.{f.name}: type {hint} has no flag form; use int, float, str, bool, Path, "
                        "tuple[str, ...] or one of those | None")
    if optional and f.default is not None:
        raise TypeError(f"{cls.__name__}.{f.name}: an optional field must default to None")
    return base


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' only where the help does not already say what the default is."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, (bool, list)) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", Path: "a path string", bool: "true or false",
               tuple: "a list of strings"}


def _check_value(cls: type, f, value: Any) -> Any:
    """``value`` read from a config file for field ``f``, checked against the field's type; else ConfigError."""
    kind = _field_kind(cls, f)
    ok = (value is None and f.default is None
          or kind is bool and isinstance(value, bool)
          or kind is int and isinstance(value, int) and not isinstance(value, bool)
          or kind is float and isinstance(value, (int, float)) and not isinstance(value, bool)
          or kind in (str, Path) and isinstance(value, str)
          or kind is tuple and isinstance(value, list) and all(isinstance(v, str) for v in value))
    if not ok:
        null = " or null" if f.default is None else ""
        raise ConfigError(f"{f.name} must be {_KIND_NAMES[kind]}{null}, got {value!r} ({type(value).__name__})")
    choices = f.metadata.get("choices")
    if choices and value is not None and any(v not in choices for v in (value if kind is tuple else [value])):
        raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
    return float(value) if kind is float and value is not None else value


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; read it as the float that users (and YAML 1.2) mean."""


class _YamlDumper(yaml.SafeDumper):
    """Quotes strings that _YamlLoader would read as numbers, so dumps read back unchanged."""


for _cls in (_YamlLoader, _YamlDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d[\d_]*)?\.?\d*[eE][-+]?\d+$"),
                               list("-+0123456789."))


def read_config_file(path: str | Path, cls: type = None) -> dict[str, Any]:
    """The options in a YAML (``--print-config`` writes it), JSON (``config.json``) or TOML file, checked
    against ``cls``'s fields (TrainConfig by default): unknown keys and wrong types raise ConfigError."""
    cls = cls or TrainConfig
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}; pass an existing YAML/TOML/JSON file") from None
    try:
        if path.suffix == ".toml":
            import tomllib  # Python 3.11+

            raw = tomllib.loads(text)
        elif path.suffix == ".json":
            raw = json.loads(text)
        else:
            raw = yaml.load(text, Loader=_YamlLoader)
    except ImportError:
        raise ConfigError(f"--config {path}: reading TOML needs Python 3.11+; write the file as YAML "
                          "(python scripts/train.py --print-config)") from None
    except yaml.MarkedYAMLError as e:
        where = f" at line {e.problem_mark.line + 1}" if e.problem_mark else ""
        raise ConfigError(f"--config {path}: not valid YAML{where}: {e.problem}") from None
    except ValueError as e:  # tomllib.TOMLDecodeError and json.JSONDecodeError; one line each
        raise ConfigError(f"--config {path}: not valid {path.suffix[1:].upper()}: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values, got a {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key).replace("-", "_"), known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"--config {path}: unknown key {key!r}{hint}; valid keys: {', '.join(known)}")
    values = {}
    for key, value in raw.items():
        try:
            values[key] = _check_value(cls, known[key], value)
        except ConfigError as e:
            raise ConfigError(f"--config {path}: {e}") from None
    return values


def dump_config(cfg: Any) -> str:
    """``cfg`` as the YAML that --config reads back to the same config."""
    head = "# scripts/train.py options: --config FILE reads this file; flags given on the command line override it\n"
    return head + yaml.dump(cfg.to_dict(), Dumper=_YamlDumper, sort_keys=False, default_flow_style=False)


class _ReplaceList(argparse.Action):
    """A repeatable flag whose first use on the command line replaces the default (or the --config file's list)."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, ([] if current is self.default else list(current)) + [values])


class ConfigArgumentParser(argparse.ArgumentParser):
    """Reads ``--config FILE`` first: its values become the defaults, so only flags given on the command line
    override them. A bad file prints one line ``error: ...`` and exits 2, like a bad flag."""

    config_class: type

    def parse_known_args(self, args=None, namespace=None):
        first, _ = super().parse_known_args(args, None)
        if getattr(first, "config", None):
            try:
                self.set_defaults(**read_config_file(first.config, self.config_class))
            except ConfigError as e:
                if getattr(first, "debug", False):
                    raise
                self.exit(2, f"error: {e}\n")
        namespace, extras = super().parse_known_args(args, namespace)
        namespace._config_applied = bool(getattr(first, "config", None))
        return namespace, extras


def build_parser(cls: type, add_help: bool = True) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the config dataclass ``cls`` (dest = field name), plus
    --config FILE (values for those fields; flags override) and --print-config."""
    p = ConfigArgumentParser(description=__doc__.splitlines()[0], add_help=add_help, formatter_class=_HelpFormatter)
    p.config_class = cls
    p.add_argument("--config", metavar="FILE", help="read options from this YAML/TOML/JSON file (keys: the "
                   "option names with '_', as --print-config writes them); flags given here override it")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved options in the --config format and exit without training")
    for f in fields(cls):
        kind, meta = _field_kind(cls, f), f.metadata
        name = meta.get("flag") or "--" + ("no-" if kind is bool and f.default else "") + f.name.replace("_", "-")
        common = {"dest": f.name, "help": meta.get("help", "").replace("%", "%%")}
        if kind is bool:
            p.add_argument(name, action="store_false" if f.default else "store_true", **common)
            if f.default and not meta.get("flag"):  # --name too, so a switch that became the default still parses
                p.add_argument("--" + f.name.replace("_", "-"), action="store_true", dest=f.name, help=argparse.SUPPRESS)
        elif kind is tuple:
            p.add_argument(name, action=_ReplaceList, default=list(f.default), metavar=meta.get("metavar"),
                           choices=meta.get("choices"), **common)
        else:
            p.add_argument(name, type=kind, default=f.default, metavar=meta.get("metavar"),
                           choices=meta.get("choices"), **common)
    return p


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The command line: TrainConfig's flags, plus --debug (how errors print, not part of the run)."""
    p = build_parser(TrainConfig, add_help)
    p.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return p


# ---------------------------------------------------------------------------------------------- build

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


# ------------------------------------------------------------------------- fault tolerance
#
# Restarts, preemption, the output-directory lock and per-step randomness. See docs/reliability.md.

def resolve_resume(cfg: TrainConfig, manager: checkpoint.CheckpointManager, log, restart: int) -> Path | None:
    """The checkpoint to resume, the same on every rank (rank 0 resolves, the others check they see it).

    A torchrun restart (``restart`` > 0: ``DistInfo.restart``, agreed by every rank, as nodes' agents count
    restarts differently) resumes the output directory's latest valid entry without any flag, since torchrun
    relaunches the same argv; a first launch resumes only with --resume.
    """
    attempt = restart
    try:
        if attempt > 0 and not cfg.eval_only:
            # this run's own newest entry; before its first save, what the first launch started from
            found = manager.resolve_agreed(None, missing_ok=True)
            if found is not None or cfg.resume in (None, "auto"):
                log.info("restart %d: %s", attempt, f"resuming from {found.name}" if found is not None
                         else f"no checkpoint in {manager.directory} yet, starting fresh")
                return found
            log.info("restart %d: no checkpoint in %s yet, resuming --resume %s again", attempt, manager.directory,
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


def acquire_run_lock(out: Path, info: launcher.DistInfo, log) -> RunLock | None:
    """Rank 0 locks ``out``; every rank learns the verdict, so a refused run exits 2 on every rank."""
    lock, verdict = None, None
    if info.is_main:
        lock = RunLock(out)
        try:
            warning = lock.acquire()
            if warning:
                log.warning("%s", warning)
        except ConfigError as e:
            lock, verdict = None, str(e)
    verdict = launcher.broadcast_object(verdict, info)
    if verdict:
        raise ConfigError(verdict)
    return lock


def seed_step(cfg: TrainConfig, info: launcher.DistInfo, step: int) -> None:
    """Re-seed this rank's random streams (dropout, augmentation) from (seed, step, rank) before each step,
    so a run resumed at step K draws what the uninterrupted run drew at step K (same world size)."""
    launcher.seed_everything(cfg.seed, rank=info.rank, step=step)


class Preempted(Exception):
    """Every rank agreed to stop for a signal; the checkpoint is written. main() exits PREEMPTED_EXIT_CODE."""

    def __init__(self, step: int, path: Path, signals: list[str]):
        super().__init__(f"preempted at step {step}: checkpoint {path}")
        self.step, self.path, self.signals = step, path, signals


# ------------------------------------------------------------------------------------------ the loop

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
        self.lock = acquire_run_lock(self.out, info, log)  # before anything in the directory is read or written
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
        self.manager = checkpoint.CheckpointManager(self.out / "checkpoints", keep_last=cfg.keep_last,
                                                    every=cfg.save_every, sharded=cfg.save_sharded,
                                                    async_save=background, overlap_snapshot=background)
        if cfg.save_sharded and cfg.async_save:
            log.info("--save-sharded: checkpoints are written synchronously (every rank writes its own file)")
        self.resume_path = resolve_resume(cfg, self.manager, log, info.restart)
        manifest = checkpoint.read_manifest(self.resume_path) if self.resume_path else None
        holds_entries = launcher.broadcast_object(bool(self.manager.entries()) if info.is_main else None, info)
        if self.resume_path is None and not cfg.eval_only and holds_entries:
            raise ConfigError(f"{self.manager.directory} already holds checkpoints of another run: "
                              "pass --resume auto to continue it, or choose another --output-dir")
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
        if cfg.compile and info.strategy != "fsdp":
            model.compile()  # in place: same class and keys, so checkpoints stay canonical
        self.model = launcher.wrap_model(model, info, sync_bn=cfg.sync_bn, param_dtype=AMP_DTYPES.get(cfg.amp))
        if cfg.compile and info.strategy == "fsdp":
            compile_fsdp_units(self.model)
        self.bare = checkpoint.unwrap(self.model)
        self.ema = build_ema(self.bare, cfg.ema) if cfg.ema else None
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

    def _loader(self, ds, sampler, batch_size: int, drop_last: bool) -> DataLoader:
        # A plain DataLoader: resuming needs no loader state, because the sampler starts each epoch at the
        # checkpoint's sample cursor (TrainSampler.set_start in fit()), whatever the world size.
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=self.cfg.workers, pin_memory=self.info.device.type == "cuda",
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
            sync = nullcontext() if last or not isinstance(self.model, nn.parallel.DistributedDataParallel) \
                else self.model.no_sync()
            with sync:
                loss = self._loss(Batch(x, y))
                self.scaler.scale(loss / accum).backward()
            total += loss.detach() / accum
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
        metrics = self._evaluate(self.bare)
        if self.ema is not None:  # _evaluate syncs its buffers from rank 0: the EMA copy checkpoints hold
            metrics.update({f"ema_{k}": v for k, v in self._evaluate(self.ema.module).items()})
        return metrics

    @torch.no_grad()
    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metric sums over this rank's unpadded shard, all-reduced: exact, whatever the world size."""
        launcher.sync_buffers(model, self.info)  # evaluate rank 0's replica: the one checkpoints hold
        was_training = model.training
        model.eval()
        metric = self.task.make_metric()
        # fsdp: gather the live model once, so ranks may run unequal batch counts (the EMA copy is not sharded)
        with launcher.unsharded(self.model) if model is self.bare else nullcontext():
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
        """Run ``write`` (rank 0's metrics, curves, summary: a no-op on the other ranks) and make every rank
        learn whether it failed, so all stop together instead of the others waiting for rank 0 at their next
        collective (one 4-byte all-reduce; the message is sent only on failure). A failed write
        (``OutputDirError``) stops every rank with its one line; any other exception is re-raised on rank 0
        with its traceback and named on the others."""
        failed, error, result = None, None, None
        try:
            result = write()
        except OutputDirError as e:
            failed = str(e)
        except Exception as e:  # a bug: rank 0 shows its traceback, its peers must not hang meanwhile
            failed, error = f"rank 0 failed while writing its outputs ({type(e).__name__}): see its traceback", e
        if self.info.distributed:
            flag = torch.tensor([float(failed is not None)], device=self.info.device)
            if launcher.all_reduce_sum(flag, self.info).item():
                failed = launcher.broadcast_object(failed, self.info)
        if error is not None:
            raise error
        if failed:
            raise ConfigError(failed)
        return result

    def _global_mean(self, value: torch.Tensor) -> float:
        return (launcher.all_reduce_sum(value.detach().reshape(1).double(), self.info) / self.info.world_size).item()

    def save(self, epoch: int, *, blocking: bool | None = None) -> Path:
        """Checkpoint the current step (in the background unless --no-async-save, --save-sharded or ``blocking``)."""
        self.trainer_state.update(step=self.step, epoch=epoch, global_batch=self.cfg.batch_size, seed=self.cfg.seed,
                                  samples_seen=self.step * self.cfg.batch_size, world_size=self.info.world_size)
        metadata = {"model": self.model_name, "model_options": self.model_options, "epoch": epoch,
                    "topology": {"strategy": self.info.strategy, "world_size": self.info.world_size,
                                 "device_type": self.info.device.type, "launcher": self.info.launcher},
                    "data": self.cfg.data, "config": self.cfg.to_dict()}
        buffers = checkpoint.buffer_agreement(self.bare)  # before the sync: did the ranks' replicas differ?
        if buffers is not None:  # the manifest (and load report) says so, not the post-sync "identical"
            metadata["topology"]["buffers"] = buffers
        launcher.sync_buffers(self.bare, self.info)  # rank 0's BN statistics: the copy the checkpoint holds
        path = self.manager.save(self.step, self.components, metadata=metadata, blocking=blocking)
        if self.ema is not None:
            failed = None
            if self.info.is_main:
                try:
                    write_ema_file(self.out / EMA_FILE, self.bare, self.ema, step=self.step, epoch=epoch)
                except OSError as e:
                    failed = (f"could not write {self.out / EMA_FILE}: {e.strerror or e}; {path} was saved and holds "
                              "the EMA too; free disk space or choose another --output-dir")
            failed = launcher.broadcast_object(failed, self.info)  # every rank stops alike, none waits on rank 0
            if failed:
                raise checkpoint.CheckpointError(failed)
        return path

    def _is_new_best(self, metrics: dict[str, float]) -> bool:
        """Whether ``metrics`` beat the run's best entry on the task's primary metric (higher is better)."""
        value = metrics.get(self.best_metric)
        if value is None:
            return False
        from checkpoint.manager import is_better

        record = self.manager.best_record()
        better = record is None or record.get("metric") != self.best_metric or is_better(value, record["value"], "max")
        # rank 0's reading decides (saving is collective; other nodes may not share its disk)
        flag = torch.tensor([float(better and self.info.is_main)], device=self.info.device)
        return bool(launcher.all_reduce_sum(flag, self.info).item())

    def _flush_saves(self) -> None:
        """Async saves: wait for the save in flight; every rank raises the writer's line if it failed."""
        if self.manager.async_save:
            self.manager.flush()

    def _at_step_boundary(self, epoch: int, saved_at: int | None, last_path: Path | None) -> None:
        """The ranks agree, in ONE all-reduce, on whether any received a preemption signal and whether the
        writer's background save failed; a failure stops every rank with the writer's line, a signal with a
        checkpoint. No collective runs on the background thread (gloo collectives from two threads deadlock)."""
        if self.preempt is None and not self.manager.async_save:
            return
        failed = self.manager.failure() is not None  # the writer's, without waiting; False elsewhere
        preempted, failed = launcher.agree_flags(self.info, self.preempt is not None and self.preempt.requested,
                                                 failed)
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

    def fit(self) -> tuple[float | None, dict[str, float], Path | None]:
        cfg, info = self.cfg, self.info
        self.model.train()
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
            for images, targets in self.loader:
                loss = self.train_step(self._to_device(images, targets))
                self.step += 1
                window_steps += 1
                last = self.step == self.total_steps
                if self.step % cfg.log_every == 0 or last:
                    final_loss = self._global_mean(loss)
                    elapsed = time.perf_counter() - window_t
                    throughput = window_steps * cfg.batch_size / max(elapsed, 1e-9)
                    self._log_row(self.step, epoch=epoch, loss=final_loss, lr=self.scheduler.get_last_lr()[0],
                                    throughput=round(throughput, 2),
                                    grad_norm=None if self.grad_norm is None else float(self.grad_norm))
                    if bar is not None:
                        bar.set_postfix(loss=f"{final_loss:.4f}", img_s=f"{throughput:.0f}")
                    window_t, window_steps = time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)
                if self.manager.should_save(self.step) and not last:
                    last_path, saved_at = self.save(epoch), self.step
                if not last:
                    self._at_step_boundary(epoch, saved_at, last_path)
                if last or self.step % self.steps_per_epoch == 0:
                    break
            metrics = self.evaluate()
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


# --------------------------------------------------------------------------------------------- features
# EMA, best entry, compile: kept here, apart from the loop, which calls them at one line each.

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


def compile_fsdp_units(model: nn.Module) -> None:
    """--compile under fsdp: compile the forward of each FSDP unit below the root, after fully_shard.

    Compiling the whole module before fully_shard (what ddp gets) compiles nothing useful here: FSDP's
    all-gather/reshard hooks are dynamo-disabled, so every unit call breaks the graph and the model runs eagerly
    (checked with TORCH_LOGS=graph_code). Compiling each unit's ``forward`` leaves the hooks outside, as
    torchtitan's per-block compile does; the root's own ops (e.g. a ResNet's stem and head) stay eager. Only the
    bound method is replaced: classes and state-dict keys do not change."""
    for m in model.modules():
        if m is not model and launcher.is_fsdp(m):
            m.forward = torch.compile(m.forward)


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
    from checkpoint._save import atomic_file  # temp name, fsync, rename: never a torn ema.pth

    with atomic_file(path) as f:
        torch.save({"model": model_sd, "model_ema": ema_sd, "step": step, "epoch": epoch}, f)
    return path


def _progress(total: int, initial: int, *, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0, file=sys.stderr)


# ----------------------------------------------------------------------------------------------- main

def main(args: argparse.Namespace) -> int:
    cfg = TrainConfig.from_args(args)
    if args.print_config:
        sys.stdout.write(dump_config(cfg))
        return 0
    # Signals are caught from the start (a SIGTERM during set-up still ends the run at its first step
    # boundary, with a checkpoint), and the previous handlers come back on every exit.
    with launcher.Preemption([cfg.preempt_signal] if cfg.preempt_signal else []) as preempt, \
            launcher.distributed(cfg.strategy, timeout_s=cfg.dist_timeout) as info:
        log = launcher.get_logger(info)
        trainer = Trainer(cfg, info, log)
        try:
            trainer.restore()
            trainer.preempt = preempt
            if cfg.eval_only:
                metrics = trainer.evaluate()
                final_loss, steps, ckpt = None, 0, trainer.resume_path
            else:
                final_loss, metrics, ckpt = trainer.fit()
                steps = trainer.step

            def outputs() -> Any:  # rank 0's files; every rank learns whether they were written
                if not cfg.eval_only:
                    trainer.runlog.curves(trainer.task.primary)
                    trainer.runlog.hparams(cfg.to_dict(), {**metrics, "final_loss": final_loss})
                return trainer.runlog.summary(model=trainer.model_name, strategy=info.strategy,
                                              world_size=info.world_size, steps=steps, final_loss=final_loss,
                                              eval=metrics, checkpoint=str(ckpt) if ckpt else None)

            summary = trainer.agreed_write(outputs)
        except Preempted:
            return launcher.PREEMPTED_EXIT_CODE
        finally:
            trainer.manager.wait()  # no background write outlives the run's lock (an error path: already told)
            try:
                trainer.runlog.close()
            finally:
                if trainer.lock is not None:
                    trainer.lock.release()
        if info.is_main:
            log.info("%s: %s", "evaluated" if cfg.eval_only else "done",
                     ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            log.info("checkpoint: %s", ckpt)
            log.info("summary: %s", summary)
            if not cfg.eval_only:
                log.info("curves: %s", trainer.out / "curves.png")
    return 0


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return main(args)
    except (ConfigError, OutputDirError, launcher.LaunchError, checkpoint.CheckpointError) as e:
        if args.debug:
            raise
        # one write of the whole line: ranks under torchrun share the stream, and print() writes the newline
        # separately, so two ranks' lines could run together
        sys.stderr.write(f"error: {checkpoint.errors.first_line(e)}\n")
        return 2


if __name__ == "__main__":
    launcher.run_main(cli)
