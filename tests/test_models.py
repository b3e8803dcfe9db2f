"""Tests for the `models` registry and its model families (CPU, small widths/inputs)."""
from __future__ import annotations

import copy
import dataclasses
import json
from contextlib import nullcontext

import pytest
import torch
import torchvision
from torch import nn

import models
import models.unet as unet_module

REQUIRED = {"mlp", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "unet"}
RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
MLP_STYLES = ["sequential", "ordereddict", "modulelist", "moduledict"]
SMALL_RESNET = dict(in_channels=1, small_input=True, num_classes=10)


def small_options(name: str) -> dict:
    """Cheap options per model family; a new family gets its defaults until it is added here."""
    if name.startswith("resnet"):
        return dict(SMALL_RESNET)
    if name == "unet":
        return dict(base_width=8)
    return {}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def logits_of(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only add spin-wait overhead, which gets severe when
    other processes share the 2 cores (conftest gives launched children OMP_NUM_THREADS=1 likewise)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------ registry
def test_list_models_is_sorted_and_complete():
    names = models.list_models()
    assert names == sorted(names)
    assert REQUIRED <= set(names)


@pytest.mark.parametrize("name", models.list_models())
def test_forward_backward(name):
    opts = small_options(name)
    cfg = models.get_config(name, **opts)
    model = models.build_model(name, **opts).train()
    inputs = models.example_inputs(name, batch_size=2, **opts)
    logits = logits_of(model(*inputs))

    assert logits.shape[:2] == (2, cfg.num_classes)
    if logits.dim() == 4:  # dense prediction keeps the input's spatial size
        assert logits.shape[2:] == inputs[0].shape[2:]
    assert torch.isfinite(logits).all()

    logits.float().pow(2).mean().backward()
    params = list(model.named_parameters())
    assert params and all(p.requires_grad for _, p in params)
    for pname, p in params:
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


@pytest.mark.parametrize("name", models.list_models())
def test_config_is_json_and_round_trips(name):
    cfg = models.get_config(name, **small_options(name))
    assert dataclasses.is_dataclass(cfg)
    options = dataclasses.asdict(cfg)
    assert json.loads(json.dumps(options)) == options  # JSON primitives only
    assert models.get_config(name, **json.loads(json.dumps(options))) == cfg  # manifest -> same config


@pytest.mark.parametrize("name", models.list_models())
def test_example_inputs_are_reproducible(name):
    a = models.example_inputs(name, **small_options(name))
    b = models.example_inputs(name, **small_options(name))
    assert len(a) == len(b) >= 1 and all(torch.equal(x, y) for x, y in zip(a, b))


def test_example_inputs_shapes():
    assert models.example_inputs("mlp", batch_size=3)[0].shape == (3, 1, 28, 28)
    assert models.example_inputs("mlp", in_features=10)[0].shape == (2, 10)
    assert models.example_inputs("resnet18")[0].shape == (2, 3, 32, 32)
    assert models.example_inputs("resnet18", **SMALL_RESNET)[0].shape == (2, 1, 28, 28)
    assert models.example_inputs("resnet18", image_size=40)[0].shape == (2, 3, 40, 40)
    x, extra = models.example_inputs("resnet50", batch_size=4, extra_inputs=3)
    assert x.shape == (4, 3, 32, 32) and extra.shape == (4, 3)
    assert models.example_inputs("unet", image_size=(37, 53), in_channels=1)[0].shape == (2, 1, 37, 53)
    with pytest.raises(ValueError, match="16"):
        models.example_inputs("unet", image_size=8)
    with pytest.raises(ValueError, match="image_size"):
        models.example_inputs("resnet18", image_size=(1, 2, 3))


# ------------------------------------------------------------------------------------------ bad options
@pytest.mark.parametrize("call, pattern", [
    (lambda: models.build_model("resnet9000"), r"valid names: .*mlp.*resnet18.*unet"),
    (lambda: models.build_model("mlp", hiden=3), r"valid options: dropout, hidden, in_features, num_classes, style"),
    (lambda: models.get_config("resnet18", depth=18), r"valid options: .*extra_inputs.*head"),
    (lambda: models.example_inputs("unet", size=3), r"valid options: .*base_width"),
    (lambda: models.build_model("mlp", style="functional"), r"'sequential', 'ordereddict', 'modulelist', 'moduledict'"),
    (lambda: models.build_model("resnet18", head="softmax"), r"'linear', 'mlp'"),
    (lambda: models.build_model("resnet18", extra_inputs=-1), r"extra_inputs must be an int >= 0"),
    (lambda: models.build_model("resnet18", in_channels=0), r"in_channels must be an int >= 1"),
    (lambda: models.build_model("resnet18", small_input="yes"), r"True or False"),
    (lambda: models.build_model("unet", base_width=2.5), r"base_width must be an int >= 1"),
    # models never read files: pretrained weights go through checkpoint.load_pretrained (test_ckpt_pretrained.py)
    (lambda: models.build_model("resnet18", weights="w.pth"), r"valid options: .*small_input"),
])
def test_bad_options_raise_naming_valid_values(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


# ------------------------------------------------------------------------------------------ mlp
@pytest.mark.parametrize("style", MLP_STYLES)
def test_mlp_styles_count_and_train(style):
    model = models.build_model("mlp", style=style)
    assert n_params(model) == 203_530
    assert not any(isinstance(m, (nn.Softmax, nn.LogSoftmax)) for m in model.modules())

    x = torch.randn(32, 1, 28, 28)
    y = torch.randint(0, 10, (32,))
    assert torch.equal(model(x), model(x.flatten(1)))  # Flatten first: images or flat vectors
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("style, container, keys", [
    ("sequential", nn.Sequential, ["1.weight", "1.bias", "3.weight", "3.bias"]),
    ("ordereddict", nn.Sequential, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]),
    ("modulelist", nn.ModuleList, ["layers.1.weight", "layers.1.bias", "layers.3.weight", "layers.3.bias"]),
    ("moduledict", nn.ModuleDict, ["layers.fc1.weight", "layers.fc1.bias", "layers.fc2.weight", "layers.fc2.bias"]),
])
def test_mlp_style_structure(style, container, keys):
    model = models.build_model("mlp", style=style, hidden=16)
    assert list(model.state_dict()) == keys
    assert any(type(m) is container for m in model.modules())
    if style == "ordereddict":
        assert [n for n, _ in model.named_children()] == ["flatten", "fc1", "relu1", "fc2"]


# ------------------------------------------------------------------------------------------ resnet
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet152"])
def test_resnet_param_count_equals_torchvision(name):
    ours = models.build_model(name)
    theirs = getattr(torchvision.models, name)(weights=None)
    assert n_params(ours) == n_params(theirs)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_state_dict_keys_equal_torchvision(name):
    ours = models.build_model(name).state_dict()
    theirs = getattr(torchvision.models, name)(weights=None).state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert isinstance(models.build_model(name), models.ResNet)


def test_resnet_default_matches_torchvision_forward():
    theirs = torchvision.models.resnet18(weights=None).eval()
    ours = models.build_model("resnet18").eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_resnet_mlp_head_has_named_layers_and_no_softmax():
    model = models.build_model("resnet18", head="mlp", **SMALL_RESNET)
    keys = [k for k in model.state_dict() if k.startswith("fc.")]
    assert keys == ["fc.fc1.weight", "fc.fc1.bias", "fc.fc2.weight", "fc.fc2.bias"]
    assert not any(isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin)) for m in model.modules())
    assert [type(m) for m in model.fc] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert model.fc.dropout1.p == 0.5 and model.fc.fc1.out_features == 128
    assert model.fc.fc2.out_features == 10
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(4, 1, 16, 16))
    assert not torch.allclose(logits.sum(1), torch.ones(4))  # logits, not probabilities
    assert "log-softmax" in models.resnet.mlp_head.__doc__  # the docstring explains why


