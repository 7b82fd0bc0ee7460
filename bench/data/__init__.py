"""Dataset registry: names -> readers that give a split as uint8 images, by one of two paths.

Resident (`ImageSet`): the split is decoded once into a tensor held in memory; the engine's batched view maker
crops from it, so no PIL runs in the loop. Streamed (`StreamedSet`): a split too large for that (ImageNet's
1.28M images) is read from its files a batch at a time in DataLoader workers and decoded there (PIL) or on the
training device (torchvision: nvjpeg on a GPU) onto the same canvas, so the views see the same pixels either
way. `feed` is the engine's one way to get batches from either.

A training split keeps each image whole, with its aspect ratio (the longer side capped at `max_side`), in the
top-left corner of a shared canvas, its size beside it: random crops are cut from the real image region, as
the official loaders cut them from the decoded file. A test split is decoded to the centre square the
evaluation resize would see (shorter side `size`, 256 for 224).
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import queue
import random
import re
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.data.views import to_device
from bench.errors import UserError, read_yaml
from bench.results import aside, write_durably

# torchvision 0.29 points every decode to TorchCodec, which this project does not use. One filter, installed once:
# `warnings.catch_warnings` around each call would swap the process's filters from the decoding thread.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]; for pretraining the instance index is the row number
    classes: list
    name: str
    meta: dict = field(default_factory=dict)  # what a result should record about the data (skipped files, ...)
    sizes: torch.Tensor | None = None  # int64 [N, 2]: (height, width) of each image, top-left; None: all H x W

    def __len__(self):
        return len(self.labels)


@dataclass
class StreamedSet:
    """A split read from its files a batch at a time (see `feed`): what `load` returns when the decoded split
    would not fit the memory budget, or when streaming is asked for. Its JPEGs are decoded by PIL in the
    DataLoader workers, or (`decoder`: device, or auto on a GPU) read there and decoded on the training device
    by torchvision (nvjpeg on a GPU), a batch per call."""
    files: list
    labels: torch.Tensor
    classes: list
    name: str
    meta: dict
    size: int
    max_side: int | None
    skip_bad: bool = False
    workers: int = 1
    decoder: str = "auto"

    def __len__(self):
        return len(self.labels)

    def on_device(self, dev) -> bool:
        return self.decoder == "device" or self.decoder == "auto" and dev.type == "cuda"

    def _each(self, keys, one):
        """[(key, one(key))] of the keys whose file reads; with skip_bad an unreadable file is left out of its
        batch (and named on stderr)."""
        out = []
        for k in keys:
            try:
                out.append((k, one(k)))
            except UserError as e:
                if not self.skip_bad:
                    raise
                print(f"bench: skipped: {e}", file=sys.stderr)
        if not out:
            raise UserError(f"{self.name}: no readable image in a batch of {len(keys)}")
        return out

    def _batch(self, pairs):
        """(uint8 images, sizes or None, the rows) as the resident path holds them, from [(row, image)]."""
        rows, decoded = zip(*pairs)
        images, sizes = _canvas(decoded) if self.max_side else (torch.stack(decoded), None)
        return images, sizes, torch.tensor(rows)

    def _pil(self, i):
        return _decode(self.files[i], self.size, self.max_side)

    def decode(self, indices: torch.Tensor):
        """These rows decoded with PIL: (uint8 images, sizes or None, the rows decoded)."""
        return self._batch(self._each(indices.tolist(), self._pil))

    def read(self, indices: torch.Tensor):
        """These rows for `decode_on`, in few tensors (a worker hands each tensor over through its own shared
        memory, which costs more than decoding a small JPEG): (every JPEG's bytes in one uint8 tensor, each row's
        byte count or -1 where it is not a JPEG, those other files' images decoded with PIL, the rows read)."""
        def one(i):
            try:
                raw = Path(self.files[i]).read_bytes()
            except OSError as e:
                raise UserError(f"cannot read image {self.files[i]}: {e.strerror}") from None
            return raw if raw[:3] == b"\xff\xd8\xff" else self._pil(i)
        rows, items = zip(*self._each(indices.tolist(), one))
        jpegs = b"".join(x for x in items if isinstance(x, bytes))
        blob = torch.frombuffer(bytearray(jpegs), dtype=torch.uint8) if jpegs else torch.empty(0, dtype=torch.uint8)
        lengths = torch.tensor([len(x) if isinstance(x, bytes) else -1 for x in items])
        return blob, lengths, [x for x in items if not isinstance(x, bytes)], torch.tensor(rows)

    def decode_on(self, dev, blob, lengths, others, rows):
        """`decode`'s batch from `read`'s, its JPEGs decoded on `dev` in one call and shaped there; a file that
        decoder refuses (a broken one, a CMYK one on a GPU) goes through PIL, which decodes or names it."""
        counts = lengths.tolist()
        ends = lengths.clamp(min=0).cumsum(0).tolist()
        jpegs = [k for k, n in enumerate(counts) if n >= 0]
        on_dev = dict(zip(jpegs, _decode_jpegs([blob[ends[k] - counts[k]:ends[k]] for k in jpegs], dev)))
        by_pil = dict(zip((k for k, n in enumerate(counts) if n < 0), others))  # decoded in the worker

        def one(k):
            if k in by_pil:
                return by_pil[k].to(dev)
            if on_dev[k] is None:
                return self._pil(int(rows[k])).to(dev)
            return _shape_tensor(on_dev[k], self.size, self.max_side)
        images, sizes, kept = self._batch(self._each(range(len(counts)), one))
        return images, sizes, rows[kept]


def _decode_jpegs(data, dev):
    """uint8 [3, h, w] of each JPEG's bytes, decoded on `dev` in one batched call (nvjpeg on a GPU); None for
    each one the decoder refuses."""
    if not data:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=dev))
    except RuntimeError:  # the batch fails as a whole: find the culprits one by one
        out = []
        for d in data:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=dev))
            except RuntimeError:
                out.append(None)
        return out


