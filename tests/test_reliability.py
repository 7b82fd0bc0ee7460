"""Damaged state, concurrent runs and bad values: each case heals and finishes, or is one line and exit 2."""
import contextlib
import json
import math
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fixtures
from bench import data as datasets
from bench.data import resident
from bench import plan as planner
from bench.errors import UserError
from bench.results import Lock, Store
from conftest import FAST, in_process, without_root
from test_engine import _KILLED_RUN


def bench(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, cwd=cwd)


def one_line_exit_2(res, *words):
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    for w in words:
        assert w in res.stderr, (w, res.stderr)


@pytest.mark.parametrize("content,words", [
    ("base: paper\npretrain: 5\n", ["pretrain", "group of settings"]),
    ("- 1\n- 2\n", ["map of settings"]),
    ("base: SELF\n", ["leads back to this file"]),
    ("base: nope\n", [": base: nope: no such preset: choose from"]),
    ("base: paper\npretrain: {epoch: 3}\n", ["unknown setting 'pretrain.epoch'"]),
    ("base: paper\nfoo: 1\n", ["unknown setting 'foo'"]),
    ("x: [1\n", ["not valid YAML"]),
    ("base: demo\npretrain: {epochs: 3}\nfinetune: {epochs: 2}\npretrain: {epochs: 4}\n",
     ["the key 'pretrain' is written twice in one map (line 4"]),
    (b"\x89\xff\x00\x12binary", ["not text (byte"]),
    ("base: paper\nmethods: {idmm: {label_smoothing: 2}}\n", ["methods.idmm.label_smoothing", "[0, 1)"]),
    ("base: paper\nfinetune: {views: {crops: [{count: 1, size: 8, scale: [0.5, 0.1]}]}}\n", ["scale"]),
    ("base: demo\nbackbones: {deit_tiny_patch16_244: {lr: 1.0e-3, warmup_epochs: 1, kwargs: {}}}\n",
     ["backbones.deit_tiny_patch16_244: timm has no model", "did you mean deit_tiny_patch16_224?"]),
])
def test_a_bad_preset_file_is_named_with_its_key(tmp_path, content, words):
    path = tmp_path / "mine.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content.replace("SELF", str(path)))
    with pytest.raises(UserError) as e:
        planner.load_preset(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("item,words", [
    ("pretrain.epochs=-1", ["pretrain.epochs", ">= 1"]), ("pretrain.epochs=0", ["pretrain.epochs"]),
    ("pretrain.epochs=abc", ["'abc'"]), ("pretrain.batch_size=0", ["pretrain.batch_size"]),
    ("pretrain.lr=nan", ["pretrain.lr", "finite"]), ("pretrain.lr=-1", ["pretrain.lr"]),
    ("finetune.stages.224.batch_size=0", ["finetune.stages.224.batch_size"]),
    ("finetune.mixing.parts=0", ["finetune.mixing.parts"]), ("pretrain.max_side=0", ["pretrain.max_side"]),
    ("finetune.drop_path=1.5", ["finetune.drop_path"]), ("data.decode=gpu", ["data.decode", "auto, pil or device"]),
    ("data.stream=1", ["data.stream", "true, false or auto"]),  # 1 == True: accepted, then not streamed
    ("backbones.deit_tiny_patch16_224.kwargs.drop_path_rate=0.5", ["set by bench", "finetune.drop_path"]),
    ("backbones.deit_tiny_patch16_224.kwargs.img_size=32", ["set by bench", "finetune.resolution"]),
])
def test_a_bad_set_value_is_refused_before_any_work(item, words):
    with pytest.raises(UserError) as e:
        planner.load_preset("demo", [item])
    assert str(e.value).startswith(f"--set {item}: ")
    for w in words:
        assert w in str(e.value)


def test_bad_values_on_the_command_line_are_one_line_and_exit_2(tmp_path):
    res = str(tmp_path / "r")
    one_line_exit_2(in_process("run", "--preset", "demo", "--set", "pretrain.epochs=-1", "--results", res),
                    "pretrain.epochs")
    one_line_exit_2(in_process("run", "--preset", "demo", "--seeds", str(2 ** 40), "--results", res), "--seeds")
    one_line_exit_2(in_process("data", "make-sin10k", "--imagenet", tmp_path, "--data-root", tmp_path, "--seed", "-1"),
                    "--seed -1: expected a whole number in [0, 2**31)")  # it was written into the list
    one_line_exit_2(in_process("report", "--seeds", "-5", "--results", res), "--seeds -5")
    if not torch.cuda.is_available():  # a flag that cannot act is said, not silently dropped
        packed = in_process("run", "--preset", "demo", "--jobs-per-gpu", "2", "--dry-run", "--results", res)
        assert packed.returncode == 0 and "--jobs-per-gpu 2 is unused: no GPU is visible" in packed.stderr
    for dry in ([], ["--dry-run"]):  # a dry run refuses it too: it had shown the jobs pending
        one_line_exit_2(in_process("run", "--preset", "demo", "--datasets", "digits_extra", "--results", res, *dry),
                        "no test split")
    (tmp_path / "file").write_text("x")
    one_line_exit_2(in_process("run", "--preset", "demo", "--results", str(tmp_path / "file")), "is a file")
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "runs").write_text("x")
    one_line_exit_2(in_process("run", "--preset", "demo", "--results", str(tmp_path / "r2")), "runs there is a file")
    # backbone kwargs timm cannot take, or a shape that cannot run, before any job (and on SLURM, before the queue)
    kw = "backbones.deit_tiny_patch16_224.kwargs"
    for item, words in ((f"{kw}.num_heads=5", "AssertionError: dim should be divisible by num_heads"),
                        (f"{kw}.bogus=1", "unexpected keyword argument 'bogus'"),
                        (f"{kw}.embed_dim=0", "ZeroDivisionError"), (f"{kw}.patch_size=20", "not a whole number of its 20-px patches")):
        for dry in ([], ["--dry-run"]):
            one_line_exit_2(in_process("run", "--preset", "demo", "--set", item, "--results", res, *dry), kw, words)
    # an entry the open maps take but nothing reads: a typo changed nothing, and exit 0
    for item, words in (("finetune.resolution.244=32", "finetune.resolution.244: not a fine-tuning stage's "
                                                       "resolution (224, 448)"),
                        ("finetune.resolution={'224': 32}", "finetune.resolution.'224': not a fine"),
                        ("pretrain_data={sin10: flowers102}", "pretrain_data.sin10: not a pretraining set a "
                                                              "table's row names (sin10k, sin_total_10k)")):
        one_line_exit_2(in_process("run", "--preset", "demo", "--set", item, "--results", res, "--dry-run"), words)
    crops = "methods.idmm.views.crops=[{count: 2, size: 20, scale: [0.2, 1.0]}]"  # a ViT built for 16 px
    one_line_exit_2(in_process("run", "--preset", "demo", "--set", crops, "--results", res, "--dry-run"),
                    "methods.idmm.views: crops of 20 px, but pretrain.resolution builds deit_tiny_patch16_224 for 16 px")
    assert not (tmp_path / "r").exists()  # nothing ran