def test_resnet_extra_inputs():
    model = models.build_model("resnet18", extra_inputs=2, **SMALL_RESNET).eval()
    assert model.fc.in_features == 512 + 2
    x, extra = models.example_inputs("resnet18", extra_inputs=2, image_size=16, **SMALL_RESNET)
    with torch.no_grad():
        a = model(x, extra)
        b = model(x, extra + 1.0)
    assert a.shape == (2, 10)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match=r"extra_inputs=2.*model\(x, extra\)"):
        model(x)
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        model(x, torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        model(x, torch.randn(2))


def test_resnet_single_extra_input_accepts_vector():
    model = models.build_model("resnet18", extra_inputs=1, **SMALL_RESNET).eval()
    x = torch.randn(2, 1, 16, 16)
    extra = torch.tensor([0.5, -1.0])
    with torch.no_grad():
        torch.testing.assert_close(model(x, extra), model(x, extra[:, None]))


def test_resnet_extra_given_without_extra_inputs_raises():
    model = models.build_model("resnet18", **SMALL_RESNET)
    with pytest.raises(ValueError, match="extra_inputs=0"):
        model(torch.randn(2, 1, 16, 16), torch.randn(2, 1))


@pytest.mark.parametrize("name, width", [("resnet18", 512), ("resnet50", 2048)])
def test_resnet_aux_output(name, width):
    model = models.build_model(name, aux_output=True, extra_inputs=3, **SMALL_RESNET).eval()
    x, extra = models.example_inputs(name, batch_size=3, extra_inputs=3, image_size=16, **SMALL_RESNET)
    with torch.no_grad():
        logits, features = model(x, extra)
        assert logits.shape == (3, 10) and features.shape == (3, width)  # features exclude the extras
        torch.testing.assert_close(features, model.forward_features(x))
        torch.testing.assert_close(logits, model.fc(torch.cat([features, extra], 1)))


def test_resnet_in_channels_and_small_input():
    small = models.build_model("resnet18", **SMALL_RESNET)
    assert small.conv1.in_channels == 1
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 10)

    gray = models.build_model("resnet18", in_channels=1)
    tv = torchvision.models.resnet18(weights=None)
    assert gray.conv1.in_channels == 1
    assert (gray.conv1.kernel_size, gray.conv1.stride, gray.conv1.padding) == \
        (tv.conv1.kernel_size, tv.conv1.stride, tv.conv1.padding)
    assert isinstance(gray.maxpool, nn.MaxPool2d)
    assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 1000)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_all_options_combined(name):
    opts = dict(head="mlp", extra_inputs=2, aux_output=True, in_channels=1, small_input=True, num_classes=7)
    model = models.build_model(name, **opts).train()
    logits, features = model(*models.example_inputs(name, image_size=16, **opts))
    assert logits.shape == (2, 7) and features.shape[0] == 2
    logits.pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------ unet
