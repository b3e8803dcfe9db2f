"""The 784-256-10 MLP, written in the four ways PyTorch lets you define a network.

All four styles are the same function (Flatten -> Linear -> ReLU -> Linear) with the same parameter
count (203,530 with defaults); they differ only in how modules are held, which changes state-dict keys:

==============  ===========================================  =====================================
style           container                                    state-dict keys
==============  ===========================================  =====================================
sequential      ``nn.Sequential`` (positional)               ``1.weight``, ``3.weight``
ordereddict     ``nn.Sequential(OrderedDict)``               ``fc1.weight``, ``fc2.weight``
modulelist      :class:`ModuleListMLP` (``nn.ModuleList``)   ``layers.1.weight``, ``layers.3.weight``
moduledict      :class:`ModuleDictMLP` (``nn.ModuleDict``)   ``layers.fc1.weight``, ``layers.fc2.weight``
==============  ===========================================  =====================================

The output is logits (no Softmax): train with ``nn.CrossEntropyLoss``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from ._registry import check_choice, check_int, example_generator, register_model

MLP_STYLES = ("sequential", "ordereddict", "modulelist", "moduledict")


@dataclass(kw_only=True)
class MLPConfig:
    """Options of the ``mlp`` model."""

    style: str = "sequential"
    """How the layers are held: one of ``MLP_STYLES`` (changes state-dict keys, not the function)."""
    in_features: int = 784
    """Flattened input size (784 = 1x28x28)."""
    hidden: int = 256
    """Width of the single hidden layer."""
    num_classes: int = 10
    """Number of output logits."""
    dropout: float = 0.0
    """Dropout probability after the hidden layer's ReLU; 0 adds no layer (and keeps the keys above)."""

    def __post_init__(self) -> None:
        check_choice("style", self.style, MLP_STYLES)
        check_int("in_features", self.in_features, minimum=1)
        check_int("hidden", self.hidden, minimum=1)
        check_int("num_classes", self.num_classes, minimum=1)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"mlp option dropout must be a number in [0, 1), got {self.dropout!r}")


class ModuleListMLP(nn.Module):
    """MLP whose layers live in an ``nn.ModuleList`` and are applied in list order."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                     *([nn.Dropout(dropout)] if dropout else []), nn.Linear(hidden, num_classes)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ModuleDictMLP(nn.Module):
    """MLP whose layers live in an ``nn.ModuleDict`` (named) and are applied in insertion order."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        drop = {"drop1": nn.Dropout(dropout)} if dropout else {}
        self.layers = nn.ModuleDict(OrderedDict(flatten=nn.Flatten(), fc1=nn.Linear(in_features, hidden),
                                                relu1=nn.ReLU(), **drop, fc2=nn.Linear(hidden, num_classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = layer(x)
        return x


def _mlp_example_inputs(cfg: MLPConfig, batch_size: int, image_size: tuple[int, int] | None) -> tuple[torch.Tensor]:
    """``(N, 1, H, W)`` images when ``image_size`` is given or ``in_features`` is a square (784 -> 28x28),
    else ``(N, in_features)``. Both are accepted because the model flattens first."""
    g = example_generator()
    if image_size is not None:
        h, w = image_size
        if h * w != cfg.in_features:
            raise ValueError(f"mlp image_size {h}x{w} has {h * w} pixels but in_features={cfg.in_features}")
        return (torch.randn(batch_size, 1, h, w, generator=g),)
    side = math.isqrt(cfg.in_features)
    if side * side == cfg.in_features:
        return (torch.randn(batch_size, 1, side, side, generator=g),)
    return (torch.randn(batch_size, cfg.in_features, generator=g),)


@register_model("mlp", config=MLPConfig, example_inputs=_mlp_example_inputs)
def mlp(cfg: MLPConfig) -> nn.Module:
    """Flatten -> Linear(in_features, hidden) -> ReLU [-> Dropout] -> Linear(hidden, num_classes), in ``cfg.style``."""
    i, h, c, p = cfg.in_features, cfg.hidden, cfg.num_classes, float(cfg.dropout)
    if cfg.style == "sequential":
        return nn.Sequential(nn.Flatten(), nn.Linear(i, h), nn.ReLU(), *([nn.Dropout(p)] if p else []), nn.Linear(h, c))
    if cfg.style == "ordereddict":
        drop = {"drop1": nn.Dropout(p)} if p else {}
        return nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc1=nn.Linear(i, h), relu1=nn.ReLU(), **drop,
                                         fc2=nn.Linear(h, c)))
    if cfg.style == "modulelist":
        return ModuleListMLP(i, h, c, p)
    return ModuleDictMLP(i, h, c, p)
