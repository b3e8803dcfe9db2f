"""scripts/train.py's configuration: TrainConfig is the one source of the flags, config files and records.

In-process tests of the parser and the config; one short real run checks config.json and the manifest.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

import checkpoint
import training
from training import config as train_config
from conftest import REPO, child_env, train_py
from training import ConfigError, TrainConfig

TRAIN = str(REPO / "scripts" / "train.py")


def parse(*argv: str) -> TrainConfig:
    return TrainConfig.from_args(training.get_args_parser().parse_args(list(argv)))


def flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


# ------------------------------------------------------------------------------ one source: the fields

def test_every_field_is_a_flag_and_the_parser_defaults_are_the_field_defaults(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    parser = training.get_args_parser()
    dests = {a.dest for a in parser._actions} - {"help", "debug", "config", "print_config"}
    assert dests == {f.name for f in fields(TrainConfig)}
    assert parse() == TrainConfig()  # no flags: exactly the dataclass defaults


def test_the_flag_names_users_type_are_kept():
    known = set(flags(training.get_args_parser()))
    assert {"--model", "--model-arg", "--data", "--image-size", "--num-samples", "--epochs", "--max-steps",
            "--batch-size", "--grad-accum", "--lr", "--weight-decay", "--optimizer", "--momentum", "--warmup-steps",
            "--amp", "--channels-last", "--sync-bn", "--clip-grad", "--aux-weight", "--strategy", "--output-dir",
            "--save-every", "--keep-last", "--resume", "--seed", "--eval-only", "--log-every", "--workers",
            "--no-tensorboard", "--no-progress", "--debug", "--config", "--print-config", "--no-async-save",
            "--async-save"} <= known


def test_switches_repeatables_types_and_choices(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    cfg = parse("--model", "mlp", "--model-arg", "a=1", "--model-arg", "b='x'", "--no-tensorboard",
                "--channels-last", "--lr", "0.5", "--max-steps", "7", "--output-dir", "o/p")
    assert cfg.model_args == ("a=1", "b='x'") and cfg.tensorboard is False and cfg.progress is True
    assert cfg.channels_last is True and cfg.lr == 0.5 and cfg.max_steps == 7 and cfg.output_dir == Path("o/p")
    assert cfg.amp == "none"  # unset: accelerate's setting, else none
    # a switch whose default is on: --no-NAME turns it off; --NAME (hidden) still parses, as scripts written
    # when it was opt-in pass it (--async-save became the default)
    assert parse().async_save is True and parse("--no-async-save").async_save is False
    assert parse("--async-save").async_save is True and parse("--tensorboard").tensorboard is True
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
        ema_decay: float | None = train_config.option(None, "EMA decay")
        save_sharded: bool = train_config.option(False, "sharded checkpoints")

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.ema_decay is not None and not 0 < self.ema_decay < 1:
                raise ConfigError(f"--ema-decay must be in (0, 1), got {self.ema_decay}")

    parser = train_config.build_parser(Extended)
    args = parser.parse_args(["--ema-decay", "0.99", "--save-sharded"])
    cfg = Extended.from_args(args)
    assert cfg.ema_decay == 0.99 and cfg.save_sharded is True
    with pytest.raises(ConfigError, match="--ema-decay must be in"):
        Extended.from_args(parser.parse_args(["--ema-decay", "2"]))


# ------------------------------------------------------------------ --config FILE, --print-config

def print_config(capsys, *argv: str) -> str:
    assert training.cli([*argv, "--print-config"]) == 0
    return capsys.readouterr().out


def test_file_values_apply_and_only_flags_given_on_the_command_line_override(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    f = tmp_path / "run.yaml"
    f.write_text("model: mlp\nlr: 1e-2\nbatch_size: 32\nmodel_args: [hidden=16]\ntensorboard: false\n"
                 "output_dir: from/file\nepochs: 3\n")
    cfg = parse("--config", str(f))
    assert (cfg.model, cfg.lr, cfg.batch_size, cfg.model_args, cfg.tensorboard, cfg.output_dir, cfg.epochs) == \
        ("mlp", 0.01, 32, ("hidden=16",), False, Path("from/file"), 3)
    assert cfg.optimizer == "adamw" and cfg.seed == 0  # not in the file: the defaults
    # flags override the file whether they come before or after --config; a repeatable flag replaces the list
    cfg = parse("--lr", "0.5", "--config", str(f), "--model-arg", "depth=2", "--epochs", "1", "--no-progress")
    assert (cfg.lr, cfg.model_args, cfg.epochs, cfg.progress) == (0.5, ("depth=2",), 1, False)
    assert (cfg.batch_size, cfg.tensorboard, cfg.output_dir) == (32, False, Path("from/file"))
    # a flag given with the default's value still overrides (given, not "different from the default")
    assert parse("--config", str(f), "--batch-size", "64").batch_size == 64
    # TOML and JSON read the same keys
    (tmp_path / "run.toml").write_text('lr = 0.25\nmodel_args = ["a=1"]\nclip_grad = 1\n')
    (tmp_path / "run.json").write_text('{"lr": 0.25, "model_args": ["a=1"], "clip_grad": 1.0}')
    assert parse("--config", str(tmp_path / "run.toml")) == parse("--config", str(tmp_path / "run.json")) == \
        parse("--lr", "0.25", "--model-arg", "a=1", "--clip-grad", "1")


def test_a_parent_parser_that_cannot_apply_config_is_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.5\n")
    child = argparse.ArgumentParser(parents=[training.get_args_parser(add_help=False)])
    with pytest.raises(ConfigError, match="was not read"):
        TrainConfig.from_args(child.parse_args(["--config", str(f)]))
    assert TrainConfig.from_args(child.parse_args(["--lr", "0.5"])).lr == 0.5


def test_print_config_round_trips_through_config(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    argv = ["--model", "unet", "--model-arg", "base_width=4", "--model-arg", "bilinear=True", "--data", "1e5",
            "--lr", "3e-4", "--resume", "yes", "--no-tensorboard", "--clip-grad", "0.5", "--strategy", "ddp",
            "--amp", "bf16", "--output-dir", "runs/x y"]
    printed = print_config(capsys, *argv)
    f = tmp_path / "printed.yaml"
    f.write_text(printed)
    assert parse("--config", str(f)) == parse(*argv)
    assert print_config(capsys, "--config", str(f)) == printed  # and prints the same text again
    assert print_config(capsys) != printed  # (the comparison can see a difference)


@pytest.mark.parametrize("text,needle", [
    ("lrr: 0.1\n", "unknown key 'lrr' (did you mean lr?); valid keys: model, model_args,"),
    ("batch-size: 8\n", "unknown key 'batch-size' (did you mean batch_size?)"),
    ("lr: fast\n", "lr must be a number, got 'fast' (str)"),
    ("epochs: 2.5\n", "epochs must be an integer, got 2.5 (float)"),
    ("channels_last: 1\n", "channels_last must be true or false, got 1 (int)"),
    ("model_args: hidden=3\n", "model_args must be a list of strings, got 'hidden=3' (str)"),
    ("batch_size: null\n", "batch_size must be an integer, got None"),
    ("optimizer: lion\n", "optimizer must be one of sgd, adamw, got 'lion'"),
    ("- lr\n", "expected a mapping of option names to values, got a list"),
    ("lr: [\n", "not valid YAML at line 2"),
])
def test_bad_config_file_is_one_line_exit_2(tmp_path, capsys, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(SystemExit) as e:
        training.get_args_parser().parse_args(["--config", str(f)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: --config {f}: ") and needle in err


def test_bad_values_in_a_file_get_the_flags_checks(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: -1\n")
    with pytest.raises(ConfigError, match="--lr must be > 0"):
        parse("--config", str(f))
    f.write_text("clip_grad: .inf\n")  # config.json and manifests are strict JSON
    with pytest.raises(ConfigError, match="--clip-grad must be a finite number"):
        parse("--config", str(f))


# ------------------------------------------------------------------------- a real run keeps its record

def test_a_run_records_its_resolved_config_in_config_json_and_every_checkpoint(tmp_path):
    out = tmp_path / "run"
    f = tmp_path / "run.yaml"
    f.write_text(f"model: mlp\ndata: digits\nnum_samples: 200\nbatch_size: 32\nmax_steps: 9\nsave_every: 2\n"
                 f"lr: 1e-2\nprogress: false\ntensorboard: false\noutput_dir: {out}\n")
    argv = ["--config", str(f), "--max-steps", "3", "--seed", "5"]  # flags override the file
    printed = train_py([*argv, "--print-config"], timeout=180)
    assert printed.returncode == 0 and not out.exists()  # --print-config trains nothing
    expected = yaml.safe_load(printed.stdout)
    # the run itself, in a process that afterwards reports whether torchdata was imported (no longer a dependency)
    check = ("import sys; import training; rc = training.cli(sys.argv[1:]); "
             "print('torchdata imported:', 'torchdata' in sys.modules); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", check, *argv], cwd=REPO, env=child_env(), capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "torchdata imported: False" in p.stdout
    recorded = json.loads((out / "config.json").read_text())
    assert recorded == expected
    assert recorded["max_steps"] == 3 and recorded["seed"] == 5 and recorded["lr"] == 0.01
    assert recorded["save_every"] == 2 and recorded["model"] == "mlp"
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    entries = checkpoint.CheckpointManager(out / "checkpoints").entries()
    assert [step for step, _ in entries] == [2, 3]
    for _, entry in entries:
        assert checkpoint.read_manifest(entry)["extra"]["config"] == recorded  # metadata the manifest does not name
    # config.json is itself a --config file: the recorded run reproduces its options exactly
    assert parse("--config", str(out / "config.json")) == parse(*argv)
