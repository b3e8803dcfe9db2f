"""Every checkpoint format anytopo reads, produced by the real library that writes it, loaded into our models.

Each foreign-format test checks three things: ``checkpoint.inspect`` names the format, ``checkpoint.load``
into a fresh model gives the source model's eval-mode outputs exactly (and the fresh model's outputs
differed before, so the load did something), and ``checkpoint.load_state_dict`` returns canonical keys.
Then anytopo's own layouts (safetensors file, .pth, sharded directory): round trips through the API and
the CLI, bit-exact dtypes, tied weights, interop with the ``safetensors`` library, and files whose
storages are tagged for a GPU this machine does not have. CPU only; small models.
"""
from __future__ import annotations

import argparse
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import checkpoint
import models
from _ckpt_testlib import (assert_bit_identical, assert_one_line_error, fresh_net_differs, outputs, run_cli, small_net,
                           trained_net)
from checkpoint import CheckpointError


def _canonical(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_loads_into_fresh(path, source: nn.Module, *, expect_outputs: torch.Tensor | None = None, **kwargs):
    """Load ``path`` into a fresh small_net; its outputs must become ``source``'s. Returns the report."""
    dst = fresh_net_differs(source)
    report = checkpoint.load(path, dst, **kwargs)
    assert report.ok, str(report)
    assert report.loaded == len(dst.state_dict())
    want = outputs(source) if expect_outputs is None else expect_outputs
    assert torch.equal(outputs(dst), want)
    return report


def _trained_with_optimizer(seed: int = 0):
    """A trained net, its optimizer after one step (momentum buffers exist), a scheduler and an EMA copy.

    The EMA (``torch.optim.swa_utils.AveragedModel``, what torchvision's ExponentialMovingAverage builds
    on) averages the weights before and after the step, so its outputs differ from the model's.
    """
    model = trained_net(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    ema = torch.optim.swa_utils.AveragedModel(model)
    ema.update_parameters(model)  # the first update copies the weights
    model.train()
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()
    sched.step()
    model.eval()
    ema.update_parameters(model)  # the second averages them
    ema.eval()
    assert not torch.equal(outputs(ema.module), outputs(model))
    return model, opt, sched, ema


# ------------------------------------------------------------------------------ plain state dicts

def _compiled(m: nn.Module) -> nn.Module:
    # Wrapping is enough: the state_dict keys get "_orig_mod." without ever running (compiling) the model.
    return torch.compile(m)


WRAPPINGS = {
    "bare": (lambda m: m, ""),
    "dataparallel": (nn.DataParallel, "module."),
    "compile": (_compiled, "_orig_mod."),
    "dataparallel(compile)": (lambda m: nn.DataParallel(_compiled(m)), "module._orig_mod."),
    "compile(dataparallel)": (lambda m: _compiled(nn.DataParallel(m)), "_orig_mod.module."),
}


@pytest.mark.parametrize("wrapping", list(WRAPPINGS))
def test_plain_state_dict_of_wrapped_model(tmp_path, wrapping):
    source = trained_net()
    wrap, prefix = WRAPPINGS[wrapping]
    sd = wrap(source).state_dict()
    # The real wrapper produced the prefix this test is about.
    assert sorted(sd) == sorted(prefix + k for k in source.state_dict())
    path = tmp_path / "weights.pth"
    torch.save(sd, path)

    assert checkpoint.inspect(path)["format"] == "state-dict"
    assert_bit_identical(checkpoint.load_state_dict(path), _canonical(source))
    report = _assert_loads_into_fresh(path, source)
    assert report.prefix_stripped == prefix


@pytest.mark.parametrize("target_wrapping", ["dataparallel", "dataparallel(compile)"])
def test_plain_state_dict_loads_into_wrapped_model(tmp_path, target_wrapping):
    source = trained_net()
    path = tmp_path / "bare.pth"
    torch.save(source.state_dict(), path)
    bare = fresh_net_differs(source)
    target = WRAPPINGS[target_wrapping][0](bare)
    checkpoint.load(path, target)
    assert torch.equal(outputs(bare), outputs(source))


# ------------------------------------------------------------------------------- training scripts

def test_torchvision_reference_checkpoint_model_and_ema(tmp_path):
    model, opt, sched, ema = _trained_with_optimizer()
    assert "n_averaged" in ema.state_dict() and all(
        k == "n_averaged" or k.startswith("module.") for k in ema.state_dict())
    path = tmp_path / "model_3.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "lr_scheduler": sched.state_dict(), "epoch": 3,
                "args": argparse.Namespace(model="small", lr=0.1, epochs=10)}, path)

    info = checkpoint.inspect(path)
    assert info["format"] == "torchvision-reference"
    assert {"optimizer", "lr_scheduler", "epoch", "args"} <= set(info["other_entries"])
    _assert_loads_into_fresh(path, model)
    _assert_loads_into_fresh(path, model, ema=True, expect_outputs=outputs(ema.module))
    assert_bit_identical(checkpoint.load_state_dict(path), _canonical(model))
    assert_bit_identical(checkpoint.load_state_dict(path, ema=True), _canonical(ema.module))


