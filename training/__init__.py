"""The training application: config, trainer, run state, data, tasks and reporting, as an importable package.

``scripts/train.py`` is its command line (``training.cli``); bench/ and tests/ import it like any user::

    from training import TrainConfig, Trainer, cli
    cli(["--model", "resnet18", "--data", "digits", "--max-steps", "10"])   # the same as scripts/train.py

Modules, each about one thing:
- ``config``: ``TrainConfig`` (one typed field per flag), its parser and its YAML/TOML/JSON files;
- ``data``: datasets shipped in wheels (digits, mnist5k), generated (shapes) or a user's folder;
- ``tasks``: each task's loss and metric (classification, segmentation);
- ``reporting``: rank 0's outputs (config.json, metrics.csv, TensorBoard, curves.png, summary.json);
- ``run_state``: the run lock, which checkpoint a (re)start resumes, the EMA, the ``best`` entry;
- ``trainer``: ``Trainer`` (build, restore, fit, evaluate, save);
- ``app``: ``main``/``cli``, which run one training and always tear down;
- ``demo``: ``make demo``.

It uses ``launcher``, ``models``, ``checkpoint`` and ``collective``; none of them knows of it.
"""
from .app import cli, main
from .config import ConfigError, TrainConfig, dump_config, get_args_parser, read_config_file
from .trainer import Trainer

__all__ = ["ConfigError", "TrainConfig", "Trainer", "cli", "dump_config", "get_args_parser", "main",
           "read_config_file"]
