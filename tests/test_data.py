"""scripts/data.py: real packaged data, generated shapes with exact masks, user folders, and error messages."""
from __future__ import annotations

import doctest
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from training import data as datasets
from training.data import ShapesDataset, build_datasets, extra_feature

UNKNOWN = ("unknown dataset 'foo': use one of digits, mnist5k, shapes[:N], imagefolder:PATH, "
           "segfolder:PATH")


# --------------------------------------------------------------------------------------------------
# digits, mnist5k

REAL = {"digits": (1797, 8), "mnist5k": (5000, 28)}


@pytest.fixture(scope="module", params=sorted(REAL))
def real(request):
    """(name, builds with seed 0, seed 0 again, seed 1)."""
    name = request.param
    return name, build_datasets(name, seed=0), build_datasets(name, seed=0), build_datasets(name, seed=1)


def test_real_data_items_and_info(real):
    name, (train, test, info), _, _ = real
    total, side = REAL[name]
    assert (info.name, info.task, info.num_classes, info.in_channels, info.image_size) == \
           (name, "classification", 10, 1, side)
    assert info.num_train + info.num_test == total == len(train) + len(test)
    assert info.num_test == math.ceil(0.2 * total)
    image, label = train[0]
    assert image.shape == (1, side, side) and image.dtype == torch.float32
    assert label.shape == () and label.dtype == torch.int64
    images, labels = next(iter(DataLoader(train, batch_size=len(train))))
    assert set(labels.tolist()) == set(range(10))
    # Normalized with the train split's own statistics.
    assert abs(images.mean().item()) < 1e-4 and abs(images.std().item() - 1) < 1e-3
    # Real digits, not noise: the classes differ in their mean image.
    means = torch.stack([images[labels == c].mean(0) for c in range(10)])
    assert torch.cdist(means.flatten(1), means.flatten(1)).fill_diagonal_(1e9).min() > 1.0


def test_real_split_is_fixed_by_seed_disjoint_and_stratified(real):
    name, (train, test, _), (train_again, test_again, _), (train_1, test_1, _) = real
    total = REAL[name][0]
    assert train.indices == train_again.indices and test.indices == test_again.indices
    assert torch.equal(train[5][0], train_again[5][0])
    assert test.indices != test_1.indices
    assert not set(train.indices) & set(test.indices)
    assert sorted(train.indices + test.indices) == list(range(total))
    test_labels = np.bincount([int(test[i][1]) for i in range(len(test))], minlength=10)
    all_labels = np.bincount([int(test.dataset[i][1]) for i in range(total)], minlength=10)
    assert np.abs(test_labels - all_labels * 0.2).max() <= 1  # stratified


def test_digits_resize_channels_subset():
    train, test, info = build_datasets("digits", image_size=16, in_channels=3, num_samples=500,
                                       test_fraction=0.1, seed=4)
    assert train[0][0].shape == (3, 16, 16) and (info.image_size, info.in_channels) == (16, 3)
    assert (len(train), len(test), info.num_train, info.num_test) == (450, 50, 450, 50)
    assert torch.equal(train[0][0][0], train[0][0][2])  # gray repeated into RGB
    assert set(int(test[i][1]) for i in range(len(test))) == set(range(10))  # stratified subset


def test_extra_feature_is_per_image_mean():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    feature = extra_feature(images)
    assert feature.shape == (2, 1)
    assert torch.allclose(feature[:, 0], images.reshape(2, -1).mean(1))
    train, _, info = build_datasets("shapes:10")
    assert "mean intensity" in info.extra_feature
    with pytest.raises(ValueError, match="batch"):
        extra_feature(torch.ones(4))


# --------------------------------------------------------------------------------------------------
# shapes


