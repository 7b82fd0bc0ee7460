"""`bench`: run | report | status | cancel | methods | data."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

from tabulate import tabulate

from bench.errors import COMPILE_CHOICES, Terminated, UserError, lazy, raise_terminated
from bench.errors import jobs as n_jobs
from bench.results import Lock, Store, check_output, probe_writable

# torch and timm behind these take seconds to import: `bench --help`, `bench status` and `bench cancel` do without
datasets, planner, engine = lazy("bench.data"), lazy("bench.plan"), lazy("bench.engine")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        print(f"bench: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _store_args(p):
    p.add_argument("--results", default="results", metavar="DIR", help="result store (default: ./results)")


# the flags that choose a table's jobs, and their defaults (status and cancel without --table refuse the others)
_JOB_FILTERS = {"preset": "paper", "methods": None, "datasets": None, "backbones": None, "seeds": [0],
                "init_weights": [], "set": []}


def _plan_args(p, without_table="comparison"):
    d = _JOB_FILTERS
    p.add_argument("--table", default="comparison",
                   help=f"comparison | transfer | sota | imagenet (default: {without_table})")
    p.add_argument("--preset", default=d["preset"],
                   help="paper | demo | path/to/preset.yaml (default: paper, the 800-epoch recipe)")
    p.add_argument("--methods", nargs="+", default=d["methods"], metavar="M", help="only these rows' methods")
    p.add_argument("--datasets", nargs="+", default=d["datasets"], metavar="D",
                   help="columns to run: registered names or folder:DIR")
    p.add_argument("--backbones", nargs="+", default=d["backbones"], metavar="B", help="only these rows' backbones")
    p.add_argument("--seeds", nargs="+", type=int, default=d["seeds"], metavar="S", help="default: 0")
    p.add_argument("--init-weights", nargs="+", default=d["init_weights"], metavar="[BACKBONE=]FILE",
                   help="ImageNet weights for the 'IN super.' rows, instead of timm's download")
    p.add_argument("--set", action="append", default=d["set"], metavar="KEY=VALUE",
                   help="override a preset value, e.g. --set pretrain.epochs=2 (changes the job hashes)")
    _store_args(p)


def _check_seeds(seeds, flag="--seeds"):
    bad = [s for s in seeds or () if not 0 <= s < 2 ** 31]
    if bad:
        raise UserError(f"{flag} {bad[0]}: expected a whole number in [0, 2**31)")


def _jobs(args):
    _check_seeds(args.seeds)
    preset = planner.load_preset(args.preset, args.set)
    return preset, planner.plan(args.table, preset, args.methods, args.datasets, args.backbones, args.seeds,
                                args.init_weights)


def _data_opts(args, preset):
    """How jobs read their images: the command's flags and the preset's `data` settings (a whole preset of
    one's own written before they existed reads as the paper preset's defaults)."""
    return {"root": args.data_root, "skip_bad": args.skip_bad,
            "cache_dir": None if args.no_cache else str(Path(args.results).resolve() / "cache"),
            "stream": "auto", "memory_gb": 32, "workers": None, "decode": "auto", **(preset.get("data") or {})}


def _data_paths(cfg, data_opts, seen, counts):
    """The dry-run's word on a job's splits: resident or streamed, and (in brackets) their decoded size if
    held resident, from the registry's split sizes or the files of a folder."""
    out, held = [], 0
    for split, size, max_side in datasets.splits_of(cfg):
        key = (cfg["data"], split, size, max_side)
        if key not in seen:  # a folder's files are listed once, not once per job
            seen[key] = datasets.planned_path(cfg["data"], split, size, max_side, data_opts, counts)
        path, est = seen[key]
        if est is not None:
            held += est if path == "resident" else 0
        out.append(f"{split}:{path}" + (f"({est / 2 ** 30:.1f}GB)" if est is not None else ""))
    return ",".join(out), held


def _job_table(jobs, store, data_opts, rerun=frozenset(), here=True):
    by_hash = {j.hash: j for j in jobs}
    rows, seen, counts, most = [], {}, {}, 0
    for j in jobs:
        d = planner.describe(j)
        if not j.skip:
            d["data_path"], held = _data_paths(j.config, data_opts, seen, counts)
            most = max(most, held)
        if j.cells and not j.skip:  # a cell's final job: the whole chain, as the table's columns give it
            r = planner.recipe([c.config for c in planner.chain(j, by_hash)])
            d["chain"] = f"{r['finetune_res']}/{r['finetune_epochs']}"
            d["cells"] = ",".join(f"{t}:{row}:{col}" for t, row, col in j.cells)
        state = "skipped: " + j.skip if j.skip else store.state(j.hash)
        state = f"{state}, --rerun: trains again" if j.hash in rerun and state != "pending" else state
        rows.append([j.short, "  ".join(f"{k}={v}" for k, v in d.items()), state])
    text = tabulate(rows, ["hash", "recipe", "state"], tablefmt="plain")
    files = [path for path, est in seen.values() if est is not None]
    if files:
        decode = data_opts["decode"]
        text += (f"\ndata: {len(files)} splits of image files, {files.count('streamed')} streamed "
                 f"(data.stream={str(data_opts['stream']).lower()}, data.memory_gb={data_opts['memory_gb']} "
                 f"per split; their JPEGs decoded by data.decode={decode}"
                 + (", nvjpeg where a job has a GPU, PIL where not" if decode == "auto" else "")
                 + f"); in brackets, a split's decoded size if held resident; the most one job holds "
                 f"resident: {most / 2 ** 30:.1f} GB")
    if here and engine.device().type != "cuda" and any(j.config.get("precision") == "bf16" for j in jobs if not j.skip):
        text += (f"\nprecision: bf16 runs as fp32 on this machine's {engine.device().type} (a CPU trains in fp32; the "
                 f"record says which ran): the jobs' hashes keep the recipe's precision")
    return text


