"""``load_pretrained(model, path)``: initialise a freshly built model from a weights file.

Where models and checkpoints meet: ``models`` builds networks and never reads files; this takes the built
model. The training script calls it for ``--model-arg weights=PATH``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from torch import nn

from .loading import load
from .plan import LoadReport
from .errors import CheckpointError, and_more

_MAX_KEYS = 10


def load_pretrained(model: nn.Module, path: str | Path, *, skippable_prefixes: tuple[str, ...] = ()) -> LoadReport:
    """Load the weights file at ``path`` into ``model`` strictly, except for modules the caller replaced.

    Reading goes through ``checkpoint.load``: every format it reads (plain state dicts, torchvision
    reference / timm / Lightning files, safetensors, shards), ``weights_only`` safety, and prefix detection
    against the model's keys. Keys under ``skippable_prefixes`` (e.g. ``"fc."`` when the head was replaced,
    see ``ResNet.replaced_prefixes``) that are missing, unexpected or of another shape are skipped with a
    warning naming them; the rest of those modules still loads where it fits. Any other mismatch raises.

    Args:
        model: the built model (bare or wrapped), before training starts.
        path: a local file or checkpoint folder; nothing is ever downloaded.
        skippable_prefixes: key prefixes of modules that may legitimately not fit the file.

    Returns:
        The ``LoadReport`` of the (non-strict) load.

    Raises:
        CheckpointError: the file is missing or unreadable, or keys outside ``skippable_prefixes`` do not
            fit; lists (sorted, at most 10 each) the missing, unexpected and shape-mismatched keys.

    Example:
        >>> model = models.build_model("resnet18", num_classes=10)
        >>> checkpoint.load_pretrained(model, "resnet18_imagenet.pth", skippable_prefixes=model.replaced_prefixes)
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"weights file {path!r} does not exist (weights= takes a local path; nothing is downloaded)")
    try:
        report = load(path, model, strict=False)
    except CheckpointError as e:
        raise CheckpointError(f"weights= file unusable: {e}") from None

    def skippable(key: str) -> bool:
        return bool(skippable_prefixes) and key.startswith(skippable_prefixes)

    errors = []
    for label, keys in (("missing", report.missing), ("unexpected", report.unexpected)):
        bad = sorted(k for k in keys if not skippable(k))
        if bad:
            errors.append(f"{len(bad)} {label} key(s): {and_more(bad, _MAX_KEYS)}")
    bad_shapes = [(k, f, m) for k, f, m in report.shape_mismatches if not skippable(k)]
    if bad_shapes:
        detail = and_more((f"{k} (file {tuple(f)} vs model {tuple(m)})" for k, f, m in bad_shapes), _MAX_KEYS)
        errors.append(f"{len(bad_shapes)} shape-mismatched key(s): {detail}")
    if errors:
        raise CheckpointError(
            f"weights file {path!r} does not fit this model: " + "; ".join(errors)
            + ". Build the model with the architecture and options the file was saved from (for a ResNet: same "
              "depth, num_classes, head, extra_inputs, in_channels, small_input), or pass a file saved from this model.")
    mismatched = [k for k, _, _ in report.shape_mismatches]
    skipped = sorted({k for k in report.missing + report.unexpected + mismatched if skippable(k)})
    if skipped:
        warnings.warn(f"weights file {path!r}: skipped {len(skipped)} key(s) of replaced modules "
                      f"that do not fit: {and_more(skipped, _MAX_KEYS)}; these keep their fresh initialisation",
                      stacklevel=2)
    return report