class _Batches(torch.utils.data.Dataset):
    """The batches of a streamed epoch as a map-style dataset: item i is batch i, decoded (or, to be decoded on
    the device, read) in a worker."""

    def __init__(self, data: StreamedSet, chunks, encoded=False):
        self.data, self.chunks, self.encoded = data, chunks, encoded

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        return (self.data.read if self.encoded else self.data.decode)(self.chunks[i])


class _ResidentFeed:
    """Batches from a split held in memory: `epoch` yields (indices in the whole split, images, sizes or None)
    for the steps start..steps-1 of a permutation of this rank's rows; `in_order` walks the split once in order
    (evaluation), moving one batch at a time to the device."""

    def __init__(self, data: ImageSet, rows, dev):
        self.data, self.dev, self.rows = data, dev, rows.cpu()

    @functools.cached_property
    def shard(self):
        """This rank's images, sizes and row numbers on the device, moved once for the whole training."""
        d, whole = self.data, len(self.rows) == len(self.data)
        return ((d.images if whole else d.images[self.rows]).to(self.dev),
                None if d.sizes is None else (d.sizes if whole else d.sizes[self.rows]).to(self.dev),
                self.rows.to(self.dev))

    def epoch(self, perm, start, steps, bs):
        images, sizes, rows = self.shard
        for s in range(start, steps):
            local = perm[s * bs:(s + 1) * bs]
            yield rows[local], images[local], None if sizes is None else sizes[local]

    def in_order(self, bs):
        for i in range(0, len(self.rows), bs):
            c = self.rows[i:i + bs]
            yield c.to(self.dev), self.data.images[c].to(self.dev)