@pytest.mark.parametrize("sig,said", [("SIGINT", "interrupted"), ("SIGTERM", "stopped by signal SIGTERM")])
def test_ctrl_c_or_sigterm_while_torch_loads_is_one_line(sig, said):
    """SIGTERM there ended the process by its default, without a word."""
    import signal
    import time

    # `bench` spends its first seconds importing torch (7 s cold on the CI machine, >1 s warm); 0.5 s lands there
    p = subprocess.Popen([sys.executable, "-m", "bench", "methods"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    time.sleep(0.5)
    p.send_signal(getattr(signal, sig))
    out, err = p.communicate(timeout=60)
    assert (err, out) == (f"bench: {said}\n", "")
    # 128 + the signal, or death by SIGINT, which a shell reports as 130 too: CPython ends that way, after the
    # handler ran, when the interrupt landed in code a C extension ran during its import (torch's), whoever caught it
    assert p.returncode in (128 + getattr(signal, sig), -signal.SIGINT)


def _record(h, **kw):
    return {"hash": h, "status": "done", "stage": "finetune", "seed": 0, "preset": "demo", "cells": [],
            "config": {"stage": "finetune", "data": "digits", "init": "random"}, "metrics": {"top1": 0.5},
            "hardware": {"cpus": 2, "machine": "x86_64"}, **kw}


_IN_A_TABLE = {"cells": [["comparison", "deit_tiny/idmm", "digits"]]}


@pytest.mark.parametrize("damage", [
    lambda r: '{"hash": "fedcba98765',  # cut short
    lambda r: {k: v for k, v in r.items() if k != "config"},  # JSON, but not what a report reads: edited by hand
    lambda r: {**r, "metrics": None}, lambda r: {**r, "metrics": {"top1": "x"}}, lambda r: {**r, "seed": "x"},
    lambda r: {**r, "cells": 5}, lambda r: {**r, "hash": None}, lambda r: {**r, "status": "odd"},
    lambda r: {**r, "config": {"stage": "finetune"}},
    # the report's mean took a NaN as no value, a 2.5 as 250%, and an overrides list of numbers crashed it
    lambda r: {**r, "metrics": {"top1": math.nan}}, lambda r: {**r, "metrics": {"top1": 2.5}},
    lambda r: {**r, "metrics": {"train_loss": 0.5}},  # a finished fine-tuning: it passed as a result without one
    lambda r: {**r, "wall_time_s": math.inf}, lambda r: {**r, "overrides": [1]},
    # a record that fills no cell is read as a stage of a cell's chain (the report's footer): it crashed it
    lambda r: {k: v for k, v in r.items() if k not in ("hardware", "cells")},
    lambda r: {**r, "cells": [], "config": {}},
], ids=["cut", "no-config", "metrics-null", "top1-text", "seed-text", "cells-number", "hash-null", "status-odd",
        "config-without-data", "top1-nan", "top1-percent", "top1-missing", "wall-infinite", "overrides-numbers",
        "no-cells-no-hardware", "no-cells-empty-config"])
def test_damaged_and_foreign_json_files_are_ignored_and_named(tmp_path, damage):
    store = Store(tmp_path)
    store.put(_record("0123456789abcdef", **_IN_A_TABLE))
    bad = damage(_record("fedcba9876543210", **_IN_A_TABLE))
    (tmp_path / "fedcba9876543210.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
    (tmp_path / "notes.json").write_text("[1, 2]")  # not ours
    assert [r["hash"] for r in store.records()] == ["0123456789abcdef"]
    assert store.get("fedcba9876543210") is None
    assert [p.name for p, _ in store.damaged()] == ["fedcba9876543210.json"]
    status = in_process("status", "--results", str(tmp_path))
    assert status.returncode == 0 and "damaged record" in status.stdout and "fedcba9876543210.json" in status.stdout
    report = in_process("report", "--results", str(tmp_path), cwd=str(tmp_path))
    assert report.returncode == 0, report.stderr
    assert f"1 damaged records in {tmp_path} are left out" in report.stderr
    # writing that job's record again keeps the damaged file aside rather than losing it
    store.put(_record("fedcba9876543210", **_IN_A_TABLE))
    assert store.get("fedcba9876543210")["status"] == "done"
    assert len(list(tmp_path.glob("fedcba9876543210.json.damaged-*"))) == 1


def test_status_and_rerun_tell_a_job_running_in_another_process_from_one_not_started(tmp_path, monkeypatch):
    res = str(tmp_path / "r")
    args = ["--table", "comparison", "--preset", "demo", "--methods", "random", "--results", res,
            "--set", "finetune.epochs=2"]
    job = planner.plan("comparison", planner.load_preset("demo", ["finetune.epochs=2"]), ["random"])[0]

    def state():
        out = in_process("status", *args)
        assert out.returncode == 0, out.stderr
        return next(line for line in out.stdout.splitlines() if line.startswith(job.hash[:10])).split("  ")[1].strip()

    assert state() == "not started"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bench.results import Lock; "
                               "assert Lock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
                               str(Store(res).run_dir(job.hash))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert state().startswith(f"running (") and f":{holder.pid})" in state()
        (Store(res).run_dir(job.hash) / "metrics.jsonl").write_text("{}\n")  # what a running job has written
        # --rerun moved its log from under it and then took the other run's record for its own
        one_line_exit_2(in_process("run", *args, "--rerun", job.hash[:8]),
                        f"--rerun {job.short}: the job is being trained by ", f":{holder.pid}; stop it")
        assert (Store(res).run_dir(job.hash) / "metrics.jsonl").read_text() == "{}\n"
        # bench cancel said "cancelled 0 SLURM jobs (none queued or running)" of a job status calls running
        cancel = in_process("cancel", *args)
        assert cancel.returncode == 0 and f"outside SLURM, 1 job is training: {job.short} (" in cancel.stderr
        assert f":{holder.pid}). Stop one with Ctrl-C" in cancel.stderr and holder.poll() is None
    finally:
        holder.kill()
        holder.wait()
    assert state() == "not started"  # its lock outlived it, naming a process that is gone
    import bench.engine as engine

    real, calls = engine.make_views, [0]

    def stop_at_the_thirtieth_step(*a):  # as a Ctrl-C there would: the step ends, the checkpoint is written
        calls[0] += 1
        if calls[0] == 30:
            engine.request_stop()
        return real(*a)

    monkeypatch.setattr(engine, "make_views", stop_at_the_thirtieth_step)
    assert in_process("run", *args).returncode == 143  # SIGTERM's
    engine.clear_stop_requests()
    assert state() == "stopped, checkpoint at epoch 1 step 4 of 2 epochs"  # 26 steps an epoch: 807 digits, 32 a batch


def test_a_launch_note_of_another_shape_leaves_status_and_cancel_working(tmp_path):
    """launch.json, hand-edited or an earlier version's: status and cancel crashed on a missing job id, a string
    or a list where a map was."""
    run = Store(tmp_path).run_dir("0123456789abcdef")
    run.mkdir(parents=True)
    for note in ['{"launcher": "slurm"}', '"local"', "[]", '{"launcher": "local", "job": "x"}',
                 '{"launcher": "local", "log": 5}', '{"launcher": "slurm", "job_id": 7, "submitted": 0}']:
        (run / "launch.json").write_text(note)
        for cmd in ("status", "cancel"):
            out = in_process(cmd, "--results", tmp_path)
            assert out.returncode == 0 and not out.stderr, (note, cmd, out.stderr)
    (run / "launch.json").write_text('{"launcher": "local", "job": {"stage": "pretrain", "method": "idmm"}}')
    assert "pretrain  idmm" in in_process("status", "--results", tmp_path).stdout  # a good note is still read
    for cmd in ("status", "cancel"):  # without --table a filter was ignored: cancel stopped every job of the store
        for flag in (["--methods", "idmm"], ["--seeds", "1"], ["--preset", "demo"], ["--set", "pretrain.epochs=1"]):
            one_line_exit_2(in_process(cmd, "--results", tmp_path, *flag),
                            f"{flag[0]} selects the jobs of a table: give --table too")


def test_a_report_says_when_records_fill_a_table_it_does_not_know(tmp_path):
    """A table of one's own whose tables file moved away: its records would otherwise just not show."""
    Store(tmp_path).put(_record("0123456789abcdef", cells=[["mine", "deit_tiny/idmm", "digits"]]))
    report = in_process("report", "--results", str(tmp_path), cwd=str(tmp_path))
    assert report.returncode == 0 and "fill tables bench does not know here: mine" in report.stderr


WHY = {"entries": "entries are not this model's", "shapes": "shapes are not this model's",
       "groups": "parameter groups are not this optimiser's"}


@pytest.mark.parametrize("damage", ["bytes", *WHY])
def test_a_damaged_checkpoint_is_set_aside_and_the_job_starts_over(tmp_path, tiny_vit, tiny_images, capfd, damage):
    """Damaged bytes, or a checkpoint whose model has other entries than this one (an earlier version's MoCo v2
    kept no queue), other shapes, or whose optimiser has other parameter groups (loading either failed the job
    on every run): set aside with the reason, and the job trains from epoch 0 to the weights of a fresh run."""
    from bench.engine import fit
    from bench.finetune import Classifier
    from test_engine import FT

    run = tmp_path / "run"
    ref = Classifier(tiny_vit(3), FT)
    fit(ref, tiny_images, FT, tmp_path / "ref")
    run.mkdir()
    if damage == "bytes":
        (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    else:
        ck = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=False)
        ck.update(epoch=1, step=0)
        first = next(iter(ck["model"]))
        if damage == "entries":
            ck["model"].pop(first)
        elif damage == "shapes":
            ck["model"][first] = torch.zeros(*ck["model"][first].shape[:-1], 1)
        else:
            ck["optimizer"]["param_groups"].append({**ck["optimizer"]["param_groups"][0], "params": []})
        torch.save(ck, run / "checkpoint.pt")
    capfd.readouterr()
    model = Classifier(tiny_vit(3), FT)
    fit(model, tiny_images, FT, run)
    assert len(list(run.glob("checkpoint.pt.damaged-*"))) == 1
    err = capfd.readouterr().err
    assert "starts again from epoch 0" in err and (damage == "bytes" or WHY[damage] in err)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("change", ["removed", "relabelled"])
def test_a_checkpoint_of_another_training_set_is_set_aside(tmp_path, tiny_vit, tiny_images, capfd, change):
    """Images removed from (or moved between classes of) a `folder:` dataset after a job stopped: no hash covers
    a folder's files, and the checkpoint's permutation and step count were drawn for the old set (resuming
    indexed past the end, failing the job on every run, or trained on in the old order). Set aside, naming both
    sets; the job trains from epoch 0 to the weights of a fresh run on the new set."""
    from bench.data import ImageSet
    from bench.engine import fit
    from bench.finetune import Classifier
    from test_engine import FT

    d = tiny_images
    new = (ImageSet(d.images[:9], d.labels[:9], d.classes, d.name) if change == "removed"
           else ImageSet(d.images, d.labels.roll(1), d.classes, d.name))
    fit(Classifier(tiny_vit(3), FT), d, FT, tmp_path / "old")
    ck = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=False)
    ck.update(epoch=0, step=2)  # stopped two steps into the first epoch
    (tmp_path / "run").mkdir()
    torch.save(ck, tmp_path / "run" / "checkpoint.pt")
    ref = Classifier(tiny_vit(3), FT)
    fit(ref, new, FT, tmp_path / "ref")
    capfd.readouterr()
    model = Classifier(tiny_vit(3), FT)
    fit(model, new, FT, tmp_path / "run")
    assert len(list((tmp_path / "run").glob("checkpoint.pt.damaged-*"))) == 1
    err = capfd.readouterr().err
    n = 9 if change == "removed" else 12
    assert re.search(rf"another training set: 12 images, labels \w+, now {n} images, labels \w+\).*epoch 0", err)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))


