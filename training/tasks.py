"""Losses and exactly aggregatable metrics for the training script.

A metric keeps *sums* (counts of correct predictions, of pixels, of overlaps), never running means.
Sums add across shards, so a distributed caller all-reduces ``metric.sums()`` with SUM and passes the
result to ``metric.compute(...)``: the value is exactly the one a single process would get on the
whole dataset, whatever the number of ranks or the batch sizes. This module knows nothing of how
the sums travel.

Example:
    >>> metric = Accuracy()
    >>> metric.update(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    >>> metric.compute(metric.sums())
    {'accuracy': 0.5}
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .data import DataInfo

__all__ = ["Metric", "Accuracy", "SegmentationMetrics", "classification_loss", "dice_loss",
           "segmentation_loss", "Task", "build_task"]


@runtime_checkable
class Metric(Protocol):
    """An accumulator whose state is a 1-D float64 tensor of sums that add across shards."""

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        """Add one batch: ``outputs`` are logits, class dimension 1."""

    def sums(self) -> Tensor:
        """The accumulated sums, 1-D float64, on the device of the outputs seen (for all-reduce)."""

    def compute(self, sums: Tensor) -> dict[str, float]:
        """Metric values from sums (this process's, or all processes' added together)."""

    def reset(self) -> None:
        """Forget everything accumulated."""


def _sum_device(outputs: Tensor) -> torch.device:
    # MPS has no float64; there is no multi-process backend on MPS either, so CPU sums lose nothing.
    return torch.device("cpu") if outputs.device.type == "mps" else outputs.device


class Accuracy:
    """Top-1 accuracy. Sums: ``[correct, count]``; ``accuracy = correct / count`` (NaN when empty)."""

    SIZE = 2

    def __init__(self) -> None:
        self._sums = torch.zeros(self.SIZE, dtype=torch.float64)

    @torch.no_grad()
    def update(self, outputs: Tensor, targets: Tensor) -> None:
        correct = (outputs.argmax(dim=1) == targets).sum()
        self._sums = self._sums.to(_sum_device(outputs))
        self._sums += torch.stack([correct.to(self._sums), torch.tensor(targets.numel()).to(self._sums)])

    def sums(self) -> Tensor:
        return self._sums.clone()

    def compute(self, sums: Tensor) -> dict[str, float]:
        correct, count = sums.double().tolist()
        return {"accuracy": correct / count if count else float("nan")}

    def reset(self) -> None:
        self._sums = torch.zeros(self.SIZE, dtype=torch.float64)


class SegmentationMetrics:
    """Dataset-level Dice and mean IoU from per-class pixel counts over every pixel seen.

    The prediction at a pixel is the argmax of the logits. For each class ``c`` the sums hold
    ``I_c`` (pixels predicted ``c`` whose target is ``c``), ``P_c`` (pixels predicted ``c``) and
    ``G_c`` (pixels whose target is ``c``), laid out as ``[I_0..I_{K-1}, P_0.., G_0..]``. Then

    - ``dice`` = mean over *foreground* classes ``c = 1 .. K-1`` with ``P_c + G_c > 0`` of
      ``2 I_c / (P_c + G_c)``;
    - ``miou`` = mean over *all* classes with union ``U_c = P_c + G_c - I_c > 0`` of ``I_c / U_c``.

    Classes never predicted nor present are left out of the mean rather than counted as 0 or 1;
    a mean over no class is NaN. Counting pixels over the whole dataset (not averaging per image)
    is what makes the result exact under any sharding.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"SegmentationMetrics needs num_classes >= 2 (background + foreground), "
                             f"got {num_classes}")
        self.num_classes = num_classes
        self._sums = torch.zeros(3 * num_classes, dtype=torch.float64)

    @torch.no_grad()
    def update(self, outputs: Tensor, targets: Tensor) -> None:
        k = self.num_classes
        if outputs.shape[1] != k:
            raise ValueError(f"outputs have {outputs.shape[1]} channels but the metric has {k} classes")
        pred = outputs.argmax(dim=1).flatten()
        target = targets.flatten().long()
        lo, hi = torch.aminmax(target)
        if lo < 0 or hi >= k:
            raise ValueError(f"targets hold class ids {int(lo)}..{int(hi)}, outside 0..{k - 1}")
        # One bincount of (target, pred) pairs gives the confusion matrix: rows target, columns pred.
        confusion = torch.bincount(target * k + pred, minlength=k * k).reshape(k, k).double()
        batch = torch.cat([confusion.diagonal(), confusion.sum(dim=0), confusion.sum(dim=1)])
        self._sums = self._sums.to(_sum_device(outputs))
        self._sums += batch.to(self._sums.device)

    def sums(self) -> Tensor:
        return self._sums.clone()

    def compute(self, sums: Tensor) -> dict[str, float]:
        inter, pred, target = sums.double().cpu().reshape(3, self.num_classes)
        denom = pred + target
        fg = denom[1:] > 0
        dice = (2 * inter[1:][fg] / denom[1:][fg]).mean()
        union = denom - inter
        present = union > 0
        miou = (inter[present] / union[present]).mean()
        return {"dice": float(dice), "miou": float(miou)}  # mean of an empty tensor is NaN

    def reset(self) -> None:
        self._sums = torch.zeros(3 * self.num_classes, dtype=torch.float64)


