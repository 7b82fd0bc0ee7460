"""Records -> pandas -> one pivot per table and preset -> Markdown (tabulate) / LaTeX, HTML (jinja2).

A table is re-planned under the preset its records came from, and each cell is looked up by its job's hash:
a record counts for a cell only if it was made by exactly the recipe the preset gives now. Seeds and extra
dataset columns (`folder:DIR`) are taken from the records themselves.
"""
from __future__ import annotations

import math
import sys
from importlib import resources

import jinja2
import pandas as pd
from tabulate import tabulate

from bench import plan as planner
from bench.errors import UserError
from bench.models import NAMES

FORMATS = {"markdown": "md", "latex": "tex", "html": "html", "csv": "csv"}
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
        "{": r"\{", "}": r"\}", "±": r"$\pm$", "—": "--", "→": r"$\to$"}


def tex(s):
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def _variants(store, table_name):
    """{(preset, overrides): records} of the records that fill a cell of this table."""
    found = {}
    for r in store.records():
        if any(c[0] == table_name for c in r.get("cells", [])) and r.get("preset"):
            found.setdefault((r["preset"], tuple(r.get("overrides", []))), []).append(r)
    return found


def _paper_recipe(row, spec):
    ft = row.get("finetune", spec["finetune"])
    return {"pretrain_data": row.get("pretrain_data", "-"), "pretrain_epochs": row.get("pretrain_epochs", 0),
            "finetune_res": "→".join(str(s["res"]) for s in ft),
            "finetune_epochs": "→".join(str(s["epochs"]) for s in ft)}


def gather(table_name, store, preset_name=None):
    """One entry per (preset, --set overrides) that has results for the table (or the paper preset when none):
    a long DataFrame of cells, the columns, skip reasons, the records used and each row's resolved recipe."""
    variants = _variants(store, table_name)
    if preset_name:
        variants = {k: v for k, v in variants.items() if k[0] == preset_name} or {(preset_name, ()): []}
    variants = variants or {("paper", ()): []}
    out = []
    for (name, overrides), recs in sorted(variants.items()):
        try:
            preset = planner.load_preset(name, overrides)
        except UserError as e:
            if preset_name:  # asked for by name: the user wants to know
                raise
            print(f"bench: warning: {len(recs)} records of preset {name} left out of the {table_name} table: {e}",
                  file=sys.stderr)
            continue
        seeds = sorted({r["seed"] for r in recs}) or [0]
        cols = planner.columns(planner.table(table_name), preset)
        cols += sorted({r["config"]["data"] for r in recs if r["stage"] == "finetune"} - set(cols))
        files = sorted({f"{r['config']['backbone']}={r['config']['init']}" for r in recs
                        if r["stage"] == "finetune" and r["config"]["init"].startswith("file:")})
        jobs = planner.plan(table_name, preset, datasets_=cols, seeds=seeds, init_weights=files)
        by_hash = {j.hash: j for j in jobs}
        rows, skips, used, recipes = [], {}, [], {}
        for job in jobs:
            rec = None if job.skip else store.get(job.hash)
            for t, row_id, col in job.cells:
                if t != table_name:
                    continue
                if job.skip:
                    skips[row_id] = job.skip
                else:
                    chain = planner.chain(job, by_hash)
                    recipes.setdefault(row_id, planner.recipe([j.config for j in chain]))
                    used += [r for r in map(store.get, (j.hash for j in chain)) if r is not None]
                top1 = rec["metrics"].get("top1") if rec and rec["status"] == "done" else None
                rows.append({"row": row_id, "column": col, "seed": job.config["seed"],
                             "top1": None if top1 is None else 100 * top1,
                             "status": rec["status"] if rec else ("skipped" if job.skip else "pending"),
                             "error": (rec or {}).get("error") if rec and rec["status"] == "failed" else None})
        label = " ".join([name] + [f"--set {o}" for o in overrides])
        out.append((label, pd.DataFrame(rows, columns=["row", "column", "seed", "top1", "status", "error"]),
                    cols, skips, used, recipes))
    return out


def _cells(df, seeds=None):
    """{(row id, column): (mean, std, n, failed, first error)} from the long frame, over the chosen seeds."""
    if seeds:
        df = df[df["seed"].isin(seeds)]
    stats = df.groupby(["row", "column"]).agg(mean=("top1", "mean"), std=("top1", "std"), n=("top1", "count"),
                                               failed=("status", lambda s: (s == "failed").sum()),
                                               error=("error", lambda e: next((x for x in e if x), None)))
    return {k: tuple(v) for k, v in stats.iterrows()}


def _value(stat):
    mean, std, n, failed, _ = stat if stat else (math.nan, math.nan, 0, 0, None)
    if n == 0:
        return "failed" if failed else "—"
    return f"{mean:.1f}" + (f" ± {std:.1f} (n={n})" if n > 1 else "")


def _gap(mean, paper):
    """The reproduced mean minus the paper's number, and its mark: = within one point, + above, - below."""
    diff = mean - paper
    return diff, "=" if abs(diff) <= 1 else "+" if diff > 0 else "-"


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


