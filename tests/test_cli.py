"""The CLI end to end, as a user types it: real digits, real training steps, real records, the report."""
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from conftest import FAST, in_process

from bench.engine import runs_bf16


def bench(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, cwd=cwd)


def test_demo_comparison_idmm_and_random_through_to_the_report(tmp_path):
    res = str(tmp_path / "results")
    run = bench("run", "--table", "comparison", "--preset", "demo", "--methods", "random", "idmm",
                "--results", res, *FAST)
    assert run.returncode == 0, run.stderr
    records = [json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json")]
    assert sorted(r["stage"] for r in records) == ["finetune", "finetune", "pretrain"]
    for r in records:
        assert r["status"] == "done" and r["versions"]["torch"] and r["hardware"]["cpus"] and r["wall_time_s"] > 0
        assert r["metrics"]["precision"] == ("bf16" if runs_bf16(torch.device("cpu"), "bf16") else "fp32")
    finals = [r for r in records if r["stage"] == "finetune"]
    assert all(0 <= r["metrics"]["top1"] <= 1 and r["metrics"]["test_size"] == 540 for r in finals)
    for r in records:  # a finished job keeps its weights and metrics log, not its optimiser checkpoint
        run_dir = tmp_path / "results" / "runs" / r["hash"]
        assert (run_dir / "weights.pt").is_file() and (run_dir / "metrics.jsonl").is_file()
        assert not (run_dir / "checkpoint.pt").exists()
    pre = next(r for r in records if r["stage"] == "pretrain")
    assert pre["metrics"]["train_size"] == 807  # IDMM's N

    again = bench("run", "--table", "comparison", "--preset", "demo", "--methods", "random", "idmm",
                  "--results", res, *FAST)
    assert again.returncode == 0 and "nothing to train" in again.stderr

    rep = bench("report", "--format", "markdown", "--results", res, cwd=str(tmp_path))
    assert rep.returncode == 0, rep.stderr
    for r in finals:
        row = "IDMM" if r["method"] == "idmm" else "random init."
        line = next(line for line in rep.stdout.splitlines() if row in line)
        assert f"{100 * r['metrics']['top1']:.1f}" in line
    assert (tmp_path / "reports" / "comparison.md").read_text() == rep.stdout

    status = bench("status", "--results", res)
    assert status.returncode == 0 and status.stdout.count("done") == 3
    assert all(line.split()[-1] == "local" for line in status.stdout.splitlines()[1:])  # where each one ran

    # polled from a cluster's login node, where importing torch can take longer than the answer: none of it
    script = ("import sys\nfrom bench.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
              f"main(['status', '--results', {res!r}])\nmain(['cancel', '--results', {res!r}])\n"
              "print(sorted({'torch', 'timm', 'torchvision', 'lightly'} & set(sys.modules)))")
    light = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert light.returncode == 0 and light.stdout.count("done") == 3, light.stderr
    assert light.stdout.splitlines()[-1] == "[]", light.stdout


def test_dry_run_lists_the_paper_recipe():
    out = bench("run", "--table", "comparison", "--preset", "paper", "--methods", "idmm", "--dry-run")
    assert out.returncode == 0, out.stderr
    pre = [line for line in out.stdout.splitlines() if "stage=pretrain" in line]
    assert len(pre) == 7
    for line in pre:
        assert "epochs=800" in line and "batch=256" in line and "crops=2x112+4x112" in line and "pending" in line
    assert ("bf16 runs as fp32 on this machine's cpu" in out.stdout) == (not torch.cuda.is_available())


def test_a_dry_run_warns_of_a_dataset_the_run_would_stop_at(tmp_path):
    (tmp_path / "mine" / "train" / "a").mkdir(parents=True)
    for spec, said in ((f"folder:{tmp_path / 'nope'}", "train is missing"),
                       (f"folder:{tmp_path / 'mine'}", "holds no images")):
        dry = in_process("run", "--preset", "demo", "--methods", "random", "--datasets", spec, "--dry-run",
                         "--results", str(tmp_path / "r"))
        assert dry.returncode == 0 and "pending" in dry.stdout, dry.stderr
        assert said in dry.stderr and "bench run would stop there" in dry.stderr, dry.stderr


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    real = bench("run", "--table", "nope")  # the process itself: its exit status and its stderr
    assert real.returncode == 2 and real.stderr.count("\n") == 1 and "Traceback" not in real.stderr
    assert "comparison, transfer, sota, imagenet" in real.stderr
    for args in (["run", "--methods", "nope"], ["run", "--preset", "nope"],
                 ["run", "--datasets", "nope"], ["run", "--set", "novalue"], ["report", "--format", "pdf"],
                 ["run", "--preset", "demo", "--datasets", f"folder:{tmp_path}/missing", "--results",
                  str(tmp_path / "r")]):
        out = in_process(*args)
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bench: error:"), (args, out.stderr)
    assert "idmm" in in_process("run", "--methods", "nope").stderr


def test_imagenet_init_row_is_skipped_without_weights_and_runs_from_a_file(tmp_path):
    import timm
    import torch

    args = ["--table", "sota", "--preset", "demo", "--methods", "in_supervised",
            "--backbones", "deit_tiny_patch16_224", "--results", str(tmp_path / "r"), *FAST]
    dry = in_process("run", *args, "--dry-run")
    assert dry.returncode == 0 and "skipped: preset 'demo' uses no ImageNet weights" in dry.stdout

    # a local state dict, as a user would pass timm's or their own ImageNet weights (built at another size)
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=4,
                              num_heads=4, num_classes=1000)
    torch.save(model.state_dict(), tmp_path / "in1k.pth")
    run = bench("run", *args, "--init-weights", str(tmp_path / "in1k.pth"))
    assert run.returncode == 0, run.stderr
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "r").glob("*.json")]
    assert rec["status"] == "done" and rec["config"]["init"].startswith("file:")
    rep = in_process("report", "--table", "sota", "--results", str(tmp_path / "r"), cwd=str(tmp_path))
    line = next(line for line in rep.stdout.splitlines() if "DeiT-Tiny" in line and "IN super." in line)
    assert f"{100 * rec['metrics']['top1']:.1f}" in line

    wrong = in_process("run", *args, "--init-weights", str(tmp_path / "nope.pth"))
    assert wrong.returncode == 2 and "is not a file" in wrong.stderr
    unused = in_process("run", *args[:4], "--methods", "random", *args[6:], "--dry-run",
                        "--init-weights", f"deit_tiny_patch16_224={tmp_path / 'in1k.pth'}")
    assert unused.returncode == 0 and "--init-weights is unused" in unused.stderr


