"""Records -> pandas -> one table model per table and preset -> Markdown (tabulate), LaTeX and an HTML page
(jinja2, with matplotlib's figures from plots.py), or CSV of the jobs; `--compare` builds the same models from
two stores, A → B per cell.

A table is re-planned under the preset its records came from, and each cell is looked up by its job's hash:
a record counts for a cell only if it was made by exactly the recipe the preset gives now. Seeds and extra
dataset columns (`folder:DIR`) are taken from the records themselves.
"""
from __future__ import annotations

import json
import math
import re
import sys
import unicodedata
import warnings
from dataclasses import dataclass, field
from importlib import resources

import jinja2
import pandas as pd
from tabulate import tabulate

from bench import plan as planner
from bench.errors import UserError, jobs as n_jobs
from bench.models import NAMES

FORMATS = {"markdown": "md", "latex": "tex", "html": "html", "csv": "csv"}
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
        ">": r"\textgreater{}", "±": r"$\pm$", "—": "--", "–": "--", "→": r"$\to$", "×": r"$\times$",
        "≤": r"$\leq$", "≥": r"$\geq$", "≈": r"$\approx$", "↑": r"$\uparrow$", "↓": r"$\downarrow$"}
# the footer names a gap's marks as each format draws them (Markdown's = + -)
_MARKS = {"latex": ("≈", "↑", "↓"), "html": ("≈", "▲", "▼")}


def tex(s):
    """Text that pdflatex typesets as written: specials escaped, the report's own symbols as math, any other
    character outside ASCII by its closest ASCII letters (an error message can hold anything)."""
    out = []
    for ch in str(s):
        if ch in _TEX:
            out.append(_TEX[ch])
        elif ord(ch) < 128:
            out.append(ch)
        else:
            out.append(unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode() or "?")
    return "".join(out)


def _variants(store, table_name):
    """{(preset, overrides): records} of the records that fill a cell of this table. `data.*` settings choose
    how images are read, not the recipe (they are not in a job's hash): they make no variant of their own."""
    found = {}
    for r in store.records():
        if any(c[0] == table_name for c in r.get("cells", [])) and r.get("preset"):
            recipe = _in_order([o for o in r.get("overrides", []) if not o.startswith("data.")])
            found.setdefault((r["preset"], recipe), []).append(r)
    return found


def _in_order(overrides):
    """--set items sorted where their order cannot change the recipe (no key set twice, none inside another's):
    the same recipe typed in two orders has the same jobs, and is one section of the report, its seeds pooled."""
    keys = [str(o).split("=", 1)[0].strip() for o in overrides]
    clash = any(a == b or b.startswith(a + ".") for i, a in enumerate(keys) for b in keys[i + 1:] + keys[:i])
    return tuple(overrides) if clash else tuple(sorted(overrides))


def _paper_recipe(row, spec):
    ft = row.get("finetune", spec["finetune"])
    return {"pretrain_data": row.get("pretrain_data", "-"), "pretrain_epochs": row.get("pretrain_epochs", 0),
            "finetune_res": "→".join(str(s["res"]) for s in ft),
            "finetune_epochs": "→".join(str(s["epochs"]) for s in ft)}


@dataclass
class Section:
    """One table under one (preset, --set overrides): the long frame of cells and what the report needs beside it."""
    table: str
    label: str
    df: pd.DataFrame
    cols: list
    skips: dict
    used: list                                     # the records of every stage of the table's cells' chains
    recipes: dict                                  # row id -> the derived row fields of its first chain
    chains: dict = field(default_factory=dict)     # row id -> [[job, ...] one chain per cell and seed]
    stale: list = field(default_factory=list)      # records of this variant that no job of its plan has now
    init_files: dict = field(default_factory=dict)  # backbone -> the --init-weights file whose records it shows
    shown: list = field(default_factory=list)      # those behind a cell shown (filled or failed): the footer's


def _label(name, overrides):
    return " ".join([name] + [f"--set {o}" for o in overrides])