@pytest.mark.parametrize("size", [(37, 53), (16, 16), (64, 48), (17, 31)])
def test_unet_any_size_and_both_upsamplings(size):
    x = torch.randn(2, 3, *size)
    shapes = {}
    for bilinear in (False, True):
        model = models.build_model("unet", base_width=4, num_classes=5, bilinear=bilinear).eval()
        with torch.no_grad():
            shapes[bilinear] = model(x).shape
    assert shapes[False] == shapes[True] == (2, 5, *size)


def test_unet_structure():
    model = models.build_model("unet", base_width=4)
    assert isinstance(model, models.UNet)
    assert isinstance(model.inc, models.DoubleConv) and isinstance(model.outc, models.OutConv)
    assert all(isinstance(getattr(model, f"down{i}"), models.Down) for i in range(1, 5))
    assert all(isinstance(getattr(model, f"up{i}"), models.Up) for i in range(1, 5))
    assert isinstance(model.up1.up, nn.ConvTranspose2d) and model.down4.maxpool_conv[1].double_conv[0].out_channels == 64
    bilinear = models.build_model("unet", base_width=4, bilinear=True)
    assert isinstance(bilinear.up1.up, nn.Upsample)
    assert bilinear.down4.maxpool_conv[1].double_conv[0].out_channels == 32  # factor 2 bottleneck


