"""Training features of issue 12: EMA, the ``best`` entry, --compile, seeded augmentation, logging, bad input.

Units test the pieces in-process; script tests launch scripts/train.py for real (one process, tiny runs).
--sync-bn is tested in test_syncbn.py.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import checkpoint
import models
from training import data
from checkpoint import CheckpointManager
from conftest import REPO, child_env, train_py

TRAIN = str(REPO / "scripts" / "train.py")
MLP = ["--model", "mlp", "--data", "digits", "--num-samples", "400", "--batch-size", "32", "--no-progress"]


def run(args: list[str], expect: int = 0, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = train_py(args, timeout=timeout)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def make_segfolder(root: Path, n: int = 12, size: int = 20) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        mask[y:y + 8, x:x + 6] = 1
        image = (mask * 200 + rng.integers(0, 40, (size, size))).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------------- units

def test_augmentation_is_a_function_of_seed_epoch_and_index_and_masks_follow(tmp_path):
    root = make_segfolder(tmp_path / "seg")
    train, _, info = data.build_datasets(f"segfolder:{root}", seed=0, image_size=16, augment="basic")
    assert isinstance(train, data.Augmented)
    first = [train[i] for i in range(len(train))]
    torch.manual_seed(123)  # global RNG state must not matter, nor the order of reads
    again = [train[i] for i in reversed(range(len(train)))][::-1]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    plain, _, _ = data.build_datasets(f"segfolder:{root}", seed=0, image_size=16)
    assert any(not torch.equal(a[0], plain[i][0]) for i, a in enumerate(first))  # it does augment
    train.set_epoch(1)
    assert any(not torch.equal(a[0], train[i][0]) for i, a in enumerate(first))  # new draws each epoch
    for image, mask in first:  # geometry applied alike: the bright pixels are the mask's (bilinear edges aside)
        assert mask.dtype == torch.int64 and set(mask.unique().tolist()) <= {0, 1}
        agree = ((image[0] > 0.5).long() == mask).float().mean().item()
        assert agree > 0.9, agree


def test_best_entry_is_never_pruned_while_best(tmp_path):
    model = nn.Linear(2, 2)
    mgr = CheckpointManager(tmp_path, keep_last=1)
    for step, acc in ((1, 0.9), (2, 0.5), (3, 0.7)):
        mgr.save(step, {"model": model})
        mgr.update_best(step, "accuracy", acc)
    assert [s for s, _ in mgr.entries()] == [1, 3]  # keep-last 1, plus the best
    assert mgr.best() == tmp_path / "step-1" and mgr.latest() == tmp_path / "step-3"
    mgr.save(4, {"model": model})
    assert mgr.update_best(4, "accuracy", 0.95)
    mgr.save(5, {"model": model})
    assert [s for s, _ in mgr.entries()] == [4, 5]  # step 1 is no longer best: pruned
    assert json.loads((tmp_path / "best").read_text())["entry"] == "step-4"


def test_ema_averages_parameters_and_batchnorm_buffers():
    from training import run_state

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = run_state.build_ema(model, 0.9)
    old = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update_parameters(model)  # first update copies
    model(torch.randn(8, 3) * 5 + 2)  # moves the BN running stats
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update_parameters(model)
    new = model.state_dict()
    for k in ("0.weight", "1.running_mean", "1.running_var"):
        torch.testing.assert_close(ema.module.state_dict()[k], 0.9 * old[k] + 0.1 * new[k])


# ------------------------------------------------------------------------------------------ scripts

def test_ema_best_and_logging_in_a_run(tmp_path):
    out = tmp_path / "run"
    run([*MLP, "--epochs", "3", "--log-every", "5", "--save-every", "5", "--keep-last", "1", "--ema", "0.9",
         "--output-dir", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["eval"]) == {"accuracy", "ema_accuracy"}
    table = rows(out)
    assert all(float(r["grad_norm"]) > 0 for r in table if r["loss"])
    evals = [(int(r["step"]), float(r["accuracy"])) for r in table if r["accuracy"]]
    best_step = max(evals, key=lambda e: (e[1], -e[0]))[0]  # first step reaching the highest accuracy
    mgr = CheckpointManager(out / "checkpoints")
    assert mgr.best() == out / "checkpoints" / f"step-{best_step}"
    assert best_step in [s for s, _ in mgr.entries()]
    # EMA weights: a component of every entry, and ema.pth in the layout checkpoint.load(ema=True) reads
    final = mgr.latest()
    from checkpoint.states import read_states
    state = read_states(final)
    assert not (final / "state.pth").exists()  # the EMA's OrderedDict goes into state.safetensors, no pickle
    ema_file = checkpoint.load_state_dict(out / "ema.pth", ema=True)
    assert set(ema_file) == {k.removeprefix("module.") for k in state["ema"] if k != "n_averaged"}
    for k, v in ema_file.items():
        assert torch.equal(v, state["ema"]["module." + k])
    assert not torch.equal(ema_file["1.weight"], checkpoint.load_state_dict(final)["1.weight"])
    # ema=True reads the entry's own EMA component: from the entry, the checkpoints/ directory (latest), and the
    # latest/best pointer files; load() fills a model with it; convert --ema writes it
    ckpts = out / "checkpoints"
    for where in (final, ckpts, ckpts / "latest"):
        assert checkpoint.load_state_dict(where, ema=True).keys() == ema_file.keys()
        assert all(torch.equal(v, ema_file[k]) for k, v in checkpoint.load_state_dict(where, ema=True).items())
    best_ema = checkpoint.load_state_dict(ckpts / "best", ema=True)
    best_state = read_states(mgr.best())["ema"]
    assert all(torch.equal(v, best_state["module." + k]) for k, v in best_ema.items())
    model = models.build_model("mlp", **json.loads((final / "manifest.json").read_text())["model_options"])
    report = checkpoint.load(ckpts / "best", model, ema=True)
    assert "weights taken from the entry's 'ema' component" in str(report) and report.step == best_step
    assert all(torch.equal(v, best_ema[k]) for k, v in model.state_dict().items())
    converted = tmp_path / "ema.safetensors"
    conv = subprocess.run([sys.executable, "-m", "checkpoint", "convert", str(final), str(converted), "--ema"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert conv.returncode == 0, conv.stderr
    assert all(torch.equal(v, ema_file[k]) for k, v in checkpoint.load_state_dict(converted).items())
    # --eval-only --resume best evaluates exactly the best entry, and its EMA without --ema being given
    proc = run([*MLP, "--eval-only", "--resume", "best", "--output-dir", str(out)])
    best_acc = dict(evals)[best_step]
    assert f"accuracy {best_acc:.4f}" in proc.stderr + proc.stdout and "ema_accuracy" in proc.stderr + proc.stdout
    # hyperparameters in TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert "hparams" in acc.PluginTagToContent("hparams") or acc.PluginTagToContent("hparams")


def test_augmented_run_resumes_with_the_same_draws(tmp_path):
    root = make_segfolder(tmp_path / "seg", n=20)
    common = ["--model", "unet", "--model-arg", "base_width=4", "--data", f"segfolder:{root}", "--image-size", "16",
              "--batch-size", "4", "--epochs", "2", "--log-every", "1", "--augment", "strong", "--no-progress",
              "--no-tensorboard", "--optimizer", "sgd"]
    run([*common, "--save-every", "3", "--keep-last", "0", "--output-dir", str(tmp_path / "full")])
    # resume mid-epoch (4 steps per epoch) from the uninterrupted run's step 3: same LR schedule, same draws
    run([*common, "--resume", str(tmp_path / "full" / "checkpoints" / "step-3"), "--output-dir", str(tmp_path / "rest")])
    full = {r["step"]: float(r["loss"]) for r in rows(tmp_path / "full") if r["loss"]}
    rest = {r["step"]: float(r["loss"]) for r in rows(tmp_path / "rest") if r["loss"]}
    assert len(full) == 8 and sorted(rest, key=int) == ["4", "5", "6", "7", "8"]
    for step, loss in rest.items():
        assert loss == pytest.approx(full[step], rel=1e-6), step


def test_compile_keeps_checkpoints_canonical(tmp_path):
    out = tmp_path / "compiled"
    run([*MLP, "--max-steps", "3", "--compile", "--ema", "0.5", "--no-tensorboard", "--output-dir", str(out)], timeout=400)
    assert set(json.loads((out / "summary.json").read_text())["eval"]) == {"accuracy", "ema_accuracy"}
    keys = set(checkpoint.load_state_dict(out / "checkpoints"))
    assert keys and not any("_orig_mod" in k or k.startswith("module.") for k in keys)

    model = models.build_model("mlp", **json.loads((out / "checkpoints" / "step-3" / "manifest.json").read_text())["model_options"])
    checkpoint.load(out / "checkpoints", model)  # strict load into a plain model


@pytest.mark.parametrize("args, message", [
    (["--ema", "1.5"], "--ema 1.5 is outside (0, 1)"),
    (["--augment", "basic"], "--augment basic needs image files"),
    (["--resume", "best"], "--resume best: "),
    (["--ema", "0.9", "--strategy", "fsdp"], "--ema with --strategy fsdp is not supported"),
    (["--dtype", "float64", "--amp", "bf16"], "--dtype float64 with --amp bf16"),
])
def test_bad_feature_input_is_one_line_and_exit_2(tmp_path, args, message):
    proc = run([*MLP, "--output-dir", str(tmp_path / "o"), *args], expect=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "use" in lines[0]  # names the fix


def torchrun(nproc: int, args: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    from conftest import BIN, free_port

    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           TRAIN, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(**env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.multiproc
@pytest.mark.slow  # three compiled launches (~18 s on 2 cores): `make test-slow`; make test keeps the single-process compile
@pytest.mark.timeout(500)
def test_compile_under_ddp_and_fsdp_trains_like_eager_and_saves_canonical_keys(tmp_path):
    """--compile with --strategy ddp and fsdp at world 2: the losses are the eager ddp run's within 1e-4 relative,
    and each checkpoint has canonical keys and loads strictly into a bare model in this process.

    Why 1e-4: the eager and compiled runs compute the same maths in another order (inductor fuses the MLP's
    matmul/bias/ReLU and its reductions; FSDP reduce-scatters where DDP all-reduces), so they differ by float32
    rounding, ~1e-7 per op, a few 1e-7 after 5 steps of this well-conditioned model at most (measured here: bit
    equal, printed with -s; another CPU or kernel library may round differently). A step that went wrong (gradients
    not averaged over the ranks, a parameter left out of the optimizer, a stale compiled graph) changes the loss
    by the size of an update, orders of magnitude above 1e-4.
    TORCH_LOGS=graph_code shows that dynamo traced the Linear layers (before the per-unit compile, fsdp traced
    nothing: FSDP's hooks break every graph, and "compiled" fsdp ran eagerly).
    Cost: ~30 s per compiled launch on 2 CPU cores without inductor's cache (~10 s with it), 3 launches.
    """

    args = [*MLP, "--max-steps", "5", "--log-every", "1", "--no-tensorboard"]
    torchrun(2, ["--strategy", "ddp", *args, "--output-dir", str(tmp_path / "eager")])
    traced = {name: torchrun(2, ["--strategy", name, *args, "--compile", "--output-dir", str(tmp_path / name)],
                             TORCH_LOGS="graph_code").stderr for name in ("ddp", "fsdp")}
    eager = [float(r["loss"]) for r in rows(tmp_path / "eager") if r["loss"]]
    assert len(eager) == 5, eager
    for name in ("ddp", "fsdp"):
        out = tmp_path / name
        # compiled for real: dynamo traced the model's Linear layers into a graph (a no-op compile traces nothing)
        assert "[__graph_code]" in traced[name] and "torch._C._nn.linear" in traced[name], traced[name][-2000:]
        losses = [float(r["loss"]) for r in rows(out) if r["loss"]]
        print(name, "compiled vs eager ddp:", " ".join(f"{abs(a - b) / abs(b):.0e}" for a, b in zip(losses, eager)))
        np.testing.assert_allclose(losses, eager, rtol=1e-4, err_msg=name)
        keys = set(checkpoint.load_state_dict(out / "checkpoints"))
        assert keys and not any("_orig_mod" in k or k.startswith("module.") for k in keys), sorted(keys)[:5]
        manifest = json.loads((out / "checkpoints" / "step-5" / "manifest.json").read_text())
        assert manifest["topology"]["strategy"] == name, manifest["topology"]
        model = models.build_model("mlp", **manifest["model_options"])
        report = checkpoint.load(out / "checkpoints", model)  # strict: raises on any missing/unexpected key
        trained = checkpoint.load_state_dict(out / "checkpoints")
        for k, v in model.state_dict().items():
            assert torch.equal(v, trained[k]), k
        assert report is not None
