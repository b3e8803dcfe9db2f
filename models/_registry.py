"""The one model registry: name -> (builder, config class, example-inputs function).

A model family registers each named entry point with :func:`register_model`. The public functions in
:mod:`models` (``list_models``, ``get_config``, ``build_model``, ``example_inputs``) only go through
this registry, so a model is buildable, validated and tested the moment it is registered.

This file also holds the small validators the config dataclasses share, so every family rejects bad
values with the same kind of message (the option, the value, the valid values).
"""
from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

Builder = Callable[[Any], nn.Module]
ExampleInputsFn = Callable[[Any, int, "tuple[int, int] | None"], "tuple[torch.Tensor, ...]"]
"""``fn(config, batch_size, image_size_or_None) -> positional forward args``."""


@dataclass(frozen=True)
class ModelEntry:
    """One registered model."""

    name: str
    builder: Builder
    """Takes a validated config instance, returns a freshly initialised ``nn.Module``."""
    config_cls: type
    """A ``@dataclass(kw_only=True)`` whose fields are the model's options (JSON primitives only)."""
    example_inputs: ExampleInputsFn


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, config: type, example_inputs: ExampleInputsFn) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` under ``name``.

    Args:
        name: the public model name (``build_model(name)``); must be new.
        config: the config dataclass the builder takes.
        example_inputs: ``fn(config, batch_size, image_size)`` returning forward args.

    Returns:
        The decorator; it returns the builder unchanged, so it stays callable directly.

    Example:
        >>> @register_model("tiny", config=TinyConfig, example_inputs=_tiny_inputs)
        ... def tiny(cfg: TinyConfig) -> nn.Module: ...
    """
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config for {name!r} must be a dataclass, got {config!r}")

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(name, builder, config, example_inputs)
        return builder

    return decorator


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; ``ValueError`` listing the valid names if unknown."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}") from None


def option_names(config_cls: type) -> list[str]:
    """Sorted option names a config class accepts (its init fields)."""
    return sorted(f.name for f in dataclasses.fields(config_cls) if f.init)


def get_config(name: str, **options: Any) -> Any:
    """The validated config instance for ``name`` built with ``options``.

    Args:
        name: a registered model name.
        **options: the model's options; unknown ones are rejected.

    Returns:
        An instance of the model's config dataclass. ``dataclasses.asdict()`` of it holds only JSON
        primitives, and ``build_model(name, **asdict(cfg))`` rebuilds the same architecture.

    Raises:
        ValueError: unknown name (lists valid names), unknown option (lists valid options), or a bad
            value (lists valid values).
    """
    entry = get_entry(name)
    valid = option_names(entry.config_cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; valid options: {', '.join(valid)}")
    try:
        return entry.config_cls(**options)
    except ValueError as e:
        raise ValueError(f"model {name!r}: {e}") from None


def build_model(name: str, **options: Any) -> nn.Module:
    """Build model ``name`` with ``options`` (validated through :func:`get_config`)."""
    entry = get_entry(name)
    return entry.builder(get_config(name, **options))


def example_inputs(name: str, batch_size: int = 2, *, image_size: int | Sequence[int] | None = None,
                   **options: Any) -> tuple[torch.Tensor, ...]:
    """Positional arguments for one forward pass of ``build_model(name, **options)``.

    Args:
        name: a registered model name.
        batch_size: leading dimension of every returned tensor.
        image_size: ``S`` or ``(H, W)`` for image models; ``None`` picks a small per-model default.
            It is not a model option.
        **options: the same options the model is built with (they decide channels, extra inputs...).

    Returns:
        A tuple of tensors (random, from a fixed seed so repeated calls are equal), e.g. ``(x,)`` or
        ``(x, extra)`` for a ResNet built with ``extra_inputs=K``.
    """
    entry = get_entry(name)
    cfg = get_config(name, **options)
    check_int("batch_size", batch_size, minimum=1)
    size: tuple[int, int] | None
    if image_size is None:
        size = None
    elif isinstance(image_size, int) and not isinstance(image_size, bool):
        check_int("image_size", image_size, minimum=1)
        size = (image_size, image_size)
    else:
        try:
            h, w = image_size  # type: ignore[misc]
        except (TypeError, ValueError):
            raise ValueError(f"image_size must be an int or an (H, W) pair, got {image_size!r}") from None
        check_int("image_size[0]", h, minimum=1)
        check_int("image_size[1]", w, minimum=1)
        size = (h, w)
    return entry.example_inputs(cfg, batch_size, size)


def example_generator() -> torch.Generator:
    """A CPU generator with a fixed seed, so example inputs are reproducible and leave global RNG alone."""
    return torch.Generator().manual_seed(0)


# --------------------------------------------------------------------------------------- validators
def check_int(option: str, value: Any, *, minimum: int) -> None:
    """``ValueError`` unless ``value`` is an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{option} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{option} must be an int >= {minimum}, got {value}")


def check_bool(option: str, value: Any) -> None:
    """``ValueError`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{option} must be True or False, got {value!r}")


def check_choice(option: str, value: Any, choices: Sequence[str]) -> None:
    """``ValueError`` naming the valid values unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def parse_model_args(items: Sequence[str] | None) -> dict[str, Any]:
    """``["num_classes=10", "small_input=True", "style=ordereddict"]`` -> dict of model options.

    Values are Python literals where they parse as one, else strings (the ``--model-arg KEY=VALUE`` flags
    of scripts/train.py and ``anytopo-ckpt``).

    Raises:
        ValueError: an item without ``=`` or with an empty key, naming the form to use.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad --model-arg {item!r}: use KEY=VALUE, e.g. --model-arg num_classes=10")
        try:
            out[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.strip()] = raw
    return out
