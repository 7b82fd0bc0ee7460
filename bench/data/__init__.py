"""Dataset registry: names -> readers that decode a split once into a uint8 tensor held in memory.

Every reader returns an `ImageSet`; the engine's batched view maker crops from it, so no PIL runs in the loop.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import UserError


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # int64 [N]; for pretraining the instance index is the row number
    classes: list
    name: str

    def __len__(self):
        return len(self.labels)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: int
    train: int  # the paper's training-split size = N of IDMM's N-way classifier
    test: int
    reader: object = None  # (root, split, size) -> ImageSet; None: no reader yet
    note: str = ""


def _digits(root, split, size, extra=False):
    """scikit-learn's 1,797 8x8 digits upscaled to `size` px, grey -> RGB, in three fixed stratified parts:
    test (30%, 540), `digits_extra` (450, the demo's stand-in for SIN-10k) and train (the other 807)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx = np.arange(len(d.target))
    rest, test_idx = train_test_split(idx, test_size=0.3, stratify=d.target, random_state=0)
    train_idx, extra_idx = train_test_split(rest, test_size=450, stratify=d.target[rest], random_state=0)
    if extra and split != "train":
        raise UserError("digits_extra is a pretraining set: it has no test split")
    pick = np.sort(extra_idx if extra else train_idx if split == "train" else test_idx)
    x = torch.from_numpy(d.images[pick]).float().div(16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return ImageSet(x, torch.from_numpy(d.target[pick]).long(), [str(i) for i in range(10)],
                    "digits_extra" if extra else "digits")


def _decode(path: Path, size: int) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = size / min(w, h)  # shorter side -> size, then centre square
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _folder(root, split, size):
    """Any folder laid out as DIR/train/<class>/* and DIR/test/<class>/*."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise UserError(f"{split_dir} is missing: a folder dataset needs {root}/train/<class>/ and {root}/test/<class>/")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    files = [(f, c) for c, name in enumerate(classes)
             for f in sorted((split_dir / name).iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise UserError(f"no images under {split_dir}/<class>/")
    images = torch.stack([_decode(f, size) for f, _ in files])
    return ImageSet(images, torch.tensor([c for _, c in files]), classes, f"folder:{root}")


DATASETS = {d.name: d for d in [
    DatasetInfo("digits", 10, 807, 540, _digits, "embedded: scikit-learn load_digits, stratified split, seed 0"),
    DatasetInfo("digits_extra", 10, 450, 0, functools.partial(_digits, extra=True),
                "embedded: 450 other digits, the demo's stand-in for SIN-10k"),
    DatasetInfo("flowers102", 102, 2040, 6149, note="Oxford Flowers102, train + val"),
    DatasetInfo("pets", 37, 3680, 3669, note="Oxford-IIIT Pets, trainval"),
    DatasetInfo("dtd", 47, 3760, 1880, note="DTD split 1, train + val"),
    DatasetInfo("indoor67", 67, 5360, 1340, note="MIT Indoor67, TrainImages.txt / TestImages.txt"),
    DatasetInfo("cub200", 200, 5994, 5794, note="CUB-200-2011, train_test_split.txt"),
    DatasetInfo("aircraft", 100, 6667, 3333, note="FGVC-Aircraft variants, trainval"),
    DatasetInfo("cars", 196, 8144, 8041, note="Stanford Cars"),
    DatasetInfo("sin10k", 1000, 10000, 0, note="10 images per ImageNet-1k class"),
    DatasetInfo("imagenet", 1000, 1281167, 50000, note="ImageNet-1k train / val"),
]}


def info(spec: str) -> DatasetInfo:
    """The registry entry of a dataset spec: a registered name or `folder:DIR`."""
    if spec.startswith("folder:"):
        return DatasetInfo(spec, 0, 0, 0, _folder, "image folder")
    if spec not in DATASETS:
        raise UserError(f"unknown dataset '{spec}': choose from {', '.join(DATASETS)} or folder:DIR")
    return DATASETS[spec]


def data_root(explicit=None) -> Path:
    return Path(explicit or os.environ.get("BENCH_DATA_ROOT", "~/data")).expanduser()


def store_size(resolution: int) -> int:
    """Decoded side length: the eval resize of the largest resolution a job needs (256 for 224)."""
    return math.ceil(resolution * 8 / 7)


def check_available(spec: str, root=None):
    """Fail before any training when a dataset a plan needs cannot be read (a missing folder, no reader)."""
    d = info(spec)
    if spec.startswith("folder:"):
        for split in ("train", "test"):
            if not (Path(spec[len("folder:"):]) / split).is_dir():
                raise UserError(f"{spec}: {Path(spec[len('folder:'):]) / split} is missing "
                                f"(a folder dataset needs train/<class>/ and test/<class>/)")
    elif d.reader is None:
        raise UserError(f"dataset '{spec}' has no reader in this version of bench")


@functools.lru_cache(maxsize=8)
def load(spec: str, split: str, size: int, root: str | None = None) -> ImageSet:
    d = info(spec)
    if d.reader is None:
        raise UserError(f"dataset '{spec}' has no reader in this version of bench")
    where = spec[len("folder:"):] if spec.startswith("folder:") else str(data_root(root) / spec)
    return d.reader(where, split, size)
