"""Bad input gives one clear line, never a traceback, and never runs code from a file.

Through the CLI (``inspect``, ``convert``, ``verify``): exit status 2 and exactly one non-empty stderr line
``error: ...`` that names the problem (and the file). Through the API: ``CheckpointError`` with the same
message. Pickles that would run code must not run, whichever command or function reads them. Strict
loads list missing/unexpected keys sorted and capped; ``strict=False`` loads the rest and reports it.
"""
from __future__ import annotations

import builtins
import json
import os
import pickle
import random
import shutil
import struct

import pytest
import torch
from torch import nn

import checkpoint
import models
from _ckpt_testlib import assert_one_line_error, run_cli, small_net
from checkpoint import CheckpointError

SHARD = "model-00002-of-00003.safetensors"  # mlp saved with max_shard_size="300KB": its 1.weight alone


def _mlp_file(path, **options):
    checkpoint.save(models.build_model("mlp", **options), path)
    return path


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """One of each kind of bad input, all derived from a good mlp checkpoint."""
    root = tmp_path_factory.mktemp("bad")
    good = _mlp_file(root / "good.safetensors")
    raw = good.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    data_start = 8 + header_len
    files = {}

    files["empty"] = root / "empty.pth"
    files["empty"].write_bytes(b"")

    noise = random.Random(0).randbytes(4096)
    assert noise[:4] != b"PK\x03\x04" and noise[8:9] != b"{" and noise[:1] != b"\x80"  # matches no format
    files["random-bytes"] = root / "noise.bin"
    files["random-bytes"].write_bytes(noise)

    files["truncated-safetensors-data"] = root / "cut_in_data.safetensors"
    files["truncated-safetensors-data"].write_bytes(raw[:data_start + (len(raw) - data_start) // 2])
    files["truncated-safetensors-header"] = root / "cut_in_header.safetensors"
    files["truncated-safetensors-header"].write_bytes(raw[:8 + header_len // 2])

    torch.save(models.build_model("mlp").state_dict(), root / "whole.pth")
    whole = (root / "whole.pth").read_bytes()
    files["truncated-pth"] = root / "cut.pth"
    files["truncated-pth"].write_bytes(whole[:len(whole) // 2])

    sharded = root / "sharded"
    checkpoint.save(models.build_model("mlp"), sharded, max_shard_size="300KB")
    assert (sharded / SHARD).is_file() and not (sharded / SHARD.replace("00002", "00004")).exists()
    files["missing-shard"] = shutil.copytree(sharded, root / "missing_shard")
    (files["missing-shard"] / SHARD).unlink()
    files["corrupt-shard"] = shutil.copytree(sharded, root / "corrupt_shard")
    shard = files["corrupt-shard"] / SHARD
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the data section; same size, so only sha256 can tell
    shard.write_bytes(bytes(data))

    files["not-a-checkpoint-dir"] = root / "notes"
    files["not-a-checkpoint-dir"].mkdir()
    (files["not-a-checkpoint-dir"] / "readme.txt").write_text("not weights")
    files["empty-dir"] = root / "nothing_here"
    files["empty-dir"].mkdir()
    files["does-not-exist"] = root / "no_such_run" / "final.safetensors"
    return files


# case -> words the one-line message must contain (besides the file's name)
CASES = {
    "empty": ["empty", "0 bytes"],
    "random-bytes": ["not a checkpoint", "first bytes"],
    "truncated-safetensors-data": ["truncated"],
    "truncated-safetensors-header": ["truncated"],
    "truncated-pth": ["damaged or truncated"],
    "missing-shard": ["missing", SHARD],
    "corrupt-shard": ["sha256", SHARD],
    "not-a-checkpoint-dir": ["not a checkpoint", "readme.txt"],
    "empty-dir": ["not a checkpoint"],
    "does-not-exist": ["no such checkpoint"],
}
COMMANDS = ["inspect", "convert", "verify"]


def _argv(command, path, tmp_path):
    if command == "convert":
        return ["convert", path, tmp_path / "out.safetensors"]
    if command == "verify":
        return ["verify", path, "--model", "mlp"]
    return ["inspect", path]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(CASES))
def test_cli_bad_input_is_one_line_exit_2(bad, tmp_path, case, command):
    path = bad[case]
    proc = run_cli(*_argv(command, path, tmp_path))
    name = SHARD if case.endswith("shard") else path.name
    assert_one_line_error(proc, name, *CASES[case])
    assert proc.stdout == ""
    assert not (tmp_path / "out.safetensors").exists()  # convert wrote nothing


@pytest.mark.parametrize("case", list(CASES))
def test_api_bad_input_raises_checkpoint_error(bad, case):
    path = bad[case]
    for read in (lambda: checkpoint.load_state_dict(path, verify=True),
                 lambda: checkpoint.load(path, models.build_model("mlp"), verify=True),
                 lambda: checkpoint.inspect(path)):
        with pytest.raises(CheckpointError) as exc:
            read()
        msg = str(exc.value)
        assert "\n" not in msg
        for needle in CASES[case]:
            assert needle.lower() in msg.lower(), msg


def test_damaged_pickle_is_not_called_code_carrying(tmp_path):
    """A .pth whose bytes after the pickle marker are garbage is damaged; --allow-pickle is the wrong advice."""
    path = tmp_path / "damaged.pth"
    path.write_bytes(b"\x80\x02" + random.Random(1).randbytes(2000))
    line = assert_one_line_error(run_cli("inspect", path), path.name)
    assert "allow-pickle" not in line and "allow_pickle" not in line, line
    assert "damaged" in line or "not a readable" in line, line


def test_cli_real_process_debug_shows_traceback(bad):
    proc = run_cli("--debug", "inspect", bad["empty"], real=True)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "CheckpointError" in proc.stderr
    # The flag also works after the command.
    proc = run_cli("inspect", bad["empty"], "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


# ------------------------------------------------------------------------------------ wrong model

@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("resnet") / "resnet18.safetensors"
    checkpoint.save(models.build_model("resnet18", num_classes=10, in_channels=1, small_input=True), path)
    return path


MLP_MISSING = "4 missing [1.bias, 1.weight, 3.bias, 3.weight]"


def test_verify_wrong_architecture_lists_keys_and_fix(resnet_file):
    line = assert_one_line_error(run_cli("verify", resnet_file, "--model", "mlp"), resnet_file.name)
    assert MLP_MISSING in line and "unexpected" in line and "bn1." in line, line
    assert "Fix:" in line, line


def test_api_wrong_architecture_lists_keys_and_fix(resnet_file):
    with pytest.raises(CheckpointError) as exc:
        checkpoint.load(resnet_file, models.build_model("mlp"))
    msg = str(exc.value)
    assert MLP_MISSING in msg and "unexpected" in msg and "Fix:" in msg and "strict=False" in msg, msg


def test_verify_shape_mismatch_lists_shapes_and_fix(tmp_path):
    path = _mlp_file(tmp_path / "mlp_h128.safetensors", hidden=128)
    line = assert_one_line_error(run_cli("verify", path, "--model", "mlp"), path.name, "shape")
    for entry in ("1.bias ([128] vs [256])", "1.weight ([128, 784] vs [256, 784])", "3.weight ([10, 128] vs [10, 256])"):
        assert entry in line, line
    assert "Fix:" in line, line
    # ... and the fix works: build the model the file was saved from.
    assert run_cli("verify", path, "--model", "mlp", "--model-arg", "hidden=128").returncode == 0


# ---------------------------------------------------------------------------------- code in pickles

class RunsShell:
    """Unpickling this runs a shell command."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


class OpensFile:
    """Unpickling this creates a file through a builtin, no shell."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return builtins.open, (self.sentinel, "w")


PAYLOADS = {"os.system": RunsShell, "builtins.open": OpensFile}
WRITERS = {"torch.save": torch.save, "pickle.dump": lambda obj, path: path.write_bytes(pickle.dumps(obj))}


def _evil_file(tmp_path, payload, writer):
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "evil.pth"
    WRITERS[writer]({"weight": torch.zeros(3), "trap": PAYLOADS[payload](sentinel)}, path)
    assert not sentinel.exists()
    return path, sentinel


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_code_carrying_pickle_never_runs(tmp_path, payload, writer):
    path, sentinel = _evil_file(tmp_path, payload, writer)
    procs = {}
    for command in COMMANDS:
        procs[command] = run_cli(*_argv(command, path, tmp_path))
        assert not sentinel.exists(), f"{command} ran code from the file"
    for read in (lambda: checkpoint.load_state_dict(path), lambda: checkpoint.load(path, small_net()),
                 lambda: checkpoint.inspect(path)):
        with pytest.raises(CheckpointError, match="allow_pickle"):
            read()
        assert not sentinel.exists()
    # Refused, and said so in one line (checked last: nothing ran, whatever the message looks like).
    for proc in procs.values():
        assert_one_line_error(proc, path.name, "--allow-pickle")


def test_code_carrying_pickle_real_process(tmp_path):
    path, sentinel = _evil_file(tmp_path, "os.system", "torch.save")
    proc = run_cli("convert", path, tmp_path / "out.safetensors", real=True)
    assert not sentinel.exists()
    assert_one_line_error(proc, path.name, "--allow-pickle")


# ------------------------------------------------------------------------------------- strict loads

class Ladder(nn.Module):
    """Ten small named layers, so key lists are long enough to be capped."""

    def __init__(self) -> None:
        super().__init__()
        for i in range(10):
            self.add_module(f"l{i:02d}", nn.Linear(2, 2))


def _partial_file(tmp_path):
    """A file lacking layers l03 and l07 and carrying 9 keys the model does not have."""
    torch.manual_seed(0)
    source = Ladder()
    sd = {k: v for k, v in source.state_dict().items() if not k.startswith(("l03.", "l07."))}
    extra = {f"extra_{i:02d}": torch.full((2,), float(i)) for i in reversed(range(9))}
    path = tmp_path / "partial.safetensors"
    checkpoint.save({**extra, **sd}, path)
    return path, source


def test_strict_load_lists_missing_and_unexpected_sorted_and_capped(tmp_path):
    path, _ = _partial_file(tmp_path)
    with pytest.raises(CheckpointError) as exc:
        checkpoint.load(path, Ladder())
    msg = str(exc.value)
    assert "4 missing [l03.bias, l03.weight, l07.bias, l07.weight]" in msg, msg
    assert "9 unexpected [extra_00, extra_01, extra_02, extra_03, extra_04, extra_05 and 3 more]" in msg, msg
    assert "extra_08" not in msg
    assert "strict=False" in msg


def test_non_strict_load_takes_the_matching_subset_and_reports_the_rest(tmp_path):
    path, source = _partial_file(tmp_path)
    torch.manual_seed(1)
    target = Ladder()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = checkpoint.load(path, target, strict=False)

    assert report.loaded == 16 and not report.ok
    assert report.missing == ["l03.bias", "l03.weight", "l07.bias", "l07.weight"]
    assert report.unexpected == [f"extra_{i:02d}" for i in range(9)]
    for k, v in target.state_dict().items():
        want = before[k] if k.startswith(("l03.", "l07.")) else source.state_dict()[k]
        assert torch.equal(v, want), k
    text = str(report)
    assert "missing: 4" in text and "unexpected: 9" in text and "and 3 more" in text


# ------------------------------------------------------------------------------------ internal errors

def test_cli_bug_is_not_reported_as_bad_input(tmp_path, monkeypatch, resnet_file):
    """An exception that is not about the input (here a TypeError raised inside inspect) is a bug: exit 3,
    one line that says so and how to get the traceback, never exit 2 dressed as a user error."""
    import checkpoint.cli

    def broken(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'\nsecond line")

    monkeypatch.setattr(checkpoint.cli, "inspect", broken)
    proc = run_cli("inspect", resnet_file)
    assert proc.returncode == 3, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: internal error: TypeError: unsupported operand"), lines[0]
    assert "--debug" in lines[0] and "second line" not in lines[0]
    proc = run_cli("inspect", resnet_file, "--json")
    assert proc.returncode == 3 and json.loads(proc.stdout) == {
        "ok": False, "error": lines[0].removeprefix("error: "), "exit_code": 3}
    proc = run_cli("inspect", resnet_file, "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "TypeError" in proc.stderr
