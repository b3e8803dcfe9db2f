"""Model registry: build any registered model by name from validated, JSON-friendly options.

Example:
    >>> import dataclasses, models
    >>> models.list_models()
    ['mlp', 'resnet101', 'resnet152', 'resnet18', 'resnet34', 'resnet50', 'unet']
    >>> cfg = models.get_config("resnet18", num_classes=10, small_input=True)
    >>> manifest = {"model": "resnet18", "options": dataclasses.asdict(cfg)}   # JSON primitives only
    >>> model = models.build_model(manifest["model"], **manifest["options"])
    >>> logits = model(*models.example_inputs("resnet18", **manifest["options"]))

Unknown names, unknown options and bad values raise ``ValueError`` naming the valid ones. This package
knows nothing of distribution or checkpoints: it must not import ``launcher`` or ``checkpoint``.
"""
from __future__ import annotations

from ._registry import build_model, example_inputs, get_config, list_models, parse_model_args, register_model

# Importing the families registers their models.
from .mlp import MLPConfig, ModuleDictMLP, ModuleListMLP
from .resnet import ResNet, ResNetConfig
from .unet import DoubleConv, Down, OutConv, UNet, UNetConfig, Up

__all__ = [
    "build_model", "example_inputs", "get_config", "list_models", "parse_model_args", "register_model",
    "MLPConfig", "ModuleDictMLP", "ModuleListMLP",
    "ResNet", "ResNetConfig",
    "DoubleConv", "Down", "OutConv", "UNet", "UNetConfig", "Up",
]
