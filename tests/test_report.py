import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

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


def test_the_footer_names_each_cpu_thread_count_the_cells_were_trained_with(tmp_path):
    store = Store(tmp_path)
    _fill(store, "comparison", "demo", {"deit_tiny/idmm": 0.337, "deit_tiny/random": 0.374})
    for i, path in enumerate(sorted(tmp_path.glob("*.json"))):  # one job trained with 1 thread, the other with 2
        rec = json.loads(path.read_text())
        rec["hardware"]["torch_threads"] = 1 + i % 2
        path.write_text(json.dumps(rec))
    footer = report.render("comparison", store, "markdown").splitlines()[-1]
    assert "2 CPUs (x86_64, 1 thread a job), 2 CPUs (x86_64, 2 threads a job)" in footer


def test_a_record_whose_hardware_says_nothing_still_makes_a_report(tmp_path):
    store = Store(tmp_path)
    _fill(store, "comparison", "demo", {"deit_tiny/idmm": 0.337})
    for path in tmp_path.glob("*.json"):  # edited by hand, or by a tool that kept only what it knew
        path.write_text(json.dumps({**json.loads(path.read_text()), "hardware": {}}))
    assert "run on ? CPUs (?), 1.0 min" in report.render("comparison", store, "markdown")
    for path in tmp_path.glob("*.json"):  # a job of 4 ranks read as one GPU's
        path.write_text(json.dumps({**json.loads(path.read_text()), "hardware": {"gpu": "NVIDIA H100", "ranks": 4}}))
    assert "run on 4 x NVIDIA H100, 1.0 min" in report.render("comparison", store, "markdown")


def test_the_footer_counts_only_the_jobs_behind_the_cells_shown(tmp_path):
    """A pretraining whose fine-tuning has not run fills no cell: it was counted, with its minutes."""
    store = Store(tmp_path)
    jobs = planner.plan("comparison", planner.load_preset("demo"), methods=["idmm"])
    pre = next(j for j in jobs if j.config["stage"] == "pretrain")
    store.put({"hash": pre.hash, "status": "done", "stage": "pretrain", "config": pre.config, "seed": 0,
               "preset": "demo", "overrides": [], "metrics": {}, "hardware": {"cpus": 2, "machine": "x86_64"},
               "wall_time_s": 600})
    assert "of preset 'demo'" not in report.render("comparison", store, "markdown")
    _fill(store, "comparison", "demo", {"deit_tiny/idmm": 0.337})
    assert "2 jobs of preset 'demo', run on 2 CPUs (x86_64), 11.0 min" in report.render("comparison", store)


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


