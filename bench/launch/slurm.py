"""The SLURM launcher, through submitit.

Jobs whose parents are not waiting go out as job arrays, one array per stage of the chains: the pretraining
array, then the fine-tuning array whose task i waits for task i of the pretraining array (`aftercorr`), and so
on. A job whose parent was queued by an earlier `bench run`, or that shares its parent with another job, goes
out on its own with `afterok` on that parent. A failed parent's children are cancelled (kill-on-invalid-dep).

Pre-emption and time limits: SLURM sends SIGUSR2 before the end (submitit's `--signal`); the job turns it into
the engine's stop request, the engine saves a checkpoint, then submitit's own handler calls `Task.checkpoint`
and requeues the job, which resumes from that checkpoint. SIGTERM (`scancel`) saves a checkpoint and ends the
job; the next `bench run` submits it again and it resumes.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import submitit
import yaml
from submitit.core.utils import FailedJobError
from submitit.slurm.slurm import SlurmInfoWatcher

from bench.errors import UserError, read_yaml, whole
from bench.errors import jobs as n_jobs
from bench.launch import about, job_spec, launch_info, time_left
from bench.slurm_task import Task

# HELD: PENDING held back (scontrol hold, sbatch --hold, an admin) until someone releases it; not a SLURM state
ACTIVE = {"PENDING", "HELD", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED"}

# --slurm-config / ~/.config/bench/slurm.yaml keys (and the --slurm-* flags that override them)
SETTINGS = {
    "partition": None, "account": None, "qos": None,
    "time": 24 * 60,            # minutes per job, or SLURM's [days-]hours:minutes:seconds; a longer run is requeued
    "gpus_per_job": None,       # default: 1 where the partition's nodes have GPUs, else 0; --gpus-per-job N
    "cpus_per_job": None,       # default: 10 per GPU, or 2 without GPUs, at most a node's
    "mem": None,                # e.g. 32G
    "constraint": None,
    "setup": [],                # shell lines run before the job (module load ..., source venv/bin/activate)
    "array_parallelism": 256,   # at most this many tasks of one array at once
    "max_requeues": 20,         # time-outs a job may be requeued after (pre-emptions are not counted)
}


def _minutes(v):
    """A time limit in whole minutes (seconds rounded up), from minutes or sbatch --time's forms H:M:S, D-H,
    D-H:M, D-H:M:S; None if it is none of them or under a minute. sbatch's M:S is refused: `2:00` reads as two
    hours to people and as two minutes to sbatch (and as 120 to YAML, which this setting once took)."""
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)((?::\d+){0,2})", str(v).strip())
    if not m or not m.group(1) and m.group(3).count(":") == 1:
        return None
    parts = [int(m.group(2))] + [int(x) for x in m.group(3).split(":")[1:]]
    if m.group(1):  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:  # minutes, or hours:minutes:seconds
        hours, minutes, seconds = parts if len(parts) == 3 else [0, parts[0], 0]
    total = int(m.group(1) or 0) * 1440 + hours * 60 + minutes + -(-seconds // 60)
    # past a year: a typo, which SLURM would take as no limit at all (99999999999999999999 read as UNLIMITED)
    return total if 1 <= total <= 365 * 1440 else None


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 2:00:00 as 7200 (base 60); here it is sbatch's hours:minutes:seconds."""


_Loader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: node.value if ":" in node.value
                        else yaml.SafeLoader.construct_yaml_int(loader, node))


_COUNT = whole(0, none=True)[0]  # null or a whole number >= 0


def _name(v):  # each goes on an #SBATCH line, which a newline would end; YAML reads a numeric account as an int
    return _COUNT(v) or isinstance(v, str) and "\n" not in v


