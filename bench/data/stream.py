"""The streamed path: a split too large to hold decoded (ImageNet's 1.28M images) is read from its files a batch
at a time in DataLoader workers and decoded there with PIL, or read there and decoded on the training device by
torchvision (nvjpeg on a GPU), onto the same canvas as the resident path's, so the views see the same pixels."""
from __future__ import annotations

import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.data.resident import ResidentFeed, canvas, decode_file, refuse_a_lost_class, shape_tensor
from bench.data.views import to_device
from bench.errors import UserError


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

    def kept(self, split: str) -> int:
        """How many images were read, once a pass over the split has found its unreadable files (--skip-bad);
        a class left with none is refused, as the resident path refuses it."""
        skipped = set(self.meta.get("skipped_bad_images", []))
        labels = self.labels.tolist()
        kept = [lab for f, lab in zip(self.files, labels) if str(f) not in skipped]
        refuse_a_lost_class(self.name, split, self.classes, labels, kept, len(skipped))
        return len(kept)

    def on_device(self, dev) -> bool:
        return self.decoder == "device" or self.decoder == "auto" and dev.type == "cuda"

    def _each(self, keys, one):
        """[(key, one(key))] of the keys whose file reads; with skip_bad an unreadable file is left out of its
        batch (the feed names it, see StreamedFeed._note_skipped), perhaps leaving none."""
        out = []
        for k in keys:
            try:
                out.append((k, one(k)))
            except UserError:
                if not self.skip_bad:
                    raise
        return out

    def _batch(self, pairs):
        """(uint8 images, sizes or None, the rows) as the resident path holds them, from [(row, image)]; a batch
        of none read is (None, None, no rows)."""
        if not pairs:
            return None, None, torch.zeros(0, dtype=torch.long)
        rows, decoded = zip(*pairs)
        images, sizes = canvas(decoded) if self.max_side else (torch.stack(decoded), None)
        return images, sizes, torch.tensor(rows)

    def _pil(self, i):
        return decode_file(self.files[i], self.size, self.max_side)

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
        pairs = self._each(indices.tolist(), one)
        rows, items = [r for r, _ in pairs], [x for _, x in pairs]
        jpegs = b"".join(x for x in items if isinstance(x, bytes))
        blob = torch.frombuffer(bytearray(jpegs), dtype=torch.uint8) if jpegs else torch.empty(0, dtype=torch.uint8)
        lengths = torch.tensor([len(x) if isinstance(x, bytes) else -1 for x in items])
        return blob, lengths, [x for x in items if not isinstance(x, bytes)], torch.tensor(rows, dtype=torch.long)

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
            return shape_tensor(on_dev[k], self.size, self.max_side)
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



class StreamedFeed(ResidentFeed):
    """The same batches, each decoded from its files in a DataLoader worker, in the permutation's order: a
    resumed epoch reads exactly the images it had not yet read."""

    def _stream(self, chunks, training=True):
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
        try:
            for chunk, (images, sizes, idx) in zip(chunks, batches):
                if len(idx) < len(chunk):
                    self._note_skipped(chunk, idx)
                if not len(idx):  # evaluation leaves it out; a training step has no images to take instead
                    if training:
                        raise UserError(f"{self.data.name}: --skip-bad left no image in a training batch of "
                                        f"{len(chunk)}: most of the split is unreadable (bench data check)")
                    continue
                yield (to_device(idx, self.dev), to_device(images, self.dev),
                       None if sizes is None else to_device(sizes, self.dev))
        except UserError as e:  # a worker's: torch re-raises it with the worker's whole traceback as its message
            said = str(e).strip().splitlines()
            raise UserError(said[-1].split("UserError: ", 1)[-1] if len(said) > 1 else str(e)) from None

    def _note_skipped(self, chunk, kept):
        """The files a batch left out (--skip-bad), each named on stderr once a run with why (a worker's reason
        does not cross to this process: the file is opened again here), and listed in the split's meta, which
        the job's record keeps, as the resident path lists them."""
        listed = self.data.meta.setdefault("skipped_bad_images", [])
        for row in sorted(set(chunk.tolist()) - set(kept.tolist())):
            if str(self.data.files[row]) not in listed:
                listed.append(str(self.data.files[row]))
                try:
                    self.data._pil(row)
                    why = f"cannot read image {self.data.files[row]}"
                except UserError as e:
                    why = str(e)
                print(f"bench: skipped: {why}", file=sys.stderr)

    def epoch(self, perm, start, steps, bs):
        perm = perm.cpu()
        yield from self._stream([self.rows[perm[s * bs:(s + 1) * bs]] for s in range(start, steps)])

    def in_order(self, bs):
        for idx, images, _ in self._stream([self.rows[i:i + bs] for i in range(0, len(self.rows), bs)], False):
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
