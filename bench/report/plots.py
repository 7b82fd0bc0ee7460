"""The HTML page's figures, drawn with matplotlib (no pyplot: no global state, no display) and embedded as
base64 PNG so that the page is one self-contained file."""
from __future__ import annotations

import base64
import io
import json

from matplotlib.figure import Figure

from bench import plan as planner


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode()


def cells(model):
    """Reproduced against the reference (the paper's number, or store A in a comparison) per cell, one colour
    per row, the diagonal and a band of one point around it."""
    points = {}
    for row in model["body"]:
        for c in row["cells"]:
            if c["gap"] is not None:
                # every label of the row: two of them named a backbone's 4 transfer rows, or the imagenet
                # table's 300- and 100-epoch rows, as one series
                points.setdefault(" ".join(row["labels"]), []).append((c["mean"] - c["gap"], c["mean"]))
    if not points:
        return None
    fig = Figure(figsize=(5.2, 4))
    ax = fig.add_subplot()
    xs = [v for pts in points.values() for p in pts for v in p]
    lo, hi = min(xs) - 2, max(xs) + 2
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
    ax.fill_between([lo, hi], [lo - 1, hi - 1], [lo + 1, hi + 1], color="grey", alpha=0.15, lw=0)
    for label, pts in points.items():
        ax.scatter([x for x, _ in pts], [y for _, y in pts], label=label, s=18)
    x_name, y_name = model.get("axes", ("paper", "reproduced"))
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel=f"{x_name}: top-1 (%)", ylabel=f"{y_name}: top-1 (%)")
    ax.legend(fontsize=6, loc="upper left", frameon=False)
    return _png(fig)


def _metrics(store, h):
    """A job's per-epoch log; lines a killed writer left half-written (or anything else) are skipped."""
    path = store.run_dir(h) / "metrics.jsonl"
    out = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(m, dict) and all(isinstance(m.get(k), (int, float)) for k in ("epoch", "loss", "lr")):
            out.append(m)
    return out


def curves(jobs, store):
    """Training loss and learning rate per epoch of every job of a row, from their metrics logs."""
    logs = [(j, m) for j in jobs if (m := _metrics(store, j.hash))]
    if not logs:
        return None
    fig = Figure(figsize=(9, 2.8), layout="constrained")
    loss_ax, lr_ax = fig.subplots(1, 2)
    for job, log in logs:
        c = job.config
        label = f"{c['stage']} {c['data']} s{c['seed']}"
        epochs = [m["epoch"] + 1 for m in log]
        loss_ax.plot(epochs, [m["loss"] for m in log], label=label, lw=1)
        lr_ax.plot(epochs, [m["lr"] for m in log], lw=1)
    loss_ax.set(xlabel="epoch", ylabel="training loss")
    lr_ax.set(xlabel="epoch", ylabel="learning rate (end of epoch)")
    loss_ax.legend(fontsize=6, frameon=False)
    return _png(fig)


def for_table(model, store):
    """{"cells": png or None, "rows": {row id: {"stages": [recipe per job], "curves": png or None}}}."""
    rows = {}
    for row_id, chains in model["section"].chains.items():
        jobs = list({j.hash: j for chain in chains for j in chain}.values())
        records = {j.hash: store.get(j.hash) for j in jobs}
        ran = [j for j in jobs if records[j.hash]]
        jobs = ran or chains[0]  # a row with no record yet shows the recipe it would run
        stages = [{"job": j.short, "status": records[j.hash]["status"] if records[j.hash] else "not run",
                   "seed": j.config["seed"], **_as_ran(planner.describe(j), records[j.hash])} for j in jobs]
        rows[row_id] = {"stages": stages, "curves": curves(ran, store)}
    return {"cells": cells(model), "rows": rows}


def _as_ran(recipe, record):
    """The recipe with what its record says ran where that differs: a CPU trains `precision: bf16` in fp32."""
    ran = ((record or {}).get("metrics") or {}).get("precision")
    if ran and ran != recipe["precision"]:
        recipe["precision"] = f"{ran} (recipe: {recipe['precision']})"
    return recipe