def test_transfer_demo_pretrains_on_the_stand_in_and_fine_tunes_on_digits(tmp_path):
    res = str(tmp_path / "r")
    run = bench("run", "--table", "transfer", "--preset", "demo", "--backbones", "pvt_v2_b0",
                "--methods", "idmm", "supervised", "--results", res, *FAST)
    assert run.returncode == 0, run.stderr
    records = [json.loads(p.read_text()) for p in (tmp_path / "r").glob("*.json")]
    pre = [r for r in records if r["stage"] == "pretrain"]
    fine = [r for r in records if r["stage"] == "finetune"]
    assert {r["config"]["data"] for r in pre} == {"digits_extra"} and {r["metrics"]["train_size"] for r in pre} == {450}
    assert {r["config"]["data"] for r in fine} == {"digits"} and len(fine) == 2
    rep = bench("report", "--table", "transfer", "--results", res, cwd=str(tmp_path))
    for r in fine:
        row = "IDMM" if r["method"] == "idmm" else "supervised"
        line = next(line for line in rep.stdout.splitlines() if "PVTv2-B0" in line and f"| {row} " in line)
        assert "digits_extra (sin10k)" in line and f"{100 * r['metrics']['top1']:.1f}" in line


def test_a_cpu_chain_repeats_exactly_in_a_new_process(tmp_path):
    """The same jobs in two processes give the same weights, bit for bit (PVT's convolutions included: with bf16
    autocast on a CPU they did not)."""
    import hashlib

    digests = []
    for run in ("a", "b"):
        done = bench("run", "--table", "transfer", "--preset", "demo", "--backbones", "pvt_v2_b0", "--methods",
                     "supervised", "--results", str(tmp_path / run), *FAST)
        assert done.returncode == 0, done.stderr
        digests.append(sorted(hashlib.sha256(p.read_bytes()).hexdigest()
                              for p in (tmp_path / run / "runs").glob("*/weights.pt")))
    assert len(digests[0]) == 2 and digests[0] == digests[1]


def test_benchmark_with_a_compiled_backbone_reports_the_compilation_apart(tmp_path):
    out = tmp_path / "b.json"
    run = in_process("benchmark", "--device", "cpu", "--compile", "on", "--images", "48", "--steps", "1",
                     "--epochs", "2", "--only", "finetune deit_tiny", "--out", str(out))
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["hardware"]["compiled"] is True
    (row,) = result["runs"].values()
    assert row["compile_s"] > 0 and min(row["official_style"], row["end_to_end"], row["step_alone"]) > 0
    assert "compile" in run.stdout + run.stderr