def _paint(shapes: list[datasets.Shape], size: int) -> torch.Tensor:
    """Reference rasterizer, written apart from the dataset's: pixel centres, last shape on top."""
    c = np.arange(size) + 0.5
    x, y = np.meshgrid(c, c)
    mask = np.zeros((size, size), dtype=np.int64)
    for s in shapes:
        if s.cls == 1:
            cx, cy, r = s.params
            inside = np.hypot(x - cx, y - cy) <= r
        elif s.cls == 2:
            x0, y0, x1, y1 = s.params
            inside = (x0 <= x) & (x <= x1) & (y0 <= y) & (y <= y1)
        else:  # barycentric coordinates all non-negative
            (xa, ya), (xb, yb), (xc, yc) = np.reshape(s.params, (3, 2))
            det = (yb - yc) * (xa - xc) + (xc - xb) * (ya - yc)
            la = ((yb - yc) * (x - xc) + (xc - xb) * (y - yc)) / det
            lb = ((yc - ya) * (x - xc) + (xa - xc) * (y - yc)) / det
            inside = (la >= 0) & (lb >= 0) & (1 - la - lb >= 0)
        mask[inside] = s.cls
    return torch.from_numpy(mask)


def test_shapes_info_and_split():
    train, test, info = build_datasets("shapes:100", seed=2)
    assert (info.name, info.task, info.num_classes, info.in_channels, info.image_size) == \
           ("shapes", "segmentation", 4, 1, 32)
    assert (len(train), len(test), info.num_train, info.num_test) == (80, 20, 80, 20)
    image, mask = train[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert mask.shape == (32, 32) and mask.dtype == torch.int64
    # Train and test are disjoint draws: test item 0 is global item 80.
    assert torch.equal(test[0][1], ShapesDataset(100, seed=2)[80][1])
    assert len(build_datasets("shapes")[0]) == 960
    assert len(build_datasets("shapes", num_samples=50)[0]) == 40
    images, masks = next(iter(DataLoader(train, batch_size=8)))
    assert images.shape == (8, 1, 32, 32) and masks.shape == (8, 32, 32)


def test_shapes_deterministic_by_seed_and_index():
    ds = ShapesDataset(20, seed=7)
    first = ds[11]
    for i in (3, 19, 0):  # other items in between must not change item 11
        ds[i]
    again = ShapesDataset(20, seed=7)[11]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(ShapesDataset(20, seed=7)[11][0], first[0])
    assert not torch.equal(ShapesDataset(20, seed=8)[11][0], first[0])
    assert not torch.equal(ds[12][0], first[0])
    assert torch.equal(build_datasets("shapes:50", seed=7)[0][11][0], first[0])


@pytest.mark.parametrize("size,channels", [(16, 1), (17, 1), (33, 3), (128, 1)])
def test_shapes_masks_are_exact(size, channels):
    clean = ShapesDataset(12, image_size=size, in_channels=channels, seed=size, noise=0.0)
    noisy = ShapesDataset(12, image_size=size, in_channels=channels, seed=size)
    seen = set()
    for i in range(len(clean)):
        image, mask = clean[i]
        shapes = clean.describe(i)
        assert image.shape == (channels, size, size) and mask.shape == (size, size)
        assert 1 <= len(shapes) <= 3
        assert torch.equal(mask, _paint(shapes, size))
        assert set(mask.unique().tolist()) - {0} <= {s.cls for s in shapes}
        assert (mask == shapes[-1].cls).any()  # the top shape always shows
        for c in mask.unique().tolist():  # without noise every pixel is inside its class's band
            lo, hi = ShapesDataset.BANDS[c]
            values = image[:, mask == c]
            assert values.min() >= lo - 1e-6 and values.max() <= hi + 1e-6, (i, c)
        noisy_image, noisy_mask = noisy[i]
        assert torch.equal(noisy_mask, mask)  # noise touches the image only
        assert 0.03 < (noisy_image - image).std() < 0.07
        seen |= set(mask.unique().tolist())
    assert seen <= {0, 1, 2, 3}


def test_shapes_every_class_appears():
    masks = torch.stack([ShapesDataset(60, seed=0)[i][1] for i in range(60)])
    assert masks.unique().tolist() == [0, 1, 2, 3]


def test_shapes_errors():
    with pytest.raises(ValueError, match=r"shapes image_size 15 is too small: use image_size >= 16"):
        build_datasets("shapes", image_size=15)
    with pytest.raises(ValueError, match=r"use shapes:N with an integer N >= 2"):
        build_datasets("shapes:lots")
    with pytest.raises(ValueError, match="conflicts with num_samples"):
        build_datasets("shapes:100", num_samples=10)
    with pytest.raises(ValueError, match="in_channels 2 is not supported"):
        build_datasets("shapes", in_channels=2)


# --------------------------------------------------------------------------------------------------
# imagefolder


def _png(path: Path, value, size=(12, 10), mode="RGB") -> None:
    """A constant image of ``value``; ``size`` is (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def _classfolders(root: Path, per_class: int, classes=("cat", "dog", "owl"), mode="RGB", shade=0):
    for k, name in enumerate(classes):
        for i in range(per_class):
            value = 40 * k + shade if mode == "L" else (40 * k + shade, 10 * i, 200)
            _png(root / name / f"{i}.png", value, mode=mode)


def test_imagefolder_split_by_seed(tmp_path):
    _classfolders(tmp_path, per_class=4)
    train, test, info = build_datasets(f"imagefolder:{tmp_path}", seed=3, test_fraction=0.25)
    assert (info.name, info.task, info.num_classes, info.in_channels, info.image_size) == \
           ("imagefolder", "classification", 3, 3, 32)
    assert (info.num_train, info.num_test) == (9, 3)
    assert not set(train.indices) & set(test.indices)
    assert sorted(int(test[i][1]) for i in range(3)) == [0, 1, 2]  # stratified
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label.dtype == torch.int64
    # The pixel values are the file's: class k has red 40 k.
    assert abs(image[0].mean().item() - 40 * int(label) / 255) < 1e-6
    again, _, _ = build_datasets(f"imagefolder:{tmp_path}", seed=3, test_fraction=0.25)
    assert again.indices == train.indices


def test_imagefolder_gray_resize_and_channels(tmp_path):
    _classfolders(tmp_path, per_class=3, mode="L")
    train, _, info = build_datasets(f"imagefolder:{tmp_path}", image_size=16)
    assert info.in_channels == 1 and train[0][0].shape == (1, 16, 16)  # gray files -> 1 channel
    train, _, info = build_datasets(f"imagefolder:{tmp_path}", image_size=7, in_channels=3)
    assert info.in_channels == 3 and train[0][0].shape == (3, 7, 7)


@pytest.mark.parametrize("held_out", ["val", "test"])
def test_imagefolder_train_val_layout(tmp_path, held_out):
    _classfolders(tmp_path / "train", per_class=3, classes=("a", "b"))
    _classfolders(tmp_path / held_out, per_class=1, classes=("a", "b"), shade=5)
    train, test, info = build_datasets(f"imagefolder:{tmp_path}", in_channels=1, test_fraction=0.5)
    assert (info.num_classes, info.num_train, info.num_test) == (2, 6, 2)  # given split, not 50 %
    assert Path(test.dataset.root).name == held_out
    assert train[0][0].shape == (1, 32, 32)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"imagefolder folder '.*nowhere' does not exist: pass an "):
        build_datasets(f"imagefolder:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no images: put them in .*<class_name>"):
        build_datasets(f"imagefolder:{tmp_path / 'empty'}")
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="has no images"):
        build_datasets(f"imagefolder:{tmp_path / 'noimg'}")
    _classfolders(tmp_path / "mixed" / "train", per_class=2, classes=("a", "b"))
    _classfolders(tmp_path / "mixed" / "val", per_class=1, classes=("a", "c"))
    with pytest.raises(ValueError, match=r"classes \['a', 'b'\] differ from val/ classes"):
        build_datasets(f"imagefolder:{tmp_path / 'mixed'}")


# --------------------------------------------------------------------------------------------------
# segfolder


def _segfolder(root: Path, n: int = 6, mask_id: int = 3, size=(24, 20)) -> None:
    """Images of ``size`` (w, h) whose left half is bright; in the mask, the left half's even
    columns are class ``mask_id`` (one-pixel stripes, which any averaging resize would blur)."""
    w, h = size
    for i in range(n):
        image = np.zeros((h, w, 3), dtype=np.uint8)
        image[:, : w // 2] = 200
        image[..., 2] = 10 * i
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[:, : w // 2: 2] = mask_id
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        suffix = ".jpg" if i == 0 else ".png"
        Image.fromarray(image).save(root / "images" / f"img{i}{suffix}")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"img{i}.png")


def test_segfolder_items_split_and_nearest_masks(tmp_path):
    _segfolder(tmp_path)
    train, test, info = build_datasets(f"segfolder:{tmp_path}", seed=1, image_size=8, test_fraction=0.34)
    assert (info.name, info.task, info.num_classes, info.in_channels, info.image_size) == \
           ("segfolder", "segmentation", 4, 3, 8)  # ids 0 and 3 -> 4 classes
    assert (info.num_train, info.num_test) == (3, 3)
    assert not {p for p, _ in train.pairs} & {p for p, _ in test.pairs}
    for ds in (train, test):
        for i in range(len(ds)):
            image, mask = ds[i]
            assert image.shape == (3, 8, 8) and image.dtype == torch.float32
            assert mask.shape == (8, 8) and mask.dtype == torch.int64
            # Nearest, 24 -> 8 columns, samples source columns 1, 4, 7, ...: ids stay exact, where
            # bilinear would average the stripes into 1s and 2s.
            assert torch.equal(mask, torch.tensor([0, 3, 0, 3, 0, 0, 0, 0]).expand(8, 8))
            assert image[0, :, :3].min() > 0.7 and image[0, :, 5:].max() < 0.1  # filter spill at 3, 4
    again = build_datasets(f"segfolder:{tmp_path}", seed=1, image_size=8, test_fraction=0.34)[0]
    other = build_datasets(f"segfolder:{tmp_path}", seed=2, image_size=8, test_fraction=0.34)[0]
    assert again.pairs == train.pairs and {p for p, _ in other.pairs} != {p for p, _ in train.pairs}
    assert build_datasets(f"segfolder:{tmp_path}", in_channels=1)[0][0][0].shape == (1, 64, 64)


def test_segfolder_classes_txt(tmp_path):
    _segfolder(tmp_path, n=4, mask_id=1)
    (tmp_path / "classes.txt").write_text("background\nroad\ncar\nsky\ntree\n")
    assert build_datasets(f"segfolder:{tmp_path}")[2].num_classes == 5
    (tmp_path / "classes.txt").write_text("background\n")
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_datasets(f"segfolder:{tmp_path}")


def test_segfolder_mask_id_beyond_classes_txt(tmp_path):
    _segfolder(tmp_path, n=4, mask_id=3)
    (tmp_path / "classes.txt").write_text("background\nthing\n")
    train, _, _ = build_datasets(f"segfolder:{tmp_path}")
    with pytest.raises(ValueError, match="holds class id 3 but the dataset has 2 classes"):
        train[0]


def test_segfolder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"segfolder folder '.*missing' does not exist"):
        build_datasets(f"segfolder:{tmp_path / 'missing'}")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match=r"lacks images/ or masks/: put images in"):
        build_datasets(f"segfolder:{tmp_path / 'flat'}")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(ValueError, match=r"images' has no images: add .png/.jpg files"):
        build_datasets(f"segfolder:{tmp_path / 'empty'}")
    _segfolder(tmp_path / "orphans", n=6)
    for i in (1, 2, 4, 5):
        (tmp_path / "orphans" / "masks" / f"img{i}.png").unlink()
    with pytest.raises(ValueError, match=r"4 images have no mask \(img1.png, img2.png, img4.png and 1 more\)"
                                         r": add masks/<stem>.png"):
        build_datasets(f"segfolder:{tmp_path / 'orphans'}")
    _segfolder(tmp_path / "rgbmask", n=3)
    _png(tmp_path / "rgbmask" / "masks" / "img1.png", (1, 1, 1), size=(24, 20))
    with pytest.raises(ValueError, match="has 3 channels: save masks as single-channel PNGs"):
        build_datasets(f"segfolder:{tmp_path / 'rgbmask'}")


# --------------------------------------------------------------------------------------------------
# spec and argument errors, module hygiene


@pytest.mark.parametrize("spec", ["foo", "imagefolder", "segfolder:", "digits:3"])
def test_unknown_spec(spec):
    with pytest.raises(ValueError) as err:
        build_datasets(spec)
    assert str(err.value) == UNKNOWN.replace("'foo'", repr(spec))


def test_argument_errors():
    with pytest.raises(ValueError, match=r"test_fraction 1.0 is out of range: use a value in \(0, 1\)"):
        build_datasets("digits", test_fraction=1.0)
    with pytest.raises(ValueError, match="in_channels 4 is not supported: use 1"):
        build_datasets("digits", in_channels=4)


def test_docstring_examples_hold():
    assert doctest.testmod(datasets).failed == 0
