import json
import math

import pytest
import torch

from bench.engine import Method, NonFiniteLoss, fit, lr_factor
from bench.finetune import Classifier
from bench.launch import stop_on_signals

CFG = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "warmup_epochs": 1, "weight_decay": 1e-3, "seed": 0}
VIEWS = {"crops": [{"count": 1, "size": 16, "scale": [0.2, 1.0]}], "flip": 0.5, "jitter": [0.4, 0.4, 0.4, 0.1],
         "jitter_p": 0.5, "grayscale_p": 0.2}
FT = {**CFG, "views": VIEWS, "mixing": {"mixup_alpha": 0.5, "cutmix_alpha": 0.5, "parts": 1}, "label_smoothing": 0.1}


def test_lr_schedule_warms_up_linearly_then_decays_to_zero():
    assert lr_factor(0, 10, 100) == 0 and lr_factor(5, 10, 100) == 0.5 and lr_factor(10, 10, 100) == 1
    assert lr_factor(55, 10, 100) == pytest.approx(0.5) and lr_factor(100, 10, 100) == pytest.approx(0)
    # a cosine, not a line through the same three points: a fifth of the way, cos(pi / 5) = (1 + sqrt 5) / 4
    assert lr_factor(28, 10, 100) == pytest.approx((1 + (1 + 5 ** 0.5) / 4) / 2)  # 0.905


def test_fit_trains_logs_and_a_finished_run_is_not_retrained(tmp_path, tiny_vit, tiny_images):
    model = Classifier(tiny_vit(3), FT)
    before = [p.clone() for p in model.parameters()]
    fit(model, tiny_images, FT, tmp_path)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1] and lines[-1]["lr"] == pytest.approx(0)
    again = Classifier(tiny_vit(3), FT)
    fit(again, tiny_images, FT, tmp_path)  # loads the final checkpoint, trains nothing
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_interrupted_run_resumes_bit_identical(tmp_path, tiny_vit, tiny_images, monkeypatch):
    import bench.engine as engine

    ref = Classifier(tiny_vit(3), FT)
    fit(ref, tiny_images, FT, tmp_path / "ref")

    calls = {"n": 0}
    real = engine.make_views

    def stop_after_three(images, spec, sizes=None):  # a SIGTERM arriving during step 3 of epoch 0
        calls["n"] += 1
        if calls["n"] == 3:
            import os
            import signal
            os.kill(os.getpid(), signal.SIGTERM)
        return real(images, spec, sizes)

    monkeypatch.setattr(engine, "make_views", stop_after_three)
    broken = Classifier(tiny_vit(3), FT)
    with pytest.raises(engine.Interrupted), stop_on_signals():  # the launcher's signal handling
        fit(broken, tiny_images, FT, tmp_path / "run")
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert (ck["epoch"], ck["step"]) == (0, 3)
    monkeypatch.setattr(engine, "make_views", real)
    resumed = Classifier(tiny_vit(3), FT)
    fit(resumed, tiny_images, FT, tmp_path / "run")
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    # the epoch the stop fell in logs the mean loss of all its steps, not of the ones after the resume
    logged = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("ref", "run")]
    assert logged[1] == pytest.approx(logged[0], rel=1e-6)


_KILLED_RUN = """
import os, signal, sys, timm, torch
import bench.engine as engine
from bench.data import ImageSet
from bench.finetune import Classifier
sys.path.insert(0, {tests!r})
from test_engine import FT
g = torch.Generator().manual_seed(0)
data = ImageSet(torch.randint(0, 256, (12, 3, 24, 24), dtype=torch.uint8, generator=g), torch.arange(12) % 3,
                ["a", "b", "c"], "random")
torch.manual_seed(0)
model = Classifier(timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1,
                                     num_heads=2, num_classes=3), {{**FT, "epochs": 4}})
real, calls = engine.make_views, [0]
def views(*args):
    calls[0] += 1
    if calls[0] == {kill_at} and {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # no handler, no last save: only time-based checkpoints survive
    return real(*args)
engine.make_views = views
engine.fit(model, data, {{**FT, "epochs": 4}}, __import__("pathlib").Path(sys.argv[1]))
torch.save(model.state_dict(), sys.argv[2])
"""