def test_benchmark_measures_streaming_beside_the_resident_split(tmp_path):
    out = tmp_path / "b.json"
    run = in_process("benchmark", "--device", "cpu", "--images", "24", "--epochs", "1", "--only", "streamed",
                     "--out", str(out), "--profile", str(tmp_path / "p"))
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["runs"]
    assert set(rows) == {"streamed deit_tiny_patch16_224 224 pil", "streamed deit_tiny_patch16_224 224 device"}
    for r in rows.values():
        assert r["end_to_end"] > 0 and r["resident"] > 0
        assert r["of_resident"] == round(r["end_to_end"] / r["resident"], 2)
        assert r["imagenet_epoch_min"] == round(1_281_167 / r["end_to_end"] / 60, 1)
        # profiled as a whole epoch: the reading is what a resident split's step profile would not show
        assert r["profile"]["steps"] == 1 and "1 x epoch" in Path(r["profile"]["file"]).read_text()
    assert rows["streamed deit_tiny_patch16_224 224 device"]["decoder"] == "torchvision on cpu"
    assert rows["streamed deit_tiny_patch16_224 224 pil"]["decoder"].startswith("PIL")
    assert "an ImageNet epoch" in run.stdout


def test_implied_hours_slow_only_the_splits_that_stream_by_the_share_streaming_kept():
    """Under the paper preset ImageNet's training split streams (1.5 TB resident) and the small sets stay
    resident: at half the resident rate, only the imagenet table's fine-tuning hours grow, by their own amount."""
    from bench import plan as planner
    from bench.benchmark import implied_hours

    preset = planner.load_preset("paper")
    backbones = ("deit_tiny_patch16_224", "pvt_v2_b0")
    rates = {**{f"finetune {b} 224": 1000.0 for b in backbones},
             **{f"pretrain {m} {b}": 2000.0 for m in ("idmm", "mocov3") for b in backbones}}
    plain, slowed = implied_hours(preset, rates), implied_hours(preset, rates, 0.5)
    assert slowed["comparison"] == plain["comparison"] and "streamed_at" not in slowed["comparison"]
    assert slowed["imagenet"]["streamed_at"] == 0.5
    imagenet_ft = sum(1_281_167 * j.config["epochs"] / 1000.0 for j in planner.plan("imagenet", preset)
                      if j.config["stage"] == "finetune" and j.config["data"] == "imagenet")
    assert abs(slowed["imagenet"]["hours"] - plain["imagenet"]["hours"] - imagenet_ft / 3600) < 0.02


def test_implied_hours_name_what_they_estimate_and_what_they_leave_out():
    """No hour without its source: a job no row measured is either estimated from rates that were measured,
    named with its share of the hours, or left out and named; a table with nothing measured has no hours."""
    from bench import data as datasets
    from bench import plan as planner
    from bench.benchmark import implied_hours

    preset = planner.load_preset("paper")
    tiny, b0 = "deit_tiny_patch16_224", "pvt_v2_b0"
    rates = {f"finetune {tiny} 224": 1000.0, f"pretrain idmm {tiny}": 2000.0, f"pretrain dino {tiny}": 500.0,
             f"pretrain idmm {b0}": 1000.0, f"finetune {b0} 224": 800.0}
    hours = implied_hours(preset, rates)
    assert "estimated" not in hours["comparison"] and hours["comparison"]["not_counted"] == [
        f"pretrain {m} {tiny} 112" for m in ("mocov2", "mocov3", "simclr", "supcon")]

    def seconds(table, pick, rate):
        return sum(datasets.DATASETS[j.config["data"]].train * j.config["epochs"] / rate
                   for j in planner.plan(table, preset) if j.config["stage"] != "skipped" and pick(j.config))

    transfer = hours["transfer"]  # DINO on PVT at DINO's DeiT rate times IDMM's PVT/DeiT ratio; supervised as fine-tuning
    assert transfer["estimated"] == [f"pretrain dino {b0} as dino on {tiny} scaled by idmm's ratio",
                                     f"pretrain supervised {b0} at its 224 px fine-tuning rate (an upper bound on its time)"]
    guessed = (seconds("transfer", lambda c: c.get("method") == "dino" and c["backbone"] == b0, 500 * 1000 / 2000)
               + seconds("transfer", lambda c: c.get("method") == "supervised" and c["backbone"] == b0, 800))
    assert abs(transfer["estimated_hours"] - guessed / 3600) < 0.01
    assert "pretrain mocov3 pvt_v2_b3 112" in transfer["not_counted"]
    sota = hours["sota"]  # 448 px fine-tuning at a quarter of the 224 px rate: 4x the tokens
    assert sota["estimated"] == [f"finetune {b} 448 px at its 224 px rate over the tokens' ratio" for b in (tiny, b0)]
    at_448 = (seconds("sota", lambda c: c["resolution"] == 448 and c["backbone"] == tiny, 1000 / 4)
              + seconds("sota", lambda c: c["resolution"] == 448 and c["backbone"] == b0, 800 / 4))
    assert abs(sota["estimated_hours"] - at_448 / 3600) < 0.01
    assert all(v == {"hours": None, "not_counted": v["not_counted"]} for v in implied_hours(preset, {}).values())
    from bench.benchmark import ROWS  # every row measured: a job that will not run (SIN-total 10k) is no hours
    assert all(set(v) <= {"hours", "estimated", "estimated_hours"}
               for v in implied_hours(preset, {label: 1000.0 for label, _ in ROWS}).values())
    mine = planner.load_preset("paper", ["datasets={comparison: [folder:/nowhere]}"])  # a size bench cannot know
    assert implied_hours(mine, rates)["comparison"] == {
        "hours": None, "not_counted": ["finetune on folder:/nowhere (of unknown size)",
                                       "pretrain on folder:/nowhere (of unknown size)"]}


