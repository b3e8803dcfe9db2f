"""ResNet-18/34/50/101/152: torchvision's own networks, re-hosted in one class of ours and modified.

torchvision builds the network (``torchvision.models.resnet50(weights=None, ...)``); :class:`ResNet`
takes its submodules as its own attributes, in torchvision's order, and adds its own ``forward``. With
default options the state-dict keys are exactly torchvision's (``conv1.weight``, ``bn1.*``,
``layer1.0...``, ``fc.weight``, ``fc.bias``), so torchvision checkpoints load as they are.

Options (see :class:`ResNetConfig`) change the stem (``in_channels``, ``small_input``), the head
(``num_classes``, ``head``, ``extra_inputs``) and the return value (``aux_output``). Models never read
files: to start from pretrained weights, build the model and call
``checkpoint.load_pretrained(model, path, skippable_prefixes=model.replaced_prefixes)``.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ._registry import check_bool, check_choice, check_int, example_generator, register_model

if TYPE_CHECKING:
    import torchvision


def _torchvision_models():
    """torchvision's model builders, imported when a ResNet is built: ``import torchvision`` imports its ops,
    and through them torch._dynamo, ~0.8 s that a process training another model need not pay."""
    import torchvision.models

    return torchvision.models

HEADS = ("linear", "mlp")
MLP_HEAD_HIDDEN = 128
"""Width of the ``head="mlp"`` hidden layer."""


@dataclass(kw_only=True)
class ResNetConfig:
    """Options shared by ``resnet18`` ... ``resnet152``. Defaults give torchvision's exact network."""

    num_classes: int = 1000
    """Number of output logits."""
    in_channels: int = 3
    """Input channels; other than 3 replaces ``conv1`` (same kernel/stride/padding)."""
    small_input: bool = False
    """For 8-64 px images: ``conv1`` becomes 3x3 stride 1 and the stem max-pool is removed."""
    head: str = "linear"
    """``"linear"`` (torchvision's ``fc``) or ``"mlp"`` (Linear-ReLU-Dropout(0.5)-Linear, no Softmax)."""
    extra_inputs: int = 0
    """K > 0: ``forward(x, extra)`` with ``extra`` of shape (N, K) (or (N,) if K == 1), concatenated to
    the pooled features before the head."""
    aux_output: bool = False
    """True: ``forward`` returns ``(logits, features)``; features are the pooled penultimate vector
    (before any extra inputs are concatenated)."""

    def __post_init__(self) -> None:
        check_int("num_classes", self.num_classes, minimum=1)
        check_int("in_channels", self.in_channels, minimum=1)
        check_bool("small_input", self.small_input)
        check_choice("head", self.head, HEADS)
        check_int("extra_inputs", self.extra_inputs, minimum=0)
        check_bool("aux_output", self.aux_output)

    @property
    def replaces_conv1(self) -> bool:
        """Whether ``conv1`` differs from torchvision's (so its saved weights may not fit)."""
        return self.in_channels != 3 or self.small_input

    @property
    def replaces_fc(self) -> bool:
        """Whether ``fc`` differs from torchvision's default 1000-class linear head."""
        return self.head != "linear" or self.num_classes != 1000 or self.extra_inputs > 0

    @property
    def replaced_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the modules that differ from torchvision's network (``"conv1."``,
        ``"fc."``): weights saved from torchvision's own network may not fit them."""
        return (("conv1.",) if self.replaces_conv1 else ()) + (("fc.",) if self.replaces_fc else ())


