"""Every official on-disk format, fabricated in miniature, read back with the right splits and labels."""
import json
import subprocess
import sys

import pytest
import torch

import fixtures
from bench import data as datasets
from bench.errors import UserError
from conftest import FAST, in_process, without_root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("data")
    fixtures.make_all(r)
    return r


@pytest.fixture
def unverified(monkeypatch):
    monkeypatch.setenv("BENCH_VERIFY_CHECKSUMS", "0")


@pytest.mark.parametrize("name", list(fixtures.SIZES))
def test_each_official_format_gives_its_splits_and_labels(name, root, unverified):
    train = datasets.load(name, "train", 20, str(root))
    test = datasets.load(name, "test", 20, str(root))
    assert (len(train), len(test)) == fixtures.SIZES[name]
    assert train.images.shape[1:] == (3, 20, 20) and train.images.dtype == torch.uint8
    assert train.classes == test.classes
    assert len(train.classes) == {"flowers102": 102, "cub200": 2}.get(name, 3)
    assert 0 <= int(train.labels.min()) and int(train.labels.max()) < len(train.classes)


def test_training_splits_keep_whole_images_with_their_aspect_ratio(tmp_path):
    """Training splits: each image whole (longer side capped), top-left on a canvas, its size beside it."""
    for i, size in enumerate([(40, 30), (30, 40), (100, 50)]):  # (width, height)
        fixtures.jpeg(tmp_path / "train" / "a" / f"{i}.jpg", i, size)
    (tmp_path / "test" / "a").mkdir(parents=True)
    train = datasets.load(f"folder:{tmp_path}", "train", 20, max_side=64)
    assert train.sizes.tolist() == [[30, 40], [40, 30], [32, 64]]  # (height, width); 100x50 shrunk to 64x32
    assert train.images.shape == (3, 3, 40, 64)
    assert train.images[0, :, 31:].sum() == 0 and train.images[0, :, :30, :40].float().std() > 10
    assert train.meta["max_side"] == 64


def test_labels_follow_the_annotation_files(root, unverified):
    assert datasets.load("flowers102", "train", 16, str(root)).labels.tolist() == [0, 1, 2, 0, 1, 2]  # trn + val
    pets = datasets.load("pets", "test", 16, str(root))
    assert pets.labels.tolist() == [0, 1, 2, 2] and pets.classes == ["Abyssinian", "American Bulldog", "Bengal"]
    assert datasets.load("cub200", "test", 16, str(root)).labels.tolist() == [0, 0, 1, 1]
    air = datasets.load("aircraft", "train", 16, str(root))
    assert air.classes == ["707-320", "A300B4", "Cessna 172"] and air.labels.tolist() == [0, 1, 2, 0, 1, 2]
    cars = datasets.load("cars", "train", 16, str(root))
    assert cars.classes[0] == "AM General Hummer SUV 2000" and cars.labels.tolist() == [0, 1, 2, 0, 1, 2]


def test_flowers_checksums_are_checked_by_default(root, monkeypatch):
    monkeypatch.delenv("BENCH_VERIFY_CHECKSUMS", raising=False)
    with pytest.raises(UserError, match="checksums differ from the official files"):
        datasets.split_files("flowers102", "train", root)


def test_a_dataset_half_there_names_the_files_it_lacks(root, tmp_path):
    import shutil
    with pytest.raises(UserError, match=r"Flowers102 not found under .*: expected flowers-102/"):
        datasets.split_files("flowers102", "train", tmp_path)
    shutil.copytree(root / "flowers-102", tmp_path / "flowers-102")
    (tmp_path / "flowers-102" / "setid.mat").unlink()
    with pytest.raises(UserError, match=r"is incomplete: flowers-102/setid.mat missing \(expected"):
        datasets.split_files("flowers102", "train", tmp_path)
    (tmp_path / "oxford-iiit-pet" / "annotations").mkdir(parents=True)
    for f in ("images", "annotations/trainval.txt", "annotations/test.txt"):  # images: a file, not the folder
        (tmp_path / "oxford-iiit-pet" / f).touch()
    with pytest.raises(UserError, match=r"is incomplete: oxford-iiit-pet/images/ missing"):
        datasets.split_files("pets", "train", tmp_path)
    for name in ("flowers102", "pets", "dtd", "aircraft", "cars"):  # each layout names the files as they lie
        assert all((root / p).exists() for p in datasets._expand(datasets.DATASETS[name].layout)), name