def test_records_of_a_recipe_the_preset_no_longer_gives_are_said_and_kept_in_the_csv(tmp_path, capsys):
    """A preset file edited after its jobs ran (here: its weight decay) plans jobs of other hashes: the cells
    are empty, and the report says why and how many, and the CSV still lists the finished records, stale."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: demo\n")
    store = Store(tmp_path / "r")
    _fill(store, "comparison", planner.preset_id(str(mine)), {"deit_tiny/idmm": 0.42, "deit_tiny/random": 0.3})
    assert "42.0" in report.render("comparison", store, "markdown") and "warning" not in capsys.readouterr().err
    mine.write_text("base: demo\nfinetune: {weight_decay: 0.01}\n")
    md = report.render("comparison", store, "markdown")
    assert "42.0" not in md
    err = capsys.readouterr().err
    assert f"warning: 2 records of preset {mine} in {tmp_path / 'r'} left out of the comparison table" in err
    assert "stale" in err
    df = pd.read_csv(io.StringIO(report.render("comparison", store, "csv")))
    assert len(df) == 2 and df["stale"].all() and sorted(df["top1"]) == [0.3, 0.42]
    capsys.readouterr()
    report.render("comparison", store, "markdown", seeds=[1])  # the seeds shown: none of them is stale
    assert "stale" not in capsys.readouterr().err
    # the pretraining a stale fine-tuning read is stale with it, counted and listed (it was neither)
    mine.write_text("base: demo\n")
    pre = next(j for j in planner.plan("comparison", planner.load_preset(str(mine)), methods=["idmm"])
               if j.config["stage"] == "pretrain")
    rec = next(r for r in store.records() if r["metrics"]["top1"] == 0.42)
    store.put({**rec, "hash": pre.hash, "stage": "pretrain", "config": pre.config, "metrics": {}, "cells": []})
    mine.write_text("base: demo\npretrain: {weight_decay: 0.01}\n")
    assert "30.0" in report.render("comparison", store, "markdown")  # random init's recipe is unchanged
    assert f"warning: 2 records of preset {mine} in {tmp_path / 'r'} left out" in capsys.readouterr().err
    df = pd.read_csv(io.StringIO(report.render("comparison", store, "csv"))).set_index("hash")
    assert len(df) == 3 and df.loc[pre.hash, "stale"] and df.loc[rec["hash"], "stale"] and df["stale"].sum() == 2
    # the preset file deleted: no recipe to plan, and the CSV still lists every record, stale (it dropped them)
    mine.unlink()
    df = pd.read_csv(io.StringIO(report.render("comparison", store, "csv")))
    assert len(df) == 3 and df["stale"].all() and "--format csv lists them" in capsys.readouterr().err


def test_two_seeds_give_mean_std_and_n_and_seeds_select(tmp_path):
    store = Store(tmp_path)
    _fill(store, "comparison", "paper", {"deit_tiny/idmm": 0.80}, seed=0, datasets=["flowers102"])
    _fill(store, "comparison", "paper", {"deit_tiny/idmm": 0.82}, seed=1, datasets=["flowers102"])
    md = report.render("comparison", store, "markdown")
    idmm = next(line for line in md.splitlines() if "IDMM" in line)
    assert "81.0 ± 1.4 (n=2) (79.9) +1.1" in idmm
    one = report.render("comparison", store, "markdown", seeds=[1])
    assert "82.0 (79.9) +2.1" in next(line for line in one.splitlines() if "IDMM" in line)
    assert "2 jobs of preset" in md and "1 job of preset" in one  # the footer counts the jobs shown
    none = report.render("comparison", store, "markdown", seeds=[5])
    assert "no records of seed 5 (those of this preset: 0, 1)" in none and "jobs of preset" not in none
    csv = lambda seeds: pd.read_csv(io.StringIO(report.render("comparison", store, "csv", seeds=seeds)))  # noqa: E731
    assert sorted(csv(None)["seed"]) == [0, 1] and list(csv([1])["seed"]) == [1]  # it listed every seed's job


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


def test_a_cell_some_of_whose_seeds_failed_or_have_not_run_says_so(tmp_path):
    """It read as a cell like any other: the mean of the seeds that finished, without n or the failure."""
    store = Store(tmp_path)
    _fill(store, "comparison", "paper", {"deit_tiny/idmm": 0.80, "deit_tiny/random": 0.5}, seed=0,
          datasets=["flowers102"])
    _fill(store, "comparison", "paper", {"deit_tiny/idmm": "out of memory", "deit_tiny/random": 0.52}, seed=1,
          datasets=["flowers102"])
    _fill(store, "comparison", "paper", {"deit_tiny/random": 0.54}, seed=2, datasets=["flowers102"])
    md = report.render("comparison", store, "markdown")
    assert "80.0 (n=1 of 3)[1] (79.9) =" in next(line for line in md.splitlines() if "IDMM" in line)
    assert "[1] failed: deit_tiny/idmm on flowers102: 1 of 3 seeds: out of memory" in md
    assert "52.0 ± 2.0 (n=3) (58.1) -6.1" in next(line for line in md.splitlines() if "random init" in line)
    assert "80.0 (79.9) =" in report.render("comparison", store, "markdown", seeds=[0])


def test_compare_pairs_the_seeds_both_stores_finished(tmp_path, monkeypatch):
    """B, a copy of A without its seed 1, differed from it by seed 1's result alone."""
    from bench.cli import main

    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    for store, seeds in ((a, (0, 1)), (b, (0,))):
        for seed in seeds:
            _fill(store, "comparison", "demo", {"deit_tiny/idmm": 0.40 + 0.05 * seed}, seed=seed)
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--compare", "a", "b", "--out", "c.md"]) == 0
    md = (tmp_path / "c.md").read_text()
    assert "42.5 ± 3.5 (n=2) → 40.0 (n=1 of 2) =" in next(line for line in md.splitlines() if "IDMM" in line)
    assert "1 cell where one store has seeds the other has not: the differences are over the seeds both" in md
    assert main(["report", "--compare", "a", "b", "--format", "csv", "--out", "c.csv"]) == 0
    row = pd.read_csv(tmp_path / "c.csv").set_index("row").loc["deit_tiny/idmm"]
    assert row["difference"] == pytest.approx(0.0) and row["seeds_in_both"] == 1


