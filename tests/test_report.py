from bench import plan as planner
from bench import report
from bench.results import Store


def _fill(store, table, preset_name, values, overrides=(), seed=0, datasets=None):
    """Records for the jobs of `table`, with the given top-1 per row id (a fixed fixture, not a run); a value
    that is a string makes a failed record with that error."""
    jobs = planner.plan(table, planner.load_preset(preset_name, overrides), datasets_=datasets, seeds=[seed])
    for job in jobs:
        if job.skip or not job.cells or job.cells[0][1] not in values:
            continue
        value = values[job.cells[0][1]]
        failed = isinstance(value, str)
        store.put({"hash": job.hash, "status": "failed" if failed else "done", "stage": job.config["stage"],
                   "config": job.config, "seed": seed, "cells": [list(c) for c in job.cells], "preset": preset_name,
                   "overrides": list(overrides), "metrics": {} if failed else {"top1": value},
                   **({"error": value} if failed else {}), "hardware": {"cpus": 2, "machine": "x86_64"},
                   "versions": {"torch": "2.14.1", "commit": "abc123"}, "wall_time_s": 60})


def test_markdown_puts_reproduced_beside_paper_and_dashes_for_missing(tmp_path):
    store = Store(tmp_path)
    _fill(store, "comparison", "paper", {"deit_tiny/idmm": 0.801, "deit_tiny/random": 0.5})
    md = report.render("comparison", store, "markdown")
    idmm = next(line for line in md.splitlines() if "IDMM" in line)
    assert "80.1 (79.9)" in idmm and "80.1 (66.4)" in idmm  # every column of the paper preset
    simclr = next(line for line in md.splitlines() if "SimCLR" in line)
    assert "— (71.1)" in simclr
    assert "preset: paper" in md and "14 jobs" in md


def test_latex_bolds_the_best_per_column_and_escapes(tmp_path):
    store = Store(tmp_path)
    _fill(store, "comparison", "paper", {"deit_tiny/idmm": 0.801, "deit_tiny/random": 0.5})
    tex = report.render("comparison", store, "latex")
    assert "\\toprule" in tex and "\\bottomrule" in tex
    idmm = next(line for line in tex.splitlines() if "IDMM" in line)
    rand = next(line for line in tex.splitlines() if "random init" in line)
    assert "\\textbf{80.1} (79.9)" in idmm and "\\textbf" not in rand
    assert "-- (71.1)" in next(line for line in tex.splitlines() if "SimCLR" in line)


def test_records_of_another_recipe_do_not_fill_cells(tmp_path):
    store = Store(tmp_path)
    _fill(store, "comparison", "demo", {"deit_tiny/idmm": 0.42}, overrides=["pretrain.epochs=1"])
    md = report.render("comparison", store, "markdown")
    assert "preset: demo --set pretrain.epochs=1" in md and "42.0" in md
    assert "1 (800)" in md  # the recipe's own pretraining epochs beside the paper's


def test_a_record_counts_only_for_the_recipe_that_made_it(tmp_path):
    store = Store(tmp_path)
    _fill(store, "comparison", "demo", {"deit_tiny/idmm": 0.42}, overrides=["pretrain.epochs=1"])
    for rec in store.records():  # claim the plain demo preset: its jobs have other hashes
        store.put({**rec, "overrides": []})
    md = report.render("comparison", store, "markdown")
    assert "preset: demo)" in md and "42.0" not in md


def test_two_seeds_give_mean_std_and_n_and_seeds_select(tmp_path):
    store = Store(tmp_path)
    _fill(store, "comparison", "paper", {"deit_tiny/idmm": 0.80}, seed=0, datasets=["flowers102"])
    _fill(store, "comparison", "paper", {"deit_tiny/idmm": 0.82}, seed=1, datasets=["flowers102"])
    md = report.render("comparison", store, "markdown")
    idmm = next(line for line in md.splitlines() if "IDMM" in line)
    assert "81.0 ± 1.4 (n=2) (79.9) +1.1" in idmm
    one = report.render("comparison", store, "markdown", seeds=[1])
    assert "82.0 (79.9) +2.1" in next(line for line in one.splitlines() if "IDMM" in line)


def test_a_failed_cell_says_failed_with_its_reason_and_the_gap_summary(tmp_path):
    store = Store(tmp_path)
    _fill(store, "comparison", "paper", {"deit_tiny/idmm": 0.80, "deit_tiny/simclr": "loss became non-finite",
                                         "deit_tiny/random": 0.58, "deit_tiny/dino": 0.7}, datasets=["flowers102"])
    md = report.render("comparison", store, "markdown")
    simclr = next(line for line in md.splitlines() if "SimCLR" in line)
    assert "failed[1] (71.1)" in simclr
    assert "[1] failed: deit_tiny/simclr on flowers102: loss became non-finite" in md
    assert "80.0 (79.9) =" in md and "58.0 (58.1) =" in md
    # 3 cells run of the paper's 7 rows x 7 columns; gaps 0.1, 0.1 and 5.9 (DINO, 70.0 vs 64.1); IDMM > DINO >
    # random in both orders: rho 1
    assert "3 of its 49 cells run, mean absolute gap 2.0 points" in md and "70.0 (64.1) +5.9" in md
    assert "(Spearman) 1.00 over 1 datasets" in md
    tex = report.render("comparison", store, "latex")
    assert r"failed\textsuperscript{1}" in tex and r"$\approx$" in tex


def test_csv_has_one_row_per_job_and_round_trips_through_pandas(tmp_path):
    import io

    import pandas as pd

    store = Store(tmp_path)
    _fill(store, "comparison", "demo", {"deit_tiny/idmm": 0.42, "deit_tiny/random": 0.3})
    df = pd.read_csv(io.StringIO(report.render("comparison", store, "csv")))
    assert len(df) == 2  # the two fine-tuning records the fixture holds
    assert {"hash", "seed", "status", "top1", "wall_time_s", "config.epochs", "config.lr", "hardware.cpus",
            "versions.commit", "config.mixing.parts"} <= set(df.columns)
    assert sorted(df["top1"]) == [0.3, 0.42] and set(df["config.mixing.parts"]) == {4}
    assert set(df["versions.commit"]) == {"abc123"}


def test_report_command_all_tables_csv_to_a_file_and_markdown_to_stdout_with_a_copy(tmp_path, monkeypatch, capsys):
    import pandas as pd

    from bench.cli import main

    store = Store(tmp_path / "r")
    _fill(store, "comparison", "demo", {"deit_tiny/idmm": 0.42})
    _fill(store, "transfer", "demo", {"pvt_v2_b0/sin10k/idmm": 0.5})
    out = tmp_path / "jobs.csv"
    assert main(["report", "--results", str(tmp_path / "r"), "--table", "all", "--format", "csv", "--out",
                 str(out)]) == 0
    df = pd.read_csv(out)
    assert set(df["table"]) == {"comparison", "transfer"} and len(df) == 2
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["report", "--results", str(tmp_path / "r"), "--table", "all"]) == 0
    text = capsys.readouterr().out
    assert "Comparison of different pretraining methods" in text and "42.0" in text
    assert (tmp_path / "reports" / "comparison-transfer.md").read_text() == text