@pytest.mark.parametrize("interval,saved_steps", [("0.000001", 9), ("1e9", None)])
def test_kill_9_loses_at_most_the_checkpoint_interval_and_resumes_exactly(tmp_path, interval, saved_steps):
    """4 epochs of 3 steps, SIGKILL while making the views of step 10. With checkpoints after every step the run
    resumes from the 9 steps done; with an interval longer than the run nothing was saved (no per-epoch
    checkpoint) and it starts again. Either way it ends with the weights of a run never stopped."""
    import os
    import subprocess
    import sys

    tests = os.path.dirname(__file__)
    env = {**os.environ, "BENCH_CHECKPOINT_EVERY_S": interval}

    def run(run_dir, out, kill_at):
        script = _KILLED_RUN.format(tests=tests, kill_at=kill_at)
        return subprocess.run([sys.executable, "-c", script, str(run_dir), str(out)], env=env)

    assert run(tmp_path / "ref", tmp_path / "ref.pt", 0).returncode == 0
    assert run(tmp_path / "run", tmp_path / "run.pt", 10).returncode == -9
    ck = tmp_path / "run" / "checkpoint.pt"
    if saved_steps is None:
        assert not ck.exists()
    else:
        c = torch.load(ck, weights_only=False)
        assert c["epoch"] * 3 + c["step"] == saved_steps
    assert run(tmp_path / "run", tmp_path / "run.pt", 0).returncode == 0
    ref, resumed = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "run.pt")
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]  # an epoch logged before the kill but after the checkpoint is not logged twice


class _Exploding(Method):
    def loss(self, views, index, label, progress):
        return self.encoder(views[0]).sum() * float("nan")


def test_non_finite_loss_stops_the_job(tmp_path, tiny_vit, tiny_images):
    with pytest.raises(NonFiniteLoss, match="non-finite in epoch 0"):
        fit(_Exploding(tiny_vit(3), {"views": VIEWS}), tiny_images, CFG, tmp_path)


class _Recorder(Method):
    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        self.batches = []

    def loss(self, views, index, label, progress):
        self.batches.append(index.tolist())
        return self.encoder(views[0]).float().pow(2).mean()


def test_every_image_is_used_each_epoch_last_partial_batch_included(tmp_path, tiny_vit, tiny_images):
    """12 images at batch 5: 3 steps (5, 5, 2) per epoch, as the official DataLoaders (drop_last=False) do."""
    model = _Recorder(tiny_vit(3), {"views": VIEWS})
    fit(model, tiny_images, {**CFG, "batch_size": 5}, tmp_path)
    assert [len(b) for b in model.batches] == [5, 5, 2, 5, 5, 2]
    for epoch in (model.batches[:3], model.batches[3:]):
        assert sorted(sum(epoch, [])) == list(range(12))
    model = _Recorder(tiny_vit(3), {"views": VIEWS})  # drop_last: as the DINO and MoCo v3 references load
    fit(model, tiny_images, {**CFG, "batch_size": 5, "drop_last": True}, tmp_path / "drop")
    assert [len(b) for b in model.batches] == [5, 5, 5, 5] and len(set(sum(model.batches[:2], []))) == 10