def gather(table_name, store, preset_name=None, variants=None, seeds=None, left_out=None):
    """One Section per (preset, --set overrides) that has results for the table (or the paper preset when none).
    `variants` ({(preset, overrides): records}, default the store's own) says which, and shapes their plans
    (seeds, columns, weights files); the cells are filled from `store`'s records, by hash. `seeds`: those the
    report shows, the only ones whose stale records it speaks of. `left_out`, a list: gets (label, records) of
    each variant whose preset no longer loads (a file since deleted or broken)."""
    variants = _variants(store, table_name) if variants is None else dict(variants)
    if preset_name:  # as the records name it (a file of one's own: its absolute path)
        preset_name = planner.preset_id(preset_name)
        variants = {k: v for k, v in variants.items() if k[0] == preset_name} or {(preset_name, ()): []}
    variants = variants or {("paper", ()): []}
    out = []
    for (name, overrides), recs in sorted(variants.items()):
        try:
            preset = planner.load_preset(name, overrides)
        except UserError as e:
            if preset_name:  # asked for by name: the user wants to know
                raise
            print(f"bench: warning: {n_jobs(len(recs), 'record')} of preset {name} left out of the {table_name} "
                  f"table: {e} (--format csv lists them, marked stale)", file=sys.stderr)
            if left_out is not None:
                left_out.append((_label(name, overrides), recs))
            continue
        ran = sorted({r["seed"] for r in recs}) or [0]
        cols = planner.columns(planner.table(table_name), preset)
        paper_order = {c: i for i, c in enumerate(planner.table(table_name)["columns"])}  # then by name
        cols += sorted({r["config"]["data"] for r in recs if r["stage"] == "finetune"} - set(cols),
                       key=lambda c: (paper_order.get(c, len(paper_order)), c))
        # records of two --init-weights files for one backbone are two recipes of its "IN super." row: the table
        # shows the newest file's, says so, and the CSV lists the other's (marked stale) as it lists stale ones
        files, label = {}, _label(name, overrides)
        for r in recs:
            if r["stage"] == "finetune" and r["config"]["init"].startswith("file:"):
                newest = files.setdefault(r["config"]["backbone"], {})
                newest[r["config"]["init"]] = max(newest.get(r["config"]["init"], ""), r.get("finished_at", ""))
        shown = {b: max(d, key=d.get) for b, d in files.items()}
        for b, d in files.items():
            if len(d) > 1:
                print(f"bench: warning: preset {label}: records of {len(d)} --init-weights files for {b}; the "
                      f"{table_name} table shows those of the newest ({shown[b]}), --format csv lists all",
                      file=sys.stderr)
        jobs = planner.plan(table_name, preset, datasets_=cols, seeds=ran,
                            init_weights=[f"{b}={f}" for b, f in sorted(shown.items())])
        by_hash = {j.hash: j for j in jobs}
        sec = Section(table_name, label, None, cols, {}, [], {})
        # made by a recipe the preset no longer gives (its file, bench's defaults or the table edited since):
        # said below, and kept in the CSV, rather than silently shown as empty cells. Not stale: a record of a
        # cell the plan skips here (timm's weights out of reach: the skip says why), and one of the other
        # store's (a comparison gathers both stores' variants from each)
        skipped = {(row, col, j.config["seed"]) for j in jobs if j.skip for t, row, col in j.cells if t == table_name}
        sec.stale = [r for r in {r["hash"]: r for r in recs}.values()
                     if r["hash"] not in by_hash and store.get(r["hash"]) is not None
                     and not any((row, col, r["seed"]) in skipped for t, row, col in r["cells"] if t == table_name)]
        sec.stale += _earlier_stages(store, sec.stale, by_hash)
        sec.init_files = shown
        rows = []
        for job in jobs:
            if not any(t == table_name for t, _, _ in job.cells):
                continue  # a pretraining job: read as part of its fine-tunings' chains
            chain = [] if job.skip else planner.chain(job, by_hash)
            stored = {j.hash: store.get(j.hash) for j in chain}  # the job's own record last
            rec = stored.get(job.hash)
            recs = [r for r in stored.values() if r is not None]
            status = rec["status"] if rec else ("skipped" if job.skip else "pending")
            error = rec.get("error") if rec and rec["status"] == "failed" else None
            failed_stage = next((r for r in recs if r["status"] == "failed"), None)
            if rec is None and failed_stage:  # its pretraining failed: the cell cannot fill, and says why
                status, error = "failed", f"its {failed_stage['stage']} failed: {failed_stage.get('error')}"
            for t, row_id, col in job.cells:
                if t != table_name:
                    continue
                if job.skip:
                    sec.skips[row_id] = job.skip
                else:
                    sec.recipes.setdefault(row_id, planner.recipe([j.config for j in chain]))
                    sec.chains.setdefault(row_id, []).append(chain)
                    sec.used += recs
                    # not a pretraining whose fine-tuning has not run: the footer counts the cells' jobs and minutes
                    sec.shown += recs if rec is not None or failed_stage else []
                top1 = rec["metrics"].get("top1") if rec and rec["status"] == "done" else None
                rows.append({"row": row_id, "column": col, "seed": job.config["seed"],
                             "top1": None if top1 is None else 100 * top1, "status": status, "error": error})
        sec.df = pd.DataFrame(rows, columns=["row", "column", "seed", "top1", "status", "error"])
        out.append(sec)
    if not out:  # every preset of the records is gone (said above): the paper's numbers alone, as with no records
        return gather(table_name, store, "paper", {}, seeds)  # (by name: a paper preset that fails says why)
    used = {r["hash"] for sec in out for r in sec.used}  # a job two presets share fills the other's cells
    for sec in out:
        sec.stale = [r for r in sec.stale if r["hash"] not in used and (not seeds or r["seed"] in seeds)]
        other_file = [r for r in sec.stale if str(r["config"].get("init")).startswith("file:")
                      and r["config"]["init"] != sec.init_files.get(r["config"]["backbone"])]  # said above
        if len(sec.stale) > len(other_file):
            print(f"bench: warning: {n_jobs(len(sec.stale) - len(other_file), 'record')} of preset {sec.label} in {store.root} left "
                  f"out of the {table_name} table: made by a recipe the preset no longer gives (its file, bench's "
                  f"defaults or the table changed since); bench report --results {store.root} --format csv lists "
                  f"them, marked stale", file=sys.stderr)
    return out