class ResNet(nn.Module):
    """A torchvision ResNet's modules under the same names, with an optional extra-input/aux-output forward.

    Args:
        backbone: a ``torchvision.models.ResNet``; its ``conv1 ... avgpool`` become ours.
        fc: the head; its input size must be ``num_features + extra_inputs``.
        extra_inputs: number of extra features concatenated to the pooled features before ``fc``.
        aux_output: return ``(logits, features)`` instead of ``logits``.
        replaced_prefixes: state-dict prefixes of modules that differ from torchvision's network.
    """

    def __init__(self, backbone: torchvision.models.ResNet, fc: nn.Module, *, extra_inputs: int = 0,
                 aux_output: bool = False, replaced_prefixes: tuple[str, ...] = ()) -> None:
        super().__init__()
        # Same attribute names, same order as torchvision: state_dict keys (and their order) match.
        self.conv1 = backbone.conv1
        self.bn1 = backbone.bn1
        self.relu = backbone.relu
        self.maxpool = backbone.maxpool
        self.layer1 = backbone.layer1
        self.layer2 = backbone.layer2
        self.layer3 = backbone.layer3
        self.layer4 = backbone.layer4
        self.avgpool = backbone.avgpool
        self.fc = fc
        self.num_features: int = backbone.fc.in_features
        """Size of the pooled feature vector (512 for resnet18/34, 2048 for resnet50+)."""
        self.extra_inputs = extra_inputs
        self.aux_output = aux_output
        self.replaced_prefixes = replaced_prefixes
        """Keys under these prefixes may not fit weights saved from torchvision's network (pass them to
        ``checkpoint.load_pretrained(..., skippable_prefixes=)``)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled penultimate features, shape ``(N, num_features)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.forward_features(x)
        head_in = features
        if self.extra_inputs:
            head_in = torch.cat([features, self._check_extra(extra, features)], dim=1)
        elif extra is not None:
            raise ValueError("this ResNet was built with extra_inputs=0 but forward got an `extra` tensor; "
                             "build it with extra_inputs=K to use extra inputs")
        logits = self.fc(head_in)
        return (logits, features) if self.aux_output else logits

    def _check_extra(self, extra: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor:
        k, n = self.extra_inputs, features.shape[0]
        if extra is None:
            raise ValueError(f"this ResNet was built with extra_inputs={k}: call it as model(x, extra) "
                             f"with extra of shape (N, {k})")
        if not isinstance(extra, torch.Tensor):
            raise TypeError(f"extra must be a tensor of shape (N, {k}), got {type(extra).__name__}")
        if k == 1 and extra.dim() == 1:
            extra = extra.unsqueeze(1)
        if extra.dim() != 2 or extra.shape[0] != n or extra.shape[1] != k:
            expected = f"({n}, {k})" + (f" or ({n},)" if k == 1 else "")
            raise ValueError(f"extra must have shape {expected} (extra_inputs={k}, batch {n}); "
                             f"got {tuple(extra.shape)}")
        return extra.to(features.dtype)


def mlp_head(in_features: int, num_classes: int) -> nn.Sequential:
    """The ``head="mlp"`` classifier: fc1 -> ReLU -> Dropout(0.5) -> fc2, returning **logits**.

    There is deliberately no Softmax at the end. Training uses ``nn.CrossEntropyLoss``, which applies
    log-softmax itself; a Softmax head followed by CrossEntropyLoss computes ``log_softmax(softmax(z))``.
    That is a real bug, not a style choice: the softmax squashes the logits into [0, 1], so the loss can
    never get near 0 and its gradient through the saturated softmax becomes tiny. Learning slows or
    stalls. Apply softmax only at inference time, for probabilities.
    """
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(in_features, MLP_HEAD_HIDDEN),
        relu1=nn.ReLU(),
        dropout1=nn.Dropout(0.5),
        fc2=nn.Linear(MLP_HEAD_HIDDEN, num_classes),
    ))


def _create_resnet(tv_builder: Callable[..., torchvision.models.ResNet], cfg: ResNetConfig) -> ResNet:
    """Build with torchvision's builder, then modify the stem/head per ``cfg``."""
    backbone = tv_builder(weights=None, num_classes=cfg.num_classes)
    if cfg.replaces_conv1:
        old = backbone.conv1
        if cfg.small_input:
            conv1 = nn.Conv2d(cfg.in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
            backbone.maxpool = nn.Identity()
        else:
            conv1 = nn.Conv2d(cfg.in_channels, old.out_channels, kernel_size=old.kernel_size,
                              stride=old.stride, padding=old.padding, bias=False)
        nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
        backbone.conv1 = conv1

    in_features = backbone.fc.in_features + cfg.extra_inputs
    if cfg.head == "mlp":
        fc: nn.Module = mlp_head(in_features, cfg.num_classes)
    elif cfg.extra_inputs:
        fc = nn.Linear(in_features, cfg.num_classes)
    else:
        fc = backbone.fc  # torchvision's own Linear(num_features, num_classes)

    return ResNet(backbone, fc, extra_inputs=cfg.extra_inputs, aux_output=cfg.aux_output,
                  replaced_prefixes=cfg.replaced_prefixes)


# -------------------------------------------------------------------------------------- registration
def _resnet_example_inputs(cfg: ResNetConfig, batch_size: int,
                           image_size: tuple[int, int] | None) -> tuple[torch.Tensor, ...]:
    """``(x,)`` or ``(x, extra)``; default 28x28 for ``in_channels=1, small_input=True``, else 32x32."""
    if image_size is None:
        side = 28 if (cfg.in_channels == 1 and cfg.small_input) else 32
        image_size = (side, side)
    g = example_generator()
    x = torch.randn(batch_size, cfg.in_channels, *image_size, generator=g)
    if cfg.extra_inputs:
        return x, torch.randn(batch_size, cfg.extra_inputs, generator=g)
    return (x,)


@register_model("resnet18", config=ResNetConfig, example_inputs=_resnet_example_inputs)
def resnet18(cfg: ResNetConfig) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]) from ``torchvision.models.resnet18``, modified per ``cfg``."""
    return _create_resnet(_torchvision_models().resnet18, cfg)


@register_model("resnet34", config=ResNetConfig, example_inputs=_resnet_example_inputs)
def resnet34(cfg: ResNetConfig) -> ResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]) from ``torchvision.models.resnet34``, modified per ``cfg``."""
    return _create_resnet(_torchvision_models().resnet34, cfg)


@register_model("resnet50", config=ResNetConfig, example_inputs=_resnet_example_inputs)
def resnet50(cfg: ResNetConfig) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]) from ``torchvision.models.resnet50``, modified per ``cfg``."""
    return _create_resnet(_torchvision_models().resnet50, cfg)


@register_model("resnet101", config=ResNetConfig, example_inputs=_resnet_example_inputs)
def resnet101(cfg: ResNetConfig) -> ResNet:
    """ResNet-101 (Bottleneck, [3, 4, 23, 3]) from ``torchvision.models.resnet101``, modified per ``cfg``."""
    return _create_resnet(_torchvision_models().resnet101, cfg)


@register_model("resnet152", config=ResNetConfig, example_inputs=_resnet_example_inputs)
def resnet152(cfg: ResNetConfig) -> ResNet:
    """ResNet-152 (Bottleneck, [3, 8, 36, 3]) from ``torchvision.models.resnet152``, modified per ``cfg``."""
    return _create_resnet(_torchvision_models().resnet152, cfg)