# What each setting must be, checked as it is read: a bad value would otherwise surface only at submission (as
# int('abc') or a broken batch script), possibly after the table's first arrays were queued. "" or null: unset.
CHECKS = {
    **{k: (_name, "a name on one line") for k in ("partition", "account", "qos", "constraint")},
    "time": (lambda v: _minutes(v) is not None,
             "minutes (a whole number >= 1), hours:minutes:seconds or days-hours[:minutes[:seconds]], "
             "at most a year"),
    "gpus_per_job": whole(0, none=True),
    "cpus_per_job": whole(1, none=True),
    "mem": (lambda v: _COUNT(v) or isinstance(v, str) and re.fullmatch(r"(\d+([KMGT]B?)?)?", v, re.I),
            "a size such as 32G, 32GB or 500M (a bare number is megabytes)"),
    "setup": (lambda v: v is None or isinstance(v, str) or isinstance(v, list) and all(isinstance(x, str) for x in v),
              "a shell line or a list of them"),
    "array_parallelism": whole(1),
    "max_requeues": whole(0),
}


def config_file():
    return Path(os.environ.get("BENCH_SLURM_CONFIG", Path.home() / ".config" / "bench" / "slurm.yaml"))


def load_settings(path=None, flags=None):
    """Defaults < ~/.config/bench/slurm.yaml (or $BENCH_SLURM_CONFIG) < --slurm-config FILE < --slurm-* flags."""
    out = dict(SETTINGS)
    files = [config_file()] + ([Path(path).expanduser()] if path else [])
    for i, f in enumerate(files):
        if not i and not f.exists():  # the default file (or $BENCH_SLURM_CONFIG's) is optional, like
            continue                  # ~/.config/bench/tables.yaml; the file --slurm-config names is not
        if not f.is_file():
            raise UserError(f"{'--slurm-config' if i else 'SLURM settings'} {f}: "
                            + ("a folder, not a file" if f.is_dir() else "no such file"))
        data = read_yaml(f, "expected 'key: value' lines", _Loader) or {}
        if not isinstance(data, dict):
            raise UserError(f"{f}: expected 'key: value' lines ({', '.join(SETTINGS)})")
        unknown = sorted(set(data) - set(SETTINGS), key=str)
        if unknown:
            raise UserError(f"{f}: unknown setting '{unknown[0]}': choose from {', '.join(SETTINGS)}")
        for k, v in data.items():
            if not CHECKS[k][0](v):
                raise UserError(f"{f}: {k}: expected {CHECKS[k][1]}, got {v!r}")
        out.update(data)
    for k, v in (flags or {}).items():
        if v not in (None, []):
            if not CHECKS[k][0](v):
                flag = "--array-parallelism" if k == "array_parallelism" else f"--slurm-{k.replace('_', '-')}"
                raise UserError(f"{flag} {v!r}: expected {CHECKS[k][1]}")
            out[k] = v
    out["time"] = _minutes(out["time"])
    if out["setup"] is None or isinstance(out["setup"], str):
        out["setup"] = [out["setup"]] if out["setup"] else []
    for k in ("partition", "account", "qos", "mem", "constraint"):  # an int from YAML: 0 is a value, not unset
        if out[k] is not None:
            out[k] = str(out[k])
    return out


def settled(rec, state):
    """Whether a job's record is its outcome: not when it says failed and a retry is queued or running."""
    return rec is not None and not (rec["status"] == "failed" and state in ACTIVE)


def ended_badly(rec, state):
    """A failed record, or none and a SLURM job that ended without one (killed, timed out too often, lost)."""
    if rec is not None:
        return rec["status"] == "failed"
    return state not in ("", "COMPLETED", "CANCELLED", *ACTIVE)


