"""Dataset registry: names -> readers that give a split as uint8 images, by one of two paths.

Resident (`resident.py`, an `ImageSet`): the split is decoded once into a tensor held in memory; the engine's
batched view maker crops from it, so no PIL runs in the loop. Streamed (`stream.py`, a `StreamedSet`): a split
too large for that (ImageNet's 1.28M images) is read from its files a batch at a time and decoded in DataLoader
workers (PIL) or on the training device (nvjpeg on a GPU) onto the same canvas, so the views see the same pixels
either way. `load` picks the path, `feed` is the engine's one way to get batches from either.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.data import resident
from bench.data.resident import ImageSet, ResidentFeed, refuse_unknown_scale
from bench.data.stream import StreamedFeed, StreamedSet
from bench.errors import UserError, read_yaml
from bench.results import write_durably

__all__ = ["ImageSet", "StreamedSet", "feed", "load", "info", "DATASETS"]

# torchvision 0.29 points every decode to TorchCodec, which this project does not use. One filter, installed once:
# `warnings.catch_warnings` around each call would swap the process's filters from the decoding thread.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)
# PIL warns of images over 89 megapixels (camera photos, shrunk to max_side once decoded) each time one is opened;
# past its limit of 179 it refuses them, and so does bench, as unreadable images (--skip-bad leaves them out)
warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")


def feed(data, rows, dev):
    """The engine's one way to its images, resident or streamed alike."""
    return (StreamedFeed if isinstance(data, StreamedSet) else ResidentFeed)(data, rows, dev)


def splits_of(cfg: dict):
    """[(split, decoded size, max_side)] a job reads: a pretraining job its training split, image files whole
    (longer side capped at max_side) and data that is not files at twice the crop size; a fine-tuning job its
    training split whole and its test split at the evaluation resize (256 for 224)."""
    res = cfg["resolution"]
    if cfg["stage"] == "pretrain":
        return [("train", 2 * res, cfg["max_side"])]
    return [("train", store_size(res), cfg["max_side"]), ("test", store_size(res), None)]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: int
    train: int  # the paper's training-split size = N of IDMM's N-way classifier
    test: int
    lister: object = None  # (root, split) -> (files, labels, classes, meta): the official split files, read
    layout: str = ""       # where the files are expected under the data root
    note: str = ""
    reader: object = None  # (root, split, size) -> ImageSet, for data that is not files (digits)
    has_test: bool = True  # pretraining-only sets (SIN-10k) have none


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


# --- listers: the official split files -> (files, labels, classes, meta) ------------------------------------

def _verify_checksums():
    """Flowers102's official files are checked against torchvision's MD5s unless BENCH_VERIFY_CHECKSUMS=0
    (for miniature or modified copies, such as the test fixtures)."""
    return os.environ.get("BENCH_VERIFY_CHECKSUMS", "1") != "0"


def _torchvision(cls_name, parts, layout, **kwargs):
    def lister(root, split):
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        if cls_name == "Flowers102" and not _verify_checksums():
            cls = type("Flowers102Unverified", (cls,), {"_check_integrity": lambda self: self._images_folder.is_dir()})
        files, labels, classes = [], [], None
        for part in parts[split]:
            try:
                ds = cls(str(root), split=part, **kwargs)
            except RuntimeError as e:
                raise UserError(_not_found(cls_name, root, layout)) from e
            except (FileNotFoundError, KeyError) as e:
                raise UserError(f"{cls_name} under {root}: missing or broken split file: {e}") from None
            pairs = ds._samples if hasattr(ds, "_samples") else zip(
                getattr(ds, "_image_files", None) or ds._images, ds._labels)
            for f, label in pairs:
                files.append(Path(f))
                labels.append(int(label))
            classes = list(ds.classes)
        return files, labels, classes, {}
    return lister


def _expand(layout: str) -> list[str]:
    """The paths a layout names: "a/{b/, c}" -> ["a/b/", "a/c"]."""
    head, _, rest = layout.partition("{")
    return [head + part.strip() for part in rest.rstrip("}").split(",")] if rest else [layout]