def test_official_schedule_is_the_official_formula_with_its_misplaced_parentheses():
    """Oracle written from the official scripts' adjust_learning_rate (notes: official-recipe.md): in epochs,
    warmup cur / w, then 0.5 * (1 + cos((pi * cur - w) / (E - w))). Per-iteration here: cur = step / steps."""
    E, w, spe = 100, 10, 8  # the 448 stage: 100 epochs, 10 of warm-up
    official = [lr_factor(i, w * spe, E * spe, "official") for i in range(E * spe)]
    for i in (0, 40, 80, 81, 400, 745, 799):
        cur = i / spe
        want = cur / w if cur < w else 0.5 * (1 + math.cos((math.pi * cur - w) / (E - w)))
        assert official[i] == pytest.approx(want, abs=1e-12)
    intended = [lr_factor(i, w * spe, E * spe) for i in range(E * spe)]
    assert sum(official) / sum(intended) == pytest.approx(0.865, abs=0.005)  # the notes' 0.87
    low = min(range(w * spe, len(official)), key=official.__getitem__)
    assert 0.9 * E * spe < low < E * spe - 1 and official[-1] > official[low]  # it rises again at the end


def test_schedule_and_precision_are_in_every_job_and_checked():
    from bench import plan as planner
    from bench.errors import UserError

    jobs = planner.plan("comparison", planner.load_preset("paper"), ["idmm"], None, None, [0])
    assert {(j.config["lr_schedule"], j.config["precision"]) for j in jobs} == {("official", "bf16")}
    # the baselines run from a reference's own training script keep its schedule and its loader: DINO_exp's
    # utils.cosine_scheduler and moco-v3's adjust_learning_rate are plain cosines, and both drop the last batch
    jobs = planner.plan("comparison", planner.load_preset("paper"), ["dino", "mocov3", "simclr"], None, None, [0])
    pre = {j.config["method"]: j.config for j in jobs if j.config["stage"] == "pretrain"}
    assert {m: (c["lr_schedule"], c.get("drop_last")) for m, c in pre.items()} == {
        "dino": ("cosine", True), "mocov3": ("cosine", True), "simclr": ("official", None)}
    # moco-v3's ViTs have no drop path (vits.py passes none to timm); DINO's student keeps main_dino.py's 0.1
    assert {m: c["drop_path"] for m, c in pre.items()} == {"dino": 0.1, "mocov3": 0.0, "simclr": 0.1}
    assert {j.config["lr_schedule"] for j in jobs if j.config["stage"] == "finetune"} == {"official"}
    with pytest.raises(UserError, match="^--set finetune.lr_schedule=step: .* expected one of cosine, official"):
        planner.load_preset("paper", ["finetune.lr_schedule=step"])  # as it is read, before any plan


def test_precision_is_what_runs_and_what_ran_is_recorded(tmp_path, tiny_vit, tiny_images):
    """fp32 is fp32 everywhere; bf16 autocasts on a GPU and falls back to fp32 on a CPU (oneDNN's bf16 kernels do
    not repeat exactly); the metrics say which ran."""
    from bench.engine import runs_bf16

    cpu = torch.device("cpu")
    out = {}
    for precision in ("fp32", "bf16"):
        model = Classifier(tiny_vit(3), {**FT, "precision": precision})
        out[precision] = (fit(model, tiny_images, {**FT, "precision": precision}, tmp_path / precision), model)
    assert out["fp32"][0]["precision"] == "fp32" and not runs_bf16(cpu, "bf16")
    assert out["bf16"][0]["precision"] == ("bf16" if runs_bf16(cpu, "bf16") else "fp32")
    assert all(p.dtype == torch.float32 for p in out["bf16"][1].parameters())  # autocast, not bf16 weights
    if runs_bf16(cpu, "bf16"):  # the same draws, other arithmetic: other losses
        assert out["bf16"][0]["loss"] != out["fp32"][0]["loss"]
    else:
        assert out["bf16"][0]["loss"] == out["fp32"][0]["loss"]