def _earlier_stages(store, recs, planned=()):
    """The records of the earlier stages that only `recs` read (a pretraining, perhaps hours of GPU), found by
    the parent hash a fine-tuning's init names (not random, not file:): stale with them."""
    out, seen = [], {r["hash"] for r in recs} | set(planned)
    todo = {r["config"].get("init") for r in recs}
    while todo:
        earlier = [r for h in sorted(todo - seen) if re.fullmatch(r"[0-9a-f]{16}", str(h))
                   for r in [store.get(h)] if r is not None]
        out += earlier
        seen |= {r["hash"] for r in earlier}
        todo = {r["config"].get("init") for r in earlier}
    return out


def _cells(df, seeds=None):
    """{(row id, column): (mean, std, n, failed, first error, seeds planned)} from the long frame, over the chosen
    seeds."""
    if seeds:
        df = df[df["seed"].isin(seeds)]
    stats = df.groupby(["row", "column"]).agg(mean=("top1", "mean"), std=("top1", "std"), n=("top1", "count"),
                                               failed=("status", lambda s: (s == "failed").sum()),
                                               error=("error", lambda e: next((x for x in e if isinstance(x, str)
                                                                               and x), None)),
                                               of=("seed", "nunique"))
    return {k: tuple(v) for k, v in stats.astype(object).iterrows()}  # (counts stay whole numbers)


def _value(stat):
    mean, std, n, failed, _, of = stat if stat else (math.nan, math.nan, 0, 0, None, 0)
    if n == 0:
        return "failed" if failed else "—"
    if n < of:  # some seeds failed or have not run: not a cell like the others
        return f"{mean:.1f}" + (f" ± {std:.1f}" if n > 1 else "") + f" (n={n} of {of})"
    return f"{mean:.1f}" + (f" ± {std:.1f} (n={n})" if n > 1 else "")


def _gap(diff, tolerance):
    """A difference and its mark: = within the tolerance, + above, - below."""
    return diff, "=" if abs(diff) <= tolerance else "+" if diff > 0 else "-"


