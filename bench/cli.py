"""`bench`: run | report | status | methods | data."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tabulate import tabulate

from bench import data as datasets
from bench import plan as planner
from bench.errors import UserError
from bench.results import Store


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        print(f"bench: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _store_args(p):
    p.add_argument("--results", default="results", metavar="DIR", help="result store (default: ./results)")


def _plan_args(p):
    p.add_argument("--table", default="comparison", help="comparison | transfer | sota | imagenet")
    p.add_argument("--preset", default="paper", help="paper | demo | path/to/preset.yaml")
    p.add_argument("--methods", nargs="+", metavar="M", help="only these rows' methods")
    p.add_argument("--datasets", nargs="+", metavar="D", help="columns to run: registered names or folder:DIR")
    p.add_argument("--backbones", nargs="+", metavar="B", help="only these rows' backbones")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S")
    p.add_argument("--init-weights", nargs="+", default=[], metavar="[BACKBONE=]FILE",
                   help="ImageNet weights for the 'IN super.' rows, instead of timm's download")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset value, e.g. --set pretrain.epochs=2 (changes the job hashes)")
    _store_args(p)


def _jobs(args):
    preset = planner.load_preset(args.preset, args.set)
    return preset, planner.plan(args.table, preset, args.methods, args.datasets, args.backbones, args.seeds,
                                args.init_weights)


def _job_table(jobs, store):
    rows = []
    for j in jobs:
        d = planner.describe(j)
        state = "skipped: " + j.skip if j.skip else store.state(j.hash)
        rows.append([j.short, "  ".join(f"{k}={v}" for k, v in d.items()), state])
    return tabulate(rows, ["hash", "recipe", "state"], tablefmt="plain")


def cmd_run(args):
    preset, jobs = _jobs(args)
    store = Store(args.results)
    if args.dry_run:
        print(_job_table(jobs, store))
        return 0
    from bench.launch import local

    runnable = [j for j in jobs if not j.skip]
    for spec in sorted({j.config["data"] for j in runnable}):
        datasets.check_available(spec, args.data_root)
    done = sum(store.state(j.hash) == "done" for j in runnable)
    skipped = len(jobs) - len(runnable)
    print(f"{args.table} / {preset['name']}: {len(runnable)} jobs, {done} done already"
          + (f", {skipped} cells skipped" if skipped else ""), file=sys.stderr)
    if done == len(runnable):
        print(f"all {done} jobs are done; nothing to train", file=sys.stderr)
        return 0
    ran, failed = local.run(jobs, store, preset["name"], args.set, args.data_root)
    print(f"finished {ran - failed} of {ran} jobs" + (f", {failed} failed (see bench status)" if failed else "")
          + f"; results in {args.results}", file=sys.stderr)
    return 1 if failed else 0


def cmd_report(args):
    from bench import report

    store = Store(args.results)
    tables = [args.table] if args.table else (report.tables_with_results(store) or ["comparison"])
    out_dir = Path(args.out)
    for name in tables:
        text = report.render(name, store, args.format, args.preset)
        sys.stdout.write(text)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.{report.FORMATS[args.format]}").write_text(text)
    return 0


def cmd_status(args):
    store = Store(args.results)
    if args.table:
        _, jobs = _jobs(args)
        print(_job_table(jobs, store))
        return 0
    rows = []
    for r in store.records():
        c = r["config"]
        top1 = r.get("metrics", {}).get("top1")
        rows.append([r["hash"][:10], r["status"], r["stage"], r.get("method", ""), c["backbone"], c["data"],
                     c["resolution"], c["epochs"], "" if top1 is None else f"{100 * top1:.1f}",
                     f"{r.get('wall_time_s', 0):.0f}s", r.get("error", "")])
    runs = store.root / "runs"
    for d in sorted(runs.iterdir()) if runs.is_dir() else []:
        if store.get(d.name) is None and (d / "checkpoint.pt").exists():
            rows.append([d.name[:10], "partial", "", "", "", "", "", "", "", "", "checkpoint saved; re-run to resume"])
    if not rows:
        print(f"no results in {args.results}")
        return 0
    print(tabulate(rows, ["hash", "state", "stage", "method", "backbone", "data", "res", "epochs", "top-1",
                          "wall", "error"], tablefmt="plain"))
    return 0


def cmd_methods(args):
    from methods import METHODS

    rows = [[name, m.summary, m.defaults_source] for name, m in METHODS.items()]
    print(tabulate(rows, ["method", "what it is", "defaults from"], tablefmt="plain"))
    return 0


def cmd_data(args):
    root = datasets.data_root(args.data_root)
    rows = []
    for d in datasets.DATASETS.values():
        where = "embedded" if d.name.startswith("digits") else ("found" if (root / d.name).is_dir() else "missing")
        rows.append([d.name, d.classes, d.train, d.test, where, d.note])
    print(f"data root: {root}")
    print(tabulate(rows, ["dataset", "classes", "train", "test", "status", "split"], tablefmt="plain"))
    return 0


def build_parser():
    p = Parser(prog="bench", description="Reproduce the tables of 'Training Vision Transformers with Only 2040 "
                                          "Images' (IDMM) beside self-supervised baselines.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="plan a table's jobs and run the ones without a record")
    _plan_args(r)
    r.add_argument("--dry-run", action="store_true", help="print the jobs and their state, run nothing")
    r.add_argument("--data-root", metavar="DIR", help="where the datasets live (default $BENCH_DATA_ROOT or ~/data)")
    r.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="render a table from the records, paper numbers beside")
    rep.add_argument("--table", help="default: every table with results")
    rep.add_argument("--format", default="markdown", choices=["markdown", "latex", "html"])
    rep.add_argument("--preset", help="default: every preset that has results for the table")
    rep.add_argument("--out", default="reports", metavar="DIR", help="also write the report here (default ./reports)")
    _store_args(rep)
    rep.set_defaults(func=cmd_report)

    st = sub.add_parser("status", help="records in the store, or a table's jobs and their state")
    _plan_args(st)
    st.set_defaults(func=cmd_status, table=None)

    m = sub.add_parser("methods", help="the pretraining methods and where their defaults come from")
    m.set_defaults(func=cmd_methods)

    d = sub.add_parser("data", help="datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dl = dsub.add_parser("list", help="registered datasets and whether they are under the data root")
    dl.add_argument("--data-root", metavar="DIR")
    dl.set_defaults(func=cmd_data)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from bench.engine import Interrupted

        if isinstance(e, Interrupted):
            print(f"bench: {e}; run the same command again to resume", file=sys.stderr)
            return 128 + e.signum
        raise


if __name__ == "__main__":
    sys.exit(main())
