"""The streamed data path against the resident one, on real JPEG files in ImageNet's layout: the same pixels,
the same views, the same top-1, a resumed streamed epoch that reads each image once, and the imagenet table end
to end on CPU with data.stream=true."""
import json
import os
import signal

import pytest
import torch

import bench.engine as engine
from bench import data as datasets
from bench.data.views import make_views
from bench.errors import UserError
from bench.finetune import Classifier, top1
from bench.launch import stop_on_signals
from fixtures import jpeg
from test_engine import FT

WNIDS = ["n01440764", "n01443537", "n01484850"]
SHAPES = [(40, 30), (30, 52), (72, 20), (33, 33)]  # (width, height): landscape, portrait, a strip, a square


def imagenet(root, train=8, val=4):
    """root/imagenet/{train,val}/<wnid>/*.JPEG, images of several shapes."""
    for split, per in (("train", train), ("val", val)):
        for c, wnid in enumerate(WNIDS):
            for i in range(per):
                jpeg(root / "imagenet" / split / wnid / f"{wnid}_{i}.JPEG", 1000 * c + 10 * i + (split == "val"),
                     SHAPES[i % len(SHAPES)])
    return root


def _both(root, split, size, max_side=None):
    common = dict(root=str(root), max_side=max_side, workers=1)
    return (datasets.load("imagenet", split, size, stream=False, **common),
            datasets.load("imagenet", split, size, stream=True, **common))


def test_streamed_batches_hold_the_resident_pixels_and_give_the_same_views(tmp_path):
    resident, streamed = _both(imagenet(tmp_path), "train", 28, max_side=64)
    assert isinstance(resident, datasets.ImageSet) and isinstance(streamed, datasets.StreamedSet)
    assert resident.meta["path"] == "resident" and streamed.meta["path"] == "streamed"
    perm = torch.randperm(len(resident), generator=torch.Generator().manual_seed(1))
    cpu = torch.device("cpu")
    steps = list(zip(datasets.feed(resident, torch.arange(24), cpu).epoch(perm, 0, 3, 8),
                     datasets.feed(streamed, torch.arange(24), cpu).epoch(perm, 0, 3, 8)))
    assert len(steps) == 3
    spec = FT["views"]
    for (i_r, x_r, s_r), (i_s, x_s, s_s) in steps:
        assert torch.equal(i_r, i_s) and torch.equal(s_r, s_s)
        assert x_s.shape[-2] <= x_r.shape[-2] and x_s.shape[-1] <= x_r.shape[-1]  # the batch's own canvas
        for k in range(len(i_r)):  # each image's region (and its repeated edge) is the same pixels
            hh, ww = s_r[k].tolist()
            assert torch.equal(x_r[k, :, :hh + 1, :ww + 1], x_s[k, :, :hh + 1, :ww + 1])
        torch.manual_seed(5)
        (v_r,) = make_views(x_r, spec, s_r)
        torch.manual_seed(5)
        (v_s,) = make_views(x_s, spec, s_s)
        assert torch.allclose(v_r, v_s, atol=1e-5)  # the crops only read the images' regions