def test_compiled_backbone_trains_like_eager_with_the_same_checkpoint_keys(tmp_path, tiny_vit, tiny_images,
                                                                          monkeypatch):
    """--compile on (here on a CPU, where auto leaves it off): the backbone is compiled in place, the losses follow
    the eager run's, the checkpoint and weights keep eager's keys, evaluation runs, and the first step's seconds
    (the compilation) are reported."""
    from bench.data.views import eval_view
    from bench.engine import predict

    cfg = {**FT, "epochs": 1, "precision": "fp32"}
    eager = Classifier(tiny_vit(3), cfg)
    ran_eager = fit(eager, tiny_images, cfg, tmp_path / "eager")
    assert ran_eager["compiled"] is False
    monkeypatch.setenv("BENCH_COMPILE", "on")
    from torch._dynamo.utils import counters

    counters.clear()
    model = Classifier(tiny_vit(3), cfg)
    ran = fit(model, tiny_images, cfg, tmp_path / "compiled")
    assert ran["compiled"] is True and ran["first_step_s"] > 0
    # the epoch's pace leaves the compiling step out (a job resumed in its last epoch reported the compilation)
    assert ran["seconds"] < ran["first_step_s"]  # (the compilation takes seconds, the two other steps less)
    assert ran["images_per_s"] == pytest.approx((len(tiny_images) - cfg["batch_size"]) / ran["seconds"], rel=0.1)
    # stopped after two steps: the checkpoint's epoch so far leaves the compiling step out too, or a session
    # resuming the epoch would count the first session's compilation in its pace
    import bench.engine as engine

    real, calls = engine.make_views, []

    def stop_in_step_two(*args):
        calls.append(1)
        if len(calls) == 2:
            engine.request_stop()
        return real(*args)

    monkeypatch.setattr(engine, "make_views", stop_in_step_two)
    with pytest.raises(engine.Interrupted), stop_on_signals():  # (which clears the request when it ends)
        fit(Classifier(tiny_vit(3), cfg), tiny_images, cfg, tmp_path / "stopped")
    monkeypatch.setattr(engine, "make_views", real)
    ck = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)
    assert (ck["step"], ck["epoch_seen"]) == (2, cfg["batch_size"]) and ck["epoch_s"] < ran["first_step_s"] / 2
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did trace the backbone
    assert ran["loss"] == pytest.approx(ran_eager["loss"], rel=1e-3)
    keys = lambda run: list(torch.load(tmp_path / run / "checkpoint.pt", weights_only=False)["model"])  # noqa: E731
    assert keys("compiled") == keys("eager")
    idx, pred = predict(model.encoder, tiny_images, lambda x: eval_view(x, 16, 1.0))
    assert len(pred) == len(tiny_images) and torch.equal(idx, torch.arange(len(tiny_images)))
    monkeypatch.setenv("BENCH_COMPILE", "sometimes")
    with pytest.raises(Exception, match="BENCH_COMPILE=sometimes"):
        fit(Classifier(tiny_vit(3), cfg), tiny_images, cfg, tmp_path / "bad")


def test_on_cpu_attention_is_the_explicit_product_and_computes_the_same(tiny_vit):
    from bench.engine import place

    torch.manual_seed(0)
    model, x = tiny_vit(3).eval(), torch.rand(4, 3, 16, 16)
    fused = model(x)
    place(model, torch.device("cpu"))
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == [False]
    assert torch.allclose(model(x), fused, atol=1e-5)


def test_dino_export_is_in_its_jobs_and_checked():
    from bench import plan as planner
    from bench.errors import UserError

    jobs = planner.plan("comparison", planner.load_preset("paper"), ["dino"], None, None, [0])
    # the authors' DINO_exp/main_dino.py saves the student alone, and their fine-tuning loads that file
    assert {j.config["method_cfg"]["export"] for j in jobs if j.config["stage"] == "pretrain"} == {"student"}
    with pytest.raises(UserError, match="methods.dino.export: 'both'"):
        planner.plan("comparison", planner.load_preset("paper", ["methods.dino.export=both"]), ["dino"])