def test_missing_split_file_is_named(root, tmp_path):
    (tmp_path / "indoor67").mkdir()
    with pytest.raises(UserError, match="TrainImages.txt is missing"):
        datasets.split_files("indoor67", "train", tmp_path)


def bench(*args, env=None, cwd=None):
    import os
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "BENCH_VERIFY_CHECKSUMS": "0", **(env or {})})


def test_every_dataset_and_a_folder_runs_pretrain_then_finetune(root, tmp_path):
    names = list(fixtures.SIZES) + [f"folder:{root / 'mine'}"]
    res = tmp_path / "r"
    run = bench("run", "--table", "comparison", "--preset", "demo", "--methods", "idmm", "--datasets", *names,
                "--data-root", str(root), "--results", str(res), *FAST)
    assert run.returncode == 0, run.stderr
    records = [json.loads(p.read_text()) for p in res.glob("*.json")]
    fine = {r["config"]["data"]: r for r in records if r["stage"] == "finetune"}
    assert set(fine) == set(names)
    for name, (n_train, n_test) in fixtures.SIZES.items():
        assert (fine[name]["metrics"]["train_size"], fine[name]["metrics"]["test_size"]) == (n_train, n_test)
    assert (fine[names[-1]]["metrics"]["train_size"], fine[names[-1]]["metrics"]["test_size"]) == (6, 4)
    assert any((res / "cache").glob("flowers102-train-*.pt"))  # decoded once, kept for the next job


def test_sin10k_is_made_reproducibly_and_pretrains_a_transfer_row(root, tmp_path):
    made = bench("data", "make-sin10k", "--imagenet", str(root / "imagenet"), "--seed", "0", "--data-root", str(root))
    assert made.returncode == 0, made.stderr
    listing = (root / "sin10k" / "files.txt").read_text()
    assert listing.startswith("# imagenet=") and "seed=0" in listing and len(listing.splitlines()) == 31
    assert "30 images of 3 classes" in made.stdout  # the fixture's 3 classes, not ImageNet's 1000: said
    assert "has 3 classes under train/, ImageNet-1k 1000" in made.stderr
    again = bench("data", "make-sin10k", "--imagenet", str(root / "imagenet"), "--seed", "0",
                  "--data-root", str(tmp_path))
    assert again.returncode == 0 and (tmp_path / "sin10k" / "files.txt").read_text().splitlines()[1:] == \
        listing.splitlines()[1:]
    res = tmp_path / "r"
    run = bench("run", "--table", "transfer", "--preset", "demo", "--backbones", "pvt_v2_b0", "--methods", "idmm",
                "--set", "pretrain_data.sin10k=sin10k", "--datasets", "flowers102", "--data-root", str(root),
                "--results", str(res), *FAST)
    assert run.returncode == 0, run.stderr
    pre = next(json.loads(p.read_text()) for p in res.glob("*.json") if '"pretrain"' in p.read_text())
    assert pre["config"]["data"] == "sin10k" and pre["metrics"]["train_size"] == 30
    assert pre["metrics"]["data"]["seed"] == "0" and len(pre["metrics"]["data"]["list_sha256"]) == 16


def test_data_list_and_check(root, tmp_path):
    listing = bench("data", "list", "--data-root", str(root))
    assert listing.returncode == 0
    assert [line.split()[4] for line in listing.stdout.splitlines() if line.startswith("flowers102")] == ["found"]
    empty = bench("data", "check", "flowers102", "--data-root", str(tmp_path))
    assert empty.returncode == 2 and len(empty.stderr.strip().splitlines()) == 1
    small = bench("data", "check", "cub200", "--data-root", str(root))
    assert small.returncode == 2 and "train has 6 images, the paper's split has 5994" in small.stderr