def test_benchmark_measures_the_three_pipelines_and_writes_json(tmp_path):
    out = tmp_path / "b.json"
    run = bench("benchmark", "--device", "cpu", "--images", "48", "--steps", "1", "--epochs", "1",
                "--only", "idmm deit_tiny", "finetune deit_tiny", "--out", str(out), "--profile", str(tmp_path / "p"))
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["hardware"]["device"] == "cpu" and result["hardware"]["cpus"] >= 1
    assert result["hardware"]["bf16"] == runs_bf16(torch.device("cpu"), "bf16")
    assert set(result["runs"]) == {"pretrain idmm deit_tiny_patch16_224", "finetune deit_tiny_patch16_224 224"}
    for r in result["runs"].values():
        assert min(r["official_style"], r["end_to_end"], r["step_alone"]) > 0
        assert r["b_over_a"] == round(r["end_to_end"] / r["official_style"], 2)
        assert r["b_over_c"] == round(r["end_to_end"] / r["step_alone"], 2)
        # the profile of whole steps: its operators by host time (a GPU adds them by device time, and its busy share)
        assert r["profile"]["wall_ms"] > 0 and r["profile"]["gpu_busy_ms"] is None and r["host_waits"] is None
        text = Path(r["profile"]["file"]).read_text()
        assert "by host time" in text and "aten::addmm" in text
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["finetune-deit_tiny_patch16_224-224.txt",
                                                                  "pretrain-idmm-deit_tiny_patch16_224.txt"]
    assert result["implied_hours"]["comparison"]["hours"] > 0 and result["implied_hours"]["transfer"]["hours"] is None
    assert "transfer   not measured" in run.stdout
    assert "(a)" in run.stdout and "b/c" in run.stdout
    # the row of the tables' 224 px stage says what it trained at: the demo model's 24 px (it said 224 alone)
    assert result["runs"]["finetune deit_tiny_patch16_224 224"]["resolution"] == 24
    assert result["runs"]["pretrain idmm deit_tiny_patch16_224"]["resolution"] == 16
    assert re.search(r"finetune deit_tiny_patch16_224 224 +24 px \(a\)", run.stdout), run.stdout
    assert "gpuGetDeviceCount" not in run.stderr  # the profiler's noise on a machine without a GPU
    bad = bench("benchmark", "--device", "cpu", "--images", "0")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0


def test_a_failed_pretraining_leaves_its_fine_tuning_not_run_in_the_progress_and_in_status(tmp_path):
    """The time left counted the fine-tuning that would never run, at the failed job's speed ("about 0.1 min
    left" with nothing left), and status called it "not started" where run had said "not run"."""
    args = ["--table", "comparison", "--preset", "demo", "--methods", "idmm", "--results", str(tmp_path / "r"),
            *FAST, "--set", "pretrain.lr=1e30"]
    run = in_process("run", *args)
    assert run.returncode == 1 and "not run: its parent" in run.stderr and "left" not in run.stderr, run.stderr
    status = in_process("status", *args)
    assert status.returncode == 0 and "not run: parent failed" in status.stdout, status.stdout