def _timm_checkpoint(path, *, with_ema: bool):
    model, opt, _, ema = _trained_with_optimizer()
    state = {"epoch": 3, "arch": "small_net", "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
             "version": 2, "args": argparse.Namespace(model="small_net", lr=0.1), "metric": 0.5}
    if with_ema:
        state["state_dict_ema"] = ema.module.state_dict()  # timm stores the EMA's bare module weights
    torch.save(state, path)
    return model, ema


def test_timm_checkpoint_model_and_ema(tmp_path):
    path = tmp_path / "checkpoint-3.pth.tar"
    model, ema = _timm_checkpoint(path, with_ema=True)

    assert checkpoint.inspect(path)["format"] == "timm"
    _assert_loads_into_fresh(path, model)
    _assert_loads_into_fresh(path, model, ema=True, expect_outputs=outputs(ema.module))
    assert_bit_identical(checkpoint.load_state_dict(path), _canonical(model))
    assert_bit_identical(checkpoint.load_state_dict(path, ema=True), _canonical(ema.module))


def test_timm_checkpoint_without_ema_refuses_ema(tmp_path):
    path = tmp_path / "checkpoint-3.pth.tar"
    model, _ = _timm_checkpoint(path, with_ema=False)
    assert checkpoint.inspect(path)["format"] == "timm"
    _assert_loads_into_fresh(path, model)
    with pytest.raises(CheckpointError, match="EMA"):
        checkpoint.load(path, small_net(), ema=True)
    with pytest.raises(CheckpointError, match="EMA"):
        checkpoint.load_state_dict(path, ema=True)


def _lightning(path, state_dict):
    model, opt, _, _ = _trained_with_optimizer()
    torch.save({"epoch": 2, "global_step": 40, "pytorch-lightning_version": "2.4.0", "state_dict": state_dict,
                "optimizer_states": [opt.state_dict()], "lr_schedulers": [], "callbacks": {},
                "hyper_parameters": {"lr": 0.1}}, path)


def test_lightning_checkpoint(tmp_path):
    source = trained_net()
    path = tmp_path / "epoch=2-step=40.ckpt"
    _lightning(path, {"model." + k: v for k, v in source.state_dict().items()})

    assert checkpoint.inspect(path)["format"] == "lightning"
    report = _assert_loads_into_fresh(path, source)
    assert report.prefix_stripped == "model."
    # Documented: only wrapper prefixes are removed without a model; the LightningModule attribute stays.
    sd = checkpoint.load_state_dict(path)
    assert_bit_identical(sd, {"model." + k: v for k, v in _canonical(source).items()})


def test_lightning_student_teacher_is_ambiguous_until_prefix_given(tmp_path):
    student, teacher = trained_net(seed=0), trained_net(seed=1)
    path = tmp_path / "distill.ckpt"
    _lightning(path, {**{"student." + k: v for k, v in student.state_dict().items()},
                      **{"teacher." + k: v for k, v in teacher.state_dict().items()}})

    with pytest.raises(CheckpointError, match="ambiguous") as exc:
        checkpoint.load(path, small_net())
    assert "student." in str(exc.value) and "teacher." in str(exc.value) and "prefix" in str(exc.value)
    # The fix the message names must work: choosing one copy loads it, the other copy is not "unexpected".
    _assert_loads_into_fresh(path, student, prefix="student.")
    _assert_loads_into_fresh(path, teacher, prefix="teacher.")