def _check_launch(args, jobs, gpus):
    """Launch flags that cannot work fail here, before anything is trained or submitted."""
    least = 0 if args.launcher == "slurm" else 1  # a CPU partition's jobs take no GPU
    if args.jobs_per_gpu < 1:
        raise UserError(f"--jobs-per-gpu {args.jobs_per_gpu}: expected a whole number of 1 or more")
    if gpus < 0 or args.gpus_per_job is not None and args.gpus_per_job < least:
        raise UserError(f"--gpus-per-job {args.gpus_per_job if args.gpus_per_job is not None else gpus}: expected a "
                        f"whole number of {least} or more")
    if gpus > 1:
        uneven = [j for j in jobs if not j.skip and j.config["batch_size"] % gpus]
        if uneven:
            raise UserError(f"{gpus} GPUs per job: job {uneven[0].short} has batch size "
                            f"{uneven[0].config['batch_size']}, which does not split evenly across the GPUs")


def _slurm_settings(args):
    from bench.launch import slurm

    flags = {k: getattr(args, f"slurm_{k}") for k in ("partition", "account", "qos", "time", "cpus_per_job", "mem",
                                                       "constraint", "setup")}
    flags["array_parallelism"] = args.array_parallelism
    return slurm.load_settings(args.slurm_config, flags)


def _rerun_set(prefixes, jobs):
    """The hashes of the named jobs and of every job that depends on them (their records are set aside once every
    other check has passed)."""
    picked = set()
    for p in prefixes:
        if len(p.strip()) < 4:
            raise UserError(f"--rerun {p!r}: give at least 4 characters of a job's hash (see --dry-run)")
        hits = [j.hash for j in jobs if j.hash.startswith(p.strip().lower())]
        if len(hits) != 1:
            raise UserError(f"--rerun {p}: {'no' if not hits else 'more than one'} job of this table has a hash "
                            f"starting so (see --dry-run)")
        picked.add(hits[0])
    for j in jobs:  # plan order: parents first, so a child of a picked job is picked too
        if j.parent in picked:
            picked.add(j.hash)
    return picked


def _compile_choice(args):
    """--compile, for this process and the job processes and SLURM tasks that inherit its environment."""
    if args.compile is not None:
        os.environ["BENCH_COMPILE"] = args.compile
    import torch

    engine.compiles(torch.device("cpu"))  # a bad $BENCH_COMPILE fails here, before any job


def _say_remade_lists(jobs, todo, store, root):
    """A list of files made again since a job read it (SIN-10k's, with another seed) is not in the job's hash,
    which is planned without reading any data: its done jobs are named, so that numbers of the old list do not
    pass for the new one's."""
    pending, remade = {j.hash for j in todo}, {}
    for j in jobs:
        rec = None if j.hash in pending else store.get(j.hash)
        read = (((rec or {}).get("metrics") or {}).get("data") or {}).get("list_sha256")
        now = datasets.list_digest(j.config["data"], root) if read else None  # (None: no list here to compare)
        if read and now and read != now:
            remade.setdefault(j.config["data"], []).append(j.short)
    for spec, shorts in sorted(remade.items()):
        print(f"bench: warning: {spec}'s list of files was made again since {n_jobs(len(shorts))} read it (done, "
              f"kept): --rerun {' '.join(shorts)} trains on the new list", file=sys.stderr)