def test_a_checkpoint_the_file_system_cannot_read_now_fails_the_job_and_is_kept(tmp_path, tiny_vit, tiny_images):
    """An error of the file system (here an I/O error: /proc/self/mem read at address 0; on a cluster, a network
    mount's passing fault) says nothing of the checkpoint's content: setting it aside would throw away the job's
    progress. The job fails, naming the path, and the checkpoint stays where a run again finds it. A folder there
    is no passing fault: one line says to move it (a failed record said to run again, as often as one liked)."""
    from bench.engine import fit
    from bench.errors import UserError
    from bench.finetune import Classifier
    from test_engine import FT

    (tmp_path / "checkpoint.pt").symlink_to("/proc/self/mem")
    with pytest.raises(OSError, match="checkpoint.pt cannot be read now .*it is kept: run the job again"):
        fit(Classifier(tiny_vit(3), FT), tiny_images, FT, tmp_path)
    assert (tmp_path / "checkpoint.pt").is_symlink() and not list(tmp_path.glob("checkpoint.pt.*"))
    for name in ("checkpoint.pt", "metrics.jsonl"):
        (tmp_path / name).unlink(missing_ok=True)
        (tmp_path / name).mkdir()
        with pytest.raises(UserError, match=f"^{tmp_path / name}: a folder where a job's {name} belongs; move it"):
            fit(Classifier(tiny_vit(3), FT), tiny_images, FT, tmp_path)
        (tmp_path / name).rmdir()


