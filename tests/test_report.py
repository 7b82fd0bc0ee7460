from bench import plan as planner
from bench import report
from bench.results import Store


def _fill(store, table, preset_name, values, overrides=()):
    """Records for the jobs of `table`, with the given top-1 per row id (a fixed fixture, not a run)."""
    jobs = planner.plan(table, planner.load_preset(preset_name, overrides))
    for job in jobs:
        if job.skip or not job.cells or job.cells[0][1] not in values:
            continue
        store.put({"hash": job.hash, "status": "done", "stage": job.config["stage"], "config": job.config,
                   "seed": 0, "cells": [list(c) for c in job.cells], "preset": preset_name,
                   "overrides": list(overrides), "metrics": {"top1": values[job.cells[0][1]]},
                   "hardware": {"cpus": 2, "machine": "x86_64"}, "wall_time_s": 60})


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