def _row_labels(spec, row, recipe):
    """The row's own columns: labels from the spec, derived fields as "ours (paper)" when they differ."""
    show = {"Backbone": NAMES.get(row["backbone"], row["backbone"]), **row.get("show", {})}
    paper = _paper_recipe(row, spec)
    out = []
    for col in spec["row_columns"]:
        if isinstance(col, dict):
            (label, key), = col.items()
            ours = recipe.get(key) if recipe else None
            out.append(str(paper[key]) if ours is None or str(ours) == str(paper[key])
                       else f"{ours} ({paper[key]})")
        else:
            out.append(str(show.get(col, "")))
    return out


def _rows(spec, recipes, cells_of, keep=lambda cells: True):
    """The table body: per row its labels, its cells, and whether it opens a new backbone group (LaTeX rules
    between groups and names the backbone once); the best mean per column is marked."""
    body, last = [], None
    for r in spec["rows"]:
        cells = cells_of(r)
        if not keep(cells):
            continue
        labels = _row_labels(spec, r, recipes.get(r["id"]))
        # the group as shown: two blocks of one backbone (the imagenet table's) are two groups
        group = labels[spec["row_columns"].index("Backbone")] if "Backbone" in spec["row_columns"] else r["backbone"]
        grouped = [("" if group == last and col == "Backbone" else v) for col, v in zip(spec["row_columns"], labels)]
        body.append({"id": r["id"], "labels": labels, "grouped": grouped, "cells": cells,
                     "new_group": last is not None and group != last})
        last = group
    for i in range(len(body[0]["cells"]) if body else 0):
        means = [b["cells"][i]["mean"] for b in body if b["cells"][i]["mean"] is not None]
        for b in body:
            b["cells"][i]["best"] = bool(means) and b["cells"][i]["mean"] == max(means)
    return body


def _cell(stat, value=None, paper=None):
    have = stat is not None and stat[2] > 0
    return {"value": value or _value(stat), "mean": stat[0] if have else None, "paper": paper, "gap": None,
            "mark": "", "note": None, "best": False}


def build(spec, sec, seeds=None):
    """The table as plain strings and cell dicts: the reproduced mean beside the paper's number and the gap,
    footnotes for failed cells, and the footer (jobs, hardware, the paper-comparison summary)."""
    stats = _cells(sec.df, seeds)
    paper_cols = spec["columns"]
    notes, gaps, pairs = [], [], {}

    def cells_of(r):
        cells = []
        for c in sec.cols:
            st = stats.get((r["id"], c))
            cell = _cell(st, paper=r["paper"][paper_cols.index(c)] if c in paper_cols else None)
            if st is not None and st[3]:  # every seed failed, or some: why (the first error)
                notes.append(f"{r['id']} on {c}: {st[4]}" if st[2] == 0 else
                             f"{r['id']} on {c}: {st[3]} of {st[5]} seeds: {st[4]}")
                cell["note"] = len(notes)
            if cell["mean"] is not None and cell["paper"] is not None:
                cell["gap"], cell["mark"] = _gap(cell["mean"] - cell["paper"], 1.0)
                gaps.append(abs(cell["gap"]))
                pairs.setdefault(c, []).append((cell["mean"], cell["paper"]))
            cells.append(cell)
        return cells

    body = _rows(spec, sec.recipes, cells_of)
    in_paper = sum(v is not None for r in spec["rows"] for c, v in zip(paper_cols, r["paper"]) if c in sec.cols)
    with warnings.catch_warnings():  # a column whose means are all equal has no rank correlation (nan, left out)
        warnings.simplefilter("ignore")
        rhos = [pd.Series([a for a, _ in p]).corr(pd.Series([b for _, b in p]), method="spearman")
                for p in pairs.values() if len(p) >= 3]
    rhos = [x for x in rhos if not math.isnan(x)]
    summary = []
    if in_paper:  # not for columns the paper does not have (the demo's digits, a user's folder)
        summary = [f"Against the paper: {len(gaps)} of its {in_paper} cells run"
                   + (f", mean absolute gap {sum(gaps) / len(gaps):.1f} points" if gaps else "")
                   + (f", rank correlation of the methods per dataset (Spearman) {sum(rhos) / len(rhos):.2f} "
                      f"over {len(rhos)} datasets" if rhos else "")
                   + "; = within one point of the paper, + above, - below."]
    footer = (_footer(sec.shown, sec.skips, sec.label, seeds) + summary
              + [f"[{i}] failed: {n}" for i, n in enumerate(notes, 1)])
    return {"title": f"{spec['title']} (preset: {sec.label})", "header": _header(spec, sec.cols), "body": body,
            "footer": footer, "legend": "Top-1 (%) on the test split, and the recipe's numbers: reproduced (paper).",
            "n_row_cols": len(spec["row_columns"]), "section": sec}