def test_a_damaged_cache_is_rebuilt_and_a_file_named_cache_is_refused(tmp_path):
    for i in range(3):
        fixtures.jpeg(tmp_path / "d" / "train" / "a" / f"{i}.jpg", i)
    (tmp_path / "d" / "test" / "a").mkdir(parents=True)
    spec, cache = f"folder:{tmp_path / 'd'}", tmp_path / "cache"

    def uncached(**kwargs):  # past load's memory of the splits it read, to its cache file
        datasets._load.cache_clear()
        return datasets.load(spec, "train", 20, max_side=64, **kwargs)

    first = uncached(cache_dir=str(cache))
    (kept,) = cache.glob("*.pt")
    kept.write_bytes(os.urandom(100))
    again = uncached(cache_dir=str(cache))
    assert torch.equal(first.images, again.images)
    assert len(list(cache.glob("*.damaged-*"))) == 1 and len(list(cache.glob("*.pt"))) == 1
    hit = uncached(cache_dir=str(cache), memory_gb=8)
    assert torch.equal(first.images, hit.images)  # read from the cache, recorded with this job's data settings
    assert hit.meta["path"] == "resident" and hit.meta["memory_gb"] == 8 and first.meta["memory_gb"] == 32
    # a cache that reads, but holds fewer images than its split (written over by another tool, a file copied
    # in): a job trained on those without a word (train_size 5 of 60)
    c = torch.load(kept, weights_only=True)
    torch.save({**c, "images": c["images"][:2], "labels": c["labels"][:2], "sizes": c["sizes"][:2]}, kept)
    whole = uncached(cache_dir=str(cache))
    assert torch.equal(first.images, whole.images) and len(list(cache.glob("*.damaged-*"))) == 2
    (tmp_path / "cachefile").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        uncached(cache_dir=str(tmp_path / "cachefile"))