def cmd_run(args):
    _compile_choice(args)
    if args.checkpoint_every is not None:  # job processes and SLURM tasks inherit the environment
        if not args.checkpoint_every > 0:
            raise UserError(f"--checkpoint-every {args.checkpoint_every}: expected a number of seconds > 0")
        os.environ["BENCH_CHECKPOINT_EVERY_S"] = repr(args.checkpoint_every)
    from bench.engine import checkpoint_interval

    checkpoint_interval()  # a bad value fails here, before any job
    if args.launcher != "slurm":  # else silently a local run, with the user thinking it went to the cluster
        engine.device()  # (a bad $BENCH_DEVICE, too; on SLURM it is the nodes' to judge)
        given = [k for k, v in vars(args).items()  # every --slurm-* flag, and the two others of SLURM's
                 if (k.startswith("slurm_") or k in ("wait", "array_parallelism")) and v not in (None, False, [])]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} is for --launcher slurm (this run is local)")
    elif args.jobs_per_gpu != 1:  # SLURM gives each job GPUs of its own
        raise UserError("--jobs-per-gpu is for the local launcher (SLURM gives each job its own GPUs)")
    settings = _slurm_settings(args) if args.launcher == "slurm" else None  # checked in a dry run too
    preset, jobs = _jobs(args)
    if args.init_weights and not any(j.init_path for j in jobs):  # a file given for nothing may be a mistake
        print("bench: note: --init-weights is unused: no 'IN super.' job of this run starts from a file (--methods "
              "in_supervised and --backbones choose them)", file=sys.stderr)
    planner.check_models(jobs)
    store = Store(args.results)
    rerun = _rerun_set(args.rerun, jobs) if args.rerun else set()
    if args.launcher == "slurm":  # the partition is asked for its nodes where SLURM can be asked (a dry run may
        gpus = settings["gpus_per_job"] if args.gpus_per_job is None else args.gpus_per_job  # be off the cluster)
        if not args.dry_run or shutil.which("sinfo"):
            from bench.launch import slurm

            node_cpus, node_gpus = slurm.partition_nodes(settings["partition"])
            gpus = (1 if node_gpus else 0) if gpus is None else gpus
            settings["cpus_per_job"] = slurm.fit_cpus(settings, gpus, node_cpus)
    else:  # a dry run refuses what the run would
        from bench.launch import local

        devices, gpus = local.visible_gpus(), args.gpus_per_job or 1
        if gpus > 1 and len(devices) < gpus:
            raise UserError(f"--gpus-per-job {gpus}: {len(devices)} GPUs are visible on this machine")
    _check_launch(args, jobs, 0 if gpus is None else gpus)
    if args.jobs_per_gpu > 1 and not devices:  # (local: SLURM refused the flag above; a value _check_launch let by)
        print(f"bench: note: --jobs-per-gpu {args.jobs_per_gpu} is unused: no GPU is visible, the jobs run one "
              f"after another", file=sys.stderr)
    runnable = [j for j in jobs if not j.skip]
    todo = [j for j in runnable if j.hash in rerun or store.state(j.hash) != "done"]
    for spec in sorted({j.config["data"] for j in todo if j.config["stage"] == "finetune"}):
        if not datasets.info(spec).has_test:
            raise UserError(f"--datasets {spec}: a pretraining set, with no test split to fine-tune and test on")
    if args.dry_run:
        print(_job_table(jobs, store, _data_opts(args, preset), rerun, here=args.launcher != "slurm"))
        for spec in sorted({j.config["data"] for j in todo if datasets.info(j.config["data"]).lister}):
            try:  # listed, no image opened: the run would stop at a dataset that cannot be (a dry run off the
                datasets.check_listing(spec, args.data_root)  # cluster may not see its data: a warning)
            except UserError as e:
                print(f"bench: warning: {e} (bench run would stop there)", file=sys.stderr)
        return 0
    data_opts = _data_opts(args, preset)
    for spec in sorted({j.config["data"] for j in todo}):  # missing data fails here, before any training
        datasets.check_available(spec, args.data_root, args.skip_bad, data_opts["cache_dir"])
    done = len(runnable) - len(todo)
    _say_remade_lists(runnable, todo, store, args.data_root)
    skipped = sum(len(j.cells) for j in jobs if j.skip)  # (a skipped pretraining fills no cell of its own)
    why = sorted({j.skip for j in jobs if j.skip})
    if todo:
        store.check_writable()
    if args.launcher != "slurm":
        _refuse_what_slurm_has(store, todo)
    for h in sorted(rerun):  # its files would move from under the process that writes them
        holder = Lock(store.run_dir(h)).holder()
        if holder:
            raise UserError(f"--rerun {h[:10]}: the job is being trained by {holder}; stop it or let it finish, "
                            "then rerun it")
    if rerun:  # last of the checks: a refused command leaves every record where it was
        for h in sorted(rerun):
            store.set_aside(h)
        print(f"--rerun: {n_jobs(len(rerun))} will train again", file=sys.stderr)
    skips = ""
    if skipped:
        skips = f", {n_jobs(skipped, 'cell')} skipped: {'; '.join(why[:2])}"
        skips += f"; {len(why) - 2} other reasons (--dry-run)" if len(why) > 2 else ""
    print(f"{args.table} / {preset['name']}: {n_jobs(len(runnable))}, {done} done already{skips}", file=sys.stderr)
    if done == len(runnable):
        print(("the job is" if done == 1 else f"all {done} jobs are") + " done; nothing to train", file=sys.stderr)
        return 0
    if args.launcher == "slurm":
        return _run_slurm(args, preset, jobs, store, data_opts, settings, gpus)
    ran, failed = local.run(jobs, store, preset["name"], args.set, data_opts, devices=devices,
                            jobs_per_gpu=args.jobs_per_gpu, gpus_per_job=gpus)
    print(f"finished {ran - failed} of {n_jobs(ran)}" + (f", {failed} failed or not run (see bench status)" if failed else "")
          + f"; results in {args.results}", file=sys.stderr)
    return 1 if failed else 0


def _refuse_what_slurm_has(store, todo):
    """A local run of jobs that SLURM has queued or running would train them twice (one after the other: the
    job's lock keeps them apart) and write over the notes bench status and cancel find them by. Where SLURM
    cannot be asked (no sacct here: a store copied off the cluster), nothing is refused; where sacct is there
    but fails (its database down), what SLURM has is not known: refused, saying so."""
    from bench.launch import slurm

    try:
        active = {h: info["job_id"] for h, (info, st) in slurm.slurm_states(store, [j.hash for j in todo]).items()
                  if st in slurm.ACTIVE}
    except slurm.SacctFailed as e:
        raise UserError(f"{e}: cannot tell whether SLURM has jobs of this run queued (they were sent there); run "
                        f"again once sacct answers, or bench cancel them") from None
    except UserError:
        return
    if active:
        h, job_id = next(iter(sorted(active.items())))
        raise UserError(f"{n_jobs(len(active))} of this run {'is' if len(active) == 1 else 'are'} queued or running "
                        f"on SLURM (e.g. {h[:10]}, SLURM job {job_id}): let SLURM train them (bench status), or "
                        f"bench cancel them before running here")