class _StreamedFeed(_ResidentFeed):
    """The same batches, each decoded from its files in a DataLoader worker, in the permutation's order: a
    resumed epoch reads exactly the images it had not yet read."""

    def _stream(self, chunks):
        on_device = self.data.on_device(self.dev)
        workers = self.data.workers
        self.data.meta["decoder"] = (f"torchvision on {self.dev}" if on_device  # the record says what decoded it
                                     else f"PIL in {workers} worker process{'es' * (workers > 1)}" if workers
                                     else "PIL")
        pin = self.dev.type == "cuda" and not on_device  # (the device path's images are there already)
        # its own generator: a DataLoader draws its workers' seeds from the global RNG otherwise, and the crops
        # drawn after a mid-epoch resume would differ from those of an uninterrupted run
        loader = torch.utils.data.DataLoader(_Batches(self.data, chunks, encoded=on_device), batch_size=None,
                                             shuffle=False, num_workers=workers, pin_memory=pin,
                                             prefetch_factor=4 if workers else None,
                                             generator=torch.Generator().manual_seed(0))
        batches = _decoded_ahead(lambda b: self.data.decode_on(self.dev, *b), loader, self.dev) if on_device \
            else loader
        for images, sizes, idx in batches:
            yield (to_device(idx, self.dev), to_device(images, self.dev),
                   None if sizes is None else to_device(sizes, self.dev))

    def epoch(self, perm, start, steps, bs):
        perm = perm.cpu()
        yield from self._stream([self.rows[perm[s * bs:(s + 1) * bs]] for s in range(start, steps)])

    def in_order(self, bs):
        for idx, images, _ in self._stream([self.rows[i:i + bs] for i in range(0, len(self.rows), bs)]):
            yield idx, images