def test_two_blocks_of_one_backbone_are_two_groups_and_extra_columns_keep_the_paper_s_order(tmp_path):
    tex = report.render("imagenet", Store(tmp_path / "empty"), "latex")
    body = tex.split("\\midrule", 1)[1]
    assert body.count("\\midrule") >= 1 and "block 2" in body.split("\\midrule")[-1], tex
    store = Store(tmp_path / "s")
    _fill(store, "comparison", "demo", {"deit_tiny/idmm": 0.4},
          datasets=["indoor67", "cub200", f"folder:{tmp_path}/a|b"])
    md = report.render("comparison", store, "markdown")
    header = next(line for line in md.splitlines() if line.startswith("| Backbone"))
    assert header.index("indoor67") < header.index("cub200") < header.index("a\\|b")  # a | escaped: one cell


def test_a_cell_whose_pretraining_failed_says_failed_with_the_pretrainings_reason(tmp_path):
    store = Store(tmp_path)
    jobs = planner.plan("comparison", planner.load_preset("paper"), ["simclr"], ["flowers102"], None, [0])
    pre = next(j for j in jobs if j.config["stage"] == "pretrain")
    store.put({"hash": pre.hash, "status": "failed", "stage": "pretrain", "config": pre.config, "seed": 0,
               "cells": [], "preset": "paper", "overrides": [], "metrics": {}, "error": "loss became non-finite",
               "hardware": {"cpus": 2, "machine": "x86_64"}, "wall_time_s": 5})
    md = report.render("comparison", store, "markdown")  # the fine-tuning has no record: it never ran
    assert "failed[1] (71.1)" in next(line for line in md.splitlines() if "SimCLR" in line)
    assert "[1] failed: deit_tiny/simclr on flowers102: its pretrain failed: loss became non-finite" in md


def test_one_recipe_typed_in_two_orders_is_one_table_with_its_seeds_pooled(tmp_path):
    """--set items in another order make the same jobs; the report made two tables of one recipe, a seed each."""
    store = Store(tmp_path)
    one, other = ["pretrain.epochs=1", "finetune.epochs=1"], ["finetune.epochs=1", "pretrain.epochs=1"]
    _fill(store, "comparison", "demo", {"deit_tiny/random": 0.30}, one, seed=0)
    _fill(store, "comparison", "demo", {"deit_tiny/random": 0.40}, other, seed=1)
    md = report.render("comparison", store, "markdown")
    assert md.count("### ") == 1 and "35.0 ± 7.1 (n=2)" in md, md
    # a key set twice: the order is the recipe, and it stays as typed
    assert report._in_order(["pretrain.epochs=1", "pretrain.epochs=2"]) == ("pretrain.epochs=1", "pretrain.epochs=2")


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
    rec = next(r for r in store.records() if r["metrics"]["top1"] == 0.42)
    row = df[df["top1"] == 0.42].iloc[0]
    assert json.loads(row["config.views.crops"]) == rec["config"]["views"]["crops"]  # lists come back as JSON
    assert row["config.lr"] == rec["config"]["lr"] and row["hash"] == rec["hash"]
    assert json.loads(row["cells"]) == rec["cells"]  # the cells a job fills (one ImageNet job fills three rows)
    # with a pretraining record beside them (no mixing), whole numbers stay whole in the text: 4, not 4.0
    pre = next(j for j in planner.plan("comparison", planner.load_preset("demo")) if j.config["stage"] == "pretrain")
    store.put({**rec, "hash": pre.hash, "stage": "pretrain", "config": pre.config, "metrics": {}, "cells": []})
    text = pd.read_csv(io.StringIO(report.render("comparison", store, "csv")), dtype=str, keep_default_na=False)
    assert sorted(text["config.mixing.parts"]) == ["", "4", "4"]


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