def test_a_corrupt_jpeg_is_named_and_leaves_no_record(root, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(root / "mine", bad)
    victim = bad / "train" / "cat" / "cat1.jpg"
    victim.write_bytes(victim.read_bytes()[:200])  # truncated
    args = ["run", "--table", "comparison", "--preset", "demo", "--methods", "random", "--datasets", f"folder:{bad}",
            "--results", str(tmp_path / "r"), *FAST]
    out = bench(*args)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("bench: error:")]
    assert len(errors) == 1 and str(victim) in errors[0] and "Traceback" not in out.stderr
    assert not list((tmp_path / "r").glob("*.json"))
    checked = bench("data", "check", f"folder:{bad}")  # the whole folder decoded, before any job
    assert checked.returncode == 2 and str(victim) in checked.stderr and len(checked.stderr.splitlines()) == 1
    skipped = bench(*args, "--skip-bad")
    assert skipped.returncode == 0, skipped.stderr
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "r").glob("*.json")]
    assert rec["metrics"]["data"]["train"]["skipped_bad_images"] == [str(victim)]
    assert rec["metrics"]["train_size"] == 5
    assert f"bench: skipped: 1 unreadable file of folder:{bad} train (the record lists them), e.g. {victim}" \
        in skipped.stderr  # said on the console as the streamed path says it (only the record had it)


def test_download_offline_fails_with_one_line(tmp_path):
    import socket

    try:  # this suite runs offline; where the official host answers, a real 330 MB download is no test
        socket.create_connection(("www.robots.ox.ac.uk", 443), timeout=2).close()
        pytest.skip("online: not downloading Flowers102 in a test")
    except OSError:
        pass
    out = bench("data", "download", "flowers102", "--data-root", str(tmp_path))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "downloading flowers102" in out.stderr and "offline?" in out.stderr
    told = bench("data", "download", "indoor67", "--data-root", str(tmp_path))
    assert told.returncode == 0 and "indoor67/{Images/, TrainImages.txt, TestImages.txt}" in told.stdout


def test_a_folder_named_in_the_users_file_is_a_column(root, tmp_path, monkeypatch):
    config = tmp_path / "datasets.yaml"
    config.write_text(f"mine: {root / 'mine'}\n")
    env = {"BENCH_DATASETS": str(config)}
    check = bench("data", "check", "mine", env=env)
    assert check.returncode == 0 and "train 6 images / 2 classes, test 4 images / 2 classes" in check.stdout
    run = bench("run", "--table", "comparison", "--preset", "demo", "--methods", "random", "--datasets", "mine",
                "--results", str(tmp_path / "r"), *FAST, env=env)
    assert run.returncode == 0, run.stderr
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "r").glob("*.json")]
    assert rec["config"]["data"] == "mine" and rec["metrics"]["train_size"] == 6
    rep = bench("report", "--results", str(tmp_path / "r"), env=env, cwd=str(tmp_path))
    header = next(line for line in rep.stdout.splitlines() if line.startswith("| Backbone"))
    assert [c.strip() for c in header.strip("|").split("|")][-1] == "mine"  # the records add their column
    unknown = bench("run", "--datasets", "yours", env=env)
    assert unknown.returncode == 2 and "mine" in unknown.stderr and str(config) in unknown.stderr
    import shutil

    odd = tmp_path / "odd"  # a test class the train split lacks: found on disk, unusable
    shutil.copytree(root / "mine", odd)
    first = sorted((odd / "test").iterdir())[0]
    first.rename(first.with_name("zebra"))
    (tmp_path / "empty").mkdir()  # what a download that failed leaves
    config.write_text(f"mine: {root / 'mine'}\ngone: {tmp_path / 'gone'}\nodd: {odd}\nempty: {tmp_path / 'empty'}\n")
    monkeypatch.setenv("BENCH_DATASETS", str(config))
    listed = in_process("data", "list")
    assert [line.split()[4] for line in listed.stdout.splitlines()
            if line.startswith(("mine", "gone", "odd", "empty"))] == ["found", "missing", "invalid", "missing"]
    told = in_process("data", "download", "mine")
    assert told.returncode == 0 and "your own folder" in told.stdout


def test_a_class_folder_without_images_is_refused_and_a_hidden_folder_is_no_class(root, tmp_path):
    import shutil

    mine = tmp_path / "mine"
    shutil.copytree(root / "mine", mine)
    (mine / "train" / ".ipynb_checkpoints").mkdir()
    files, labels, classes, _ = datasets.split_files(f"folder:{mine}", "train")
    assert len(classes) == 2 and sorted(set(labels)) == [0, 1]
    (mine / "train" / "empty").mkdir()
    (mine / "train" / "empty" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="empty holds no images"):
        datasets.split_files(f"folder:{mine}", "train")


