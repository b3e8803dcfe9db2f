"""scripts/train.py's configuration: TrainConfig is the one source of the flags, config files and records.

In-process tests of the parser and the config; one short real run checks config.json and the manifest.
"""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

import train
from train import ConfigError, TrainConfig


def parse(*argv: str) -> TrainConfig:
    return TrainConfig.from_args(train.get_args_parser().parse_args(list(argv)))


def flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


# ------------------------------------------------------------------------------ one source: the fields

def test_every_field_is_a_flag_and_the_parser_defaults_are_the_field_defaults(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    parser = train.get_args_parser()
    dests = {a.dest for a in parser._actions} - {"help", "debug"}
    assert dests == {f.name for f in fields(TrainConfig)}
    assert parse() == TrainConfig()  # no flags: exactly the dataclass defaults


def test_the_flag_names_users_type_are_kept():
    known = set(flags(train.get_args_parser()))
    assert {"--model", "--model-arg", "--data", "--image-size", "--num-samples", "--epochs", "--max-steps",
            "--batch-size", "--grad-accum", "--lr", "--weight-decay", "--optimizer", "--momentum", "--warmup-steps",
            "--amp", "--channels-last", "--sync-bn", "--clip-grad", "--aux-weight", "--strategy", "--output-dir",
            "--save-every", "--keep-last", "--resume", "--seed", "--eval-only", "--log-every", "--workers",
            "--no-tensorboard", "--no-progress", "--debug"} <= known


def test_switches_repeatables_types_and_choices(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    cfg = parse("--model", "mlp", "--model-arg", "a=1", "--model-arg", "b='x'", "--no-tensorboard",
                "--channels-last", "--lr", "0.5", "--max-steps", "7", "--output-dir", "o/p")
    assert cfg.model_args == ("a=1", "b='x'") and cfg.tensorboard is False and cfg.progress is True
    assert cfg.channels_last is True and cfg.lr == 0.5 and cfg.max_steps == 7 and cfg.output_dir == Path("o/p")
    assert cfg.amp == "none"  # unset: accelerate's setting, else none
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert parse().amp == "bf16" and parse("--amp", "fp16").amp == "fp16"
    with pytest.raises(SystemExit) as e:
        parse("--optimizer", "lion")
    assert e.value.code == 2


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--max-steps", "0"], "--max-steps must be positive, got 0"),
    (["--warmup-steps", "-1"], "--warmup-steps must be positive, got -1"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--eval-only"], "--eval-only needs the checkpoint to evaluate: add --resume PATH"),
])
def test_validation_messages_name_the_flag(argv, message):
    with pytest.raises(ConfigError) as e:
        parse(*argv)
    assert str(e.value) == message


def test_a_new_field_becomes_a_flag_with_its_validation():
    """What the module comment promises a developer adding an option: one field, nothing else."""
    from dataclasses import dataclass

    @dataclass(kw_only=True, frozen=True)
    class Extended(TrainConfig):
        ema_decay: float | None = train.option(None, "EMA decay")
        save_sharded: bool = train.option(False, "sharded checkpoints")

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.ema_decay is not None and not 0 < self.ema_decay < 1:
                raise ConfigError(f"--ema-decay must be in (0, 1), got {self.ema_decay}")

    parser = train.build_parser(Extended)
    args = parser.parse_args(["--ema-decay", "0.99", "--save-sharded"])
    cfg = Extended.from_args(args)
    assert cfg.ema_decay == 0.99 and cfg.save_sharded is True
    with pytest.raises(ConfigError, match="--ema-decay must be in"):
        Extended.from_args(parser.parse_args(["--ema-decay", "2"]))