def _not_found(cls_name, root, layout):
    """Why torchvision found no dataset under `root`: nothing of it there, some of its files missing (named),
    or every path there and a checksum that differs (Flowers102's, the only files torchvision checks)."""
    missing = [p for p in _expand(layout) if not (Path(root) / p).exists()
               or p.endswith("/") and not (Path(root) / p).is_dir()]  # (a folder's name on a file: not there)
    if len(missing) == len(_expand(layout)):
        return f"{cls_name} not found under {root}: expected {layout}"
    if missing:
        return f"{cls_name} under {root} is incomplete: {', '.join(missing)} missing (expected {layout})"
    if cls_name == "Flowers102":
        return (f"{cls_name} under {root}: the files' checksums differ from the official files (set "
                f"BENCH_VERIFY_CHECKSUMS=0 to read a modified copy)")
    return f"{cls_name} under {root} is not as torchvision reads it: expected {layout}"


def _read_lines(path: Path):
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise UserError(f"split file {path} is missing") from None
    except UnicodeDecodeError as e:
        raise UserError(f"split file {path} is damaged: not text (byte {e.start} is not UTF-8)") from None
    except OSError as e:
        raise UserError(f"cannot read split file {path}: {e.strerror}") from None


def _indoor67(root, split):
    base = Path(root) / "indoor67"
    lines = _read_lines(base / {"train": "TrainImages.txt", "test": "TestImages.txt"}[split])
    classes = sorted({line.split("/")[0] for line in _read_lines(base / "TrainImages.txt")})
    index = {c: i for i, c in enumerate(classes)}
    return [base / "Images" / line for line in lines], [index[line.split("/")[0]] for line in lines], classes, {}


def _cub(root, split):
    base = Path(root) / "CUB_200_2011"
    images = dict(line.split(" ", 1) for line in _read_lines(base / "images.txt"))
    labels = dict(line.split() for line in _read_lines(base / "image_class_labels.txt"))
    is_train = dict(line.split() for line in _read_lines(base / "train_test_split.txt"))
    classes = [line.split(" ", 1)[1] for line in _read_lines(base / "classes.txt")]
    want = "1" if split == "train" else "0"
    ids = [i for i in images if is_train[i] == want]
    return [base / "images" / images[i] for i in ids], [int(labels[i]) - 1 for i in ids], classes, {}