def _difference(a, b, key, seeds=None):
    """(B minus A in a cell over the seeds both stores finished, how many; (None, 0) where they share none).
    Paired: a mean over other seeds would differ by the seeds alone."""
    def done(sec):
        df = sec.df[(sec.df["row"] == key[0]) & (sec.df["column"] == key[1]) & sec.df["top1"].notna()]
        return df[df["seed"].isin(seeds)] if seeds else df

    x, y = done(a).set_index("seed")["top1"], done(b).set_index("seed")["top1"]
    both = x.index.intersection(y.index)
    return ((y[both] - x[both]).mean(), len(both)) if len(both) else (None, 0)


def build_compare(spec, a, b, names, seeds=None):
    """Two result stores side by side per cell: A's value → B's value and B minus A, over the seeds both have."""
    sa = _cells(a.df, seeds) if a else {}
    sb = _cells(b.df, seeds) if b else {}
    cols = (a.cols if a else []) + [c for c in (b.cols if b else []) if c not in (a.cols if a else [])]
    diffs, unpaired = [], 0

    def cells_of(r):
        nonlocal unpaired
        cells = []
        for c in cols:
            x, y = sa.get((r["id"], c)), sb.get((r["id"], c))
            cell = _cell(y, value=f"{_value(x)} → {_value(y)}")
            if cell["mean"] is not None and x is not None and x[2] > 0:
                diff, n = _difference(a, b, (r["id"], c), seeds)
                if diff is not None:
                    cell["gap"], cell["mark"] = _gap(diff, 0.05)
                    diffs.append(cell["gap"])
                unpaired += n < max(x[2], y[2])
            cells.append(cell)
        return cells

    body = _rows(spec, {**(b.recipes if b else {}), **(a.recipes if a else {})}, cells_of,
                 keep=lambda cells: any(c["value"] != "— → —" for c in cells))
    footer = []
    for name, sec in ((names[0], a), (names[1], b)):
        footer += [f"{name}: {line}" for line in (_footer(sec.shown, {}, sec.label, seeds) if sec else ["no results"])]
    if diffs:
        footer.append(f"{len(diffs)} cells in both; {names[1]} minus {names[0]}: mean "
                      f"{sum(diffs) / len(diffs):+.1f}, mean absolute {sum(map(abs, diffs)) / len(diffs):.1f} "
                      "points; = the same to 0.1.")
    if unpaired:
        footer.append(f"{n_jobs(unpaired, 'cell')} where one store has seeds the other has not: the differences "
                      f"are over the seeds both finished (--seeds picks them)")
    label = (a or b).label
    return {"title": f"{spec['title']} (preset: {label}): {names[0]} → {names[1]}", "header": _header(spec, cols),
            "body": body, "footer": footer, "legend": f"Top-1 (%) on the test split: {names[0]} → {names[1]}.",
            "n_row_cols": len(spec["row_columns"]), "section": b or a, "axes": names}


def _header(spec, cols):
    return [next(iter(c)) if isinstance(c, dict) else c for c in spec["row_columns"]] + list(cols)


def _machine(hw):
    """Where a record ran. On a CPU the thread count is part of it: threads split a step's sums differently, and the
    demo's cells move with it (README, "The demo table")."""
    if hw.get("gpu"):  # a multi-GPU job's ranks, a GPU each
        return f"{hw['ranks']} x {hw['gpu']}" if hw.get("ranks", 1) > 1 else hw["gpu"]
    n = hw.get("torch_threads")
    threads = f", {n} thread{'s' if n != 1 else ''} a job" if n is not None else ""
    return f"{hw.get('cpus', '?')} CPUs ({hw.get('machine', '?')}{threads})"  # (a record's own words, if short)