def test_a_folder_that_cannot_be_listed_is_named_not_passed_over(tmp_path):
    """os.walk passes over a folder it cannot list (another user's, a network mount's fault): the images below
    it were left out of their class without a word, and a class folder itself was said to hold no images."""
    fixtures.folder(tmp_path / "mine")
    below = tmp_path / "mine" / "train" / "cat" / "more"
    fixtures.jpeg(below / "cat9.jpg", 1)
    below.chmod(0)
    try:
        out = without_root("data", "check", f"folder:{tmp_path / 'mine'}")
    finally:
        below.chmod(0o755)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"cannot list {below} (Permission denied)" in out.stderr


def test_a_folder_is_read_as_imagefolder_reads_it(root, tmp_path):
    """Images at any depth below their class folder, hidden files left out (macOS's ._name twins), a class
    folder that links nowhere and a single class refused rather than silently dropped or scored 100%."""
    import shutil

    mine = tmp_path / "mine"
    shutil.copytree(root / "mine", mine)
    before = datasets.split_files(f"folder:{mine}", "train")[0]
    deep = mine / "train" / "cat" / "a" / "b"
    deep.mkdir(parents=True)
    shutil.copy(before[0], deep / "deep.ppm")
    (mine / "train" / "cat" / "._cat1.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    files, labels, classes, _ = datasets.split_files(f"folder:{mine}", "train")
    assert len(files) == len(before) + 1 and deep / "deep.ppm" in files and classes == ["cat", "dog"]
    assert labels[files.index(deep / "deep.ppm")] == 0 and not any(f.name.startswith(".") for f in files)
    datasets.check_available(f"folder:{mine}")  # the hidden file is not read as an image
    # links back up (os.walk follows them for ever: two such links hung bench) or to a folder already read
    for link, to in (("self", "."), ("self2", "."), ("up", ".."), ("again", "a")):
        (mine / "train" / "cat" / "a" / link).symlink_to(to if to != "a" else mine / "train" / "cat" / "a")
    assert datasets.split_files(f"folder:{mine}", "train")[0] == files  # each image once
    (mine / "train" / "bird").symlink_to(tmp_path / "unmounted")
    with pytest.raises(UserError, match=r"train/bird links to .*unmounted, which is not there$"):
        datasets.split_files(f"folder:{mine}", "train")
    (mine / "train" / "bird").unlink()
    for split in ("train", "test"):
        shutil.rmtree(mine / split / "dog")
    with pytest.raises(UserError, match="1 class; a classification needs at least 2"):
        datasets.check_available(f"folder:{mine}")


def test_one_folder_named_two_ways_is_one_column_and_one_job(root, tmp_path, monkeypatch):
    """Relative paths, ~ and a trailing / name one folder: the plan holds its absolute path, so that the same
    name in another directory is another folder, not a record of this one."""
    from bench import plan as planner

    monkeypatch.chdir(root)
    monkeypatch.setenv("HOME", str(root))
    jobs = planner.plan("comparison", planner.load_preset("demo"), ["random"],
                        ["folder:mine", "folder:./mine/", f"folder:{root}/mine", "folder:~/mine"])
    assert [j.config["data"] for j in jobs] == [f"folder:{root / 'mine'}"]
    with pytest.raises(UserError, match="folder: names no folder"):
        planner.plan("comparison", planner.load_preset("demo"), ["random"], ["folder:"])


def test_unreadable_images_by_any_cause_are_one_line_and_skip_bad_never_empties_a_class(root, tmp_path, monkeypatch):
    import shutil

    from PIL import Image

    mine = tmp_path / "mine"
    shutil.copytree(root / "mine", mine)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # past twice this, PIL refuses a file as a bomb
    big = mine / "train" / "cat" / "big.png"
    Image.new("RGB", (100, 100)).save(big)
    with pytest.raises(UserError, match=f"^cannot read image {big}: Image size .*--skip-bad leaves such files out"):
        datasets.check_available(f"folder:{mine}")
    datasets.check_available(f"folder:{mine}", skip_bad=True)
    big.unlink()
    Image.new("I", (8, 8)).save(mine / "train" / "cat" / "deep.tif")  # 32-bit pixels: no known 0-255 scale
    with pytest.raises(UserError, match="32-bit integer pixels .* --skip-bad leaves such files out"):
        datasets.check_available(f"folder:{mine}")
    datasets.check_available(f"folder:{mine}", skip_bad=True)
    for f in (mine / "test" / "dog").iterdir():
        f.write_bytes(b"")
    with pytest.raises(UserError, match="test: no readable image of class 'dog' is left once unreadable files"):
        datasets.check_available(f"folder:{mine}", skip_bad=True)


def test_a_folder_whose_every_image_opened_is_not_opened_again_until_a_file_changes(root, tmp_path):
    """Every `bench run` opened every image of a folder again (ImageNet-sized: half an hour on one core): a
    split whose images all opened is remembered under the cache by its files' names, sizes and times."""
    import os
    import shutil

    mine, cache = tmp_path / "mine", tmp_path / "cache"
    shutil.copytree(root / "mine", mine)
    datasets.check_available(f"folder:{mine}", cache_dir=str(cache))
    assert len(list(cache.glob("opened-*"))) == 2  # train and test
    victim = next((mine / "train" / "cat").iterdir())
    st = victim.stat()
    victim.write_bytes(b"\0" * st.st_size)  # damaged, its size and time as before: the memo vouches for it
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    datasets.check_available(f"folder:{mine}", cache_dir=str(cache))
    victim.write_bytes(b"\0")  # a file changed: opened again
    with pytest.raises(UserError, match=f"^cannot read image {victim}: "):
        datasets.check_available(f"folder:{mine}", cache_dir=str(cache))


def test_data_check_opens_the_images_of_a_registered_dataset(root, tmp_path, monkeypatch, capsys):
    """`bench data check cub200` compared split sizes and never opened an image (the README said it did): a
    broken file was found mid-job, hours later."""
    import shutil

    from bench.cli import main

    shutil.copytree(root / "CUB_200_2011", tmp_path / "CUB_200_2011")
    broken = sorted((tmp_path / "CUB_200_2011" / "images").rglob("*.jpg"))[0]
    broken.write_bytes(b"garbage")
    assert main(["data", "check", "cub200", "--data-root", str(tmp_path)]) == 2
    assert f"cannot read image {broken}" in capsys.readouterr().err


def test_a_very_elongated_test_image_is_resized_from_the_region_it_shows(tmp_path):
    """Not whole (an 8000 x 1 image took 8 GB so): the same centre square, but for its edges, on both decoders."""
    import numpy as np
    from PIL import Image

    from bench.data.resident import decode_file, shape_tensor

    pixels = np.random.default_rng(0).integers(0, 255, (10, 700, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "strip.png")
    got = decode_file(tmp_path / "strip.png", 256)
    whole = Image.fromarray(pixels).resize((17920, 256), Image.BICUBIC).crop((8832, 0, 9088, 256))
    diff = (got.int() - torch.from_numpy(np.array(whole)).permute(2, 0, 1).int()).abs()
    assert got.shape == (3, 256, 256) and diff[:, :, 8:-8].max() <= 1 and diff.float().mean() < 1
    assert torch.equal(shape_tensor(torch.from_numpy(pixels).permute(2, 0, 1), 256, None), got)


@pytest.mark.parametrize("h,w", [(300, 1), (40, 1), (1, 300), (2, 700)])
def test_an_image_a_pixel_wide_is_shaped_on_the_device_as_pil_shapes_it(tmp_path, h, w):
    """torch's antialiased resize of a tensor one pixel wide was off by up to 200 levels (the device decoder's)."""
    import numpy as np
    from PIL import Image

    from bench.data.resident import decode_file, shape_tensor

    pixels = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "line.png")
    for size, max_side in ((0, 16), (0, 64), (24, None)):
        pil = decode_file(tmp_path / "line.png", size, max_side)
        dev = shape_tensor(torch.from_numpy(pixels).permute(2, 0, 1), size, max_side)
        assert pil.shape == dev.shape and (pil.int() - dev.int()).abs().max() <= 1, (size, max_side)


def test_a_folder_whose_path_is_long_keeps_its_decoded_cache(root, tmp_path):
    import shutil

    deep = tmp_path.joinpath(*[f"level_{i:02d}_with_a_longish_name" for i in range(8)])
    shutil.copytree(root / "mine", deep)
    assert len(str(deep)) > 255
    first = datasets.resident.load(f"folder:{deep}", "train", datasets.split_files(f"folder:{deep}", "train"),
                                   24, False, str(tmp_path / "cache"), 64, {})
    (cached,) = (tmp_path / "cache").iterdir()
    assert len(cached.name) < 128
    again = datasets.resident.load(f"folder:{deep}", "train", datasets.split_files(f"folder:{deep}", "train"),
                                   24, False, str(tmp_path / "cache"), 64, {})
    assert torch.equal(first.images, again.images)


def test_the_decoded_cache_is_one_per_split_and_follows_its_labels(root, tmp_path):
    """Whole images (max_side) were decoded and kept once per stage size (Flowers three times at the paper's
    224/256/512), a label file edited since (CUB's image_class_labels.txt) still gave the old labels, and a
    folder named in 4-byte characters made a cache name over the 255-byte limit."""
    import shutil

    cache, mine = tmp_path / "cache", tmp_path / ("😀" * 60)
    shutil.copytree(root / "mine", mine)
    opts = dict(cache_dir=str(cache), max_side=64)
    first = datasets.load(f"folder:{mine}", "train", 24, **opts)
    assert datasets.load(f"folder:{mine}", "train", 32, **opts) is first and len(list(cache.iterdir())) == 1
    (cached,) = cache.iterdir()
    assert len(cached.name.encode()) < 255
    files, labels, classes, meta = datasets.split_files(f"folder:{mine}", "train")
    swapped = datasets.resident.load(f"folder:{mine}", "train", (files, [1 - v for v in labels], classes, meta),
                                     0, False, str(cache), 64, {})
    assert torch.equal(swapped.labels, 1 - first.labels) and torch.equal(swapped.images, first.images)
    again = datasets.resident.load(f"folder:{mine}", "train", (files, labels, classes, meta), 0, False, str(cache),
                                   64, {})  # read from its file (tensors and plain data only), not set aside
    assert torch.equal(again.images, first.images) and len(list(cache.iterdir())) == 2


@pytest.mark.parametrize("content", [b"# garbage header\nn01/a.JPEG\n", b"", b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary",
                                     b"# imagenet=/x seed=0 per_class=10\n"],
                         ids=["bad-header", "empty", "binary", "no-images"])
def test_a_damaged_sin10k_list_is_one_line_and_listed_as_invalid(tmp_path, content):
    from conftest import in_process

    listing = tmp_path / "sin10k" / "files.txt"
    listing.parent.mkdir()
    listing.write_bytes(content)
    with pytest.raises(UserError) as e:
        datasets.split_files("sin10k", "train", tmp_path)
    assert str(listing) in str(e.value) and len(str(e.value).splitlines()) == 1
    check = in_process("data", "check", "sin10k", "--data-root", tmp_path)
    assert check.returncode == 2 and len(check.stderr.splitlines()) == 1 and str(listing) in check.stderr
    rows = in_process("data", "list", "--data-root", tmp_path)
    assert rows.returncode == 0
    assert [line.split()[4] for line in rows.stdout.splitlines() if line.startswith("sin10k")] == ["invalid"]


def test_a_sin10k_list_reads_an_imagenet_path_with_spaces(tmp_path):
    (tmp_path / "sin10k").mkdir()
    (tmp_path / "sin10k" / "files.txt").write_text("# imagenet=/my data/in1k seed=3 per_class=1\nn01/a.JPEG\n")
    files, labels, classes, meta = datasets.split_files("sin10k", "train", tmp_path)
    assert [str(f) for f in files] == ["/my data/in1k/train/n01/a.JPEG"] and classes == ["n01"]
    assert (meta["imagenet"], meta["seed"], meta["per_class"]) == ("/my data/in1k", "3", "1")


@pytest.mark.parametrize("content, words", [(b"\xff\xfe\x00\x01binary", ": not text"),
                                            (b"mine: [1\n", "not valid YAML: while parsing a flow sequence: expected ',' or ']'"),
                                            (b"mine:\n", "mine: expected a folder, got None"),
                                            (b"mine: 5\n", "mine: expected a folder, got 5"),
                                            (b"folder:x: /x\n", "may not start with 'folder:'"),
                                            (b"pets: /x\n", "pets: the name of one of bench's datasets")],
                         ids=["binary", "bad-yaml", "no-folder", "a-number", "folder-prefix", "taken-name"])
def test_a_bad_users_datasets_file_is_named_in_one_line(tmp_path, monkeypatch, content, words):
    mine = tmp_path / "datasets.yaml"
    mine.write_bytes(content)
    monkeypatch.setenv("BENCH_DATASETS", str(mine))
    with pytest.raises(UserError) as e:
        datasets.info("mine")
    assert str(mine) in str(e.value) and words in str(e.value) and len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("where", ["a-file", "under-a-file", "/proc/nope"])
def test_make_sin10k_into_a_root_it_cannot_write_is_one_line(tmp_path, where):
    for i in range(10):  # make_sin10k only lists the names
        (tmp_path / "imagenet" / "train" / "n01").mkdir(parents=True, exist_ok=True)
        (tmp_path / "imagenet" / "train" / "n01" / f"{i}.JPEG").touch()
    (tmp_path / "a-file").write_text("not a folder")
    root = {"a-file": tmp_path / "a-file", "under-a-file": tmp_path / "a-file" / "sub"}.get(where, where)
    with pytest.raises(UserError) as e:
        datasets.make_sin10k(tmp_path / "imagenet", root, seed=0)
    assert str(e.value).startswith(f"cannot write {root}/sin10k/files.txt: ") and len(str(e.value).splitlines()) == 1
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_make_sin10k_from_a_train_folder_without_classes_is_one_line(tmp_path):
    """It wrote a list of no images, counted as one image of one class, and exited 0."""
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match=r"train holds no class folders: --imagenet should hold train/<wnid>/\*\.JPEG$"):
        datasets.make_sin10k(tmp_path / "imagenet", tmp_path / "root", seed=0)
    assert not (tmp_path / "root").exists()