def _image_folder(split_dir: Path):
    """torchvision's ImageFolder layout: each folder of `split_dir` a class, its images at any depth below it;
    hidden files and folders (.ipynb_checkpoints, macOS's ._name twins) are not images or classes."""
    if not split_dir.is_dir():
        raise UserError(f"{split_dir} is missing: expected <class>/ folders of images there")
    entries = sorted(p for p in split_dir.iterdir() if not p.name.startswith("."))
    broken = [p for p in entries if p.is_symlink() and not p.exists()]
    if broken:  # else a class would vanish without a word (an unmounted disk)
        raise UserError(f"{broken[0]} links to {os.readlink(broken[0])}, which is not there")
    classes = [p.name for p in entries if p.is_dir()]
    if not classes:
        loose = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in entries)
        raise UserError(f"{split_dir} has no <class>/ folders" + (": its images lie in it directly; put each class's "
                                                                  "in a folder of its own" if loose else ""))
    files = []
    for c, name in enumerate(classes):
        seen = {os.path.realpath(split_dir / name)}  # a link back up (or twice to one folder): walked once, not forever
        for top, dirs, names in os.walk(split_dir / name, onerror=_cannot_list, followlinks=True):
            dirs[:] = [d for d in sorted(dirs) if not d.startswith(".") and os.path.realpath(Path(top) / d) not in seen]
            seen.update(os.path.realpath(Path(top) / d) for d in dirs)
            files += [(Path(top) / f, c) for f in sorted(names)
                      if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    empty = sorted(set(classes) - {classes[c] for _, c in files})
    if empty:  # a class no image stands for would still get an output of the head, and count in the test
        raise UserError(f"{split_dir / empty[0]} holds no images ({' '.join(sorted(IMAGE_EXTENSIONS))})"
                        + (f", nor do {len(empty) - 1} other class folders" if len(empty) > 1 else ""))
    return [f for f, _ in files], [c for _, c in files], classes, {}


def _cannot_list(e: OSError):
    """os.walk's default passes over a folder it cannot list: a class's images there would be left out unsaid."""
    raise UserError(f"cannot list {e.filename} ({e.strerror})")


def _folder(root, split):
    """Any folder laid out as DIR/train/<class>/* and DIR/test/<class>/*."""
    return _image_folder(Path(root) / split)


def _imagenet(root, split):
    where = Path(root) / "imagenet" / {"train": "train", "test": "val"}[split]
    if not where.is_dir():
        raise UserError(f"{where} is missing: expected <wnid>/ folders of JPEGs there (the data root is --data-root "
                        f"or $BENCH_DATA_ROOT, default ~/data)")
    try:
        return _image_folder(where)
    except UserError as e:
        if split == "test" and "no <class>/ folders" in str(e):  # the official archive's val/ is flat
            raise UserError(f"{e} (ImageNet's val/ as its archive has it: sort it into val/<wnid>/ by the official "
                            f"validation ground truth)") from None
        raise


SIN10K_LIST = "sin10k/files.txt"


def _sin10k(root, split):
    if split != "train":
        raise UserError("sin10k is a pretraining set: it has no test split")
    path = Path(root) / SIN10K_LIST
    if not path.is_file():
        raise UserError(f"{path} is missing: make it with `bench data make-sin10k --imagenet DIR --seed 0`")
    header, *lines = _read_lines(path) or [""]
    # values may hold spaces (an ImageNet path): each runs up to the next ` key=`
    meta = dict(re.findall(r"(\w+)=(.*?)(?=\s+\w+=|$)", header)) if header.startswith("#") else {}
    why = "no '# imagenet=DIR ...' first line" if "imagenet" not in meta else "no images listed" if not lines else ""
    if why:
        raise UserError(f"{path} is damaged ({why}): make it again with "
                        f"`bench data make-sin10k --imagenet DIR --seed 0`")
    classes = sorted({line.split("/")[0] for line in lines})
    index = {c: i for i, c in enumerate(classes)}
    files = [Path(meta["imagenet"]) / "train" / line for line in lines]
    return files, [index[line.split("/")[0]] for line in lines], classes, {**meta, "list_sha256": _digest(path)}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def list_digest(spec: str, root=None) -> str | None:
    """The digest of the list of files a dataset reads, where one list names them (SIN-10k's), as its records
    keep it (`list_sha256`); None where there is none, or it is not there."""
    path = Path(_root_for(spec, root)) / SIN10K_LIST
    return _digest(path) if info(spec).lister is _sin10k and path.is_file() else None


def make_sin10k(imagenet: Path, root: Path, seed: int, per_class: int = 10) -> Path:
    """Pick `per_class` images of every ImageNet-1k training class with a seeded RNG; write the list."""
    train = Path(imagenet).expanduser() / "train"
    if not train.is_dir():
        raise UserError(f"{train} is missing: --imagenet should hold train/<wnid>/*.JPEG")
    rng = random.Random(seed)
    lines = []
    try:
        # hidden ones are not classes or images, as when the imagenet table reads the folder (macOS's ._name twins)
        for wnid in sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(f.name for f in (train / wnid).iterdir()
                           if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."))
            if len(files) < per_class:
                raise UserError(f"{train / wnid} has {len(files)} images, fewer than {per_class}")
            lines += [f"{wnid}/{name}" for name in rng.sample(files, per_class)]
    except OSError as e:
        raise UserError(f"cannot read {e.filename}: {e.strerror}") from None
    if not lines:
        raise UserError(f"{train} holds no class folders: --imagenet should hold train/<wnid>/*.JPEG")
    out = Path(root).expanduser() / SIN10K_LIST
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # whole or not at all: a write cut short would leave a list that silently names fewer images
        write_durably(out, f"# imagenet={train.parent.resolve()} seed={seed} per_class={per_class}\n"
                      + "\n".join(lines) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror} (--data-root should be a writable folder)") from None
    return out


# torchvision ImageFolder's, and GIF
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _tv(name, classes, train, test, cls_name, parts, layout, note, **kwargs):
    return DatasetInfo(name, classes, train, test, _torchvision(cls_name, parts, layout, **kwargs), layout, note)


DATASETS = {d.name: d for d in [
    DatasetInfo("digits", 10, 807, 540, note="embedded: scikit-learn load_digits, stratified split, seed 0",
                reader=_digits),
    DatasetInfo("digits_extra", 10, 450, 0, note="embedded: 450 other digits, the demo's stand-in for SIN-10k",
                reader=functools.partial(_digits, extra=True), has_test=False),
    _tv("flowers102", 102, 2040, 6149, "Flowers102", {"train": ["train", "val"], "test": ["test"]},
        "flowers-102/{jpg/, imagelabels.mat, setid.mat}", "Oxford Flowers102, train + val"),
    _tv("pets", 37, 3680, 3669, "OxfordIIITPet", {"train": ["trainval"], "test": ["test"]},
        "oxford-iiit-pet/{images/, annotations/trainval.txt, annotations/test.txt}", "Oxford-IIIT Pets, trainval"),
    _tv("dtd", 47, 3760, 1880, "DTD", {"train": ["train", "val"], "test": ["test"]},
        "dtd/dtd/{images/, labels/train1.txt, labels/val1.txt, labels/test1.txt}", "DTD split 1, train + val",
        partition=1),
    DatasetInfo("indoor67", 67, 5360, 1340, _indoor67, "indoor67/{Images/, TrainImages.txt, TestImages.txt}",
                "MIT Indoor67, TrainImages.txt / TestImages.txt"),
    DatasetInfo("cub200", 200, 5994, 5794, _cub, "CUB_200_2011/{images/, images.txt, image_class_labels.txt, "
                "train_test_split.txt, classes.txt}", "CUB-200-2011, train_test_split.txt"),
    _tv("aircraft", 100, 6667, 3333, "FGVCAircraft", {"train": ["trainval"], "test": ["test"]},
        "fgvc-aircraft-2013b/data/{images/, variants.txt, images_variant_trainval.txt, images_variant_test.txt}",
        "FGVC-Aircraft variants, trainval", annotation_level="variant"),
    _tv("cars", 196, 8144, 8041, "StanfordCars", {"train": ["train"], "test": ["test"]},
        "stanford_cars/{cars_train/, cars_test/, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat}",
        "Stanford Cars"),
    DatasetInfo("sin10k", 1000, 10000, 0, _sin10k, SIN10K_LIST + " (bench data make-sin10k)",
                "10 images per ImageNet-1k class", has_test=False),
    DatasetInfo("imagenet", 1000, 1281167, 50000, _imagenet, "imagenet/{train,val}/<wnid>/", "ImageNet-1k train / val"),
]}

DOWNLOADS = {  # torchvision's downloaders; the others print where the official files are
    "flowers102": "Flowers102", "pets": "OxfordIIITPet", "dtd": "DTD", "aircraft": "FGVCAircraft",
}
OFFICIAL = {
    "indoor67": "https://web.mit.edu/torralba/www/indoor.html (indoorCVPR_09.tar, TrainImages.txt, TestImages.txt)",
    "cub200": "https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz)",
    "cars": "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (mirrors: torchvision's StanfordCars docs)",
    "sin10k": "made from ImageNet: bench data make-sin10k --imagenet DIR --seed 0",
    "imagenet": "https://image-net.org/download (ILSVRC2012 train and val, val sorted into <wnid>/ folders)",
}


def user_datasets_file() -> Path:
    return Path(os.environ.get("BENCH_DATASETS", "~/.config/bench/datasets.yaml")).expanduser()


def user_datasets() -> dict:
    """Names a user gave their own image folders: a YAML map `name: /path/with/train/and/test`."""
    path = user_datasets_file()
    if path.is_dir():
        raise UserError(f"{path}: a folder, where the file naming your own datasets belongs ($BENCH_DATASETS)")
    if not path.is_file():
        return {}
    entries = read_yaml(path, "it should map dataset names to folders") or {}
    if not isinstance(entries, dict):
        raise UserError(f"{path} should map dataset names to folders")
    for k, v in entries.items():
        if not isinstance(v, str) or not v.strip():
            raise UserError(f"{path}: {k}: expected a folder, got {v!r}")
        if str(k).startswith("folder:"):  # `folder:DIR` is read as the path it names, never as this name
            raise UserError(f"{path}: {k}: a name may not start with 'folder:'")
        if str(k) in DATASETS:  # the registry's own would win, and the folder never be read
            raise UserError(f"{path}: {k}: the name of one of bench's datasets; give the folder another")
    return {str(k): str(Path(str(v)).expanduser()) for k, v in entries.items()}


def info(spec: str) -> DatasetInfo:
    """The registry entry of a dataset spec: a registered name, a name from the user's file, or `folder:DIR`."""
    if spec.startswith("folder:"):
        return DatasetInfo(spec, 0, 0, 0, _folder, "train/<class>/, test/<class>/", "image folder")
    if spec in DATASETS:
        return DATASETS[spec]
    mine = user_datasets()
    if spec in mine:
        return DatasetInfo(spec, 0, 0, 0, lambda root, split, path=mine[spec]: _folder(path, split),
                           f"{mine[spec]}/{{train,test}}/<class>/", f"image folder named in {user_datasets_file()}")
    raise UserError(f"unknown dataset '{spec}': choose from {', '.join([*DATASETS, *mine])}, folder:DIR, "
                    f"or name a folder in {user_datasets_file()}")


def data_root(explicit=None) -> Path:
    return Path(explicit or os.environ.get("BENCH_DATA_ROOT", "~/data")).expanduser()


def store_size(resolution: int) -> int:
    """Decoded side length: the eval resize of the largest resolution a job needs (256 for 224)."""
    return math.ceil(resolution * 8 / 7)


def canonical(spec: str) -> str:
    """`folder:DIR` with DIR absolute and normalised (~ expanded, no trailing /): one folder is one column and one
    set of jobs (their hashes hold it), whichever directory it was named from; other specs as they are."""
    if not spec.startswith("folder:"):
        return spec
    if not spec[len("folder:"):]:
        raise UserError("folder: names no folder (folder:DIR)")
    return "folder:" + os.path.abspath(os.path.expanduser(spec[len("folder:"):]))


def _root_for(spec, root):
    return canonical(spec)[len("folder:"):] if spec.startswith("folder:") else str(data_root(root))


def check_listing(spec: str, root=None):
    """{split: the lister's (files, labels, classes, ...)} of a dataset of files, listed but no image opened; a
    UserError when it cannot be listed, when its train and test splits name different classes, or when it has
    fewer than two (a top-1 of 100% by construction)."""
    d = info(spec)
    listed = {split: d.lister(_root_for(spec, root), split) for split in (("train", "test") if d.has_test
                                                                          else ("train",))}
    if d.has_test and listed["train"][2] != listed["test"][2]:
        train, test = set(listed["train"][2]), set(listed["test"][2])
        # ascii(): names that differ by a trailing space, their Unicode form or a newline show how they differ
        show = lambda names: ", ".join(map(ascii, sorted(names)[:5])) or "-"  # noqa: E731
        raise UserError(f"{spec}: train and test have different classes (only in train: {show(train - test)}; "
                        f"only in test: {show(test - train)})")
    if len(listed["train"][2]) < 2:  # a top-1 of 100% by construction
        raise UserError(f"{spec}: {len(listed['train'][2])} class; a classification needs at least 2")
    return listed


def check_available(spec: str, root=None, skip_bad=False, cache_dir=None, open_all=None, listed=None):
    """Fail before any training when a dataset a plan needs cannot be found (its split files are read), or when
    its train and test splits name different classes; when one of its images is unreadable (unless skip_bad) or
    has pixels of no known scale. Images are opened (`open_all`, by default for a user's folder alone, which no
    official split file vouches for) by a thread per core; with `cache_dir`, a split whose every file opened is
    remembered there by its files' names, sizes and times, and not opened again (ImageNet's 1.28M would take
    half an hour on one core before every run). `listed`: check_listing's result, where the caller has it."""
    d = info(spec)
    if d.lister is None:
        return
    listed = listed or check_listing(spec, root)
    if not (open_all if open_all is not None else not d.train):
        return
    for split, (files, labels, classes, _) in listed.items():
        key = [(str(f), *resident.file_stat(f)) for f in files]
        memo = Path(cache_dir) / f"opened-{hashlib.sha256(repr(key).encode()).hexdigest()[:16]}" if cache_dir else None
        if memo is not None and memo.is_file():
            continue
        errors = resident.in_threads(_open_error, files)
        bad = [(f, e) for f, e in zip(files, errors) if e is not None]
        if bad and not skip_bad:
            raise UserError(f"{bad[0][1]} (bench run --skip-bad leaves such files out"
                            + (f"; {len(bad) - 1} other files are unreadable too)" if len(bad) > 1 else ")"))
        resident.refuse_a_lost_class(spec, split, classes, labels,
                                     [label for label, e in zip(labels, errors) if e is None], len(bad))
        if memo is not None and not bad:
            with contextlib.suppress(OSError):  # a memo saves time only: a results folder it cannot write is no error
                memo.parent.mkdir(parents=True, exist_ok=True)
                memo.touch()


def _open_error(f):
    """Why the image file `f` cannot be decoded in a faithful mode, or None."""
    from PIL import Image

    try:
        with Image.open(f) as im:
            refuse_unknown_scale(im.mode, f)
            # a JPEG decoded at 1/8 scale: every byte of the file read, an eighth of the work
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        return None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, UserError) as e:
        return str(e) if isinstance(e, UserError) else f"cannot read image {f}: {e}"


def split_files(spec: str, split: str, root=None):
    d = info(spec)
    if d.lister is None:
        raise UserError(f"dataset '{spec}' is not made of files")
    return d.lister(_root_for(spec, root), split)


def resident_bytes(n: int, size: int, max_side: int | None) -> int:
    """What a split of n files takes decoded and resident, at most: the canvas (max_side square per image) or
    the test split's centre squares."""
    return n * 3 * (max_side or size) ** 2


def data_path(n: int, size: int, max_side: int | None, stream="auto", memory_gb: float = 32.0) -> str:
    """resident or streamed: streamed when asked, or (auto) when the decoded split would exceed the budget."""
    if stream is True or stream == "auto" and resident_bytes(n, size, max_side) > memory_gb * 2 ** 30:
        return "streamed"
    return "resident"


def planned_path(spec: str, split: str, size: int, max_side: int | None, data_opts: dict, counts=None):
    """(path, resident estimate in bytes or None) of a split before anything is read: from its files where they
    are there (as the run will count them: a miniature ImageNet is resident), else from the registry's split
    size; data that is not files is always resident."""
    d = info(spec)
    if d.reader is not None:
        return "resident", None
    counts = {} if counts is None else counts  # {(spec, split): files}: ImageNet's 1.28M are listed once a command
    try:
        if (spec, split) not in counts:
            counts[spec, split] = len(split_files(spec, split, data_opts.get("root"))[0])
        n = counts[spec, split]
    except UserError:
        n = d.train if split == "train" else d.test
        if not n:
            return "?", None
    return (data_path(n, size, max_side, data_opts.get("stream", "auto"), data_opts.get("memory_gb", 32.0)),
            resident_bytes(n, size, max_side))


def _workers(workers):
    """data.workers, or half the CPUs this process may run on (a SLURM job's allocation, not the node's)."""
    return workers if workers is not None else min(8, max(1, resident.usable_cpus() // 2))


def load(spec: str, split: str, size: int, root: str | None = None, skip_bad: bool = False,
         cache_dir: str | None = None, max_side: int | None = None, stream="auto", memory_gb: float = 32.0,
         workers: int | None = None, decode: str = "auto"):
    """One split: resident (an ImageSet, decoded once; with `cache_dir`, kept in a file for later jobs) or, when
    `data_path` says so, streamed (a StreamedSet that reads a batch at a time in `workers` processes and decodes
    it there with PIL or, `decode`: device, or auto on a GPU, on the training device).

    With max_side (training splits): every image whole, aspect ratio kept, longer side at most max_side, on a
    canvas with their sizes. Without (test splits): uint8 [N, 3, size, size] centre squares. Data that is not
    files (digits) is resident and square at `size` either way."""
    if max_side and info(spec).reader is None:  # whole images: the stage's size plays no part (one split, not three)
        size = 0
    return _load(spec, split, size, root, skip_bad, cache_dir, max_side, stream, memory_gb, workers, decode)


@functools.lru_cache(maxsize=8)
def _load(spec, split, size, root, skip_bad, cache_dir, max_side, stream, memory_gb, workers, decode):
    d = info(spec)
    if d.reader is not None:
        return d.reader(root, split, size)
    files, labels, classes, meta = d.lister(_root_for(spec, root), split)
    how = {"stream": stream, "memory_gb": memory_gb, "decode": decode,  # how it was read, beside what was read
           "resident_gb_estimate": round(resident_bytes(len(files), size, max_side) / 2 ** 30, 3)}
    meta = {**meta, **how}
    if data_path(len(files), size, max_side, stream, memory_gb) == "streamed":
        meta.update(files=len(files), path="streamed", **({"max_side": max_side} if max_side else {}))
        return StreamedSet(files, torch.tensor(labels), classes, spec, meta, size, max_side, skip_bad,
                           _workers(workers), decode)
    return resident.load(spec, split, (files, labels, classes, meta), size, skip_bad, cache_dir, max_side, how)