def classification_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy on logits ``(N, K)`` against class ids ``(N,)``, mean over the batch."""
    return F.cross_entropy(logits, targets)


def dice_loss(logits: Tensor, targets: Tensor, num_classes: int, eps: float = 1.0) -> Tensor:
    """Soft Dice loss: ``1 -`` mean over foreground classes of the batch's soft Dice.

    For class ``c``, with softmax probabilities ``p`` and one-hot targets ``g`` summed over the whole
    batch and every pixel: ``dice_c = (2 * sum(p * g) + eps) / (sum(p) + sum(g) + eps)``. ``eps``
    keeps a class absent from both prediction and target at Dice 1 (loss 0) instead of 0/0.

    Args:
        logits: ``(N, K, *spatial)``.
        targets: ``(N, *spatial)`` class ids in ``0 .. K-1``.
        num_classes: ``K`` (at least 2; class 0 is background and not averaged).
        eps: smoothing added to numerator and denominator.

    Returns:
        A scalar tensor in ``[0, 1]``.
    """
    if num_classes < 2:
        raise ValueError(f"dice_loss needs num_classes >= 2 (background + foreground), got {num_classes}")
    probs = logits.softmax(dim=1).flatten(2)                          # N, K, P
    onehot = F.one_hot(targets.flatten(1), num_classes).transpose(1, 2).to(probs)  # N, K, P
    dims = (0, 2)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return 1.0 - dice[1:].mean()


def segmentation_loss(logits: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Pixel-wise cross-entropy plus :func:`dice_loss`: CE trains every pixel, Dice the overlap."""
    return F.cross_entropy(logits, targets) + dice_loss(logits, targets, num_classes)


@dataclass(frozen=True)
class Task:
    """What training needs to know about the task, apart from the model and the data."""

    name: str
    """``"classification"`` or ``"segmentation"``."""
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    """``loss_fn(outputs, targets)`` -> scalar loss."""
    make_metric: Callable[[], Metric]
    """A fresh, empty metric (one per evaluation)."""
    primary: str
    """The metric key that decides "best": ``"accuracy"`` or ``"dice"``."""


def build_task(info: DataInfo) -> Task:
    """The task for a dataset, from its :class:`datasets.DataInfo`.

    Example:
        >>> from training.data import build_datasets
        >>> task = build_task(build_datasets("shapes:20")[2])
        >>> task.primary, sorted(task.make_metric().compute(torch.zeros(12)))
        ('dice', ['dice', 'miou'])
    """
    if info.task == "classification":
        return Task(name="classification", loss_fn=classification_loss, make_metric=Accuracy,
                    primary="accuracy")
    if info.task == "segmentation":
        return Task(name="segmentation",
                    loss_fn=partial(segmentation_loss, num_classes=info.num_classes),
                    make_metric=partial(SegmentationMetrics, info.num_classes), primary="dice")
    raise ValueError(f"unknown task {info.task!r}: use 'classification' or 'segmentation'")