@pytest.mark.parametrize("size", [(15, 32), (32, 8)])
def test_unet_too_small_raises(size):
    model = models.build_model("unet", base_width=4)
    with pytest.raises(ValueError, match="16"):
        model(torch.randn(1, 3, *size))


def _unet_step(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    model.zero_grad()
    model(x).pow(2).mean().backward()


@pytest.mark.parametrize("bilinear", [False, True])
def test_unet_checkpointing_matches_plain(bilinear):
    plain = models.build_model("unet", base_width=4, num_classes=3, bilinear=bilinear)
    ckpt = copy.deepcopy(plain)
    ckpt.checkpointing = True
    x = torch.randn(2, 3, 37, 53)
    _unet_step(plain, x)
    _unet_step(ckpt, x)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-6, msg=name)
    # One training step updates BN running stats exactly once, as without checkpointing.
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(a, b), name
    assert int(ckpt.inc.double_conv[1].num_batches_tracked) == 1


def test_unet_naive_checkpointing_would_double_update_bn(monkeypatch):
    """Proves the test above is sensitive: without the recompute context, stats are updated twice."""
    monkeypatch.setattr(unet_module, "_recompute_preserves_buffers", lambda m: (nullcontext(), nullcontext()))
    plain = models.build_model("unet", base_width=4)
    ckpt = copy.deepcopy(plain)
    ckpt.checkpointing = True
    x = torch.randn(2, 3, 32, 32)
    _unet_step(plain, x)
    _unet_step(ckpt, x)
    assert int(ckpt.inc.double_conv[1].num_batches_tracked) == 2
    assert not torch.equal(ckpt.inc.double_conv[1].running_mean, plain.inc.double_conv[1].running_mean)


def test_unet_checkpointing_survives_repeated_backward():
    model = models.build_model("unet", base_width=4, checkpointing=True).train()
    before = model.inc.double_conv[1].running_mean.clone()
    out = model(torch.randn(2, 3, 32, 32)).sum()
    after_forward = model.inc.double_conv[1].running_mean.clone()
    out.backward(retain_graph=True)
    out.backward()
    assert not torch.equal(before, after_forward)
    assert torch.equal(model.inc.double_conv[1].running_mean, after_forward)
    assert int(model.inc.double_conv[1].num_batches_tracked) == 1


def test_unet_checkpoint_only_when_training_with_grad(monkeypatch):
    calls = []
    real = unet_module.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(kwargs)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", counting)
    model = models.build_model("unet", base_width=4, checkpointing=True)
    x = torch.randn(2, 3, 16, 16)  # batch 2: BN in training needs >1 value at the 1x1 bottleneck

    model.eval()
    model(x)
    assert calls == []  # eval mode: never
    model.train()
    with torch.no_grad():
        model(x)
    assert calls == []  # no autograd: nothing to save memory for
    model(x)
    assert len(calls) == 9  # inc, down1-4, up1-4
    assert all(kw["use_reentrant"] is False and "context_fn" in kw for kw in calls)

    calls.clear()
    models.build_model("unet", base_width=4).train()(x)
    assert calls == []  # checkpointing=False


def test_unet_default_param_count():
    # The classic U-Net (3 -> 2 classes, base 64, transposed convs) has 31,037,698 parameters.
    assert n_params(models.build_model("unet")) == 31_037_698