def _run_slurm(args, preset, jobs, store, data_opts, settings, gpus):
    from bench.launch import slurm

    store.root.mkdir(parents=True, exist_ok=True)
    store = Store(store.root.resolve())  # SLURM jobs may start in another directory
    ids, not_run, active = slurm.submit(jobs, store, preset["name"], args.set, data_opts, settings,
                                        gpus_per_job=gpus, name=f"bench-{args.table}")
    for job, why in not_run:
        print(f"{job.short} not submitted: {why}", file=sys.stderr)
    if active:
        print(f"{n_jobs(len(active))} already queued or running: not submitted again", file=sys.stderr)
    if ids:
        by_hash = {j.hash: j for j in jobs}
        print(tabulate([[h[:10], by_hash[h].config["stage"], by_hash[h].method, by_hash[h].config["data"], i]
                        for h, i in ids.items()], ["hash", "stage", "method", "data", "SLURM job"], tablefmt="plain"))
    follow = f"bench status --results {args.results}"
    print(f"submitted {n_jobs(len(ids))}; logs under {store.root / 'slurm'}"
          + ("" if args.wait else f"; `{follow}` to follow them"), file=sys.stderr)
    if not args.wait:
        return 1 if not_run else 0
    # the jobs are SLURM's now: leaving the wait (Ctrl-C, SIGTERM) leaves them queued and running, and says so
    old = signal.signal(signal.SIGTERM, raise_terminated)  # (bench's entry installs it; main() called alone not)
    try:
        outcome = slurm.wait(store, [j.hash for j in jobs if not j.skip], lambda m: print(m, file=sys.stderr))
    except KeyboardInterrupt as e:
        print(f"bench: stopped waiting; the jobs go on in SLURM: `{follow}`, `bench cancel --results "
              f"{args.results}` to stop them, the same command with --wait to wait again", file=sys.stderr)
        # 143 for SIGTERM, as a local run stopped by it
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, old)
    bad = [h for h, o in outcome.items() if o != "done"]
    print(f"finished {len(outcome) - len(bad)} of {n_jobs(len(outcome))}"
          + (f", {len(bad)} failed or not run (see bench status)" if bad else ""), file=sys.stderr)
    return 1 if bad else 0


def _check_selection(stores, tables, args):
    """Records the report would show none of: the CSV and a comparison would be empty, so they are refused; a
    table shows the paper's numbers alone, and says so (an empty store is said apart, in cmd_report)."""
    for name in tables:  # a misspelt table or preset is what to say first
        planner.table(name)
    if args.preset:
        planner.load_preset(args.preset)
    everything = [r for s in stores for r in s.records()]
    recs = [r for r in everything if any(c[0] in tables for c in r.get("cells", []))]
    preset = planner.preset_id(args.preset) if args.preset else None
    if any((preset is None or r["preset"] == preset) and (not args.seeds or r["seed"] in args.seeds) for r in recs):
        return
    asked = " and ".join(x for x in (preset and f"preset {args.preset}",
                                      args.seeds and f"seed {', '.join(map(str, args.seeds))}") if x)
    other = sorted({c[0] for r in everything for c in r.get("cells", [])} - set(tables))
    held = (f"; they hold presets {', '.join(sorted({r['preset'] for r in recs}))}, seeds "
            f"{', '.join(map(str, sorted({r['seed'] for r in recs})))}" if recs
            else f"; they hold records of the {', '.join(other)} table{'s' if len(other) > 1 else ''}" if other
            else "")
    what = (f"no records{f' of {asked}' if asked else ''} for the {', '.join(tables)} "
            f"table{'s' if len(tables) > 1 else ''} in {' or '.join(args.compare or [str(args.results)])}{held}")
    if args.compare or args.format == "csv":
        raise UserError(what)
    if everything:
        print(f"bench: {what}: the paper's numbers alone", file=sys.stderr)


