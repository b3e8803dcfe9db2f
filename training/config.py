"""The run's options: ``TrainConfig`` (one typed field per flag), its command line and its config files.

``TrainConfig`` is the ONE source of the run's options: :func:`get_args_parser` is generated from its fields,
and ``--config`` files, ``--print-config``, ``output-dir/config.json`` and the checkpoint manifest
(``"config"``) all use its field names as keys.

To add an option (say --ema-decay), add ONE field to TrainConfig and nothing else here::

    ema_decay: float | None = option(None, "keep an EMA of the weights with this decay")

- the flag is the field name with '-' for '_' (--ema-decay); its type (int, float, str, Path, X | None,
  bool, tuple[str, ...]) gives the argparse type and the type checked in --config files;
- a bool field is a switch: default False -> --name (store_true), default True -> --no-name (store_false)
  and a hidden --name (the default, accepted so scripts written before it became the default still run);
- tuple[str, ...] is a repeatable flag: pass flag="--model-arg" to name its single form;
- choices=[...] restricts the values (on the command line and in files), metavar= names the value;
- an optional field (X | None) must default to None (a config file omits unset options);
- checks that need a number range or another field go in __post_init__ and raise ConfigError with a
  message that names the flag and the fix (the entry point prints it as one line and exits 2); they apply
  to flags and config files alike.

Then read it as ``cfg.ema_decay`` where it is used. --help, --config, --print-config and config.json follow.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

import launcher
import models

from .data import AUGMENTS

DESCRIPTION = "Train a ResNet/MLP classifier or a U-Net segmenter on any topology, with the same script."

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = {"float32": torch.float32, "float64": torch.float64}  # --dtype


class ConfigError(ValueError):
    """A bad flag or flag combination; the message names the fix."""


def option(default: Any, help: str, *, choices: list[str] | tuple[str, ...] | None = None,
           metavar: str | None = None, flag: str | None = None):
    """A TrainConfig field that is also a command-line flag (see the module docstring)."""
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
    hang_timeout: float | None = option(None, "seconds a rank may stay in one phase (data, forward, backward, optimizer, "
                                              "collective, save, eval) before the run counts it as hung: the stuck "
                                              "rank is named on every rank, the stacks go to OUTPUT_DIR/hangs/, every "
                                              "rank exits 124 (a restart resumes); default: max(60, 10x the longest "
                                              "that phase took so far), --dist-timeout before it is measured; 0: off",
                                        metavar="SECONDS")
    straggler_steps: int = option(5, "warn when a rank's own step time stays above 2x the other ranks' median for "
                                     "this many consecutive steps (0: never); metrics.csv has the spread either way")
    output_dir: Path = option(Path("runs/train"), "checkpoints, metrics, curves and summary go here")
    checkpoint_dir: str | None = option(None, "where the checkpoints go: a directory every node sees, or an "
                                              "object store, s3://BUCKET/PREFIX (credentials and endpoint from "
                                              "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, "
                                              "AWS_ENDPOINT_URL); default OUTPUT_DIR/checkpoints",
                                        metavar="DIR|URL")
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
    preempt_grace: float = option(30.0, "seconds the scheduler leaves between its signal and SIGKILL (torchrun: 30; "
                                        "Slurm: KillWait): when a step plus a save would not fit, say so and save "
                                        "more often", metavar="SECONDS")
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
        if self.ema is not None and launcher.STRATEGY_CLASSES[self.strategy].shards_parameters:
            raise ConfigError(f"--ema with --strategy {self.strategy} is not supported yet (the EMA copy would be "
                              "sharded): use --strategy ddp, or drop --ema")
        if self.preempt_signal is not None:
            try:
                launcher.parse_signal(self.preempt_signal)
            except launcher.LaunchError as e:
                raise ConfigError(f"--preempt-signal: {e}") from None
        if self.dist_timeout is not None and self.dist_timeout <= 0:
            raise ConfigError(f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.hang_timeout is not None and self.hang_timeout < 0:
            raise ConfigError(f"--hang-timeout must be >= 0 seconds (0 turns the watchdog off), got {self.hang_timeout}")
        if self.straggler_steps < 0:
            raise ConfigError(f"--straggler-steps must be >= 0 (0: never warn), got {self.straggler_steps}")
        if self.preempt_grace <= 0:
            raise ConfigError(f"--preempt-grace must be > 0 seconds, got {self.preempt_grace}")
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
    p = ConfigArgumentParser(description=DESCRIPTION, add_help=add_help, formatter_class=_HelpFormatter)
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


