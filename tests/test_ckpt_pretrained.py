"""``checkpoint.load_pretrained``: where models and checkpoints meet (``models`` never reads files).

A built model takes a weights file strictly, except for the modules it replaced (``ResNet.replaced_prefixes``):
those are skipped with a warning naming the keys. ``scripts/train.py --model-arg weights=PATH`` goes through it.
"""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import checkpoint
import models
from checkpoint import CheckpointError
from conftest import REPO, child_env

SMALL_RESNET = dict(in_channels=1, small_input=True, num_classes=10)


def _save(state, path: Path, fmt: str) -> Path:
    if fmt == "safetensors":
        path = path.with_suffix(".safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "nested":
        torch.save({"state_dict": state, "epoch": 3}, path)
    elif fmt == "model":
        torch.save({"model": state}, path)
    elif fmt == "ddp":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


def _pretrained(name: str, path, **options):
    model = models.build_model(name, **options)
    checkpoint.load_pretrained(model, path, skippable_prefixes=model.replaced_prefixes)
    return model


def _tv_resnet18_file(tmp_path) -> Path:
    return _save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "tv.pth", "torch")


@pytest.mark.parametrize("fmt", ["torch", "safetensors", "nested", "model", "ddp"])
def test_round_trip_any_format(tmp_path, fmt):
    opts = dict(head="mlp", extra_inputs=1, **SMALL_RESNET)
    src = models.build_model("resnet18", **opts).train()
    src(*models.example_inputs("resnet18", batch_size=4, image_size=16, **opts))  # BN stats off their init
    path = _save(src.state_dict(), tmp_path / "w.pt", fmt)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a matching file loads without skipping anything
        dst = _pretrained("resnet18", path, **opts)
    x, extra = models.example_inputs("resnet18", image_size=16, **opts)
    src.eval(), dst.eval()
    with torch.no_grad():
        torch.testing.assert_close(dst(x, extra), src(x, extra), rtol=0, atol=0)


def test_replaced_prefixes_follow_the_options():
    assert models.build_model("resnet18").replaced_prefixes == ()
    assert models.build_model("resnet18", num_classes=10).replaced_prefixes == ("fc.",)
    assert models.build_model("resnet18", **SMALL_RESNET).replaced_prefixes == ("conv1.", "fc.")


def test_skips_replaced_head_with_a_warning(tmp_path):
    path = _tv_resnet18_file(tmp_path)
    file = torch.load(path, weights_only=True)
    with pytest.warns(UserWarning, match=r"skipped 2 key\(s\) of replaced modules .*fc\.bias, fc\.weight"):
        model = _pretrained("resnet18", path, num_classes=10)
    assert model.fc.out_features == 10
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, file[key]), key  # the whole backbone came from the file


def test_skips_replaced_stem_but_loads_a_fitting_head(tmp_path):
    path = _tv_resnet18_file(tmp_path)
    file = torch.load(path, weights_only=True)
    with pytest.warns(UserWarning, match=r"conv1\.weight") as record:
        model = _pretrained("resnet18", path, in_channels=1)
    assert "fc." not in str(record[0].message)  # fc fits: default head, loaded
    assert torch.equal(model.fc.weight, file["fc.weight"])
    assert torch.equal(model.layer1[0].conv1.weight, file["layer1.0.conv1.weight"])
    assert model.conv1.weight.shape == (64, 1, 7, 7)


def test_without_skippable_prefixes_every_mismatch_raises(tmp_path):
    path = _tv_resnet18_file(tmp_path)
    with pytest.raises(CheckpointError, match=r"2 shape-mismatched key\(s\): fc\.bias"):
        checkpoint.load_pretrained(models.build_model("resnet18", num_classes=10), path)


def test_wrong_architecture_lists_keys_and_the_fix(tmp_path):
    path = _save(models.build_model("resnet18").state_dict(), tmp_path / "r18.pt", "torch")
    with pytest.raises(CheckpointError) as info:
        _pretrained("resnet50", path)
    message = str(info.value)
    assert "\n" not in message
    assert "missing key(s): layer1.0.bn3.bias" in message  # sorted
    assert "shape-mismatched key(s): fc.weight (file (1000, 512) vs model (1000, 2048))" in message
    assert " more" in message  # capped at 10 per kind
    assert "Build the model with the architecture" in message  # names the fix

    path = _save(models.build_model("resnet34").state_dict(), tmp_path / "r34.pt", "torch")
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): layer1\.2\.bn1\.bias"):
        _pretrained("resnet18", path)


def test_file_without_num_batches_tracked_loads(tmp_path):
    """Old torchvision files lack ``*.num_batches_tracked``; they still load, strictly otherwise."""
    state = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = _save(state, tmp_path / "old.pth", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _pretrained("resnet18", path)
    assert torch.equal(model.bn1.running_var, state["bn1.running_var"])


def test_head_mismatch_on_default_model_raises(tmp_path):
    path = _save(models.build_model("resnet18", num_classes=10).state_dict(), tmp_path / "ten.pt", "torch")
    with pytest.raises(CheckpointError, match=r"fc\.weight \(file \(10, 512\) vs model \(1000, 512\)\)"):
        _pretrained("resnet18", path)


def test_bad_files_raise(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        _pretrained("resnet18", tmp_path / "nope.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a dict of tensors"):
        _pretrained("resnet18", tmp_path / "list.pt")


# ----------------------------------------------------------------- scripts/train.py --model-arg weights=PATH

TRAIN = str(REPO / "scripts" / "train.py")


def _train(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    out = tmp_path / "run"
    return subprocess.run(
        [sys.executable, TRAIN, "--model", "resnet18", "--data", "digits", "--num-samples", "120", "--batch-size",
         "16", "--max-steps", "1", "--lr", "1e-30", "--no-progress", "--no-tensorboard", "--output-dir", str(out), *extra],
        cwd=REPO, env=child_env(PYTHONWARNINGS="default"), capture_output=True, text=True, timeout=300)


def test_train_script_starts_from_weights_file(tmp_path):
    """With lr=1e-30 one step moves no parameter by more than ~1e-30, so the saved parameters are the file's
    wherever the model kept torchvision's modules (a fresh init differs from the file by ~1e-2)."""
    path = _tv_resnet18_file(tmp_path)
    file = torch.load(path, weights_only=True)
    proc = _train(tmp_path, "--model-arg", f"weights={path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 3 key(s) of replaced modules" in proc.stderr and "conv1.weight, fc.bias, fc.weight" in proc.stderr
    saved = checkpoint.load_state_dict(tmp_path / "run" / "checkpoints")
    params = [k for k, _ in models.build_model("resnet18", **SMALL_RESNET).named_parameters()]
    kept = [k for k in params if not k.startswith(("conv1.", "fc."))]
    assert len(kept) > 50
    for k in kept:
        torch.testing.assert_close(saved[k], file[k], rtol=0, atol=1e-20, msg=k)
    assert saved["conv1.weight"].shape == (64, 1, 3, 3)  # the replaced stem kept its own init
    manifest = checkpoint.read_manifest(tmp_path / "run" / "checkpoints")
    assert "weights" not in manifest["model_options"]  # an init file, not a model option


def test_train_script_bad_weights_file_is_one_line_exit_2(tmp_path):
    path = _save(models.build_model("resnet34").state_dict(), tmp_path / "r34.pt", "torch")
    proc = _train(tmp_path, "--model-arg", f"weights={path}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: weights file") and "unexpected key(s)" in lines[-1], lines[-1]