def _footer(used, skips, preset, seeds=None):
    lines = []
    if seeds:  # the jobs behind the cells shown, not every seed's
        shown = [r for r in used if r["seed"] in seeds]
        if used and not shown:
            lines.append(f"no records of seed {', '.join(map(str, seeds))} (those of this preset: "
                         f"{', '.join(map(str, sorted({r['seed'] for r in used})))})")
        used = shown
    if used:
        hw = sorted({_machine(r["hardware"]) for r in used})
        wall = sum(r.get("wall_time_s", 0) for r in {r["hash"]: r for r in used}.values())
        lines.append(f"{n_jobs(len({r['hash'] for r in used}))} of preset '{preset}', "
                     f"run on {', '.join(hw)}, {wall / 60:.1f} min of training and evaluation in total.")
    lines += [f"{row}: {why}" for row, why in skips.items()]
    return lines


def _cell_text(c):
    text = c["value"] + (f"[{c['note']}]" if c["note"] else "")
    if c["paper"] is not None:
        text += f" ({c['paper']})"
    if c["gap"] is not None:
        text += f" {c['mark']}{abs(c['gap']):.1f}" if c["mark"] != "=" else " ="
    return text


def _flat(d, prefix=""):
    for k, v in d.items():
        yield from _flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [(f"{prefix}{k}", v)]


def csv_rows(table_name, store, preset_name=None, seeds=None):
    """One row per job record the table uses (of `seeds` where given, as the other formats' cells): every config
    field flattened, seed, metric, status, wall time, images/s, hardware, package versions and commit."""
    recs = {}

    def add(r, label, stale):
        if not (seeds and r["seed"] not in seeds):
            recs[r["hash"]] = {**{k: v for k, v in r.items() if k not in ("traceback", "cells")}, "table": table_name,
                               "preset_label": label, "top1": (r.get("metrics") or {}).get("top1"),
                               "stale": stale, "cells": r.get("cells", [])}
    left_out = []  # a preset file since deleted or broken: its records are stale, not gone
    for sec in gather(table_name, store, preset_name, seeds=seeds, left_out=left_out):
        stale = {r["hash"] for r in sec.stale}
        for r in sec.used + sec.stale:
            add(r, sec.label, r["hash"] in stale)
    for label, rs in left_out:
        for r in rs + _earlier_stages(store, rs):
            if r["hash"] not in recs:
                add(r, label, True)
    df = pd.json_normalize(list(recs.values()), sep=".")
    df = df.drop(columns=[c for c in df.columns if c.startswith("metrics.data")], errors="ignore")
    # a field of whole numbers that some records lack (a pretraining job has no mixing.parts) stays whole: 4, not
    # the 4.0 of the float column pandas makes of it
    kinds = {}
    for r in recs.values():
        for k, v in _flat(r):
            if v is not None:
                kinds.setdefault(k, set()).add(type(v))
    df = df.astype({c: "Int64" for c in df.columns if df[c].dtype == float and kinds.get(c) == {int}})
    return df.map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)  # JSON, not Python's repr


def compare_rows(table_name, a, b, names, preset_name=None, seeds=None):
    """The compared cells as a long frame: one row per (preset, row, column) with both sides (a_*, b_*; the
    stores' paths in columns a and b) and the difference b - a."""
    out = []
    for label, x, y in _paired(table_name, a, b, preset_name, seeds):
        stats = [_cells(sec.df, seeds) if sec else {} for sec in (x, y)]
        for key in sorted(k for k in set(stats[0]) | set(stats[1])
                          if any(st.get(k, (0,) * 6)[2] or st.get(k, (0,) * 6)[3] for st in stats)):
            row = {"table": table_name, "preset_label": label, "row": key[0], "column": key[1],
                   "a": names[0], "b": names[1]}
            for side, st in zip("ab", stats):
                mean, std, n, failed, _, _ = st.get(key, (None, None, 0, 0, None, 0))
                row.update({f"{side}_mean": mean if n else None, f"{side}_std": std if n > 1 else None,
                            f"{side}_n": n, f"{side}_failed": failed})
            row["difference"], row["seeds_in_both"] = _difference(x, y, key, seeds) if x and y else (None, 0)
            out.append(row)
    return pd.DataFrame(out)