def cmd_report(args):
    from bench import report

    for flag in ("table", "preset", "out"):  # an empty value (a shell variable unset) is a mistake, not "none"
        if getattr(args, flag) is not None and not getattr(args, flag).strip():
            raise UserError(f"--{flag}: an empty value")
    suffix = Path(args.out).suffix.lower() if args.out else ""
    args.format = args.format or {".tex": "latex", ".html": "html", ".htm": "html", ".csv": "csv"}.get(suffix,
                                                                                                     "markdown")
    if args.standalone and args.format != "latex":
        raise UserError("--standalone makes a LaTeX document: use it with --format latex")
    if args.compare and args.results is not None:
        raise UserError("--results with --compare: --compare names the two stores it reads; drop --results")
    args.results = args.results or "results"
    _check_seeds(args.seeds)
    store = Store(args.results)
    compare = None
    if args.compare:
        compare = tuple((d, Store(d)) for d in args.compare)
        for d, s in compare:
            if not s.records():
                raise UserError(f"--compare {d}: no records there (is it a --results directory?)")
    stores = [s for _, s in compare] if compare else [store]
    known = list(planner.load_tables())
    if args.table == "all" or not args.table:
        tables = sorted({t for s in stores for t in report.tables_with_results(s)},
                        key=known.index) or ["comparison"]
    else:
        tables = [args.table]
    _check_selection(stores, tables, args)
    if not compare and not store.records():  # a mistyped --results looks like a table not run yet: say which
        print(f"bench: no records in {args.results}: the paper's numbers alone", file=sys.stderr)
    for s in stores:  # what the tables below leave out, said rather than shown as empty cells
        damaged = s.damaged()
        if damaged:
            print(f"bench: warning: {len(damaged)} damaged records in {s.root} are left out (bench status "
                  f"names them)", file=sys.stderr)
        unknown = sorted({c[0] for r in s.records() for c in r["cells"]} - set(known))
        if unknown:
            print(f"bench: warning: records in {s.root} fill tables bench does not know here: {', '.join(unknown)} "
                  f"(tables of your own are read from {planner.user_tables_file()})", file=sys.stderr)
    text = report.document(tables, store, args.format, args.preset, args.seeds, args.standalone, compare)
    if args.out:
        out = check_output(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
        except OSError as e:
            raise UserError(f"--out {out}: {e.strerror}") from None
        print(f"wrote {out}", file=sys.stderr)
        return 0
    sys.stdout.write(text)
    name = ("compare-" if compare else "") + ("-".join(tables) if len(tables) < 4 else "all")
    copy = Path("reports") / f"{name}.{report.FORMATS[args.format]}"
    try:
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(text)
    except OSError:
        pass  # the copy is a convenience; stdout has the report
    return 0


def _known_hashes(store):
    hashes = {r["hash"] for r in store.records()}
    runs = store.root / "runs"
    for d in runs.iterdir() if runs.is_dir() else []:
        if (d / "checkpoint.pt").exists() or (d / "launch.json").exists():
            hashes.add(d.name)
    return sorted(hashes)


def _whole_store(args, command):
    """status and cancel without --table cover every job of the store: a flag that selects jobs of a table would
    be ignored (cancel would stop the jobs it meant to spare), so it is refused."""
    given = [k for k, v in _JOB_FILTERS.items() if getattr(args, k) != v]
    if given:
        raise UserError(f"--{given[0].replace('_', '-')} selects the jobs of a table: give --table too (without "
                        f"it, bench {command} covers every job of {args.results})")
    return _known_hashes(Store(args.results))


def _parent_failed(store, parent, planned):
    """Whether an earlier stage of a job without a record failed (the nearest one with a record says)."""
    while parent:
        rec = store.get(parent)
        if rec is not None:
            return rec["status"] == "failed"
        parent = planned[parent].parent if parent in planned else (store.launch(parent) or {}).get("job", {}).get(
            "parent")
    return False


def cmd_status(args):
    from bench.launch import slurm

    store = Store(args.results)
    if args.table:
        _, jobs = _jobs(args)
        hashes = [j.hash for j in jobs if not j.skip]
        planned = {j.hash: j for j in jobs}
    else:
        hashes, planned = _whole_store(args, "status"), {}
    if not hashes:
        print(f"no results in {args.results}")
        _print_damaged(store)
        return 0
    launched = {h: store.launch(h) for h in hashes}
    try:
        queue = slurm.slurm_states(store, hashes) if any(i and i["launcher"] == "slurm" for i in launched.values()) else {}
    except UserError as e:  # records are still worth showing without SLURM
        print(f"bench: warning: {e}", file=sys.stderr)
        queue = {}
    rows, failures = [], []
    for h in hashes:
        rec, info = store.get(h), launched[h] or {}
        c = rec["config"] if rec else planned[h].config if h in planned else {}
        c = c or info.get("job", {})  # a job without a record: what the launcher noted when it sent it
        sstate = queue.get(h, (None, ""))[1]
        parent = planned[h].parent if h in planned else info.get("job", {}).get("parent")
        # a job with a record is settled: its checkpoint (kept after training) is not opened
        checkpoint = _checkpoint_note(store.run_dir(h) / "checkpoint.pt", c.get("epochs")) if rec is None else None
        if slurm.settled(rec, sstate):
            state = rec["status"]
        elif sstate in slurm.ACTIVE:
            state = sstate.lower()
        elif sstate == "CANCELLED" and parent and slurm.ended_badly(store.get(parent),
                                                                    queue.get(parent, (None, ""))[1]):
            state = "not run: parent failed"  # SLURM cancelled it (kill-on-invalid-dep), its parent ended badly
        elif sstate == "CANCELLED":
            state = "cancelled" + (f" ({checkpoint})" if checkpoint else "")
        elif sstate:  # ended without a record: killed, out of memory, a node failure, lost
            state = "failed"
        else:  # running here (its lock's owner is alive), stopped, not started, or SLURM could not be asked
            holder = Lock(store.run_dir(h)).holder()
            state = f"running ({holder})" if holder else store.state(h)
            if state == "pending" and _parent_failed(store, parent, planned):
                state = "not run: parent failed"  # as bench run said of it
            elif state == "pending":
                state = {None: "not started", "local": "stopped, no checkpoint"}.get(info.get("launcher"), "submitted")
            elif state == "partial":  # the same command resumes it
                state = f"stopped, {checkpoint or 'checkpoint saved'}"
        top1 = (rec or {}).get("metrics", {}).get("top1")
        log = info.get("stderr") or info.get("log") or ""
        rows.append([h[:10], state, c.get("stage", ""), (rec or {}).get("method") or c.get("method") or
                     (planned[h].method if h in planned else ""), c.get("backbone", ""), c.get("data", ""),
                     c.get("epochs", ""), "" if top1 is None else f"{100 * top1:.1f}", info.get("launcher", ""),
                     info.get("job_id", ""), sstate, log])
        if state == "failed":
            why = (rec or {}).get("error") or f"SLURM state {sstate}, no record" + (
                f"; {checkpoint}: the same command resumes it" if checkpoint else "")
            failures.append((h, why, slurm.log_tail(log) if log else _last_frames((rec or {}).get("traceback"))))
    print(tabulate(rows, ["hash", "state", "stage", "method", "backbone", "data", "epochs", "top-1", "launcher",
                          "job id", "SLURM", "log"], tablefmt="plain"))
    for h, why, tail in failures:
        print(f"\n{h[:10]}: {why}")
        for line in tail:
            print(f"  | {line}")
    _print_damaged(store)
    return 0


def _checkpoint_note(path, epochs):
    """Where a stopped job's checkpoint stands, in the words of the engine's 'resumed from' line; None: none."""
    if not path.exists():
        return None
    at = engine.checkpoint_position(path)
    if at is None:
        return "checkpoint saved"
    epoch, step = at
    if epoch == epochs:  # trained; stopped while evaluating
        return "checkpoint after the last epoch"
    return f"checkpoint at epoch {epoch} step {step}" + (f" of {epochs} epochs" if epochs is not None else "")


def _last_frames(tb, n=2):
    """Where a job run in this process (it has no log) crashed: the last n frames of its traceback, each its
    `File ..., line ...` and its source line (not the carets or an error message of many lines)."""
    lines = (tb or "").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith('  File "')][-n:]
    return [x for i in starts for x in [lines[i], *[y for y in lines[i + 1:i + 2] if y.startswith("    ")]]]