def test_make_sin10k_lists_no_hidden_file_or_folder(tmp_path):
    """macOS's ._name twins were picked as images (a sin10k job then failed on them, or dropped them and N was
    wrong), and a hidden folder (.ipynb_checkpoints) counted as a class with too few images."""
    train = tmp_path / "imagenet" / "train"
    for i in range(10):
        (train / "n01").mkdir(parents=True, exist_ok=True)
        (train / "n01" / f"{i}.JPEG").touch()
        (train / "n01" / f"._{i}.JPEG").touch()
    (train / ".ipynb_checkpoints").mkdir()
    listed = datasets.make_sin10k(tmp_path / "imagenet", tmp_path / "root", seed=0).read_text().splitlines()[1:]
    assert sorted(listed) == [f"n01/{i}.JPEG" for i in range(10)]


def test_imagenet_with_its_archive_s_flat_val_folder_says_how_to_sort_it(tmp_path):
    """val/ as ILSVRC2012's archive has it (50,000 JPEGs, no <wnid>/ folders) read as a split of no class:
    'different classes (only in train: ...; only in test: -)', with no word of why."""
    import shutil

    fixtures.imagenet(tmp_path)
    val = tmp_path / "imagenet" / "val"
    for f in list(val.rglob("*.JPEG")):
        shutil.move(f, val / f.name)
    for d in [d for d in val.iterdir() if d.is_dir()]:
        d.rmdir()
    with pytest.raises(UserError, match=r"val has no <class>/ folders: its images lie in it directly; .*sort it into "
                                        r"val/<wnid>/ by the official validation ground truth\)$"):
        datasets.check_available("imagenet", tmp_path)


def test_a_stop_or_an_error_ends_the_threaded_reading_of_a_split_at_once(root):
    """Ctrl-C while a split's files were opened or decoded by threads: the pool's exit first ran every file not
    yet begun (ImageNet's: minutes), and in a job, whose handlers only note a signal, decoding went on to the end."""
    import signal
    import time

    from bench import engine
    from bench.data import resident
    from bench.engine import Interrupted

    ran = []

    def slow(i):
        ran.append(i)
        time.sleep(0.005)
        if i == 3:
            raise KeyboardInterrupt
        return i

    with pytest.raises(KeyboardInterrupt):
        resident.in_threads(slow, range(2000))
    time.sleep(0.05)
    assert len(ran) < 50  # the rest were dropped, not run (2000 x 5 ms)

    files = sorted((root / "mine" / "train").rglob("*.*"))
    engine.request_stop(signal.SIGINT)
    try:
        with pytest.raises(Interrupted, match="stopped by signal SIGINT$"):
            resident.decode_all(files, 16, skip_bad=False)
    finally:
        engine.clear_stop_requests()
    assert len(resident.decode_all(files, 16, skip_bad=False)) == len(files)