# --- golden files, the LaTeX compile, the page in a browser, --compare -----------------------------------------

GOLDEN = Path(__file__).parent / "golden"
_PNG = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")


def _golden_store(root):
    """Fixed records: IDMM and random init. with two seeds on two datasets, SimCLR failed on one, the rest of the
    table missing; a metrics log for every job so that the page has curves."""
    store = Store(root)
    for seed, (idmm, rand) in enumerate([(0.80, 0.58), (0.82, 0.60)]):
        _fill(store, "comparison", "paper", {"deit_tiny/idmm": idmm, "deit_tiny/random": rand,
                                             "deit_tiny/simclr": "loss became non-finite (x_1 & 50% ≥ 1e3)"},
              seed=seed, datasets=["flowers102", "pets"])
    for rec in store.records():
        run = store.run_dir(rec["hash"])
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"epoch": e, "loss": 4.0 / (1 + e + rec["seed"]), "lr": 5e-4 * (1 - e / 10)}) + "\n"
            for e in range(10)))
    return store


@pytest.mark.parametrize("fmt", ["markdown", "latex", "html", "csv"])
def test_each_format_matches_its_golden_file(tmp_path, fmt):
    """The whole rendered report, byte for byte (the PNG payloads aside). After a deliberate change to the
    output, BENCH_UPDATE_GOLDEN=1 pytest tests/test_report.py rewrites them: review the diff."""
    text = report.document(["comparison"], _golden_store(tmp_path), fmt, standalone=fmt == "latex")
    if fmt == "html":
        assert len(_PNG.findall(text)) == 4  # the cells' plot and three rows' curves
        text = _PNG.sub("data:image/png;base64,...", text)
    golden = GOLDEN / f"comparison.{report.FORMATS[fmt]}"
    if os.environ.get("BENCH_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()


def _tool(name, hint):
    """A system tool the test needs: skipped where it is missing, except in CI, where .ci/setup installs it."""
    path = shutil.which(name)
    if path is None and not os.environ.get("CI"):
        pytest.skip(f"{name} is not installed here: {hint}")
    assert path, f"{name} is missing: {hint}"
    return path


def test_standalone_latex_compiles_with_pdflatex(tmp_path):
    pdflatex = _tool("pdflatex", "sudo .ci/setup installs TeX Live's base packages")
    store = _golden_store(tmp_path / "r")
    _fill(store, "sota", "paper", {"t2t_vit_7/idmm": 0.7})  # a second table, with its backbone groups
    (tmp_path / "t.tex").write_text(report.document(["comparison", "sota"], store, "latex", standalone=True))
    out = subprocess.run([pdflatex, "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:]
    assert (tmp_path / "t.pdf").stat().st_size > 1000
    assert "Overfull" not in out.stdout  # the tables fit the page


def test_the_page_shows_the_precision_a_job_ran_in_beside_the_recipes(tmp_path):
    """A CPU trains the recipe's bf16 in fp32 (its record says so): the page's recipe of that job says fp32."""
    store = Store(tmp_path)
    _fill(store, "comparison", "demo", {"deit_tiny/idmm": 0.4, "deit_tiny/random": 0.3})
    for rec in store.records():
        if rec["config"]["data"] == "digits" and rec["config"]["init"] == "random":
            store.put({**rec, "metrics": {**rec["metrics"], "precision": "fp32"}})
    page = report.document(["comparison"], store, "html")
    assert page.count("fp32 (recipe: bf16)") == 1 and "<td>bf16</td>" in page  # the other job: no record of it


def test_the_page_renders_in_a_browser_with_tables_and_plots(tmp_path):
    browser = _tool("chromium-headless-shell", "sudo .ci/setup installs Debian's chromium-headless-shell")
    from playwright.sync_api import sync_playwright

    store = _golden_store(tmp_path / "r")
    _fill(store, "transfer", "paper", {"pvt_v2_b0/sin10k/idmm": 0.5})
    logged = next(r for r in store.records() if (store.run_dir(r["hash"]) / "metrics.jsonl").exists())
    with open(store.run_dir(logged["hash"]) / "metrics.jsonl", "a") as log:
        log.write('{"epoch": 10}\n["not", "a", "line"]\n{"epoch": 11, "lo')  # a foreign and a cut-short line
    page_file = tmp_path / "report.html"
    page_file.write_text(report.document(["comparison", "transfer"], store, "html"))
    problems = []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser, args=["--no-sandbox"])
        page = b.new_page()
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url[:80]}"))
        page.goto(page_file.as_uri())
        page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
        images = page.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth, i.alt])")
        tables = page.evaluate("[...document.querySelectorAll('table.bench')].map(t => t.rows.length)")
        idmm = page.evaluate("[...document.querySelectorAll('table.bench tr')].find(r => r.innerText.includes("
                             "'IDMM')).innerText")
        b.close()
    assert problems == []
    assert tables == [1 + len(planner.table(t)["rows"]) for t in ("comparison", "transfer")]  # header + rows
    assert len(images) >= 5 and all(ok and width > 100 for ok, width, _ in images), images
    assert "81.0 ± 1.4 (n=2) (79.9)" in idmm