@pytest.mark.parametrize("value,words", [("foo", "expected cpu, cuda or cuda:N"), ("mps", "expected cpu, cuda"),
                                         (f"cuda:{torch.cuda.device_count()}", "torch sees")])
def test_a_device_bench_cannot_train_on_is_one_line_before_any_job(tmp_path, monkeypatch, capsys, value, words):
    """BENCH_DEVICE=foo was a traceback in a dry run, and in a run a failed record per job (children not run)."""
    from bench.cli import main

    monkeypatch.setenv("BENCH_DEVICE", value)
    for extra in ([], ["--dry-run"]):
        assert main(["run", "--table", "comparison", "--preset", "demo", "--methods", "random", *extra,
                     "--results", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"bench: error: BENCH_DEVICE={value}: {words}") and err.count("\n") == 1
    assert not list(tmp_path.glob("*.json"))


def test_top1_counts_the_predictions_that_match_each_images_label():
    """A model that calls bright images class 1 and dark ones class 0, on 10 images two of which are labelled
    against it: 8 of 10 right, each prediction compared with its own image's label."""
    from bench.data import ImageSet
    from bench.finetune import top1

    bright = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    images = (bright * 255).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 16, 16).contiguous()
    labels = bright.clone()
    labels[0], labels[9] = 0, 1

    class Brightness(torch.nn.Module):
        def forward(self, x):
            m = x.mean((1, 2, 3))
            return torch.stack([-m, m], 1)

    test = ImageSet(images, labels, ["dark", "bright"], "test")
    assert top1(Brightness(), test, 16, 1.0, "fp32") == pytest.approx(0.8)


def test_fine_tuning_alternates_mixup_and_cutmix_by_epoch(tiny_vit):
    """main_deit.py: Mixup on even epochs (every pixel a blend of two images), CutMix on odd ones (a box of
    another image pasted, the rest untouched)."""
    seen = []

    class Seeing(Classifier):
        def logits(self, x):
            seen.append(x)
            return super().logits(x)

    torch.manual_seed(0)
    x = torch.rand(12, 3, 16, 16)
    model = Seeing(tiny_vit(3), {**FT, "mixing": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "parts": 1}})
    for epoch in (0, 1, 2, 3):
        model.start_epoch(epoch)
        model.loss([x], torch.arange(12), torch.arange(12) % 3, 0)
    for epoch, mixed in enumerate(seen):
        same = (mixed == x).flatten(1).float().mean(1)  # per image: the share of its values left as they were
        if epoch % 2 == 0:  # an image mixed with itself (a fixed point of the permutation) stays whole
            assert all(s == 0 or s == 1 for s in same.tolist()), (epoch, same)
        else:
            assert any(0 < s < 1 for s in same.tolist()), (epoch, same)


def test_fine_tuning_starts_from_the_weights_its_parent_handed_over(tmp_path):
    """At lr 0 a fine-tuning job ends where it started: its exported backbone is the parent's, tensor for tensor
    (the head, of another shape, is its own)."""
    from bench import finetune, models
    from bench import plan as planner

    job = next(j for j in planner.plan("comparison", planner.load_preset("demo"), ["idmm"], None, None, [0])
               if j.config["stage"] == "finetune")
    cfg = {**job.config, "epochs": 1, "lr": 0.0}
    torch.manual_seed(123)  # not the job's seed: the parent's weights differ from the child's random init
    parent = models.create(cfg["backbone"], cfg["resolution"], 0, 0.0, cfg["model_kwargs"])
    init = models.export(parent, cfg["backbone"], cfg["resolution"])
    finetune.run(cfg, tmp_path, init, {"cache_dir": None})
    child = torch.load(tmp_path / "weights.pt", weights_only=True)["state_dict"]
    shared = [k for k, v in init["state_dict"].items() if not k.startswith("head")]
    assert len(shared) > 10 and all(torch.equal(child[k], init["state_dict"][k]) for k in shared)