def models(tables, store, preset_name=None, seeds=None, compare=None):
    """The table models to render: one per table and preset, or per table and preset present in either of the
    two compared stores."""
    out = []
    for name in tables:
        spec = planner.table(name)
        if compare is None:
            out += [build(spec, sec, seeds) for sec in gather(name, store, preset_name, seeds=seeds)]
            continue
        (na, sa), (nb, sb) = compare
        out += [build_compare(spec, x, y, (na, nb), seeds) for _, x, y in _paired(name, sa, sb, preset_name, seeds)]
    return out


def _paired(table_name, a, b, preset_name=None, seeds=None):
    """[(label, store A's Section or None, store B's)] for every preset variant with records in either store."""
    # both stores' variants for each: a job two recipes share (random init, under another pretraining's
    # epochs) has its record in A, though A never ran B's recipe
    variants = {}
    for store in (a, b):
        for k, recs in _variants(store, table_name).items():
            variants.setdefault(k, []).extend(recs)
    sides = [{s.label: s for s in gather(table_name, store, preset_name, variants, seeds) if s.used}
             for store in (a, b)]
    return [(k, sides[0].get(k), sides[1].get(k)) for k in sorted(set(sides[0]) | set(sides[1]))]


def _env():
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(resources.files("bench") / "report" / "templates")),
                             autoescape=jinja2.select_autoescape(["html.j2"]), trim_blocks=True, lstrip_blocks=True)
    env.filters["tex"] = tex
    return env


def document(tables, store, fmt="markdown", preset_name=None, seeds=None, standalone=False, compare=None):
    """The whole report, every table asked for, in one format. HTML is always a complete self-contained page;
    LaTeX is a run of table floats, or with `standalone` a document that compiles on its own."""
    if fmt == "csv":
        if compare is not None:
            (na, sa), (nb, sb) = compare
            frames = [compare_rows(t, sa, sb, (na, nb), preset_name, seeds) for t in tables]
        else:
            frames = [csv_rows(t, store, preset_name, seeds) for t in tables]
        return pd.concat(frames, ignore_index=True).to_csv(index=False)
    ms = models(tables, store, preset_name, seeds, compare)
    if fmt in _MARKS:
        same, up, down = _MARKS[fmt]
        for m in ms:
            m["footer"] = [f.replace("; = within", f"; {same} within").replace(", + above, - below", f", {up} above, "
                                                                               f"{down} below")
                           .replace("points; = the same", f"points; {same} the same") for f in m["footer"]]
    if fmt == "markdown":
        return "\n\n".join(_markdown(m) for m in ms) + "\n"
    env = _env()
    if fmt == "latex":
        body = "\n\n".join(env.get_template("table.tex.j2").render(**m) for m in ms)
        return (env.get_template("document.tex.j2").render(body=body) if standalone else body) + "\n"
    from bench.report import plots

    for m in ms:
        m["plots"] = plots.for_table(m, store if compare is None else compare[1][1])
    return env.get_template("page.html.j2").render(tables=ms, title="bench report: " + ", ".join(tables))


def _markdown(m):
    pipe = lambda cells: [str(c).replace("|", "\\|") for c in cells]  # noqa: E731  (a | in a name splits a cell)
    rows = [pipe(b["labels"] + [_cell_text(c) for c in b["cells"]]) for b in m["body"]]
    return "\n".join([f"### {m['title']}", "", tabulate(rows, pipe(m["header"]), tablefmt="pipe",
                                                        disable_numparse=True),
                      "", m["legend"]] + [f"- {f}" for f in m["footer"]])


def render(table_name, store, fmt="markdown", preset_name=None, seeds=None):
    """One table in one format (the tests' and scripts' shorthand for `document`)."""
    return document([table_name], store, fmt, preset_name, seeds)


def tables_with_results(store):
    names = {c[0] for r in store.records() for c in r.get("cells", [])}
    return [t for t in planner.load_tables() if t in names]