def test_a_lock_of_a_dead_owner_is_taken_over_and_a_live_one_is_not(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (tmp_path / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    with Lock(tmp_path) as held:
        assert held
        with Lock(tmp_path) as again:  # this process holds it: a second taker must wait
            assert not again
    assert not (tmp_path / "lock").exists()
    # while another process takes a dead owner's lock over, this one waits; unless that one died doing it
    (tmp_path / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    (tmp_path / "lock.takeover").write_bytes(b"")
    assert not Lock(tmp_path).acquire()
    os.utime(tmp_path / "lock.takeover", (0, 0))
    with Lock(tmp_path) as held:
        assert held and not (tmp_path / "lock.takeover").exists()
    (tmp_path / "lock").mkdir()  # not a lock a process could have left: named, and left alone
    with pytest.raises(UserError, match="a folder where a job's lock file belongs"):
        Lock(tmp_path).__enter__()
    assert (tmp_path / "lock").is_dir()


def _lock_of(tmp_path, **owner):
    (tmp_path / "lock").write_text(json.dumps(owner))
    return Lock(tmp_path)


def test_a_lock_is_judged_by_who_took_it(tmp_path, monkeypatch):
    import socket
    import time

    from bench.results import _started

    here = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = {"host": here, "pid": sleeper.pid, "start": _started(sleeper.pid)}
        assert not _lock_of(tmp_path, **live).acquire()
        # a live process of the same SLURM job (two runs in one allocation) is still another process
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        assert not _lock_of(tmp_path, **live, slurm_job="77").acquire()
        # the pid now names a process that started later than the lock's owner did: the owner is gone
        lock = _lock_of(tmp_path, **{**live, "start": live["start"] - 1})
        assert lock.acquire() is (live["start"] is not None)
        lock.release()
    finally:
        sleeper.kill()
    for pid in (0, -1, 10 ** 20):  # damaged: os.kill(0 or -1) asks a group or every process; 10**20 overflowed
        lock = _lock_of(tmp_path, host=here, pid=pid)
        assert lock.acquire()
        lock.release()
    # this process's own pid, in a lock it does not hold: a process before it that had the same pid
    lock = _lock_of(tmp_path, host=here, pid=os.getpid(), token="earlier")
    assert lock.acquire()
    assert not Lock(tmp_path).acquire()  # and now that it holds it, a second taker waits
    lock.release()
    # another host: alive while its heartbeat is fresh, unless it is this SLURM job before a requeue
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert not _lock_of(tmp_path, host="elsewhere", pid=1, slurm_job="77", restart=1).acquire()
    lock = _lock_of(tmp_path, host="elsewhere", pid=1, slurm_job="77", restart=0)
    assert lock.acquire()
    lock.release()
    _lock_of(tmp_path, host="elsewhere", pid=1)
    assert not Lock(tmp_path).acquire()
    old = time.time() - Lock.STALE_S - 1
    os.utime(tmp_path / "lock", (old, old))
    lock = Lock(tmp_path)
    assert lock.acquire()
    lock.release()
    assert not (tmp_path / "lock").exists()


def test_three_processes_taking_over_a_dead_owners_lock_leave_one_owner(tmp_path, monkeypatch):
    """A finds the owner dead; before A removes the lock, B (finding the same) takes it over. A then moved B's
    lock aside to compare it, C took the empty place, and B's lock could not be put back: B and C both trained
    the job. Here B acts in A's window, and C whenever A moves or removes a lock file."""
    import socket
    from pathlib import Path

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    a, b, c = Lock(tmp_path), Lock(tmp_path), Lock(tmp_path)
    judge, rename, unlink = Lock._owner_alive, os.rename, Path.unlink
    stage = []

    def owner_alive(self):
        alive = judge(self)
        if self is a and not stage:
            assert b.acquire()  # B, in A's window
            stage.append("B took it")
        return alive

    def then_c(real):  # C tries right after A's first move or removal of a lock file
        def wrapped(*args, **kw):
            out = real(*args, **kw)
            if stage == ["B took it"] and "lock" in str(args[0]).rsplit("/", 1)[-1]:
                stage.append("C tried")
                c.acquire()
            return out
        return wrapped

    monkeypatch.setattr(Lock, "_owner_alive", owner_alive)
    monkeypatch.setattr(os, "rename", then_c(rename))
    monkeypatch.setattr(Path, "unlink", then_c(unlink))
    try:
        assert not a.acquire() and stage == ["B took it", "C tried"]
        assert b.held and not c.held
        assert json.loads((tmp_path / "lock").read_text())["token"] == json.loads(b._body)["token"]
    finally:
        for lock in (a, b, c):
            lock.release()


def test_a_held_lock_beats_and_its_release_leaves_a_successors_lock(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(Lock, "HEARTBEAT_S", 0.05)
    lock = Lock(tmp_path)
    assert lock.acquire()
    old = time.time() - 3600
    os.utime(tmp_path / "lock", (old, old))
    time.sleep(0.5)
    assert time.time() - (tmp_path / "lock").stat().st_mtime < 60
    (tmp_path / "lock").write_text(json.dumps({"host": "elsewhere", "pid": 1}))  # taken over meanwhile
    lock.release()
    assert json.loads((tmp_path / "lock").read_text())["host"] == "elsewhere"


def test_a_stop_while_waiting_for_a_lock_or_between_jobs_stops_there(tmp_path):
    import signal
    import socket

    from bench import engine
    from bench.launch import execute, launch_info, local, stop_on_signals

    preset = planner.load_preset("demo", ["pretrain.epochs=1", "finetune.epochs=1"])
    jobs = [j for j in planner.plan("comparison", preset, ["random"], None, None, [0, 1]) if not j.skip]
    store = Store(tmp_path / "r")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store.run_dir(jobs[0].hash).mkdir(parents=True)
        (store.run_dir(jobs[0].hash) / "lock").write_text(json.dumps({"host": socket.gethostname(),
                                                                     "pid": sleeper.pid}))
        with stop_on_signals(), pytest.raises(engine.Interrupted, match="^stopped by signal SIGINT$"):
            engine.request_stop(signal.SIGINT)  # Ctrl-C while another run trains the job: no wait for it
            execute(jobs[0], store, "demo", data_opts={"cache_dir": None})
        # a second run, waiting on that job, leaves the note of the process training it as it is (it wrote its
        # own pid there)
        store.put_launch(jobs[0].hash, launch_info(jobs[0], launcher="local", pid=sleeper.pid))
        with pytest.raises(engine.Interrupted):
            local.run(jobs[:1], store, "demo", data_opts={"cache_dir": None},
                      log=lambda line: os.kill(os.getpid(), signal.SIGINT))
        assert store.launch(jobs[0].hash)["pid"] == sleeper.pid
    finally:
        sleeper.kill()
    (store.run_dir(jobs[0].hash) / "lock").unlink()

    def log(line):  # Ctrl-C as the first job's record is written: the second does not start
        if "done in" in line:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(engine.Interrupted):
        local.run(jobs, store, "demo", data_opts={"cache_dir": None}, log=log)
    assert [store.state(j.hash) for j in jobs] == ["done", "pending"]


def test_a_write_killed_midway_leaves_nothing_once_the_job_runs_again(tmp_path):
    """SIGKILL in the middle of a checkpoint's write (SLURM's, KillWait after the SIGTERM that began the save)
    left its temporary file for good: no resume, record or --rerun removed it. The job's next run does; the
    temporary file of a process trying the job's lock at that moment stays."""
    from bench.launch import execute

    preset = planner.load_preset("demo", ["pretrain.epochs=1", "finetune.epochs=1"])
    job = next(j for j in planner.plan("comparison", preset, ["random"]) if not j.skip)
    store = Store(tmp_path / "r")
    run_dir = store.run_dir(job.hash)
    run_dir.mkdir(parents=True)
    killed = subprocess.run([sys.executable, "-c", "import os, signal, sys; from pathlib import Path; "
                             "from bench.results import write_durably; write_durably(Path(sys.argv[1]), "
                             "lambda f: (f.write(b'x' * 4096), f.flush(), os.kill(os.getpid(), signal.SIGKILL)))",
                             str(run_dir / "checkpoint.pt")])
    assert killed.returncode == -9
    (left,) = run_dir.glob(".checkpoint.pt.*.tmp")
    contender = run_dir / ".lock.4242.1.tmp"
    contender.write_text("{}")
    assert execute(job, store, "demo", data_opts={"cache_dir": None})["status"] == "done"
    assert not left.exists() and contender.exists()


def test_two_runs_on_one_results_directory_train_each_job_once(tmp_path):
    res = str(tmp_path / "results")
    args = [sys.executable, "-m", "bench", "run", "--table", "comparison", "--preset", "demo", "--methods",
            "random", "--results", res, *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    (record,) = Store(res).records()
    assert record["status"] == "done"
    lines = (tmp_path / "results" / "runs" / record["hash"] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # one epoch, trained once: the other process waited and took the record
    assert any("waiting for it" in err for _, err in outs) or record["wall_time_s"] < 3


def test_kill_9_at_random_moments_still_ends_with_the_uninterrupted_weights(tmp_path):
    tests = os.path.dirname(__file__)
    env = {**os.environ, "BENCH_CHECKPOINT_EVERY_S": "0.000001"}

    def run(run_dir, out, kill_at):
        script = _KILLED_RUN.format(tests=tests, kill_at=kill_at)
        return subprocess.run([sys.executable, "-c", script, str(run_dir), str(out)], env=env).returncode

    assert run(tmp_path / "ref", tmp_path / "ref.pt", 0) == 0
    kills = sorted(random.Random().sample(range(1, 12), 3))
    for k in kills:  # each process dies at its k-th step: a moment drawn anew for every run of this test
        assert run(tmp_path / "run", tmp_path / "run.pt", k) in (-9, 0), kills
    assert run(tmp_path / "run", tmp_path / "run.pt", 0) == 0
    ref, got = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "run.pt")
    assert all(torch.equal(ref[k], got[k]) for k in ref), kills


def test_resumed_jobs_report_their_whole_training(tmp_path, tiny_vit, tiny_images, monkeypatch):
    import bench.engine as engine
    from bench.finetune import Classifier
    from bench.launch import stop_on_signals
    from test_engine import FT

    real, calls = engine.make_views, {"n": 0}

    def slow_then_stop(images, spec, sizes=None):
        calls["n"] += 1
        import time
        time.sleep(0.2)
        if calls["n"] == 5:
            os.kill(os.getpid(), 15)
        return real(images, spec, sizes)

    monkeypatch.setattr(engine, "make_views", slow_then_stop)
    with pytest.raises(engine.Interrupted), stop_on_signals():
        engine.fit(Classifier(tiny_vit(3), FT), tiny_images, FT, tmp_path)
    monkeypatch.setattr(engine, "make_views", real)
    last = engine.fit(Classifier(tiny_vit(3), FT), tiny_images, FT, tmp_path)
    assert last["earlier_sessions_s"] >= 1.0  # five slowed steps before the stop
    first_epoch, second_epoch = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert second_epoch["seconds"] >= 0.4  # its two slowed steps before the stop are counted


def test_16_bit_images_decode_faithfully_and_float_ones_are_refused(tmp_path):
    grey = np.full((20, 30), 40000, dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "deep.png")
    x = resident.decode_file(tmp_path / "deep.png", 20, max_side=64)
    assert abs(float(x.float().mean()) - 40000 / 257) < 1  # not clipped to white
    Image.fromarray(np.full((20, 30), 0.5, dtype=np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(UserError, match="float.tif.*floating-point"):
        resident.decode_file(tmp_path / "float.tif", 20, max_side=64)


def test_a_folder_whose_test_classes_differ_is_refused_before_training(tmp_path):
    fixtures.jpeg(tmp_path / "d" / "train" / "cat" / "0.jpg", 0)
    fixtures.jpeg(tmp_path / "d" / "test" / "dog" / "0.jpg", 1)
    one_line_exit_2(in_process("data", "check", f"folder:{tmp_path / 'd'}"), "different classes")
    res = tmp_path / "r"
    one_line_exit_2(in_process("run", "--preset", "demo", "--datasets", f"folder:{tmp_path / 'd'}", "--results",
                          str(res)), "different classes")
    assert not list(res.glob("*.json"))


def test_a_refused_rerun_leaves_the_record_in_place(tmp_path):
    from test_report import _fill

    _fill(Store(tmp_path), "comparison", "demo", {"deit_tiny/random": 0.3})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    h = next(iter(before))[:8]
    res = in_process("run", "--preset", "demo", "--methods", "random", "--rerun", h, "--gpus-per-job", "2",
                     "--results", str(tmp_path))
    one_line_exit_2(res, "--gpus-per-job 2")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_an_output_file_never_takes_a_results_place(tmp_path):
    from test_report import _fill

    _fill(Store(tmp_path), "comparison", "demo", {"deit_tiny/random": 0.3})
    record = next(tmp_path.glob("*.json"))
    weights = tmp_path / "runs" / record.stem / "weights.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    before = {p: p.read_bytes() for p in (record, weights)}
    for args in (["report", "--results", tmp_path, "--out", record],
                 ["report", "--results", tmp_path, "--format", "csv", "--out", weights],
                 ["benchmark", "--device", "cpu", "--out", weights.parent / "bench.json"]):
        one_line_exit_2(in_process(*args), "a job's results live there")
    assert {p: p.read_bytes() for p in before} == before
    one_line_exit_2(in_process("benchmark", "--device", "tpu"), "--device tpu")
    # a label typed another way ("fine-tune") measured nothing and wrote an empty JSON, exit 0
    one_line_exit_2(in_process("benchmark", "--device", "cpu", "--only", "finetune", "fine-tune"),
                    "--only fine-tune: matches no measurement")
    (tmp_path / "file").write_text("x")  # no folder can be made under a file: refused before minutes of work
    one_line_exit_2(in_process("benchmark", "--device", "cpu", "--out", tmp_path / "file" / "b.json"), "--out")
    one_line_exit_2(in_process("benchmark", "--device", "cpu", "--out", tmp_path), f"--out {tmp_path}: a folder")


def test_a_deleted_custom_preset_leaves_the_other_tables_reportable(tmp_path):
    store = Store(tmp_path)
    store.put(_record("0123456789abcdef", preset=str(tmp_path / "gone.yaml"),
                      cells=[["comparison", "deit_tiny/idmm", "digits"]]))
    res = in_process("report", "--results", str(tmp_path), cwd=str(tmp_path))
    assert res.returncode == 0 and "gone.yaml" in res.stderr and "Traceback" not in res.stderr
    assert "(preset: paper)" in res.stdout  # the paper's numbers alone, as with no records; it printed nothing


def test_a_damaged_parent_weights_file_names_the_way_to_regenerate_it(tmp_path):
    res = str(tmp_path / "results")
    base = ["run", "--table", "comparison", "--preset", "demo", "--methods", "idmm", "--results", res, *FAST]
    assert in_process(*base).returncode == 0
    store = Store(res)
    pre = next(r for r in store.records() if r["stage"] == "pretrain")
    fine = next(r for r in store.records() if r["stage"] == "finetune")
    store.weights(pre["hash"]).write_bytes(b"garbage")
    store.set_aside(fine["hash"])
    blocked = in_process(*base)  # the run's progress lines, then the error: one line, with the way out
    assert blocked.returncode == 2 and "Traceback" not in blocked.stderr
    error = blocked.stderr.strip().splitlines()[-1]
    assert error.startswith("bench: error: cannot read weights file") and f"--rerun {pre['hash'][:10]}" in error
    for prefix, said in (("", "give at least 4 characters"), (pre["hash"][:3], "give at least 4 characters"),
                         ("ffff" if not pre["hash"].startswith("ffff") else "0000", "no job of this table")):
        one_line_exit_2(in_process(*base, "--rerun", prefix), said)
    planned = in_process(*base, "--rerun", pre["hash"][:8].upper(), "--dry-run").stdout
    assert planned.count("--rerun: trains again") == 1  # the damaged parent; its child has no record
    again = in_process(*base, "--rerun", pre["hash"][:10])
    assert again.returncode == 0, again.stderr
    assert {r["status"] for r in Store(res).records()} == {"done"} and len(Store(res).records()) == 2
    run_dir = store.run_dir(pre["hash"])  # the replaced run's files are kept beside the new ones
    (old_weights,) = run_dir.glob("weights.pt.replaced-*")
    assert old_weights.read_bytes() == b"garbage" and list(run_dir.glob("metrics.jsonl.replaced-*"))
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1  # FAST: one epoch, the new run's


@pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"),
                    reason="a read-only mount needs root (CI runs as root)")
def test_a_read_only_results_directory_is_named_before_any_work_and_its_results_still_read(tmp_path, capsys,
                                                                                         monkeypatch):
    """A real read-only mount (root ignores permission bits): what only reads works; what would write says so
    in one line before any training, and the records stay as they were."""
    from bench.cli import main
    from test_report import _fill

    results, ro = tmp_path / "r", tmp_path / "ro"
    _fill(Store(results), "comparison", "demo", {"deit_tiny/random": 0.3})
    before = {p.name: p.read_bytes() for p in results.glob("*.json")}
    ro.mkdir()
    monkeypatch.chdir(tmp_path)
    subprocess.run(["mount", "--bind", str(results), str(ro)], check=True)

    def cli(*args):
        code = main(list(args))
        return code, capsys.readouterr()

    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        run = ["run", "--table", "comparison", "--preset", "demo", "--backbones", "deit_tiny_patch16_224",
               "--results", str(ro)]
        code, out = cli("report", "--results", str(ro))
        assert code == 0 and "30.0" in out.out
        assert cli("status", "--results", str(ro))[0] == 0
        code, out = cli(*run, "--methods", "random")
        assert code == 0 and "nothing to train" in out.err
        for extra in (["--methods", "random", "idmm"], ["--methods", "random", "--rerun", next(iter(before))[:8]]):
            code, out = cli(*run, *extra)
            assert code == 2 and out.err.count("\n") == 1, out.err
            assert f"--results {ro}: cannot write there (Read-only file system); nothing was run" in out.err
        for flag, path in (("--out", ro / "b.json"), ("--profile", ro / "prof")):  # before minutes of measuring
            code, out = cli("benchmark", "--device", "cpu", flag, str(path))
            assert code == 2 and out.err.count("\n") == 1, out.err
            assert f"{flag} {path}: cannot write there (Read-only file system)" in out.err
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert {p.name: p.read_bytes() for p in results.glob("*.json")} == before


def test_records_that_cannot_be_read_are_one_line_and_left_as_they_are(tmp_path):
    """A record no one may read (another user's, or a network mount's passing fault) said nothing of its content:
    `bench run` set it aside as damaged and trained the finished job again. A results folder no one may list:
    status and cancel raised PermissionError, and the report said there were no records."""
    from test_report import _fill

    res = tmp_path / "r"
    _fill(Store(res), "comparison", "demo", {"deit_tiny/random": 0.3})
    (rec,) = res.glob("*.json")
    before = rec.read_bytes()
    rec.chmod(0)
    try:
        out = without_root("run", "--table", "comparison", "--preset", "demo", "--methods", "random", "--results", res)
    finally:
        rec.chmod(0o644)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"cannot read the record {rec} (Permission denied); it was left as it is" in out.stderr
    assert rec.read_bytes() == before and sorted(p.name for p in res.iterdir()) == [rec.name]
    res.chmod(0)
    try:
        outs = {cmd: without_root(cmd, "--results", res) for cmd in ("status", "cancel", "report")}
    finally:
        res.chmod(0o755)
    for cmd, out in outs.items():
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Permission denied" in out.stderr, (cmd, out)
    assert rec.read_bytes() == before


@pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"),
                    reason="a read-only mount needs root (CI runs as root)")
def test_a_jobs_folder_that_cannot_be_written_is_one_line_not_a_traceback(tmp_path):
    """The store writable but one job's folder not (another user's, a read-only mount): its lock could not be
    made, and the job's first write raised OSError through the CLI."""
    job = planner.plan("comparison", planner.load_preset("demo"), ["random"])[0]
    run_dir = Store(tmp_path).run_dir(job.hash)
    run_dir.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(run_dir), str(run_dir)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(run_dir)], check=True)
        out = in_process("run", "--preset", "demo", "--methods", "random", "--results", tmp_path)
    finally:
        subprocess.run(["umount", str(run_dir)], check=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.splitlines()[-1] == \
        f"bench: error: {run_dir}: cannot write there (Read-only file system); the job was not run"


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB file system of its own, to fill."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this machine will not mount a small tmpfs for the test")
    yield mnt
    subprocess.run(["umount", str(mnt)])


def test_a_full_disk_is_named_as_such_and_leaves_no_temporary_file(small_disk):
    """torch.save on a full disk raises "unexpected pos 848960 vs 848848"; the OSError behind it is what a user
    can act on."""
    from bench.results import write_durably

    with pytest.raises(OSError, match=rf"No space left on device: '{small_disk / 'checkpoint.pt'}'"):
        write_durably(small_disk / "checkpoint.pt", lambda f: torch.save({"x": torch.zeros(200_000)}, f))
    assert not list(small_disk.iterdir())


def test_a_record_rewritten_on_a_full_disk_stays_the_old_one_whole(small_disk):
    """A record is replaced (a --rerun, a failed job trained again) by writing the new one beside it and renaming:
    written in place, the disk filling up half-way would leave neither."""
    store = Store(small_disk)
    old = _record("abc", status="failed", metrics={})
    store.put(old)
    with open(small_disk / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:  # what else the disk holds, to its last block
            f.write(b"x" * 4096)
    with pytest.raises(UserError, match="cannot write the record of job abc .*No space left on device"):
        store.put({**old, "status": "done", "metrics": {"top1": 0.5, "log": "x" * 20_000}})
    assert store.get("abc") == old and not store.damaged()
    assert sorted(p.name for p in small_disk.iterdir()) == ["abc.json", "filler"]