def test_compare_puts_two_stores_side_by_side_with_the_difference(tmp_path, monkeypatch):
    from bench.cli import main

    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    _fill(a, "comparison", "demo", {"deit_tiny/idmm": 0.40, "deit_tiny/random": 0.30})
    _fill(b, "comparison", "demo", {"deit_tiny/idmm": 0.43, "deit_tiny/dino": 0.2})
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--compare", "a", "b", "--out", "c.md"]) == 0
    md = (tmp_path / "c.md").read_text()
    assert "a → b" in md
    idmm = next(line for line in md.splitlines() if "IDMM" in line)
    assert "40.0 → 43.0 +3.0" in idmm
    assert "30.0 → —" in next(line for line in md.splitlines() if "random" in line)
    assert "— → 20.0" in next(line for line in md.splitlines() if "DINO" in line)
    assert "SimCLR" not in md  # in neither store
    assert "1 cells in both; b minus a: mean +3.0" in md
    assert main(["report", "--compare", "a", "b", "--format", "csv", "--out", "c.csv"]) == 0
    df = pd.read_csv(tmp_path / "c.csv")
    assert len(df) == 3 and df.set_index("row").loc["deit_tiny/idmm", "difference"] == pytest.approx(3.0)


def test_compare_finds_a_job_two_recipes_share_in_the_store_that_ran_only_one(tmp_path, monkeypatch):
    """B ran the demo and the demo with 3 pretraining epochs; A the demo alone. Random init is one job under both
    recipes: its record in A fills A's side of B's second table."""
    from bench.cli import main

    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    for store in (a, b):
        _fill(store, "comparison", "demo", {"deit_tiny/idmm": 0.40, "deit_tiny/random": 0.30})
    _fill(b, "comparison", "demo", {"deit_tiny/idmm": 0.45}, overrides=("pretrain.epochs=3",))
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--compare", "a", "b", "--format", "csv", "--out", "c.csv"]) == 0
    df = pd.read_csv(tmp_path / "c.csv").set_index(["preset_label", "row"])
    three = "demo --set pretrain.epochs=3"
    assert df.loc[(three, "deit_tiny/random"), "a_mean"] == pytest.approx(30.0)
    assert df.loc[(three, "deit_tiny/random"), "difference"] == pytest.approx(0.0)
    assert pd.isna(df.loc[(three, "deit_tiny/idmm"), "a_mean"])  # A never pretrained for 3 epochs


