"""The resident path: a split decoded once with PIL (a thread per core) into one uint8 tensor held in memory,
kept in a cache file for later jobs, and fed to the engine from there (moved to the device once); and the
decoding of one image file, which the streamed path shares so that both see the same pixels.

A training split keeps each image whole, with its aspect ratio (the longer side capped at `max_side`), in the
top-left corner of a shared canvas, its size beside it: random crops are cut from the real image region, as
the official loaders cut them from the decoded file. A test split is decoded to the centre square the
evaluation resize would see (shorter side `size`, 256 for 224).
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import UserError
from bench.errors import jobs as n_of
from bench.results import aside, read_tensors, write_durably


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

    def kept(self, split: str) -> int:
        """How many images were read (a resident split leaves an unreadable file out as it decodes)."""
        return len(self)


def refuse_a_lost_class(spec, split, classes, labels, kept_labels, skipped):
    """--skip-bad leaves every class at least one image: a class without one would still have its output and
    count in the test, a number not earned."""
    lost = sorted(set(labels) - set(kept_labels))
    if lost:
        raise UserError(f"{spec} {split}: no readable image of class {classes[lost[0]]!r} is left once unreadable "
                        f"files are skipped ({skipped} skipped)")


class ResidentFeed:
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


def _source_box(w, h, nw, nh, box):
    """The region of the w x h original that `box` (in the resized nw x nh image) covers, when resizing the whole
    image first would be wasteful: an 8000 x 1 image, resized whole, took 8 GB for a 256 px square. Such an image
    (64 times longer than wide, or more) is resized by PIL from that region alone, which moves the pixels at the
    square's edges by a few levels; every other image is resized whole, as before."""
    if box is None or nw * nh <= 64 * (box[2] - box[0]) * (box[3] - box[1]):
        return None
    sx, sy = w / nw, h / nh
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def decode_file(path: Path, size: int, max_side: int | None = None) -> torch.Tensor:
    """uint8 [3, h, w], decoded with PIL and shaped by `_geometry` (bicubic, antialiased)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = _to_rgb(im, path)
            nw, nh, box = _geometry(*im.size, size, max_side)
            region = _source_box(*im.size, nw, nh, box)
            if region is not None:
                im = im.resize((box[2] - box[0], box[3] - box[1]), Image.BICUBIC, box=region)
            elif (nw, nh) != im.size:
                im = im.resize((nw, nh), Image.BICUBIC)
            if box is not None and region is None:
                im = im.crop(box)
            return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def shape_tensor(x: torch.Tensor, size: int, max_side: int | None) -> torch.Tensor:
    """The same shaping as `decode_file`'s, on a decoded uint8 [3, h, w] wherever it lies: torch's antialiased
    bicubic is PIL's filter (a = -0.5), so the two differ by rounding."""
    h, w = x.shape[1:]
    nw, nh, box = _geometry(w, h, size, max_side)
    region = _source_box(w, h, nw, nh, box)
    if region is not None:  # rare: resized by PIL from the region, as decode_file does, so both give one result
        from PIL import Image

        im = Image.fromarray(x.permute(1, 2, 0).cpu().numpy())
        im = im.resize((box[2] - box[0], box[3] - box[1]), Image.BICUBIC, box=region)
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).to(x.device)
    if (nw, nh) != (w, h):
        # torch's antialiased resize of a tensor 1 pixel wide is wrong (off by up to 200 levels from PIL's, which
        # it matches otherwise): such an image is resized transposed, its height as a width
        t = w == 1 and h > 1
        x = x.transpose(1, 2) if t else x
        x = F.interpolate(x[None].float(), size=(nw, nh) if t else (nh, nw), mode="bicubic", antialias=True,
                          align_corners=False)[0]
        x = x.round_().clamp_(0, 255).to(torch.uint8)
        x = x.transpose(1, 2).contiguous() if t else x
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
    refuse_unknown_scale(im.mode, path)
    return im.convert("RGB")


