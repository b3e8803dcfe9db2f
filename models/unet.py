"""U-Net (Ronneberger et al. 2015, in the common milesial/Pytorch-UNet shape) with optional
gradient checkpointing that leaves BatchNorm running statistics correct.

Encoder: ``inc`` (DoubleConv) then four ``Down`` (MaxPool2d(2) + DoubleConv); decoder: four ``Up``
(upsample x2, pad to the skip's size, concatenate, DoubleConv) and a 1x1 ``OutConv``. Channel widths
are ``base_width * (1, 2, 4, 8, 16)``; with ``bilinear=True`` the bottleneck and decoder widths are
halved (``factor = 2``) because bilinear upsampling does not reduce channels.

Inputs of any ``H, W >= 16`` work, odd sizes included; the output has the input's spatial size.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._registry import check_bool, check_int, example_generator, register_model

MIN_SIZE = 16
"""Smallest input height/width: four 2x poolings must leave at least 1 pixel (16 -> 8 -> 4 -> 2 -> 1)."""


@dataclass(kw_only=True)
class UNetConfig:
    """Options of the ``unet`` model."""

    in_channels: int = 3
    """Input image channels."""
    num_classes: int = 2
    """Output channels (per-pixel logits; no Softmax/Sigmoid)."""
    bilinear: bool = False
    """True: bilinear upsampling (and halved bottleneck); False: ConvTranspose2d upsampling."""
    base_width: int = 64
    """Channels of the first block; block i has ``base_width * 2**i``."""
    checkpointing: bool = False
    """Gradient-checkpoint every encoder/decoder block while training (saves activation memory,
    costs a recomputation in backward). BatchNorm running statistics are still updated once per step."""

    def __post_init__(self) -> None:
        check_int("in_channels", self.in_channels, minimum=1)
        check_int("num_classes", self.num_classes, minimum=1)
        check_bool("bilinear", self.bilinear)
        check_int("base_width", self.base_width, minimum=1)
        check_bool("checkpointing", self.checkpointing)


class DoubleConv(nn.Module):
    """(3x3 conv -> BatchNorm -> ReLU) x 2; ``mid_channels`` defaults to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None) -> None:
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """Downscale by 2 (max-pool), then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Upscale ``x1`` by 2, pad it to the skip ``x2``'s size, concatenate ``[x2, x1]``, DoubleConv.

    ``bilinear=True``: ``Upsample`` (keeps channels) + ``DoubleConv(in, out, mid=in // 2)``;
    otherwise ``ConvTranspose2d(in, in // 2, 2, stride=2)`` + ``DoubleConv(in, out)``.
    """

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = False) -> None:
        super().__init__()
        if bilinear:
            self.up: nn.Module = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x1 = self.up(x1)
        # After pooling an odd size the upsampled map is 1 px short; pad (floor left/top, ceil right/bottom).
        diff_y = x2.size()[2] - x1.size()[2]
        diff_x = x2.size()[3] - x1.size()[3]
        x1 = F.pad(x1, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class OutConv(nn.Module):
    """1x1 conv to ``num_classes`` logits per pixel."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _RestoreBuffers:
    """Recompute context: snapshot a block's buffers on enter, put them back on exit.

    Checkpointing runs a block's forward twice: once in the forward pass and again (recomputation,
    inside backward) to rebuild the activations. In training mode BatchNorm updates ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` on *every* forward, so a naive checkpoint applies the
    momentum update twice per step and counts two batches. The forward pass's update is the real one;
    this context undoes whatever the recomputation did. Re-entrant by design: autograd may recompute
    more than once (e.g. ``backward(retain_graph=True)`` twice), each time with a fresh snapshot.
    """

    def __init__(self, module: nn.Module) -> None:
        self._buffers = [b for b in module.buffers()]
        self._saved: list[list[torch.Tensor]] = []

    def __enter__(self) -> "_RestoreBuffers":
        with torch.no_grad():
            self._saved.append([b.clone() for b in self._buffers])
        return self

    def __exit__(self, *exc: object) -> bool:
        saved = self._saved.pop()
        with torch.no_grad():
            for buf, old in zip(self._buffers, saved):
                buf.copy_(old)
        return False  # never swallow exceptions (early-stop of recomputation raises through here)


def _recompute_preserves_buffers(module: nn.Module) -> tuple[ContextManager, ContextManager]:
    """``context_fn`` for ``checkpoint``: plain forward, buffer-restoring recomputation.

    ``torch.utils.checkpoint`` (non-reentrant) calls ``context_fn()`` once per checkpointed call; the
    first context wraps the original forward, the second wraps the recomputation run from backward.
    """
    return nullcontext(), _RestoreBuffers(module)


class UNet(nn.Module):
    """U-Net for per-pixel classification; returns logits of shape ``(N, num_classes, H, W)``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, *, bilinear: bool = False,
                 base_width: int = 64, checkpointing: bool = False) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.bilinear = bilinear
        self.checkpointing = checkpointing
        w = base_width
        factor = 2 if bilinear else 1
        self.inc = DoubleConv(in_channels, w)
        self.down1 = Down(w, 2 * w)
        self.down2 = Down(2 * w, 4 * w)
        self.down3 = Down(4 * w, 8 * w)
        self.down4 = Down(8 * w, 16 * w // factor)
        self.up1 = Up(16 * w, 8 * w // factor, bilinear)
        self.up2 = Up(8 * w, 4 * w // factor, bilinear)
        self.up3 = Up(4 * w, 2 * w // factor, bilinear)
        self.up4 = Up(2 * w, w, bilinear)
        self.outc = OutConv(w, num_classes)

    def _run(self, block: nn.Module, *xs: torch.Tensor) -> torch.Tensor:
        """Run ``block``, checkpointed only when it can save memory: training with autograd on."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *xs, use_reentrant=False,
                              context_fn=functools.partial(_recompute_preserves_buffers, block))
        return block(*xs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"UNet expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h < MIN_SIZE or w < MIN_SIZE:
            raise ValueError(f"UNet needs H and W >= {MIN_SIZE} (four 2x poolings); got {h}x{w}")
        x1 = self._run(self.inc, x)
        x2 = self._run(self.down1, x1)
        x3 = self._run(self.down2, x2)
        x4 = self._run(self.down3, x3)
        x5 = self._run(self.down4, x4)
        x = self._run(self.up1, x5, x4)
        x = self._run(self.up2, x, x3)
        x = self._run(self.up3, x, x2)
        x = self._run(self.up4, x, x1)
        return self.outc(x)


def _unet_example_inputs(cfg: UNetConfig, batch_size: int, image_size: tuple[int, int] | None) -> tuple[torch.Tensor]:
    """``(x,)`` with ``x`` of shape ``(N, in_channels, H, W)``; default 64x64."""
    h, w = image_size or (64, 64)
    if h < MIN_SIZE or w < MIN_SIZE:
        raise ValueError(f"unet image_size must be at least {MIN_SIZE}x{MIN_SIZE}; got {h}x{w}")
    return (torch.randn(batch_size, cfg.in_channels, h, w, generator=example_generator()),)


@register_model("unet", config=UNetConfig, example_inputs=_unet_example_inputs)
def unet(cfg: UNetConfig) -> UNet:
    """U-Net with ``cfg``'s widths, upsampling mode and checkpointing."""
    return UNet(cfg.in_channels, cfg.num_classes, bilinear=cfg.bilinear, base_width=cfg.base_width,
                checkpointing=cfg.checkpointing)