def _lightning_file(tmp_path, source: nn.Module, name: str = "model.") -> Path:
    path = tmp_path / "epoch=2-step=40.ckpt"
    _lightning(path, {name + k: v for k, v in source.state_dict().items()})
    return path


def test_cli_convert_lightning_strips_the_modules_only_child(tmp_path):
    """No model needed: the LightningModule's one child ('model.') is on every key, so convert strips it, says
    so (text and --json), and the output loads strictly into the bare network with plain torch code."""
    source = trained_net()
    path = _lightning_file(tmp_path, source)
    proc = run_cli("convert", path, tmp_path / "net.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert "stripped 'model.' ('model.': the LightningModule's only child); --keep-prefix keeps it" in proc.stdout
    bare = fresh_net_differs(source)
    bare.load_state_dict(load_file(tmp_path / "net.safetensors"), strict=True)
    assert torch.equal(outputs(bare), outputs(source))

    result = json.loads(run_cli("convert", path, tmp_path / "net.pth", "--json").stdout)
    assert result["prefix_stripped"] == "model." and "LightningModule" in result["prefix_reasons"][0]
    bare = fresh_net_differs(source)
    bare.load_state_dict(torch.load(tmp_path / "net.pth", weights_only=True), strict=True)
    assert torch.equal(outputs(bare), outputs(source))

    info = json.loads(run_cli("inspect", path, "--json").stdout)  # inspect lists the keys convert writes
    assert info["prefix_stripped"] == "model." and [t["name"] for t in info["tensors"]] == list(source.state_dict())
    assert "stripped 'model.'" in run_cli("inspect", path).stdout


def test_cli_convert_keep_prefix_keeps_the_files_keys(tmp_path):
    source = trained_net()
    path = _lightning_file(tmp_path, nn.DataParallel(source))  # 'model.module.': both would be stripped
    assert set(load_file(_converted(path, tmp_path / "a.safetensors"))) == set(source.state_dict())
    proc = run_cli("convert", path, tmp_path / "kept.safetensors", "--keep-prefix", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["prefix_stripped"] == ""
    assert set(load_file(tmp_path / "kept.safetensors")) == {"model.module." + k for k in source.state_dict()}
    info = json.loads(run_cli("inspect", path, "--keep-prefix", "--json").stdout)
    assert info["prefix_stripped"] == "" and all(t["name"].startswith("model.module.") for t in info["tensors"])


def _converted(src, dst, *args) -> Path:
    proc = run_cli("convert", src, dst, *args)
    assert proc.returncode == 0, proc.stderr
    return dst


def test_cli_convert_lightning_with_two_children_keeps_keys_without_a_model(tmp_path):
    """'model.' and 'loss.' children: no single wrapper attribute, so nothing is stripped by guesswork."""
    source = trained_net()
    path = tmp_path / "two.ckpt"
    _lightning(path, {**{"model." + k: v for k, v in source.state_dict().items()}, "loss.weight": torch.ones(8)})
    out = _converted(path, tmp_path / "two.safetensors")
    assert set(load_file(out)) == {"model." + k for k in source.state_dict()} | {"loss.weight"}


MLP = ["--model", "mlp", "--model-arg", "in_features=12", "--model-arg", "hidden=6", "--model-arg", "num_classes=3"]


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return models.build_model("mlp", in_features=12, hidden=6, num_classes=3)


def test_cli_convert_to_a_model_resolves_what_default_stripping_cannot(tmp_path):
    """A distillation .ckpt (student. and teacher.) has no wrapper on every key: without a model nothing is
    stripped; with --model it is ambiguous, as checkpoint.load says; --model plus --prefix picks one copy,
    and a custom attribute ('net.', not a wrapper) in a plain state dict is matched against the model."""
    student, teacher = _mlp(0), _mlp(1)
    path = tmp_path / "distill.ckpt"
    _lightning(path, {**{"student." + k: v for k, v in student.state_dict().items()},
                      **{"teacher." + k: v for k, v in teacher.state_dict().items()}})
    assert all(k.startswith(("student.", "teacher.")) for k in load_file(_converted(path, tmp_path / "d.safetensors")))

    proc = run_cli("convert", path, tmp_path / "amb.safetensors", *MLP)
    line = assert_one_line_error(proc, "ambiguous", "student.", "teacher.", "--prefix")
    assert not (tmp_path / "amb.safetensors").exists(), line

    proc = run_cli("convert", path, tmp_path / "s.safetensors", *MLP, "--prefix", "student.", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["prefix_stripped"] == "student."
    fresh, x = _mlp(5), torch.randn(4, 12)
    fresh.load_state_dict(load_file(tmp_path / "s.safetensors"), strict=True)
    assert torch.equal(fresh(x), student(x))
    manifest = checkpoint.read_manifest(tmp_path / "s.safetensors")  # verify can rebuild the model from it
    assert manifest["model"] == "mlp" and manifest["model_options"]["hidden"] == 6
    assert run_cli("verify", tmp_path / "s.safetensors").returncode == 0

    plain = tmp_path / "custom.pth"
    torch.save({"net." + k: v for k, v in teacher.state_dict().items()}, plain)
    assert all(k.startswith("net.") for k in load_file(_converted(plain, tmp_path / "c0.safetensors")))
    proc = run_cli("convert", plain, tmp_path / "c.safetensors", *MLP)
    assert proc.returncode == 0 and "matched to mlp: stripped 'net.'" in proc.stdout, proc.stderr
    assert set(load_file(tmp_path / "c.safetensors")) == set(teacher.state_dict())


def test_cli_convert_to_the_wrong_model_lists_keys_and_writes_nothing(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(_mlp(0).state_dict(), path)
    proc = run_cli("convert", path, tmp_path / "out.safetensors", "--model", "mlp")  # default sizes: 784/256/10
    assert_one_line_error(proc, "does not fit mlp", "shape mismatches", "convert without --model")
    assert not (tmp_path / "out.safetensors").exists()
    assert_one_line_error(run_cli("convert", path, tmp_path / "o.safetensors", "--model", "mlp", "--keep-prefix"),
                          "--keep-prefix")
    assert_one_line_error(run_cli("convert", path, tmp_path / "o.safetensors", "--model", "nope"), "nope", "mlp")


# --------------------------------------------------------------------------------------- accelerate

def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def accelerate_outputs(tmp_path_factory):
    """One real ``Accelerator(cpu=True)``: save_state folder, save_model single file and sharded."""
    from accelerate import Accelerator

    root = tmp_path_factory.mktemp("accelerate")
    _reset_accelerate()
    try:
        accelerator = Accelerator(cpu=True)
        model = trained_net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model, opt = accelerator.prepare(model, opt)
        model.train()
        loss = model(torch.randn(8, 16)).square().mean()
        accelerator.backward(loss)
        opt.step()
        model.eval()
        accelerator.save_state(root / "state")
        accelerator.save_model(model, root / "model")
        accelerator.save_model(model, root / "sharded", max_shard_size="1KB")
        source = accelerator.unwrap_model(model)
    finally:
        _reset_accelerate()
    return root, source


@pytest.mark.parametrize("kind, fmt", [("state", "accelerate-folder"), ("model", "safetensors"),
                                       ("sharded", "sharded-safetensors")])
def test_accelerate_outputs(accelerate_outputs, kind, fmt):
    root, source = accelerate_outputs
    path = root / kind
    names = {p.name for p in path.iterdir()}
    if kind == "state":
        assert {"model.safetensors", "optimizer.bin"} <= names
    if kind == "sharded":
        assert "model.safetensors.index.json" in names and len([n for n in names if n.startswith("model-")]) > 1

    assert checkpoint.inspect(path)["format"] == fmt
    _assert_loads_into_fresh(path, source)
    assert_bit_identical(checkpoint.load_state_dict(path), _canonical(source))


# ------------------------------------------------------------------------------- HF-style sharding

def _split(sd: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    keys = sorted(sd)
    size = math.ceil(len(keys) / n)
    return [{k: sd[k] for k in keys[i:i + size]} for i in range(0, len(keys), size)]


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_hf_sharded_checkpoint_with_index(tmp_path, kind):
    source = trained_net()
    parts = _split(source.state_dict(), 3)
    weight_map = {}
    for i, part in enumerate(parts, 1):
        if kind == "safetensors":
            name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in part.items()}, tmp_path / name, metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{i:05d}-of-{len(parts):05d}.bin"
            torch.save(part, tmp_path / name)
        weight_map.update({k: name for k in part})
    index = tmp_path / ("model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json")
    total = sum(v.numel() * v.element_size() for v in source.state_dict().values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))

    for path in (tmp_path, index):  # the folder or the index file itself
        assert checkpoint.inspect(path)["format"] == f"sharded-{kind}"
        _assert_loads_into_fresh(path, source)
        assert_bit_identical(checkpoint.load_state_dict(path), _canonical(source))


# --------------------------------------------------------------------------------------------- DCP

@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("nested", [True, False], ids=["model-entry", "flat"])
def test_torch_distributed_checkpoint_folder(tmp_path, nested):
    import torch.distributed.checkpoint as dcp

    source = trained_net()
    state = {"model": source.state_dict()} if nested else source.state_dict()
    dcp.save(state, checkpoint_id=tmp_path, no_dist=True)
    assert (tmp_path / ".metadata").is_file()

    info = checkpoint.inspect(tmp_path)
    assert info["format"] == "dcp"
    assert info["num_tensors"] == len(source.state_dict())
    _assert_loads_into_fresh(tmp_path, source)
    assert_bit_identical(checkpoint.load_state_dict(tmp_path), _canonical(source))


@pytest.mark.filterwarnings("ignore")
def test_cli_convert_dcp_strips_its_model_subtree(tmp_path):
    """A DCP folder saved flat with every key under 'model.' converts to the bare network's keys."""
    import torch.distributed.checkpoint as dcp

    source = trained_net()
    dcp.save({"model." + k: v for k, v in source.state_dict().items()}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    proc = run_cli("convert", tmp_path / "dcp", tmp_path / "net.safetensors", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["prefix_reasons"] == ["'model.': the DCP state's 'model' entry"]
    bare = fresh_net_differs(source)
    bare.load_state_dict(load_file(tmp_path / "net.safetensors"), strict=True)
    assert torch.equal(outputs(bare), outputs(source))


# ------------------------------------------------------------------------------------ our own layouts

def _mixed_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    half = torch.randn(33, 7, generator=g).half()
    half[0, :4] = torch.tensor([float("nan"), -0.0, float("inf"), 6.0e-8])  # NaN, signed zero, subnormal
    bf16 = torch.randn(40, generator=g).bfloat16()
    bf16[:2] = torch.tensor([-0.0, float("-inf")])
    return {"half": half, "bf16": bf16, "f32": torch.randn(9, 9, generator=g), "f64": torch.randn(3, generator=g).double(),
            "i64": torch.arange(-5, 20), "i8": torch.arange(-8, 8, dtype=torch.int8), "mask": torch.rand(17, generator=g) > 0.5,
            "scalar": torch.tensor(2.5)}


LAYOUTS = {"safetensors": "w.safetensors", "pth": "w.pth", "sharded": "w_dir"}
LAYOUT_FORMAT = {"safetensors": "anytopo-safetensors", "pth": "anytopo-pth", "sharded": "anytopo-sharded"}


def _save_layout(obj, tmp_path, layout: str):
    path = tmp_path / LAYOUTS[layout]
    checkpoint.save(obj, path, max_shard_size="1KB" if layout == "sharded" else None)
    return path


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_own_layouts_round_trip_bit_exact(tmp_path, layout):
    sd = _mixed_dtypes()
    path = _save_layout(sd, tmp_path, layout)
    assert checkpoint.inspect(path)["format"] == LAYOUT_FORMAT[layout]
    assert_bit_identical(checkpoint.load_state_dict(path, verify=True), sd)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_own_layouts_load_into_model(tmp_path, layout):
    source = trained_net()
    path = _save_layout(nn.DataParallel(source), tmp_path, layout)
    _assert_loads_into_fresh(path, source, verify=True)
    assert_bit_identical(checkpoint.load_state_dict(path), _canonical(source))


def test_sharded_directory_follows_the_hf_index_layout(tmp_path):
    source = trained_net()
    path = _save_layout(source, tmp_path, "sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert sorted(index["weight_map"]) == sorted(source.state_dict())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    # Every shard is a plain safetensors file the safetensors library reads; together they are the model.
    merged = {}
    for shard in shards:
        merged.update(load_file(path / shard))
    assert_bit_identical(merged, _canonical(source))
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(shards) <= set(manifest["files"])
    assert all(len(info["sha256"]) == 64 for info in manifest["files"].values())


def test_safetensors_interop_both_ways(tmp_path):
    sd = _mixed_dtypes()
    ours = tmp_path / "ours.safetensors"
    checkpoint.save(sd, ours)
    assert_bit_identical(load_file(ours), sd)
    with safe_open(ours, "pt") as f:
        assert f.metadata()["format"] == "pt"

    theirs = tmp_path / "theirs.safetensors"
    save_file(sd, theirs, metadata={"format": "pt"})
    assert checkpoint.inspect(theirs)["format"] == "safetensors"
    assert_bit_identical(checkpoint.load_state_dict(theirs), sd)

    source = trained_net()
    save_file(_canonical(source), tmp_path / "model.safetensors")
    _assert_loads_into_fresh(tmp_path / "model.safetensors", source)


@pytest.fixture(scope="module")
def layout_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    sd = {**_mixed_dtypes(), **{f"net.{k}": v for k, v in trained_net().state_dict().items()}}
    return sd, {layout: _save_layout(sd, root, layout) for layout in LAYOUTS}


@pytest.mark.parametrize("dst_layout", list(LAYOUTS))
@pytest.mark.parametrize("src_layout", list(LAYOUTS))
def test_cli_convert_between_own_layouts(tmp_path, layout_sources, src_layout, dst_layout):
    sd, sources = layout_sources
    dst = tmp_path / LAYOUTS[dst_layout]
    extra = ["--max-shard-size", "1KB"] if dst_layout == "sharded" else []
    proc = run_cli("convert", sources[src_layout], dst, *extra, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["source_format"] == LAYOUT_FORMAT[src_layout] and result["tensors"] == len(sd)
    assert checkpoint.inspect(dst)["format"] == LAYOUT_FORMAT[dst_layout]
    assert_bit_identical(checkpoint.load_state_dict(dst, verify=True), sd)


# ------------------------------------------------------------------------------------- tied weights

class TiedNet(nn.Module):
    """Two Linear layers sharing one weight Parameter (like tied input/output embeddings)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.encode = nn.Linear(24, 24)
        self.decode = nn.Linear(24, 24)
        self.decode.weight = self.encode.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(torch.tanh(self.encode(x)))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tied_weights_saved_once_and_stay_tied(tmp_path, layout):
    source = TiedNet(seed=0)
    path = tmp_path / LAYOUTS[layout]
    checkpoint.save(source, path)  # no "tensors share memory" error
    x = torch.randn(3, 24)

    weight_bytes = 24 * 24 * 4
    info = checkpoint.inspect(path)
    assert info["num_tensors"] == 4
    assert info["bytes"] == weight_bytes + 2 * 24 * 4  # the shared weight counted once
    if layout == "safetensors":
        stored = load_file(path)
        assert len(stored) == 3 and ({"encode.weight", "decode.weight"} & set(stored))
        (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
        assert path.stat().st_size - 8 - header_len == weight_bytes + 2 * 24 * 4

    sd = checkpoint.load_state_dict(path)
    assert sd["encode.weight"] is sd["decode.weight"]
    target = TiedNet(seed=1)
    assert not torch.equal(target(x), source(x))
    checkpoint.load(path, target)
    assert target.encode.weight is target.decode.weight
    assert torch.equal(target.encode.weight, source.encode.weight)
    assert torch.equal(target(x), source(x))


def test_cli_convert_stores_tied_pth_entries_once(tmp_path):
    """torch.save(model.state_dict()) holds tied weights as two tensor objects over one storage."""
    source = TiedNet(seed=0)
    sd = source.state_dict()
    assert sd["encode.weight"] is not sd["decode.weight"]
    torch.save(sd, tmp_path / "tied.pth")
    assert run_cli("convert", tmp_path / "tied.pth", tmp_path / "tied.safetensors").returncode == 0
    assert len(load_file(tmp_path / "tied.safetensors")) == 3  # the shared weight written once
    manifest = checkpoint.read_manifest(tmp_path / "tied.safetensors")
    assert manifest["aliases"] == {"encode.weight": "decode.weight"}
    back = checkpoint.load_state_dict(tmp_path / "tied.safetensors")
    assert back["encode.weight"] is back["decode.weight"] and torch.equal(back["encode.weight"], sd["encode.weight"])


# --------------------------------------------------------------------------------------- device tags

def test_pth_tagged_for_a_missing_gpu_loads_on_cpu(tmp_path, monkeypatch):
    source = trained_net()
    path = tmp_path / "from_gpu_node.pth"
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:3")
        torch.save(source.state_dict(), path)
    assert not torch.cuda.is_available()
    with pytest.raises(RuntimeError, match="CUDA"):  # the file really asks for cuda:3
        torch.load(path)

    assert checkpoint.inspect(path)["format"] == "state-dict"
    sd = checkpoint.load_state_dict(path)
    assert all(v.device.type == "cpu" for v in sd.values())
    assert_bit_identical(sd, _canonical(source))
    _assert_loads_into_fresh(path, source)


# ----------------------------------------------------------------------------------------------- CLI

def test_cli_convert_layout_dp_loads_in_legacy_code(tmp_path):
    source = trained_net()
    src = tmp_path / "bare.safetensors"
    checkpoint.save(source, src)
    dst = tmp_path / "legacy_dp.pth"
    proc = run_cli("convert", src, dst, "--layout", "dp")
    assert proc.returncode == 0, proc.stderr

    # Legacy training code: plain torch.load + load_state_dict into a DataParallel model.
    legacy = nn.DataParallel(fresh_net_differs(source))
    sd = torch.load(dst, weights_only=True)
    assert all(k.startswith("module.") for k in sd)
    legacy.load_state_dict(sd)
    assert torch.equal(outputs(legacy.module), outputs(source))


def test_cli_convert_ema(tmp_path):
    model, opt, sched, ema = _trained_with_optimizer()
    src = tmp_path / "model_9.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "epoch": 9, "args": argparse.Namespace(lr=0.1)}, src)
    dst = tmp_path / "ema.safetensors"
    proc = run_cli("convert", src, dst, "--ema")
    assert proc.returncode == 0, proc.stderr
    assert_bit_identical(load_file(dst), _canonical(ema.module))  # bare keys, no n_averaged
    _assert_loads_into_fresh(dst, model, expect_outputs=outputs(ema.module))


def test_cli_diff_same_and_different(tmp_path):
    source = trained_net()
    a, same, b = tmp_path / "a.safetensors", tmp_path / "same.pth", tmp_path / "b.safetensors"
    checkpoint.save(source, a)
    torch.save(nn.DataParallel(source).state_dict(), same)  # other format and prefix, same tensors
    changed = _canonical(source)
    changed["3.bias"][2] += 0.5
    checkpoint.save(changed, b)

    proc = run_cli("diff", a, same, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["same"] is True and result["max_abs_diff"] == 0.0 and result["differing"] == []
    assert result["compared"] == len(changed)

    proc = run_cli("diff", a, b, "--json", real=True)
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert result["same"] is False
    assert result["differing"] == ["3.bias"] and result["max_abs_diff_key"] == "3.bias"
    assert result["max_abs_diff"] == pytest.approx(0.5, abs=1e-6)
    assert result["only_in_a"] == result["only_in_b"] == result["shape_mismatches"] == []

    text = run_cli("diff", a, b)
    assert text.returncode == 1 and text.stdout.startswith("different")


def test_cli_verify_mlp(tmp_path):
    import models

    path = tmp_path / "mlp.safetensors"
    checkpoint.save(models.build_model("mlp"), path)
    proc = run_cli("verify", path, "--model", "mlp", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] is True and result["finite"] is True
    assert result["output_shapes"] == [[2, 10]]
    assert result["report"]["loaded"] == 4 and result["report"]["ok"] is True