def test_a_streamed_test_split_scores_the_same_top1_as_the_resident_one(tmp_path, tiny_vit):
    resident, streamed = _both(imagenet(tmp_path), "test", 28)
    model = tiny_vit(3, img_size=24)
    a, b = (top1(model, d, 24, 1.142857, "fp32") for d in (resident, streamed))
    assert a == b and 0 <= a <= 1
    assert len(streamed) == 12 and streamed.meta["files"] == 12


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU here (.ci/device-check runs it on one)"))])
def test_jpegs_decoded_on_the_device_are_the_pil_pixels_to_resize_rounding(tmp_path, device):
    """data.decode=device (torchvision's decoder on the training device; the CPU's libjpeg-turbo, or nvjpeg on a
    GPU) gives the PIL path's batches: the same rows, sizes and canvases, the same pixels where an image is kept
    as decoded, and within resize rounding where it is shrunk (torch's antialiased bicubic against PIL's, which
    rounds to 8 bits between its two passes), for a training canvas and a test split's centre squares. nvjpeg's
    inverse DCT and chroma upsampling are not libjpeg's: on a GPU every image is compared within a few levels."""
    root = imagenet(tmp_path)
    on = torch.device(device)
    for split, max_side in (("train", 64), ("train", 32), ("test", None)):
        pil, dev = (datasets.load("imagenet", split, 28, root=str(root), max_side=max_side, stream=True, workers=1,
                                  decode=d) for d in ("pil", "device"))
        perm = torch.randperm(len(pil), generator=torch.Generator().manual_seed(2))
        rows = torch.arange(len(pil))
        steps = list(zip(datasets.feed(pil, rows, on).epoch(perm, 0, len(pil) // 6, 6),
                         datasets.feed(dev, rows, on).epoch(perm, 0, len(pil) // 6, 6)))
        assert len(steps) == len(pil) // 6
        assert pil.meta["decoder"] == "PIL in 1 worker process" and dev.meta["decoder"] == f"torchvision on {on}"
        diffs = []
        for (i_p, x_p, s_p), (i_d, x_d, s_d) in steps:
            assert torch.equal(i_p, i_d) and x_p.shape == x_d.shape and x_d.dtype == torch.uint8
            assert x_d.device.type == device and (s_p is None) == (s_d is None)
            assert s_p is None or torch.equal(s_p, s_d)
            for k, i in enumerate(i_p.tolist()):
                w, h = SHAPES[i % len(SHAPES)] if split == "train" else (28, 28)
                if max_side and max(w, h) <= max_side and device == "cpu":  # not resized: the decoders agree exactly
                    assert torch.equal(x_p[k], x_d[k])
                else:
                    diffs.append((x_p[k].int() - x_d[k].int()).abs().flatten().cpu())
        d = torch.cat(diffs).float()
        mean, far = (0.5, 2) if device == "cpu" else (1.5, 8)
        assert d.numel() and d.mean() < mean and (d > far).float().mean() < 0.01, (split, max_side, d.mean(), d.max())


def test_a_batch_read_for_the_device_crosses_from_its_worker_as_one_byte_tensor(tmp_path):
    """Each tensor a DataLoader worker returns travels through its own shared memory: a batch of JPEGs goes as
    one tensor of their bytes and one of their lengths, however many files it holds."""
    root = imagenet(tmp_path)
    data = datasets.load("imagenet", "train", 28, root=str(root), max_side=64, stream=True, workers=0,
                         decode="device")
    blob, lengths, others, rows = data.read(torch.arange(20))
    sizes = [data.files[i].stat().st_size for i in range(20)]
    assert lengths.tolist() == sizes and blob.numel() == sum(sizes)
    assert others == [] and rows.tolist() == list(range(20))
    assert bytes(blob[sizes[0]:sizes[0] + sizes[1]].numpy()) == data.files[1].read_bytes()


def test_decoding_on_the_device_names_a_broken_jpeg_or_skips_it_and_reads_other_formats(tmp_path, capsys):
    from PIL import Image

    root = imagenet(tmp_path)
    bad = root / "imagenet" / "val" / WNIDS[1] / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    Image.new("RGB", (30, 40), (10, 200, 30)).save(root / "imagenet" / "val" / WNIDS[2] / "green.png")
    cpu = torch.device("cpu")
    strict = datasets.load("imagenet", "test", 28, root=str(root), stream=True, workers=0, decode="device")
    with pytest.raises(UserError, match="broken.JPEG"):
        list(datasets.feed(strict, torch.arange(len(strict)), cpu).in_order(16))
    lenient = datasets.load("imagenet", "test", 28, root=str(root), stream=True, skip_bad=True, workers=0,
                            decode="device")
    (idx, images), = datasets.feed(lenient, torch.arange(len(lenient)), cpu).in_order(16)
    files = [str(f) for f in lenient.files]
    assert len(lenient) == 14 and len(idx) == len(images) == 13
    assert files.index(str(bad)) not in idx.tolist()
    png = idx.tolist().index(next(i for i, f in enumerate(files) if f.endswith("green.png")))
    assert images[png].flatten(1).float().mean(1).round().tolist() == [10.0, 200.0, 30.0]
    assert "skipped: cannot read image" in capsys.readouterr().err


def test_a_broken_file_read_in_a_worker_process_is_one_line_not_the_workers_traceback(tmp_path):
    root = imagenet(tmp_path)
    bad = root / "imagenet" / "val" / WNIDS[1] / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    data = datasets.load("imagenet", "test", 28, root=str(root), stream=True, workers=1, decode="pil")
    with pytest.raises(UserError) as e:
        list(datasets.feed(data, torch.arange(len(data)), torch.device("cpu")).in_order(16))
    assert str(e.value).startswith(f"cannot read image {bad}: ") and len(str(e.value).splitlines()) == 1


def test_a_file_skipped_in_streamed_epochs_is_named_once_and_listed_for_the_record(tmp_path, capfd):
    root = imagenet(tmp_path)
    bad = root / "imagenet" / "train" / WNIDS[0] / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    data = datasets.load("imagenet", "train", 28, root=str(root), max_side=64, stream=True, skip_bad=True,
                         workers=1, decode="pil")
    fed = datasets.feed(data, torch.arange(len(data)), torch.device("cpu"))
    for epoch in range(2):
        seen = [i for idx, _, _ in fed.epoch(torch.randperm(len(data)), 0, 5, 5) for i in idx.tolist()]
        assert len(seen) == len(data) - 1 and data.files.index(bad) not in seen
    assert data.meta["skipped_bad_images"] == [str(bad)]
    err = capfd.readouterr().err
    assert err.count("bench: skipped:") == 1 and f"cannot read image {bad}: " in err


def test_device_decoding_runs_a_batch_ahead_in_its_own_thread_in_order_and_ends_with_its_consumer(tmp_path):
    """A GPU decode blocks its caller until done, so the streamed path decodes in a thread of its own, ahead of the
    training step: the batches arrive in the order read, as decoded in the consumer's thread; an error in the
    thread is raised in the consumer after the batches before it; a consumer that stops early ends the thread."""
    import threading

    from bench.data.stream import _decoded_ahead

    root = imagenet(tmp_path)
    data = datasets.load("imagenet", "train", 28, root=str(root), max_side=64, stream=True, workers=0,
                         decode="device")
    cpu = torch.device("cpu")
    reads = [data.read(torch.arange(i, min(i + 5, len(data)))) for i in range(0, len(data), 5)]
    threads = []

    def decode(batch):
        threads.append(threading.current_thread().name)
        return data.decode_on(cpu, *batch)

    got = list(_decoded_ahead(decode, iter(reads), cpu))
    want = [data.decode_on(cpu, *r) for r in reads]
    assert len(got) == len(want) == 5 and set(threads) == {"bench-decode"}
    for (gi, gs, gr), (wi, ws, wr) in zip(got, want):
        assert torch.equal(gi, wi) and torch.equal(gs, ws) and torch.equal(gr, wr)
    real, threads[:] = data.decode_on, []  # the streamed feed decodes there too
    data.decode_on = lambda dev, *batch: threads.append(threading.current_thread().name) or real(dev, *batch)
    assert sum(len(i) for i, _ in datasets.feed(data, torch.arange(len(data)), cpu).in_order(5)) == len(data)
    assert set(threads) == {"bench-decode"}
    data.decode_on = real

    calls = []

    def fails_third(batch):
        calls.append(batch)
        if len(calls) == 3:
            raise UserError("the third batch's file")
        return decode(batch)

    seen = []
    with pytest.raises(UserError, match="the third batch's file"):
        for b in _decoded_ahead(fails_third, iter(reads), cpu):
            seen.append(b)
    assert len(seen) == 2

    pulled = []
    stream = _decoded_ahead(decode, (pulled.append(r) or r for r in reads * 20), cpu, depth=2)
    next(stream)
    stream.close()  # a training stopped after one step
    assert not any(t.name == "bench-decode" and t.is_alive() for t in threading.enumerate())
    assert len(pulled) <= 5  # read no further than the queue's depth and one in hand


def test_a_streamed_epoch_resumed_in_the_middle_reads_each_image_once(tmp_path, tiny_vit, monkeypatch):
    """A SIGTERM during step 2 of epoch 0 (batches of 4 of 24 images: 6 steps); the resumed run reads the rest
    of that epoch, and ends bit-identical to an uninterrupted streamed run, and within rounding of the resident
    path's."""
    root = imagenet(tmp_path / "data")
    resident, streamed = _both(root, "train", 28, max_side=64)
    cfg = {**FT, "batch_size": 4}
    seen = []

    class Probe(Classifier):
        def loss(self, views, index, label, progress):
            seen.append(index.tolist())
            return super().loss(views, index, label, progress)

    def train(data, run):
        model = Probe(tiny_vit(3), cfg)
        engine.fit(model, data, cfg, tmp_path / run)
        return model

    ref_resident = train(resident, "resident")
    seen.clear()
    ref = train(streamed, "streamed")
    assert sorted(i for batch in seen[:6] for i in batch) == list(range(24))
    seen.clear()

    real, calls = engine.make_views, {"n": 0}

    def stop_at_two(images, spec, sizes=None):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(images, spec, sizes)

    monkeypatch.setattr(engine, "make_views", stop_at_two)
    with pytest.raises(engine.Interrupted), stop_on_signals():
        train(streamed, "run")
    monkeypatch.setattr(engine, "make_views", real)
    first = [i for batch in seen for i in batch]
    seen.clear()
    resumed = train(streamed, "run")
    rest = [i for batch in seen[:4] for i in batch]  # the 4 steps left of epoch 0
    assert len(first) == 8 and sorted(first + rest) == list(range(24))
    for a, b, c in zip(ref.state_dict().values(), resumed.state_dict().values(),
                       ref_resident.state_dict().values()):
        assert torch.equal(a, b)
        # the resident path trains the same: its views differ from the streamed ones by float rounding only
        # (a crop's samples on the batch's canvas rather than the whole split's), 1e-6 of a pixel
        assert torch.allclose(a, c, atol=1e-4, rtol=1e-3), (a - c).abs().max()


def test_the_imagenet_table_runs_streamed_end_to_end_and_fills_its_cells(tmp_path, monkeypatch, capsys):
    """The chain the table needs on a fabricated ImageNet folder: the check, SIN-10k made from it, IDMM
    pretraining on SIN-10k, fine-tuning and evaluation on ImageNet streamed, the report's cells filled."""
    from bench.cli import main

    from conftest import FAST

    data = imagenet(tmp_path / "data", train=10)
    monkeypatch.chdir(tmp_path)
    assert main(["data", "check", "imagenet", "--data-root", str(data)]) == 2  # not the paper's 1,281,167
    assert "train has 30 images, the paper's split has 1281167" in capsys.readouterr().err
    assert main(["data", "make-sin10k", "--imagenet", str(data / "imagenet"), "--data-root", str(data)]) == 0
    common = ["--table", "imagenet", "--preset", "demo", "--methods", "random", "idmm", "--backbones", "pvt_v2_b0",
              "--data-root", str(data), "--results", "r", "--set", "data.stream=true", "--set", "data.decode=device",
              "--set", "pretrain_data.sin10k=sin10k", *FAST]  # the demo pretrains on digits otherwise
    capsys.readouterr()
    assert main(["run", *common, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "data=sin10k" in plan and "data_path=train:streamed" in plan and "test:streamed" in plan
    assert "decoded by data.decode=device)" in plan
    # by itself (data.stream=auto) the miniature is resident, in the dry run as in the run: its files are counted
    assert main(["run", *[a.replace("stream=true", "stream=auto") for a in common], "--dry-run"]) == 0
    assert "data_path=train:resident(0.0GB),test:resident(0.0GB)" in capsys.readouterr().out
    assert main(["run", *common]) == 0
    recs = [json.loads(p.read_text()) for p in (tmp_path / "r").glob("*.json")]
    pre = next(r for r in recs if r["stage"] == "pretrain")
    assert pre["config"]["data"] == "sin10k" and pre["metrics"]["train_size"] == 30
    assert pre["metrics"]["data"]["path"] == "streamed" and pre["metrics"]["data"]["decoder"] == "torchvision on cpu"
    tuned = [r for r in recs if r["stage"] == "finetune"]
    assert len(tuned) == 2 and all(r["status"] == "done" and r["metrics"]["test_size"] == 12 for r in tuned)
    assert all(r["metrics"]["data"]["train"]["path"] == "streamed" for r in tuned)
    assert tuned[0]["metrics"]["data"]["train"]["stream"] is True
    capsys.readouterr()
    assert main(["report", "--results", "r", "--table", "imagenet"]) == 0
    text = capsys.readouterr().out
    # the --set items in one order (sorted), whatever order they were typed in
    assert "(preset: demo --set finetune.epochs=1 --set pretrain.epochs=1 --set pretrain_data.sin10k=sin10k)" in text
    assert "data.stream" not in text and "data.decode" not in text  # how images were read is not the recipe
    rows = [line for line in text.splitlines() if "PVT" in line]
    for rec in tuned:
        method = "random init." if rec["config"]["init"] == "random" else "IDMM (SIN-10k)"
        row = next(line for line in rows if f"| {method} " in line)
        assert f"{100 * rec['metrics']['top1']:.1f} (" in row
    # the list made again with another seed: not in the jobs' hashes (planned without reading data), so the
    # run finds them done; it names the pretraining that read the old list (it said nothing)
    assert main(["data", "make-sin10k", "--imagenet", str(data / "imagenet"), "--data-root", str(data),
                 "--seed", "7"]) == 0
    capsys.readouterr()
    assert main(["run", *common]) == 0
    err = capsys.readouterr().err
    assert f"sin10k's list of files was made again since 1 job read it (done, kept): --rerun {pre['hash'][:10]}" in err


def test_a_streamed_split_names_an_unreadable_file_or_leaves_it_out_with_skip_bad(tmp_path, capsys):
    root = imagenet(tmp_path)
    bad = root / "imagenet" / "val" / WNIDS[1] / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    strict = datasets.load("imagenet", "test", 28, root=str(root), stream=True, workers=0)
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match="broken.JPEG"):
        list(datasets.feed(strict, torch.arange(len(strict)), cpu).in_order(16))
    lenient = datasets.load("imagenet", "test", 28, root=str(root), stream=True, skip_bad=True, workers=0)
    (idx, images), = datasets.feed(lenient, torch.arange(len(lenient)), cpu).in_order(16)
    assert len(lenient) == 13 and len(idx) == len(images) == 12
    assert str(lenient.files[4]).endswith("broken.JPEG") and 4 not in idx.tolist()
    assert "skipped: cannot read image" in capsys.readouterr().err
    assert lenient.kept("test") == 12  # the record's test_size: the images read (it counted the file skipped)
    # every image of a class unreadable: refused as the resident path refuses it (a top-1 over the other
    # classes was recorded, without a word but the files' names)
    for f in (root / "imagenet" / "val" / WNIDS[1]).iterdir():
        f.write_bytes(b"junk")
    emptied = datasets.load("imagenet", "test", 28, root=str(root), stream=True, skip_bad=True, workers=0,
                            memory_gb=1.0)  # (another cache entry of load: not the split read above)
    # a batch an image each: those with none readable are left out (one stopped the evaluation), the others
    # read, by either decoder; a training step with no image is refused in one line
    for decode in ("pil", "device"):
        emptied.decoder = decode
        feed = datasets.feed(emptied, torch.arange(len(emptied)), cpu)
        read = torch.cat([idx for idx, _ in feed.in_order(1)])
        assert read.tolist() == [i for i, lab in enumerate(emptied.labels.tolist()) if lab != 1]
        with pytest.raises(UserError, match="imagenet: --skip-bad left no image in a training batch of 1: "):
            list(feed.epoch(torch.arange(len(emptied)), 0, len(emptied), 1))
    with pytest.raises(UserError, match=f"imagenet test: no readable image of class '{WNIDS[1]}' is left once "):
        emptied.kept("test")


def _streamed_rank(rank, world, port, root, out):
    """One rank of a 2-process streamed fine-tuning: writes the indices each of its steps read."""
    import timm

    from bench.launch import init_distributed

    torch.set_num_threads(1)
    init_distributed(rank, world, rank, "127.0.0.1", port)
    data = datasets.load("imagenet", "train", 28, root=str(root), max_side=64, stream=True, workers=1)
    seen = []

    class Probe(Classifier):
        def loss(self, views, index, label, progress):
            seen.append(index.tolist())
            return super().loss(views, index, label, progress)

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1,
                              num_heads=2, num_classes=3)
    engine.fit(Probe(model, {**FT, "batch_size": 8}), data, {**FT, "batch_size": 8}, out / "run")
    torch.save(seen, out / f"rank{rank}.pt")


def test_each_rank_of_a_streamed_job_reads_its_own_shard_once_per_epoch(tmp_path):
    import torch.multiprocessing as mp

    from bench.launch import local

    root = imagenet(tmp_path / "data")
    mp.spawn(_streamed_rank, args=(2, local._free_port(), root, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for epoch in range(FT["epochs"]):  # 24 images, 12 per rank, 4 per rank per step: 3 steps an epoch
        read = [sorted(i for step in steps[3 * epoch:3 * epoch + 3] for i in step) for steps in ranks]
        assert len(read[0]) == len(read[1]) == 12 and not set(read[0]) & set(read[1])
        assert sorted(read[0] + read[1]) == list(range(24))
        assert read[0] == [i for i in range(24) if i % 2 == 0]  # engine.shard: every second image