def _decoded_ahead(decode, batches, dev, depth=2):
    """decode(batch) of each of `batches`, in a thread of its own, up to `depth` batches ahead of the consumer.

    A GPU's JPEG decode blocks its caller until it is done (torchvision synchronises the decoder's stream): in the
    training thread it would keep the next step's kernels from being queued while it runs. On a GPU the thread
    works on a side stream, finished before each decode (the decoder writes from a stream of its own, not ordered
    after the kernels that last used the memory the allocator hands it), and the consumer's stream waits for the
    batch's event; the images are marked as used there, so the side stream's allocator does not reuse them early."""
    side = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    out, stop = queue.Queue(maxsize=depth), threading.Event()

    def put(item):  # False once the consumer has gone
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            if side is not None:  # a thread starts on GPU 0: without this, a job on another GPU makes a context there
                torch.cuda.set_device(side.device)
            for batch in batches:
                if side is None:
                    item = (decode(batch), None)
                else:
                    side.synchronize()
                    with torch.cuda.stream(side):
                        item = (decode(batch), side.record_event())
                if not put(item):
                    return
            put(None)
        except BaseException as e:  # raised again in the consumer's thread, as it would have been there
            put(e)

    thread = threading.Thread(target=work, name="bench-decode", daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            result, ready = item
            if ready is not None:
                stream = torch.cuda.current_stream(dev)
                stream.wait_event(ready)
                for t in result:
                    if isinstance(t, torch.Tensor) and t.is_cuda:
                        t.record_stream(stream)
            yield result
    finally:  # the consumer is done or gone (an error, a stop): the thread ends at its next batch
        stop.set()
        thread.join()


def feed(data, rows, dev):
    """The engine's one way to its images, resident or streamed alike."""
    return (_StreamedFeed if isinstance(data, StreamedSet) else _ResidentFeed)(data, rows, dev)


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
                hint = " (or their checksums differ from the official files)" if cls_name == "Flowers102" else ""
                raise UserError(f"{cls_name} not found under {root}: expected {layout}{hint}") from e
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
    if not split_dir.is_dir():
        raise UserError(f"{split_dir} is missing: expected <class>/ folders of images there")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    files = [(f, c) for c, name in enumerate(classes)
             for f in sorted((split_dir / name).iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise UserError(f"no images under {split_dir}/<class>/")
    return [f for f, _ in files], [c for _, c in files], classes, {}


def _folder(root, split):
    """Any folder laid out as DIR/train/<class>/* and DIR/test/<class>/*."""
    return _image_folder(Path(root) / split)


def _imagenet(root, split):
    return _image_folder(Path(root) / "imagenet" / {"train": "train", "test": "val"}[split])


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
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return files, [index[line.split("/")[0]] for line in lines], classes, {**meta, "list_sha256": digest}


def make_sin10k(imagenet: Path, root: Path, seed: int, per_class: int = 10) -> Path:
    """Pick `per_class` images of every ImageNet-1k training class with a seeded RNG; write the list."""
    train = Path(imagenet).expanduser() / "train"
    if not train.is_dir():
        raise UserError(f"{train} is missing: --imagenet should hold train/<wnid>/*.JPEG")
    rng = random.Random(seed)
    lines = []
    try:
        for wnid in sorted(p.name for p in train.iterdir() if p.is_dir()):
            files = sorted(f.name for f in (train / wnid).iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
            if len(files) < per_class:
                raise UserError(f"{train / wnid} has {len(files)} images, fewer than {per_class}")
            lines += [f"{wnid}/{name}" for name in rng.sample(files, per_class)]
    except OSError as e:
        raise UserError(f"cannot read {e.filename}: {e.strerror}") from None
    out = Path(root).expanduser() / SIN10K_LIST
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # whole or not at all: a write cut short would leave a list that silently names fewer images
        write_durably(out, f"# imagenet={train.parent.resolve()} seed={seed} per_class={per_class}\n"
                      + "\n".join(lines) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror} (--data-root should be a writable folder)") from None
    return out


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


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
        "dtd/dtd/{images/, labels/train1.txt, val1.txt, test1.txt}", "DTD split 1, train + val", partition=1),
    DatasetInfo("indoor67", 67, 5360, 1340, _indoor67, "indoor67/{Images/, TrainImages.txt, TestImages.txt}",
                "MIT Indoor67, TrainImages.txt / TestImages.txt"),
    DatasetInfo("cub200", 200, 5994, 5794, _cub, "CUB_200_2011/{images/, images.txt, image_class_labels.txt, "
                "train_test_split.txt, classes.txt}", "CUB-200-2011, train_test_split.txt"),
    _tv("aircraft", 100, 6667, 3333, "FGVCAircraft", {"train": ["trainval"], "test": ["test"]},
        "fgvc-aircraft-2013b/data/{images/, variants.txt, images_variant_trainval.txt, images_variant_test.txt}",
        "FGVC-Aircraft variants, trainval", annotation_level="variant"),
    _tv("cars", 196, 8144, 8041, "StanfordCars", {"train": ["train"], "test": ["test"]},
        "stanford_cars/{cars_train/, cars_test/, devkit/, cars_test_annos_withlabels.mat}", "Stanford Cars"),
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
    if not path.is_file():
        return {}
    entries = read_yaml(path, "it should map dataset names to folders") or {}
    if not isinstance(entries, dict):
        raise UserError(f"{path} should map dataset names to folders")
    for k, v in entries.items():
        if v is None or isinstance(v, (bool, dict, list)):
            raise UserError(f"{path}: {k}: expected a folder, got {v!r}")
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


def _root_for(spec, root):
    return spec[len("folder:"):] if spec.startswith("folder:") else str(data_root(root))


def check_available(spec: str, root=None, skip_bad=False):
    """Fail before any training when a dataset a plan needs cannot be found (its split files are read), or when
    its train and test splits name different classes; a user's folder also when one of its images is unreadable
    (unless skip_bad) or has pixels of no known scale."""
    d = info(spec)
    if d.lister is None:
        return
    listed = {split: d.lister(_root_for(spec, root), split) for split in (("train", "test") if d.has_test
                                                                          else ("train",))}
    if d.has_test and listed["train"][2] != listed["test"][2]:
        train, test = set(listed["train"][2]), set(listed["test"][2])
        raise UserError(f"{spec}: train and test have different classes (only in train: "
                        f"{', '.join(sorted(train - test)[:5]) or '-'}; only in test: "
                        f"{', '.join(sorted(test - train)[:5]) or '-'})")
    if not d.train:  # a user's folder, checked whole before any job: every file decodes, in a faithful mode
        from PIL import Image

        for files, *_ in listed.values():
            for f in files:
                try:
                    with Image.open(f) as im:
                        _refuse_unknown_scale(im.mode, f)
                        # a JPEG decoded at 1/8 scale: every byte of the file read, an eighth of the work
                        im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                        im.load()
                except (OSError, ValueError, SyntaxError) as e:
                    if not skip_bad:
                        raise UserError(f"cannot read image {f}: {e} (--skip-bad leaves such files out)") from None


def split_files(spec: str, split: str, root=None):
    d = info(spec)
    if d.lister is None:
        raise UserError(f"dataset '{spec}' is not made of files")
    return d.lister(_root_for(spec, root), split)


def _geometry(w: int, h: int, size: int, max_side: int | None):
    """(new width, new height, crop box or None) that an image of w x h is resized to and cut by: with max_side,
    the whole image, shrunk only if its longer side exceeds max_side; without, the centre square of side `size`
    after resizing the shorter side to it. Both decoders follow it."""
    if max_side is not None:
        if max(w, h) <= max_side:
            return w, h, None
        s = max_side / max(w, h)
        return max(1, round(w * s)), max(1, round(h * s)), None
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    left, top = (nw - size) // 2, (nh - size) // 2
    return nw, nh, (left, top, left + size, top + size)


def _decode(path: Path, size: int, max_side: int | None = None) -> torch.Tensor:
    """uint8 [3, h, w], decoded with PIL and shaped by `_geometry` (bicubic, antialiased)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = _to_rgb(im, path)
            nw, nh, box = _geometry(*im.size, size, max_side)
            if (nw, nh) != im.size:
                im = im.resize((nw, nh), Image.BICUBIC)
            if box is not None:
                im = im.crop(box)
            return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def _shape_tensor(x: torch.Tensor, size: int, max_side: int | None) -> torch.Tensor:
    """The same shaping as `_decode`'s, on a decoded uint8 [3, h, w] wherever it lies: torch's antialiased
    bicubic is PIL's filter (a = -0.5), so the two differ by rounding."""
    h, w = x.shape[1:]
    nw, nh, box = _geometry(w, h, size, max_side)
    if (nw, nh) != (w, h):
        x = F.interpolate(x[None].float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    if box is not None:
        x = x[:, box[1]:box[3], box[0]:box[2]]
    return x


def _to_rgb(im, path):
    """8-bit RGB, faithfully: 16-bit greyscale is scaled down (PIL's convert would clip it to white); modes whose
    scale is unknown (32-bit integer or float pixels) are refused by name rather than decoded wrong."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        a = np.asarray(im, dtype=np.float64) / 257.0
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    _refuse_unknown_scale(im.mode, path)
    return im.convert("RGB")


def _refuse_unknown_scale(mode, path):
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise UserError(f"cannot read image {path}: {kind} pixels ({mode} mode) have no known 0-255 scale; "
                        f"convert it to 8 or 16 bits")


def _canvas(decoded):
    """Images of any sizes -> (uint8 [N, 3, H, W] with each image top-left, int64 [N, 2] of their sizes).
    An image's last row and column are repeated once into the empty canvas, so that a crop's bilinear samples
    within half a pixel of its bottom or right edge see the edge, not black (as a resize clamps at the edge)."""
    sizes = torch.tensor([list(x.shape[1:]) for x in decoded], dtype=torch.long)
    out = torch.zeros(len(decoded), 3, int(sizes[:, 0].max()), int(sizes[:, 1].max()), dtype=torch.uint8,
                      device=decoded[0].device)
    for i, x in enumerate(decoded):
        h, w = x.shape[1:]
        out[i, :, :h, :w] = x
        out[i, :, h:h + 1, :w] = x[:, -1:]
        out[i, :, :h + 1, w:w + 1] = out[i, :, :h + 1, w - 1:w]
    return out, sizes


def _decode_all(files, size, skip_bad, max_side=None):
    """Decode with a thread per core (PIL releases the GIL); a bad file stops everything unless skip_bad."""
    def one(f):
        try:
            return _decode(f, size, max_side)
        except UserError:
            if skip_bad:
                return None
            raise

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(one, files))


def resident_bytes(n: int, size: int, max_side: int | None) -> int:
    """What a split of n files takes decoded and resident, at most: the canvas (max_side square per image) or
    the test split's centre squares."""
    return n * 3 * (max_side or size) ** 2


def data_path(n: int, size: int, max_side: int | None, stream="auto", memory_gb: float = 32.0) -> str:
    """resident or streamed: streamed when asked, or (auto) when the decoded split would exceed the budget."""
    if stream is True or stream == "auto" and resident_bytes(n, size, max_side) > memory_gb * 2 ** 30:
        return "streamed"
    return "resident"


def planned_path(spec: str, split: str, size: int, max_side: int | None, data_opts: dict):
    """(path, resident estimate in bytes or None) of a split before anything is read: from the registry's split
    size, or the files of a folder that is there; data that is not files is always resident."""
    d = info(spec)
    if d.reader is not None:
        return "resident", None
    n = d.train if split == "train" else d.test
    if not n:
        try:
            n = len(split_files(spec, split, data_opts.get("root"))[0])
        except UserError:
            return "?", None
    return (data_path(n, size, max_side, data_opts.get("stream", "auto"), data_opts.get("memory_gb", 32.0)),
            resident_bytes(n, size, max_side))


def _workers(workers):
    """data.workers, or half the CPUs this process may run on (a SLURM job's allocation, not the node's)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return workers if workers is not None else min(8, max(1, cpus // 2))


@functools.lru_cache(maxsize=8)
def load(spec: str, split: str, size: int, root: str | None = None, skip_bad: bool = False,
         cache_dir: str | None = None, max_side: int | None = None, stream="auto", memory_gb: float = 32.0,
         workers: int | None = None, decode: str = "auto"):
    """One split: resident (an ImageSet, decoded once; with `cache_dir`, kept in a file for later jobs) or, when
    `data_path` says so, streamed (a StreamedSet that reads a batch at a time in `workers` processes and decodes
    it there with PIL or, `decode`: device, or auto on a GPU, on the training device).

    With max_side (training splits): every image whole, aspect ratio kept, longer side at most max_side, on a
    canvas with their sizes. Without (test splits): uint8 [N, 3, size, size] centre squares. Data that is not
    files (digits) is resident and square at `size` either way."""
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
    cache = None
    if cache_dir and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise UserError(f"{cache_dir} is not a directory: remove it, or run with --no-cache")
    if cache_dir:
        key = [(str(f), *_stat(f)) for f in files] + [size, skip_bad, max_side]
        stamp = hashlib.sha256(repr(key).encode()).hexdigest()
        shape = f"max{max_side}" if max_side else str(size)
        cache = Path(cache_dir) / f"{spec.replace('/', '_').replace(':', '_')}-{split}-{shape}-{stamp[:16]}.pt"
        if cache.is_file():
            try:
                c = torch.load(cache, weights_only=False)
                meta = {**c["meta"], **how, "path": "resident"}  # an older cache lacks the path
                return ImageSet(c["images"], c["labels"], c["classes"], spec, meta, c.get("sizes"))
            except Exception as e:  # cut short or overwritten: decoded again below
                aside(cache, f"cannot be read ({type(e).__name__}); decoding the images again")
    decoded = _decode_all(files, size, skip_bad, max_side)
    keep = [i for i, x in enumerate(decoded) if x is not None]
    if not keep:
        raise UserError(f"{spec} {split}: no readable images")
    bad = [str(files[i]) for i, x in enumerate(decoded) if x is None]
    meta = {**meta, "files": len(files), "path": "resident", **({"skipped_bad_images": bad} if bad else {})}
    if max_side:
        images, sizes = _canvas([decoded[i] for i in keep])
        meta.update(max_side=max_side, mean_size=[round(v, 1) for v in sizes.float().mean(0).tolist()])
    else:
        images, sizes = torch.stack([decoded[i] for i in keep]), None
    out = ImageSet(images, torch.tensor([labels[i] for i in keep]), classes, spec, meta, sizes)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            kept = {"images": out.images, "labels": out.labels, "classes": classes, "meta": meta, "sizes": sizes}
            write_durably(cache, lambda f: torch.save(kept, f))
        except OSError as e:  # a cache is an optimisation: the job goes on without it
            print(f"bench: cannot keep the decoded {spec} {split} under {cache.parent}: {e.strerror}",
                  file=sys.stderr)
    return out


def _stat(f):
    try:
        st = os.stat(f)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None, None
