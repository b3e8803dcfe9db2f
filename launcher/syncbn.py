"""BatchNorm whose batch statistics are those of the GLOBAL batch, on every backend (gloo included).

torch's ``nn.SyncBatchNorm`` runs only on CUDA. :class:`SyncBatchNorm` here is an ordinary autograd
module: in training it sums, per channel, its local batch and counts the elements, all-reduces those
``C + 1`` numbers over the process group with a differentiable all-reduce (the global mean), then
all-reduces the centred sum of squares (the global biased variance), and normalises. Autograd then gives the exact
backward of that computation, and the backward of the all-reduce is itself an all-reduce of the gradient
terms (what ``nn.SyncBatchNorm``'s hand-written backward does for ``sum_dy`` and ``sum_dy_xmu``).

Because the count is reduced with the sums, ranks with unequal batches (the last, uneven batch of an
evaluation, or uneven shares of a global batch) are weighted by their number of samples: the result is
the statistics of the concatenated batch, whatever the split.

Numerics: two all-reduces, not one of sum and sum of squares, because ``E[x^2] - E[x]^2`` loses most digits
for a channel whose spread is small next to its mean (seen in ResNet-18's last stage: gradient errors of 1e-2
after three steps); the centred second pass keeps the variance as exact as ``F.batch_norm``'s. The result equals ``F.batch_norm`` over the whole batch up to float32 rounding (~1e-6 relative), not bit for
bit: summation order differs with the split.

Example:
    >>> model = convert_sync_batchnorm(model)            # before DDP wrapping
    >>> ddp = DistributedDataParallel(model)             # gloo on CPU works
"""
from __future__ import annotations

import functools
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "all_reduce_sum_differentiable"]


class _AllReduceSum(Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the incoming gradient.

    Every rank's output is the same global sum S; the total objective is the sum of the ranks' losses,
    so dL/d(local input) = sum over ranks of dL_r/dS: an all-reduce of the gradients.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum_differentiable(tensor: Tensor, group=None) -> Tensor:
    """Sum ``tensor`` over the ranks of ``group`` (default: the world), differentiably. Under torch.compile
    (dynamo imported: it is by then) the collective runs eagerly, as ``torch.compiler.disable`` makes it."""
    if "torch._dynamo" in sys.modules:
        return _eager_all_reduce()(tensor, group)
    return _AllReduceSum.apply(tensor, group)


@functools.cache
def _eager_all_reduce():
    # decorated on first use: torch.compiler.disable imports dynamo, ~1 s of every process's start otherwise
    return torch.compiler.disable(lambda tensor, group: _AllReduceSum.apply(tensor, group))


class SyncBatchNorm(_BatchNorm):
    """Drop-in BatchNorm (1d/2d/3d inputs) that normalises with the statistics of all ranks' batches.

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm*d``, so checkpoints stay canonical.
    Without an initialised process group of more than one rank, or in eval mode with running statistics,
    it is exactly ``F.batch_norm``.

    Args: as ``nn.BatchNorm2d``, plus ``process_group`` (None: the default group).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D input")

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # momentum / num_batches_tracked exactly as _BatchNorm.forward
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not batch_stats or self._world() == 1:
            return F.batch_norm(input,
                                self.running_mean if not self.training or self.track_running_stats else None,
                                self.running_var if not self.training or self.track_running_stats else None,
                                self.weight, self.bias, batch_stats, factor, self.eps)
        return self._sync_forward(input, factor)

    def _sync_forward(self, input: Tensor, factor: float) -> Tensor:
        c = self.num_features
        shape = [1, c] + [1] * (input.dim() - 2)
        dims = [0] + list(range(2, input.dim()))
        x = input if input.dtype == torch.float64 else input.float()  # float32 at least (autocast), float64 kept
        # pass 1: per-channel sum and element count -> the global mean
        count = torch.full((1,), float(x.numel() // c), device=x.device, dtype=x.dtype)
        total = all_reduce_sum_differentiable(torch.cat([x.sum(dims), count]), self.process_group)
        n = total[c].detach()
        if float(n) <= 1:
            raise ValueError(f"SyncBatchNorm: {int(n)} value(s) per channel over all ranks; "
                             "batch statistics need more than 1 (use a larger batch)")
        mean = total[:c] / n
        # pass 2: centred sum of squares -> the global (biased) variance, without E[x^2] - E[x]^2 cancellation
        xc = x - mean.view(shape)
        var = all_reduce_sum_differentiable((xc * xc).sum(dims), self.process_group) / n
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape).to(x.dtype) + self.bias.view(shape).to(x.dtype)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                unbiased = var.detach() * (n / (n - 1))
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return y.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` (and ``nn.SyncBatchNorm``) in ``module`` by :class:`SyncBatchNorm`,
    keeping its parameters and buffers (same tensors, same keys). Returns the converted module."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    del module
    return out