def _print_damaged(store):
    """Record files that cannot be read: ignored everywhere else, named here (their jobs run again)."""
    for path, why in store.damaged():
        print(f"\ndamaged record {path}: {why}; its job counts as not run (bench run trains it again, the file "
              f"is then kept aside)")


def cmd_cancel(args):
    from bench.launch import slurm

    store = Store(args.results)
    if args.table:
        _, jobs = _jobs(args)
        hashes = [j.hash for j in jobs if not j.skip]
    else:
        hashes = _whole_store(args, "cancel")
    ids = slurm.cancel(store, hashes)
    here = [(h, holder) for h in hashes if (store.launch(h) or {}).get("launcher") != "slurm"
            for holder in [Lock(store.run_dir(h)).holder()] if holder]
    if here:  # status says "running": cancel must not leave the user believing them stopped
        print(f"bench cancel stops SLURM jobs only; outside SLURM, {n_jobs(len(here))} "
              f"{'is' if len(here) == 1 else 'are'} training: " + ", ".join(f"{h[:10]} ({who})" for h, who in here)
              + ". Stop one with Ctrl-C in its shell, or kill -INT PID (it saves a checkpoint)", file=sys.stderr)
    if ids:
        print(f"cancelled {n_jobs(len(ids), 'SLURM job')}: {' '.join(ids)}")
    elif args.table:  # the plan names the jobs: one run with other --set values or seeds is not this plan
        print(f"no queued or running SLURM job of this plan ({args.table}, preset {args.preset}, these --set "
              f"values and seeds); without --table, bench cancel stops every job of {args.results}")
    else:
        print("cancelled 0 SLURM jobs (none queued or running)")
    return 0


def cmd_methods(args):
    from methods import METHODS

    rows = [[name, m.summary, m.defaults_source] for name, m in METHODS.items()]
    print(tabulate(rows, ["method", "what it is", "defaults from"], tablefmt="plain"))
    return 0


def cmd_data_list(args):
    root = datasets.data_root(args.data_root)
    rows = []
    mine = datasets.user_datasets()
    for d in [*datasets.DATASETS.values(), *map(datasets.info, mine)]:
        if d.reader is not None:
            where = "embedded"
        else:
            try:  # listed, not decoded: `bench data check NAME` opens every image
                datasets.check_listing(d.name, args.data_root)
                where = "found"
            except UserError:  # present but unusable (wrong checksums, classes) is not the same as absent
                there = Path(mine[d.name]) if d.name in mine else root / d.layout.split("/")[0]
                # (an empty folder: what a failed download leaves)
                where = "invalid" if there.exists() and (not there.is_dir() or any(there.iterdir())) else "missing"
        rows.append([d.name, d.classes or "-", d.train or "-", d.test or "-", where, d.layout or "-", d.note])
    print(f"data root: {root}  (--data-root DIR or $BENCH_DATA_ROOT)")
    print(tabulate(rows, ["dataset", "classes", "train", "test", "status", "expected layout", "split"],
                   tablefmt="plain"))
    return 0


def cmd_data_check(args):
    d = datasets.info(args.name)
    if d.reader is not None:
        print(f"{d.name}: embedded, train {d.train}" + (f", test {d.test}" if d.has_test else ", no test split"))
        return 0
    found, listed = {}, datasets.check_listing(args.name, args.data_root)  # (ImageNet's: seconds to list)
    for split, (files, labels, _, _) in listed.items():
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise UserError(f"{d.name} {split}: {len(missing)} listed images are missing, e.g. {missing[0]}")
        found[split] = (len(files), len(set(labels)))
    # every image opened, classes compared
    datasets.check_available(args.name, args.data_root, open_all=True, listed=listed)
    if not d.train:  # the user's own folder: no paper split to compare with
        print(f"{d.name}: " + ", ".join(f"{s} {n} images / {c} classes" for s, (n, c) in found.items()))
        return 0
    expected = {"train": d.train, "test": d.test}
    wrong = [f"{s} has {n} images, the paper's split has {expected[s]}" for s, (n, _) in found.items() if n != expected[s]]
    wrong += [f"{s} has {c} classes, expected {d.classes}" for s, (_, c) in found.items() if c != d.classes]
    if wrong:
        raise UserError(f"{d.name}: " + "; ".join(wrong))
    print(f"{d.name}: ok, " + ", ".join(f"{s} {n} images / {c} classes" for s, (n, c) in found.items()))
    return 0