def refuse_unknown_scale(mode, path):
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise UserError(f"cannot read image {path}: {kind} pixels ({mode} mode) have no known 0-255 scale; "
                        f"convert it to 8 or 16 bits")


def canvas(decoded):
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


def usable_cpus() -> int:
    """The CPUs this process may run on (a SLURM job's allocation, not the node's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def in_threads(fn, items):
    """[fn(x) for x in items] on a thread per usable CPU (PIL and file reads release the GIL). An error or Ctrl-C
    ends it at once: the items not yet begun are dropped (a pool's own exit would first run every one of them,
    minutes for ImageNet's files)."""
    pool = ThreadPoolExecutor(max_workers=usable_cpus())
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(cancel_futures=True)


def decode_all(files, size, skip_bad, max_side=None):
    """Decode with a thread per core; a bad file stops everything unless skip_bad. A stop asked for by a signal
    (a job's handlers only note it, see engine.request_stop) stops it too, not the first training step after it."""
    from bench.engine import Interrupted, stop_requested  # (the engine imports this module)

    def one(f):
        if stop_requested():
            raise Interrupted(stop_requested(), saved=False)
        try:
            return decode_file(f, size, max_side)
        except UserError:
            if skip_bad:
                return None
            raise

    return in_threads(one, files)


def load(spec, split, listing, size, skip_bad, cache_dir, max_side, how) -> ImageSet:
    """The split `listing` names ((files, labels, classes, meta)) decoded, or read from its cache file; `how`
    (the data settings it was read under) joins its meta."""
    files, labels, classes, meta = listing
    cache = None
    if cache_dir and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise UserError(f"{cache_dir} is not a directory: remove it, or run with --no-cache")
    if cache_dir:
        # every file as it is now and the label it takes (a label file edited since: decoded again)
        key = [(str(f), lab, *file_stat(f)) for f, lab in zip(files, labels)] + [classes, size, skip_bad, max_side]
        stamp = hashlib.sha256(repr(key).encode()).hexdigest()
        shape = f"max{max_side}" if max_side else str(size)
        # the spec's end names the file for people (a folder's whole path could pass the 255-byte limit: cut in
        # bytes, not characters); the stamp, of every file, tells the splits apart
        readable = spec.replace('/', '_').replace(':', '_').encode()[-60:].decode(errors="ignore")
        cache = Path(cache_dir) / f"{readable}-{split}-{shape}-{stamp[:16]}.pt"
        if cache.is_file():
            try:
                c = read_tensors(cache)
                n = len(files) - len(c["meta"].get("skipped_bad_images", []))
                sizes = c.get("sizes")
                if not (len(c["images"]) == len(c["labels"]) == n and c["classes"] == classes
                        and (sizes is None) == (max_side is None) and (sizes is None or len(sizes) == n)):
                    raise ValueError("not the split it is named for")  # (a job would train on it without a word)
                meta = {**c["meta"], **how, "path": "resident"}  # an older cache lacks the path
                return ImageSet(c["images"], c["labels"], c["classes"], spec, meta, sizes)
            except Exception as e:  # cut short, overwritten, another split's: decoded again below
                aside(cache, f"cannot be read ({type(e).__name__}); decoding the images again")
    decoded = decode_all(files, size, skip_bad, max_side)
    keep = [i for i, x in enumerate(decoded) if x is not None]
    if not keep:
        raise UserError(f"{spec} {split}: no readable images")
    bad = [str(files[i]) for i, x in enumerate(decoded) if x is None]
    refuse_a_lost_class(spec, split, classes, labels, [labels[i] for i in keep], len(bad))
    if bad:  # as the streamed path names each file it skips
        print(f"bench: skipped: {n_of(len(bad), 'unreadable file')} of {spec} {split} (the record lists them), "
              f"e.g. {bad[0]}", file=sys.stderr)
    meta = {**meta, "files": len(files), "path": "resident", **({"skipped_bad_images": bad} if bad else {})}
    if max_side:
        images, sizes = canvas([decoded[i] for i in keep])
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


def file_stat(f):
    try:
        st = os.stat(f)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None, None