def build(spec, df, cols, recipes, seeds=None):
    """Header and rows of plain strings, plus the best reproduced mean per column (for bold), the gap to the
    paper per cell, footnotes for failed cells and the paper-comparison summary."""
    stats = _cells(df, seeds)
    paper_cols = spec["columns"]
    header = [next(iter(c)) if isinstance(c, dict) else c for c in spec["row_columns"]] + cols
    body, best = [], {}
    for c in cols:
        means = [stats[(r["id"], c)][0] for r in spec["rows"] if (r["id"], c) in stats and stats[(r["id"], c)][2]]
        best[c] = max(means) if means else None
    notes, gaps, pairs = [], [], {}
    for r in spec["rows"]:
        line = _row_labels(spec, r, recipes.get(r["id"]))
        cells = []
        for c in cols:
            st = stats.get((r["id"], c))
            paper = r["paper"][paper_cols.index(c)] if c in paper_cols else None
            cell = {"value": _value(st), "paper": paper, "best": st is not None and st[2] > 0 and st[0] == best[c],
                    "gap": None, "mark": "", "note": None}
            if st is not None and st[2] == 0 and st[3]:
                notes.append(f"{r['id']} on {c}: {st[4]}")
                cell["note"] = len(notes)
            if st is not None and st[2] > 0 and paper is not None:
                cell["gap"], cell["mark"] = _gap(st[0], paper)
                gaps.append(abs(cell["gap"]))
                pairs.setdefault(c, []).append((st[0], paper))
            cells.append(cell)
        body.append((line, cells))
    in_paper = sum(v is not None for r in spec["rows"] for c, v in zip(paper_cols, r["paper"]) if c in cols)
    rhos = [pd.Series([a for a, _ in p]).corr(pd.Series([b for _, b in p]), method="spearman")
            for p in pairs.values() if len(p) >= 3]
    rhos = [x for x in rhos if not math.isnan(x)]
    if not in_paper:  # columns the paper does not have (the demo's digits, a user's folder)
        return header, body, notes, ""
    summary = (f"Against the paper: {len(gaps)} of its {in_paper} cells run"
               + (f", mean absolute gap {sum(gaps) / len(gaps):.1f} points" if gaps else "")
               + (f", rank correlation of the methods per dataset (Spearman) {sum(rhos) / len(rhos):.2f} over "
                  f"{len(rhos)} datasets" if rhos else "")
               + "; = within one point of the paper, + above, - below.")
    return header, body, notes, summary


def _footer(used, skips, preset):
    lines = []
    if used:
        hw = sorted({r["hardware"].get("gpu") or f"{r['hardware']['cpus']} CPUs ({r['hardware']['machine']})"
                     for r in used})
        wall = sum(r.get("wall_time_s", 0) for r in {r["hash"]: r for r in used}.values())
        lines.append(f"{len({r['hash'] for r in used})} jobs of preset '{preset}', "
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


def csv_rows(table_name, store, preset_name=None):
    """One row per job record the table uses: every config field flattened, seed, metric, status, wall time,
    images/s, hardware, package versions and commit."""
    recs = {}
    for preset, _df, _cols, _skips, used, _recipes in gather(table_name, store, preset_name):
        for r in used:
            recs[r["hash"]] = {**{k: v for k, v in r.items() if k not in ("traceback", "cells")}, "table": table_name,
                               "preset_label": preset, "top1": (r.get("metrics") or {}).get("top1")}
    df = pd.json_normalize(list(recs.values()), sep=".")
    return df.drop(columns=[c for c in df.columns if c.startswith("metrics.data")], errors="ignore")


def render(table_name, store, fmt="markdown", preset_name=None, seeds=None):
    if fmt == "csv":
        return csv_rows(table_name, store, preset_name).to_csv(index=False)
    spec = planner.table(table_name)
    parts = []
    for preset, df, cols, skips, used, recipes in gather(table_name, store, preset_name):
        header, body, notes, summary = build(spec, df, cols, recipes, seeds)
        footer = (_footer(used, skips, preset) + ([summary] if summary else [])
                  + [f"[{i}] failed: {n}" for i, n in enumerate(notes, 1)])
        title = f"{spec['title']} (preset: {preset})"
        if fmt == "markdown":
            rows = [line + [_cell_text(c) for c in cells] for line, cells in body]
            note = "Top-1 (%) on the test split, and the recipe's numbers: reproduced (paper)."
            parts.append("\n".join([f"### {title}", "", tabulate(rows, header, tablefmt="pipe", disable_numparse=True), "", note]
                                   + [f"- {f}" for f in footer]))
        else:
            env = jinja2.Environment(loader=jinja2.FileSystemLoader(
                str(resources.files("bench") / "report" / "templates")), autoescape=fmt == "html",
                trim_blocks=True, lstrip_blocks=True)
            env.filters["tex"] = tex
            parts.append(env.get_template(f"table.{FORMATS[fmt]}.j2").render(
                title=title, header=header, body=body, n_row_cols=len(spec["row_columns"]), footer=footer))
    return "\n\n".join(parts) + "\n"


def tables_with_results(store):
    names = {c[0] for r in store.records() for c in r.get("cells", [])}
    return [t for t in planner.load_tables() if t in names]