def cmd_data_download(args):
    d = datasets.info(args.name)
    root = datasets.data_root(args.data_root)
    if d.reader is not None:
        print(f"{d.name} is embedded: nothing to download")
        return 0
    if d.name not in datasets.DATASETS:  # a folder of one's own, by path or by name
        print(f"{d.name}: your own folder ({d.layout}): nothing to download")
        return 0
    if d.name not in datasets.DOWNLOADS:
        print(f"{d.name}: bench cannot download it. Get the official files from {datasets.OFFICIAL[d.name]}\n"
              f"and lay them out as {root}/{d.layout}")
        return 0
    import torchvision.datasets as tvd

    try:
        getattr(tvd, datasets.DOWNLOADS[d.name])(str(root), download=True)
    except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError
        raise UserError(f"downloading {d.name} to {root} failed ({type(e).__name__}: {e}); offline? "
                        f"put the official files under {root}/{d.layout}") from None
    print(f"{d.name}: downloaded to {root}")
    return 0


def cmd_data_make_sin10k(args):
    _check_seeds([args.seed], "--seed")
    out = datasets.make_sin10k(args.imagenet, datasets.data_root(args.data_root), args.seed)
    names = out.read_text().splitlines()[1:]
    classes = len({n.split("/")[0] for n in names})
    print(f"wrote {out} ({len(names)} images of {classes} classes, seed {args.seed})")
    if classes != 1000:  # a subset, or another dataset: the transfer table's numbers are of SIN-10k
        print(f"bench: warning: {args.imagenet} has {classes} classes under train/, ImageNet-1k 1000: this list is "
              f"not the paper's SIN-10k (10 images of each of ImageNet's 1000 classes)", file=sys.stderr)
    return 0