def _sacct(ids, names=None):
    """SLURM job id -> state. sacct is asked for the arrays' own ids: the tasks of an array that have not started
    are one line (`698_[1-2%3]`) that it shows for the array alone, and submitit's reader expands it. `names`
    ({id: the job name bench gave it}): a job of that id under another name is not bench's (the id reused after
    the cluster was reset, a store copied from another cluster): LOST, which bench cancel never scancels and
    bench wait does not wait on."""
    if not ids:
        return {}
    if shutil.which("sacct") is None:
        raise UserError("sacct not found: this machine is not a SLURM client (see the README: .ci/slurm-cluster)")
    arrays = sorted({str(i).split("_")[0] for i in ids})
    out = subprocess.run(["sacct", "-o", "JobID,State,JobName,Reason", "--parsable2", "-X", "-j", ",".join(arrays)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SacctFailed(f"sacct failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    info = SlurmInfoWatcher().read_info(out.stdout)
    ours = lambda jid: info[jid].get("JobName") == (names or {}).get(jid, info[jid].get("JobName"))  # noqa: E731

    def state(i):  # (held: JobHeldUser, JobHeldAdmin; a requeued job SLURM holds back is REQUEUE_HOLD already)
        st = i["State"].split()[0]
        return "HELD" if st == "PENDING" and i.get("Reason", "").startswith("JobHeld") else st
    # slurmdbd learns of a job, and of its reason, some seconds after the controller: a job sacct does not know
    # yet, or knows as pending, is read from squeue, which asks the controller
    info.update(_squeue([jid for jid in ids if jid not in info or info[jid]["State"].startswith("PENDING")]))
    return {jid: state(info[jid]) if ours(jid) else "LOST" for jid in ids if jid in info}


def _squeue(ids):
    """SLURM job id -> {State, JobName, Reason} of the jobs among `ids` that the controller still has."""
    if not ids or shutil.which("squeue") is None:
        return {}
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%j|%r", "-j", ",".join(sorted(set(ids)))],
                         capture_output=True, text=True)  # (exit 1 when it has none of them: nothing to add)
    rows = (line.split("|", 3) for line in out.stdout.splitlines() if out.returncode == 0 and line.count("|") >= 3)
    return {jid: {"State": st, "JobName": name, "Reason": reason} for jid, st, name, reason in rows if jid in ids}


class SacctFailed(UserError):
    """sacct is there but cannot answer (slurmdbd down): what SLURM has queued is not known."""


def slurm_states(store, hashes):
    """hash -> (launch info, SLURM state) for the jobs last sent to SLURM. A job neither sacct nor squeue knows
    (just submitted, on a busy controller) counts as PENDING for five minutes, then as LOST."""
    launched = {h: store.launch(h) for h in hashes}
    launched = {h: info for h, info in launched.items() if info and info.get("launcher") == "slurm"}
    states = _sacct({info["job_id"] for info in launched.values()},  # (a note of an earlier version has no name)
                    {info["job_id"]: info["name"] for info in launched.values() if "name" in info})
    out = {}
    for h, info in launched.items():
        state = states.get(info["job_id"])
        if state is None:
            state = "PENDING" if time.time() - info["submitted"] < 300 else "LOST"
        out[h] = (info, state)
    return out


def _sinfo(fmt):
    if shutil.which("sinfo") is None:
        raise UserError("sinfo not found: this machine is not a SLURM client (see the README: .ci/slurm-cluster)")
    out = subprocess.run(["sinfo", "-h", "-N", "-o", fmt], capture_output=True, text=True)  # -N: a line per node
    if out.returncode:
        raise UserError(f"sinfo failed: {out.stderr.strip() or out.returncode}")
    return out.stdout


def partition_nodes(partition=None):
    """(the most CPUs of one node, whether a node has GPUs) of `partition`, or of the default one when None, from
    sinfo; a partition the cluster does not have is named before anything is submitted."""
    rows = [line.split(None, 2) + ["", ""] for line in _sinfo("%P %c %G").splitlines() if line.strip()]
    mine = [r for r in rows if (r[0].rstrip("*") == partition if partition else r[0].endswith("*"))] or (
        [] if partition else rows)  # no default partition: sbatch says so itself
    if not mine:
        known = sorted({r[0].rstrip("*") for r in rows})
        raise UserError(f"--slurm-partition {partition}: no such partition here (sinfo: {', '.join(known) or 'none'})")
    cpus = max((int(r[1]) for r in mine if r[1].isdigit()), default=None)
    return cpus, any("gpu" in r[2] for r in mine)


def fit_cpus(settings, gpus_per_job, node_cpus):
    """The CPUs a job asks for: cpus_per_job, or by default 10 per GPU (2 without GPUs) but at most a node's. A job
    asking more than any node of its partition has is not refused by sbatch: it stays pending for ever (reason
    PartitionConfig), so that is refused here."""
    asked = settings["cpus_per_job"]
    if asked is None:
        asked = 10 * gpus_per_job if gpus_per_job else 2
        return max(1, min(asked, node_cpus)) if node_cpus else asked
    if node_cpus and asked > node_cpus:
        where = f"partition {settings['partition']}" if settings["partition"] else "the default partition"
        raise UserError(f"cpus_per_job {asked} (--slurm-cpus-per-job or the SLURM settings): the nodes of {where} "
                        f"have at most {node_cpus} CPUs; such a job would stay pending for ever")
    return asked


def _executor(store, settings, gpus_per_job, name):
    ex = submitit.SlurmExecutor(folder=store.root / "slurm" / "%j", max_num_timeout=settings["max_requeues"])
    cpus = fit_cpus(settings, gpus_per_job, None)
    params = {"job_name": name, "time": int(settings["time"]), "ntasks_per_node": max(1, gpus_per_job),
              "cpus_per_task": max(1, cpus // max(1, gpus_per_job)), "array_parallelism": settings["array_parallelism"],
              "setup": list(settings["setup"]), "additional_parameters": {"kill-on-invalid-dep": "yes"}}
    if gpus_per_job:
        params["gpus_per_node"] = gpus_per_job
    for key in ("partition", "account", "qos", "mem", "constraint"):
        if settings[key]:
            params[key] = settings[key]
    ex.update_parameters(**params)
    return ex


def submit(jobs, store, preset_name, overrides, data_opts, settings, gpus_per_job=0, name="bench"):
    """Submit every job that is not done, queued or running. Returns {hash: SLURM job id} of what was submitted,
    a list of (job, reason) not submitted because a parent failed, and {hash: SLURM job id} of the jobs already
    queued or running."""
    runnable = [j for j in jobs if not j.skip]
    active = {h: info["job_id"] for h, (info, st) in slurm_states(store, [j.hash for j in runnable]).items()
              if st in ACTIVE}
    todo, todo_set, stale = [], set(), []
    for j in runnable:  # plan order: parents first
        if j.hash in active and j.parent in todo_set:  # it waits on a parent that is submitted again: never runs
            stale.append(active.pop(j.hash))
        if store.state(j.hash) != "done" and j.hash not in active:
            todo.append(j)
            todo_set.add(j.hash)
    if stale:
        subprocess.run(["scancel", *stale], check=True)
    not_run, blocked = [], set()
    chains, tail_of = [], {}  # chain: [job, child, grandchild...]; tail_of: hash of a chain's last job -> chain
    for job in todo:
        parent_failed = job.parent in blocked or (
            job.parent and job.parent not in todo_set and job.parent not in active
            and store.state(job.parent) != "done")
        if parent_failed:
            blocked.add(job.hash)
            not_run.append((job, f"its parent {job.parent[:10]} failed (see bench status)"))
            continue
        chain = tail_of.pop(job.parent, None) if job.parent in todo_set else None
        if chain is None:
            chain = [job]
            chains.append(chain)
        else:
            chain.append(job)
        tail_of[job.hash] = chain
    # a chain whose head waits for nothing goes into the arrays; the others go out job by job
    free = sorted((c for c in chains if c[0].parent is None or c[0].parent not in todo_set | set(active)),
                  key=len, reverse=True)
    ids = {}

    def record(job, sj):
        ids[job.hash] = sj.job_id
        store.put_launch(job.hash, launch_info(job, launcher="slurm", job_id=sj.job_id, name=name,
                                               stdout=str(sj.paths.stdout), stderr=str(sj.paths.stderr)))

    spec = lambda j: job_spec(j, store.root, preset_name, overrides, data_opts)  # noqa: E731
    submitit_said = io.StringIO()  # submitit prints a refusal of sbatch's before raising it: said once, below
    folder = store.root / "slurm"
    listing = lambda: set(os.listdir(folder)) if folder.is_dir() else set()  # noqa: E731
    before = listing()
    try:
        with contextlib.redirect_stderr(submitit_said):
            previous = []  # the SLURM jobs of the last level
            for level in range(max((len(c) for c in free), default=0)):
                batch = [c[level] for c in free if len(c) > level]  # a prefix of the previous level, index for index
                ex = _executor(store, settings, gpus_per_job, name)
                if level:
                    dep = f"aftercorr:{previous[0].job_id.split('_')[0]}" if len(previous) > 1 and len(batch) > 1 \
                        else f"afterok:{previous[0].job_id}"
                    ex.update_parameters(dependency=dep)
                with ex.batch():
                    submitted = [ex.submit(Task(spec(j))) for j in batch]
                for j, sj in zip(batch, submitted):
                    record(j, sj)
                previous = submitted
            for job in [j for j in todo if j.hash not in ids and j.hash not in blocked]:  # parents first
                ex = _executor(store, settings, gpus_per_job, name)
                if job.parent in ids or job.parent in active:
                    ex.update_parameters(dependency=f"afterok:{ids.get(job.parent) or active[job.parent]}")
                record(job, ex.submit(Task(spec(job))))
    except FailedJobError as e:  # sbatch said no: its own words, not submitit's traceback
        for name in listing() - before:  # what submitit wrote for the refused job and left behind
            if re.fullmatch(r"[0-9a-f]{32}\.pkl|\.submission_file_[0-9a-f]{32}\.sh", name):
                (folder / name).unlink(missing_ok=True)
        said = [ln.strip() for ln in str(e).splitlines() if "error" in ln.lower()] or [str(e).strip() or "?"]
        before_it = f" ({n_jobs(len(ids))} {'was' if len(ids) == 1 else 'were'} submitted before it: bench status," \
            " bench cancel)" if ids else ""
        raise UserError(f"sbatch refused the job: {said[0]}{before_it}") from None
    sys.stderr.write(submitit_said.getvalue())  # what it said of jobs it did submit (warnings)
    return ids, not_run, active


def wait(store, hashes, log, poll=5.0):
    """Block until no job among `hashes` is queued or running, with one progress line per change.
    Returns {hash: outcome} with outcome done / failed / the SLURM state a job ended in without a record."""
    last, t0 = None, time.time()
    while True:
        states = slurm_states(store, hashes)
        outcome, walls, waiting = {}, [], {"running": [], "queued": []}
        for h in hashes:
            rec = store.get(h)
            info, st = states.get(h, ({}, "NOT SUBMITTED"))
            if settled(rec, st):
                outcome[h] = rec["status"]
                walls += [(rec["config"], rec.get("wall_time_s", 0))] if rec["status"] == "done" else []
            else:
                outcome[h] = "running" if st == "RUNNING" else "queued" if st in ACTIVE else st
                if outcome[h] in waiting and "job" in info:  # its stage and epochs, noted when it was sent
                    waiting[outcome[h]].append(info["job"])
        n = {k: sum(v == k for v in outcome.values()) for k in ("done", "failed", "running", "queued")}
        ended = len(hashes) - n["done"] - n["failed"] - n["running"] - n["queued"]
        held = sorted({info["job_id"].split("_")[0] for info, st in states.values() if st == "HELD"})
        line = f"jobs: {n['done']} done, {n['running']} running, {n['queued']} queued"
        line += f" ({len(held)} held: scontrol release {','.join(held)})" if held else ""
        line += f", {n['failed'] + ended} failed or not run" if n["failed"] + ended else ""
        if walls and n["running"] + n["queued"]:
            left = time_left(waiting["queued"], waiting["running"], walls, slots=n["running"])
            line += f"; {about(left)}"
        if line != last:
            log(f"[{time.time() - t0:5.0f}s] {line}")
            last = line
        if not n["running"] + n["queued"]:
            return outcome
        time.sleep(poll)


def cancel(store, hashes):
    """scancel the queued and running jobs among `hashes`; returns their SLURM ids."""
    ids = sorted({info["job_id"] for info, st in slurm_states(store, hashes).values() if st in ACTIVE})
    if ids:
        subprocess.run(["scancel", *ids], check=True)
    return ids


def log_tail(path, lines=8):
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.rstrip().splitlines() if line.strip()][-lines:]
