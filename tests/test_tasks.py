"""tasks: hand-checked metrics, exact aggregation over shards, losses, and build_task."""
from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F

from training import tasks
from training.data import DataInfo
from training.tasks import (Accuracy, Metric, SegmentationMetrics, build_task, classification_loss, dice_loss,
                   segmentation_loss)


def _logits(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits (N, K, ...) whose argmax is ``pred`` (N, ...)."""
    return 5.0 * F.one_hot(pred, num_classes).movedim(-1, 1).float()


def _info(task: str, num_classes: int) -> DataInfo:
    return DataInfo(name="x", task=task, num_classes=num_classes, in_channels=1, image_size=8,
                    num_train=1, num_test=1, extra_feature="")


# --------------------------------------------------------------------------------------------------
# Accuracy


def test_accuracy_by_hand():
    metric = Accuracy()
    metric.update(_logits(torch.tensor([0, 2, 1, 1]), 3), torch.tensor([0, 2, 2, 1]))
    sums = metric.sums()
    assert sums.dtype == torch.float64 and sums.dim() == 1 and sums.tolist() == [3.0, 4.0]
    assert metric.compute(sums) == {"accuracy": 0.75}
    metric.update(_logits(torch.tensor([1]), 3), torch.tensor([0]))  # accumulates across batches
    assert metric.compute(metric.sums()) == {"accuracy": 0.6}
    metric.reset()
    assert metric.sums().tolist() == [0.0, 0.0]


def test_accuracy_sums_aggregate_exactly_over_uneven_shards():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(37, 5, generator=g), torch.randint(0, 5, (37,), generator=g)
    whole = Accuracy()
    whole.update(logits, targets)
    shards = [Accuracy(), Accuracy()]
    shards[0].update(logits[:7], targets[:7])
    for start in range(7, 37, 10):  # the second shard sees several batches
        shards[1].update(logits[start:start + 10], targets[start:start + 10])
    total = shards[0].sums() + shards[1].sums()  # what an all-reduce SUM does
    assert torch.equal(total, whole.sums())
    assert Accuracy().compute(total) == whole.compute(whole.sums())
    per_shard = [m.compute(m.sums())["accuracy"] for m in shards]
    assert abs(sum(per_shard) / 2 - whole.compute(whole.sums())["accuracy"]) > 1e-3  # means would not


# --------------------------------------------------------------------------------------------------
# SegmentationMetrics

# target        pred          class  I  P  G   dice 2I/(P+G)   IoU I/(P+G-I)
# 0 1 1         0 1 2           0    2  3  2   (background)    2/3
# 2 2 0         2 0 0           1    1  1  2   2/3             1/2
#                               2    1  2  2   1/2             1/3
TARGET = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
PRED = torch.tensor([[[0, 1, 2], [2, 0, 0]]])


def test_segmentation_metrics_by_hand():
    metric = SegmentationMetrics(3)
    metric.update(_logits(PRED, 3), TARGET)
    sums = metric.sums()
    assert sums.dtype == torch.float64 and sums.tolist() == [2, 1, 1, 3, 1, 2, 2, 2, 2]
    result = metric.compute(sums)
    assert result["dice"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert result["miou"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 3) / 3)
    metric.reset()
    assert not metric.sums().any()


def test_segmentation_metrics_skip_absent_classes():
    # A 4th class that is neither present nor predicted leaves both means unchanged.
    metric = SegmentationMetrics(4)
    metric.update(_logits(PRED, 4), TARGET)
    result = metric.compute(metric.sums())
    assert result["dice"] == pytest.approx(7 / 12) and result["miou"] == pytest.approx(0.5)
    # Background counts in mIoU but not in Dice: all-background, predicted perfectly.
    empty = SegmentationMetrics(2)
    empty.update(_logits(torch.zeros(1, 2, 2, dtype=torch.long), 2), torch.zeros(1, 2, 2, dtype=torch.long))
    result = empty.compute(empty.sums())
    assert result["miou"] == 1.0 and result["dice"] != result["dice"]  # NaN: no foreground anywhere


def test_segmentation_metrics_aggregate_exactly_over_shards():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(10, 4, 16, 16, generator=g)
    targets = torch.randint(0, 4, (10, 16, 16), generator=g)
    targets[:3] = 0  # shards with very different class mixes
    whole = SegmentationMetrics(4)
    whole.update(logits, targets)
    shards = [SegmentationMetrics(4), SegmentationMetrics(4)]
    shards[0].update(logits[:3], targets[:3])
    shards[1].update(logits[3:6], targets[3:6])
    shards[1].update(logits[6:], targets[6:])
    total = shards[0].sums() + shards[1].sums()
    assert torch.equal(total, whole.sums())
    assert SegmentationMetrics(4).compute(total) == whole.compute(whole.sums())
    naive = sum(m.compute(m.sums())["dice"] for m in shards) / 2
    assert abs(naive - whole.compute(whole.sums())["dice"]) > 1e-3


def test_segmentation_metrics_reject_bad_input():
    metric = SegmentationMetrics(3)
    with pytest.raises(ValueError, match=r"class ids 0..3, outside 0..2"):
        metric.update(_logits(PRED, 3), TARGET + (TARGET == 2).long())
    with pytest.raises(ValueError, match="4 channels but the metric has 3 classes"):
        metric.update(_logits(PRED, 4), TARGET)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        SegmentationMetrics(1)


# --------------------------------------------------------------------------------------------------
# Losses


def test_dice_loss_by_hand_and_extremes():
    # Uniform logits with K=2: p = 0.5 everywhere. Targets [0, 1, 1, 1]: class 1 has
    # sum(p*g) = 1.5, sum(p) = 2, sum(g) = 3 -> dice = (3 + 1) / (5 + 1) -> loss 1/3.
    targets = torch.tensor([[[0, 1], [1, 1]]])
    assert dice_loss(torch.zeros(1, 2, 2, 2), targets, 2).item() == pytest.approx(1 / 3)
    g = torch.Generator().manual_seed(2)
    targets = torch.randint(0, 4, (3, 8, 8), generator=g)
    perfect = dice_loss(4 * _logits(targets, 4), targets, 4)
    wrong = dice_loss(4 * _logits((targets + 1) % 4, 4), targets, 4)
    random = dice_loss(torch.randn(3, 4, 8, 8, generator=g), targets, 4)
    assert perfect.item() < 1e-3 and wrong.item() > 0.95 and perfect < random < wrong
    # A foreground class absent from targets and prediction costs nothing (eps).
    assert dice_loss(20 * _logits(targets.clamp(max=2), 4), targets.clamp(max=2), 4).item() < 1e-3


def test_losses_backprop_and_compose():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, 5, generator=g, requires_grad=True)
    targets = torch.randint(0, 3, (2, 5, 5), generator=g)
    loss = segmentation_loss(logits, targets, 3)
    expected = F.cross_entropy(logits, targets) + dice_loss(logits, targets, 3)
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0 and torch.isfinite(logits.grad).all()
    # Following the gradient lowers the loss.
    with torch.no_grad():
        assert segmentation_loss(logits - 1.0 * logits.grad, targets, 3) < loss
    flat = torch.randn(6, 4, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    ce = classification_loss(flat, labels)
    assert ce.item() == pytest.approx(F.cross_entropy(flat, labels).item())
    ce.backward()
    assert flat.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# build_task


def test_build_task_classification():
    task = build_task(_info("classification", 10))
    assert (task.name, task.primary) == ("classification", "accuracy")
    metric = task.make_metric()
    assert isinstance(metric, Accuracy) and isinstance(metric, Metric)
    assert task.make_metric() is not metric  # fresh each time
    logits, labels = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    assert torch.equal(task.loss_fn(logits, labels), classification_loss(logits, labels))
    metric.update(logits, labels)
    assert task.primary in metric.compute(metric.sums())


def test_build_task_segmentation():
    task = build_task(_info("segmentation", 3))
    assert (task.name, task.primary) == ("segmentation", "dice")
    metric = task.make_metric()
    assert isinstance(metric, SegmentationMetrics) and metric.num_classes == 3
    logits = _logits(PRED, 3)
    assert torch.equal(task.loss_fn(logits, TARGET), segmentation_loss(logits, TARGET, 3))
    metric.update(logits, TARGET)
    assert metric.compute(metric.sums())[task.primary] == pytest.approx(7 / 12)
    with pytest.raises(ValueError, match="unknown task 'detection'"):
        build_task(_info("detection", 3))
    with pytest.raises(AttributeError):
        task.primary = "miou"  # frozen


def test_docstring_examples_hold():
    assert doctest.testmod(tasks).failed == 0