def cmd_benchmark(args):
    import torch

    from bench import benchmark

    _compile_choice(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: expected cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: torch sees no GPU here")
    small = device == "cpu"  # CPU: the demo's models on 256 images, in a few minutes
    for name, value in (("--images", args.images), ("--steps", args.steps), ("--epochs", args.epochs)):
        if value is not None and value < 1:
            raise UserError(f"{name} {value}: expected a whole number >= 1")
    for text in args.only or ():
        if not any(text in label for label in benchmark.LABELS):
            raise UserError(f"--only {text}: matches no measurement; they are: {', '.join(benchmark.LABELS)}")
    preset = args.preset or ("demo" if small else "paper")
    out = check_output(args.out)
    if out.is_dir():  # found only after the first row's minutes of measuring, and that row lost
        raise UserError(f"--out {out}: a folder; give the path of the JSON file to write")
    profile = args.profile and check_output(args.profile, "--profile")
    probe_writable(out.parent, f"--out {out}")
    if profile:
        probe_writable(profile, f"--profile {profile}")
    benchmark.run(device, preset, args.images or (256 if small else 2040), args.steps or (5 if small else 30),
                  args.epochs or (2 if small else 3), out, args.only,
                  profile_dir=profile or None)
    return 0


COMPILE_HELP = ("torch.compile the backbone: auto (default, $BENCH_COMPILE): on a GPU, not on a CPU; the first "
                "step's seconds, compilation included, are in each record")


def build_parser():
    p = Parser(prog="bench", description="Reproduce the tables of 'Training Vision Transformers with Only 2040 "
                                          "Images' (IDMM) beside self-supervised baselines.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="plan a table's jobs and run the ones without a record")
    _plan_args(r)
    r.add_argument("--dry-run", action="store_true", help="print the jobs and their state, run nothing")
    r.add_argument("--data-root", metavar="DIR", help="where the datasets live (default $BENCH_DATA_ROOT or ~/data)")
    r.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed in the records)")
    r.add_argument("--no-cache", action="store_true", help="do not keep decoded datasets under RESULTS/cache")
    r.add_argument("--rerun", nargs="+", default=[], metavar="HASH",
                   help="train these jobs (hash prefixes) and all that depend on them again; old records kept aside")
    r.add_argument("--checkpoint-every", type=float, metavar="SECONDS",
                   help="seconds of training between checkpoints (default $BENCH_CHECKPOINT_EVERY_S or 300)")
    r.add_argument("--compile", choices=COMPILE_CHOICES, help=COMPILE_HELP)
    r.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: this machine (one job after another on CPU, a queue over the GPUs); slurm: submitit")
    r.add_argument("--jobs-per-gpu", type=int, default=1, metavar="K", help="local: pack K jobs on each GPU")
    r.add_argument("--gpus-per-job", type=int, metavar="N",
                   help="run each job on N GPUs with torch.distributed, the batch split across them (default 1; "
                        "slurm: gpus_per_job of the SLURM settings, else 1 where the partition has GPUs, else 0)")
    r.add_argument("--wait", action="store_true", help="slurm: block with the table's progress until every job ends")
    r.add_argument("--slurm-config", metavar="FILE",
                   help="YAML of SLURM settings (partition, account, qos, time, gpus_per_job, cpus_per_job, mem, "
                        "constraint, setup, array_parallelism, max_requeues); default ~/.config/bench/slurm.yaml")
    r.add_argument("--array-parallelism", type=int, metavar="K", help="slurm: at most K tasks of an array at once")
    for flag, meta, text in [("partition", "NAME", ""), ("account", "NAME", ""), ("qos", "NAME", ""),
                             ("time", "TIME", "time limit per job: minutes, hours:minutes:seconds or days-hours[:minutes"
                                                     "[:seconds]]; a job past it is requeued and resumes"),
                             ("cpus-per-job", "N", ""), ("mem", "SIZE", "e.g. 32G"), ("constraint", "FEATURES", "")]:
        r.add_argument(f"--slurm-{flag}", metavar=meta, type=int if meta == "N" else str, help=text or None)
    r.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                   help="a shell line run before each job (module load ..., source .venv/bin/activate); repeatable")
    r.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="render a table from the records, paper numbers beside")
    rep.add_argument("--table", help="comparison | transfer | sota | imagenet | all (default: all with results)")
    rep.add_argument("--format", choices=["markdown", "latex", "html", "csv"],
                     help="default: from --out's suffix (.tex, .html, .csv), else markdown")
    rep.add_argument("--preset", help="default: every preset that has results for the table")
    rep.add_argument("--out", metavar="FILE", help="write the report here (default: stdout, and a copy under reports/)")
    rep.add_argument("--seeds", nargs="+", type=int, metavar="S", help="only these seeds in each cell's mean")
    rep.add_argument("--standalone", action="store_true", help="LaTeX: a complete document that pdflatex compiles")
    rep.add_argument("--compare", nargs=2, metavar=("RESULTS_A", "RESULTS_B"),
                     help="two result stores side by side per cell: A → B and the difference")
    _store_args(rep)
    rep.set_defaults(func=cmd_report, results=None)  # None: not given (--compare takes no --results)

    st = sub.add_parser("status", help="every job's state, launcher, SLURM id and logs; why failed jobs failed")
    _plan_args(st, "every job of the store")
    st.set_defaults(func=cmd_status, table=None)

    c = sub.add_parser("cancel", help="cancel the queued and running SLURM jobs of a table (default: of the store)")
    _plan_args(c, "every job of the store")
    c.set_defaults(func=cmd_cancel, table=None)

    b = sub.add_parser("benchmark", help="images/s: official-style pipeline, this project end to end, the step "
                                         "alone; implied device-hours per table")
    b.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when torch sees a GPU)")
    b.add_argument("--preset", help="default: demo on CPU (tiny models), paper on a GPU")
    b.add_argument("--images", type=int, help="JPEGs to write and train on (default 256 on CPU, 2040 on a GPU)")
    b.add_argument("--steps", type=int, help="timed steps of (a) and (c) (default 5 on CPU, 30 on a GPU)")
    b.add_argument("--epochs", type=int, help="epochs of (b) (default 2 on CPU, 3 on a GPU)")
    b.add_argument("--only", nargs="+", metavar="TEXT", help="only the measurements whose label contains TEXT")
    b.add_argument("--compile", choices=COMPILE_CHOICES, help=COMPILE_HELP)
    b.add_argument("--out", default="reports/benchmark.json", metavar="FILE", help="the JSON written")
    b.add_argument("--profile", metavar="DIR", help="also profile a few whole steps of each row (torch.profiler): "
                                                    "the top operators by device and host time, a file per row")
    b.set_defaults(func=cmd_benchmark)

    m = sub.add_parser("methods", help="the pretraining methods and where their defaults come from")
    m.set_defaults(func=cmd_methods)

    d = sub.add_parser("data", help="datasets: list | check NAME | download NAME | make-sin10k")
    dsub = d.add_subparsers(dest="data_command", required=True)
    for name, func, text in [("list", cmd_data_list, "registered datasets and whether they are under the data root"),
                             ("check", cmd_data_check, "verify a dataset's split sizes against the paper's"),
                             ("download", cmd_data_download, "download with torchvision, or say where to get it"),
                             ("make-sin10k", cmd_data_make_sin10k, "pick 10 images per ImageNet class, seeded")]:
        dp = dsub.add_parser(name, help=text)
        dp.add_argument("--data-root", metavar="DIR", help="default $BENCH_DATA_ROOT or ~/data")
        if name in ("check", "download"):
            dp.add_argument("name")
        if name == "make-sin10k":
            dp.add_argument("--imagenet", required=True, metavar="DIR", help="holds train/<wnid>/*.JPEG")
            dp.add_argument("--seed", type=int, default=0)
        dp.set_defaults(func=func)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if not str(getattr(args, "results", "results")).strip():  # else the records land in the current folder
            raise UserError("--results: an empty path (give a folder, default ./results)")
        return args.func(args)
    except UserError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:  # a folder of another user's, or one made unreadable: the user's to settle
        print(f"bench: error: {e.filename}: {e.strerror}" if e.filename else f"bench: error: {e}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated):
            print("bench: stopped by signal SIGTERM", file=sys.stderr)
            return 128 + signal.SIGTERM
        print("bench: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from bench.engine import Interrupted

        if isinstance(e, Interrupted):
            print(f"bench: {e}; run the same command again to " + ("resume" if e.saved else "go on"), file=sys.stderr)
            return 128 + e.signum
        raise


if __name__ == "__main__":
    sys.exit(main())