def test_report_refuses_a_compare_store_without_records_and_standalone_outside_latex(tmp_path, capsys):
    from bench.cli import main

    _fill(Store(tmp_path / "a"), "comparison", "demo", {"deit_tiny/idmm": 0.4})
    (tmp_path / "empty").mkdir()
    assert main(["report", "--compare", str(tmp_path / "a"), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "empty: no records there" in err and len(err.strip().splitlines()) == 1
    assert main(["report", "--results", str(tmp_path / "a"), "--standalone"]) == 2
    assert "--format latex" in capsys.readouterr().err
    assert main(["report", "--results", str(tmp_path / "empty")]) == 0  # a table all dashes, and why
    assert f"no records in {tmp_path / 'empty'}" in capsys.readouterr().err
    # an empty value was "not given" (the whole store's tables, stdout); a file where a folder is said so
    (tmp_path / "file").write_text("x")
    for args, words in ((["--out", ""], "--out: an empty value"), (["--table", " "], "--table: an empty value"),
                        (["--preset", ""], "--preset: an empty value"),
                        (["--out", str(tmp_path / "file" / "t.md")],
                         f"--out {tmp_path / 'file' / 't.md'}: {tmp_path / 'file'} is a file, not a folder")):
        assert main(["report", "--results", str(tmp_path / "a"), *args]) == 2
        assert capsys.readouterr().err == f"bench: error: {words}\n"
    # the format from the file's suffix (a .tex of Markdown was written), unless asked for
    assert main(["report", "--results", str(tmp_path / "a"), "--out", str(tmp_path / "t.tex")]) == 0
    assert "\\toprule" in (tmp_path / "t.tex").read_text()
    assert main(["report", "--results", str(tmp_path / "a"), "--out", str(tmp_path / "t.md"), "--format", "csv"]) == 0
    assert (tmp_path / "t.md").read_text().startswith("hash,")


def test_no_stale_warning_for_a_record_another_preset_shows_or_whose_cell_is_skipped_here(tmp_path, capsys,
                                                                                          monkeypatch):
    """Not stale: a record made under an edited preset file whose job the demo preset also plans (random init,
    shown in demo's section); one of timm's ImageNet weights on a machine that cannot get them (the cell says
    why it is skipped). In a comparison, each store's stale records are counted once, under its own name."""
    from bench import models

    mine = tmp_path / "mine.yaml"
    mine.write_text("base: demo\npretrain: {epochs: 3}\n")
    store = Store(tmp_path / "a")
    _fill(store, "comparison", planner.preset_id(str(mine)), {"deit_tiny/random": 0.3, "deit_tiny/idmm": 0.5})
    _fill(store, "comparison", "demo", {"deit_tiny/idmm": 0.42})
    mine.write_text("base: demo\npretrain: {epochs: 3}\nfinetune: {weight_decay: 0.01}\n")
    capsys.readouterr()
    md = report.render("comparison", store, "markdown")
    assert "30.0" in md and "42.0" in md and "50.0" not in md
    (warning,) = capsys.readouterr().err.splitlines()  # the IDMM record alone: random init's fills demo's cell
    assert f"1 record of preset {mine} in {tmp_path / 'a'} left out" in warning
    with monkeypatch.context() as m:  # written as where timm's weights can be had
        m.setattr(models, "imagenet_weights_missing", lambda backbone: None)
        _fill(store, "sota", "paper", {"deit_tiny/in_supervised": 0.9}, datasets=["flowers102"])
    assert "offline" in report.render("sota", store, "markdown") and not capsys.readouterr().err
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    report.document(["comparison"], None, "markdown", compare=(("A", Store(tmp_path / "a")), ("B", Store(tmp_path / "b"))))
    err = capsys.readouterr().err.splitlines()
    assert sorted(err) == sorted(warning.replace(str(tmp_path / "a"), str(tmp_path / d)) for d in "ab")


def test_records_of_two_weights_files_for_one_backbone_still_make_a_report(tmp_path, capsys):
    """The 'IN super.' row run from one file, then from another: the report re-plans with both files' digests,
    which a check for two files given at once on the command line refused, stopping every report of the store.
    It shows the newest file's records (it showed whichever digest sorted last) and says so, in place of calling
    the other's stale; the CSV lists both."""
    demo, name, store = planner.load_preset("demo"), "deit_tiny_patch16_224", Store(tmp_path / "r")
    for i in range(2):
        (tmp_path / f"w{i}.pth").write_bytes(b"weights %d" % i)
    digests = {i: planner.file_digest(tmp_path / f"w{i}.pth") for i in range(2)}
    newest = min(digests, key=digests.get)  # the one that sorts first: not the last one planned by chance
    for i, value in enumerate((0.6, 0.7)):
        for job in planner.plan("sota", demo, methods=["in_supervised"], backbones=[name],
                                init_weights=[f"{name}={tmp_path / f'w{i}.pth'}"]):
            store.put({"hash": job.hash, "status": "done", "stage": "finetune", "config": job.config, "seed": 0,
                       "cells": [list(c) for c in job.cells], "preset": "demo", "overrides": [],
                       "metrics": {"top1": value}, "hardware": {"cpus": 2, "machine": "x86_64"}, "wall_time_s": 60,
                       "finished_at": "2026-02-01T00:00:00+00:00" if i == newest else "2026-01-01T00:00:00+00:00"})
    capsys.readouterr()
    md = report.render("sota", store, "markdown")
    assert "IN super." in md and f"{(60.0, 70.0)[newest]}" in md and f"{(60.0, 70.0)[1 - newest]}" not in md
    (warning,) = capsys.readouterr().err.splitlines()
    assert f"records of 2 --init-weights files for {name}; the sota table shows those of the newest " \
           f"(file:{digests[newest]})" in warning
    csv = report.csv_rows("sota", store)
    assert sorted(csv["stale"]) == [False, True] and not capsys.readouterr().err.count("made by a recipe")


def test_a_filter_that_selects_no_record_is_refused_where_the_output_would_be_empty(tmp_path, capsys, monkeypatch):
    """--preset or --seeds naming nothing the stores hold: the CSV and a comparison would print nothing and exit
    0; they refuse in one line naming what the stores hold. A table still shows the paper's numbers, and says so.
    --results beside --compare (which names both stores) was ignored: refused."""
    from bench.cli import main

    monkeypatch.chdir(tmp_path)
    for side in "ab":
        _fill(Store(tmp_path / side), "comparison", "demo", {"deit_tiny/idmm": 0.4})
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for args in (["--compare", a, b, "--preset", "paper"], ["--results", a, "--format", "csv", "--preset", "paper"],
                 ["--results", a, "--format", "csv", "--seeds", "7"]):
        assert main(["report", *args]) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "no records of" in err and "they hold presets demo, seeds 0" in err
    assert main(["report", "--results", a, "--preset", "paper"]) == 0
    out, err = capsys.readouterr()
    assert "(79.9)" in out and "no records of preset paper for the comparison table" in err
    assert main(["report", "--results", a, "--compare", a, b]) == 2
    assert "drop --results" in capsys.readouterr().err
    assert main(["report", "--compare", a, b, "--preset", "demo", "--format", "csv"]) == 0
    assert "a_mean" in capsys.readouterr().out
    # no filter, yet nothing to show: a table the stores have no records of; an empty store's CSV
    for args, where in ((["--compare", a, b, "--table", "sota"], f"{a} or {b}"),
                        (["--results", a, "--format", "csv", "--table", "sota"], a)):
        assert main(["report", *args]) == 2, args
        assert capsys.readouterr().err.strip().splitlines() == [
            f"bench: error: no records for the sota table in {where}; they hold records of the comparison table"]
    (tmp_path / "empty").mkdir()
    assert main(["report", "--results", str(tmp_path / "empty"), "--format", "csv"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["report", "--results", a, "--table", "comparisn", "--preset", "demo", "--format", "csv"]) == 2
    assert "unknown table 'comparisn'" in capsys.readouterr().err  # the misspelt table, not 'no records'
    for fmt in ("csv", "markdown"):
        assert main(["report", "--results", a, "--preset", "papr", "--format", fmt]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            "bench: error: --preset papr: no such preset: choose from demo, paper or a .yaml path"]


def test_a_preset_file_of_ones_own_is_found_by_the_relative_path_given_to_run(tmp_path, monkeypatch):
    """Records name a preset file by its absolute path; `--preset mine.yaml`, run from its folder, finds them."""
    (tmp_path / "sub").mkdir()
    mine = tmp_path / "sub" / "mine.yaml"
    mine.write_text("base: demo\n")
    store = Store(tmp_path / "r")
    _fill(store, "comparison", planner.preset_id(str(mine)), {"deit_tiny/random": 0.5})
    monkeypatch.chdir(tmp_path / "sub")
    md = report.render("comparison", store, "markdown", preset_name="mine.yaml")
    assert "50.0" in md and str(mine) in md
