"""The result store: one JSON record per finished (or failed) job, named by the job's config hash.

    DIR/<hash>.json          the record (written to a temporary name, then renamed)
    DIR/runs/<hash>/         checkpoint.pt, metrics.jsonl, weights.pt (what the next stage loads),
                             launch.json (where the job was last sent: launcher, SLURM id, log paths)
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import socket
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from bench.errors import UserError, lazy

torch = lazy("torch")  # for checkpoints and caches; records and the store's state are plain files


_RECORD_NAME = re.compile(r"^[0-9a-f]{16}\.json$")  # <config hash>.json; any other JSON file is not ours


def probe_writable(folder, named, then=""):
    """A folder that cannot take a file (a read-only mount, no permission, a file in its place) fails now, not
    after minutes or hours of work that had nowhere to go."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"{named}: cannot write there ({e.strerror}){then}") from None


def check_output(path, flag="--out") -> Path:
    """A file a command writes on request (a report, a benchmark's JSON) must not take a result's place: a record
    (<hash>.json) or anything in a job's run directory (weights, checkpoints)."""
    path = Path(path)
    above = next((d for d in path.absolute().parents if d.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"{flag} {path}: {above} is a file, not a folder")
    in_a_run = any(d.parent.name == "runs" and re.fullmatch(r"[0-9a-f]{16}", d.name)
                   for d in [path.absolute(), *path.absolute().parents])
    a_record = _RECORD_NAME.match(path.name) and (path.exists() or (path.parent / "runs").is_dir())
    if a_record or in_a_run:
        raise UserError(f"{flag} {path}: a job's results live there (a record, or its run directory); "
                        f"write somewhere else")
    return path


def read_tensors(path: Path, **kwargs):
    """torch.load to the host of a file bench wrote: tensors and plain data only (a pickle there runs no code),
    and without torch's warning about a damaged file's pickle protocol (its caller says what is wrong with it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)


def aside(path: Path, why: str, tag: str = "damaged") -> Path:
    """Move a file out of the way, keeping it (PATH.<tag>-<time>-<pid>[-k]), and say so on stderr."""
    name = f"{path.name}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    dest, k = path.with_name(name), 1
    while dest.exists():  # set aside twice in a second by one process: the first one is kept too
        dest, k = path.with_name(f"{name}-{k}"), k + 1
    os.replace(path, dest)
    print(f"bench: {path} {why}; moved aside to {dest.name}", file=sys.stderr, flush=True)
    return dest


def write_durably(path: Path, content):
    """Write to a unique temporary name, fsync it, rename it over `path`, fsync the directory: after a crash the
    file is the old one or the new one, whole. content: text, or a function that writes to a binary file
    (`lambda f: torch.save(obj, f)`). The one way records, checkpoints and caches reach the disk."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, a signal: no half-written temporary file left behind
        tmp.unlink(missing_ok=True)
        cause = None if isinstance(e, OSError) else e.__cause__ or e.__context__
        while cause is not None:  # torch.save's writer says "unexpected pos 848960"; the OSError behind it, why
            if isinstance(cause, OSError) and cause.errno:
                raise OSError(cause.errno, cause.strerror, str(path)) from e
            cause = cause.__cause__ or cause.__context__
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass


def remove_leftovers(folder: Path):
    """The temporary files write_durably left in `folder` when its process was killed mid-write (SLURM's SIGKILL,
    KillWait after the SIGTERM of a scancel or a time limit, lands in the checkpoint that SIGTERM began; a lost
    node): nothing else removes them, and a checkpoint's can take gigabytes. Only for a folder with one writer, a
    job's, by the holder of its lock; the lock's own temporary files are those of processes trying it now."""
    for tmp in folder.glob(".*.tmp"):
        if not tmp.name.startswith(".lock."):
            try:
                tmp.unlink()
            except OSError:
                pass


# What the readers of a record (the reports, `bench status`, the launchers) take from it. A record that parses but
# breaks these (edited by hand, cut by a tool) is damaged: the job runs again and the file is kept aside.
_FIELDS = {"hash": str, "status": str, "config": dict, "metrics": dict, "stage": str, "seed": int, "cells": list,
           "preset": str, "overrides": list, "hardware": dict, "wall_time_s": (int, float)}
# every record bench writes has these; one without cells (a pretraining) is read too, as a stage of a cell's chain
_NEEDED = ("hash", "status", "config", "metrics", "stage", "seed", "preset", "hardware")


def _not_a_record(rec, name):
    """Why a parsed JSON object cannot be a record, or None."""
    missing = [k for k in _NEEDED if k not in rec]
    if missing:
        return f"no {', '.join(missing)}"
    for key, kind in _FIELDS.items():
        if key in rec and (not isinstance(rec[key], kind) or isinstance(rec[key], bool)):
            return f"its {key} is {json.dumps(rec[key])[:40]}"
    if rec["status"] not in ("done", "failed"):
        return f"its status is {rec['status']!r}"
    if rec["hash"] != name:
        return f"its hash {rec['hash'][:20]!r} is not its file's name"
    top1 = rec["metrics"].get("top1")
    if top1 is not None and (not isinstance(top1, (int, float)) or isinstance(top1, bool) or not 0 <= top1 <= 1):
        return f"its metrics.top1 is {json.dumps(top1)[:40]}"  # (NaN too: a fraction, never a percentage)
    if top1 is None and rec["stage"] == "finetune" and rec["status"] == "done":  # a cell without a number
        return "it is a finished fine-tuning without metrics.top1"
    wall = rec.get("wall_time_s", 0)
    if not 0 <= wall < math.inf:
        return f"its wall_time_s is {json.dumps(wall)}"
    if not all(isinstance(o, str) for o in rec.get("overrides", [])):
        return "its overrides are not --set items"
    if not all(isinstance(c, list) and len(c) == 3 and all(isinstance(x, str) for x in c) for c in rec.get("cells", [])):
        return "its cells are not [table, row, column] triples"
    cfg = rec["config"]
    if not (isinstance(cfg.get("data"), str) and (rec["stage"] != "finetune" or isinstance(cfg.get("init"), str))):
        return "its config has no data or init"
    return None


class Store:
    def __init__(self, root):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--results {self.root}: is a file, not a directory")

    def path(self, h):
        return self.root / f"{h}.json"

    def run_dir(self, h):
        return self.root / "runs" / h

    def weights(self, h):
        return self.run_dir(h) / "weights.pt"

    @staticmethod
    def _read(path):
        """A record, or (None, why) when the file is not one. A file that cannot be read now (no permission, a
        network mount's passing fault) says nothing of its content: a UserError, rather than training a finished
        job again and setting its record aside as damaged."""
        try:
            rec = json.loads(path.read_text())
        except FileNotFoundError:
            return None, None
        except OSError as e:
            raise UserError(f"cannot read the record {path} ({e.strerror}); it was left as it is") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return None, f"does not parse ({type(e).__name__}: {e})"
        if not isinstance(rec, dict) or not {"hash", "status"} <= set(rec):
            return None, "is not a record (no hash and status)"
        why = _not_a_record(rec, path.stem)
        return (None, f"is not a record ({why})") if why else (rec, None)

    def get(self, h):
        return self._read(self.path(h))[0]  # a damaged record counts as none: the job runs again

    def _files(self):
        """The record files (glob would take a folder it cannot list for an empty one)."""
        if not self.root.is_dir():
            return []
        try:
            return sorted(p for p in self.root.iterdir() if _RECORD_NAME.match(p.name))
        except OSError as e:
            raise UserError(f"cannot list --results {self.root} ({e.strerror})") from None

    def records(self):
        return [rec for p in self._files() for rec in [self._read(p)[0]] if rec is not None]

    def damaged(self):
        """(path, why) of every record file that is not a record: `bench status` lists them."""
        return [(p, why) for p in self._files() for why in [self._read(p)[1]] if why]

    def put(self, record):
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            path = self.path(record["hash"])
            if path.exists() and self._read(path)[1]:
                aside(path, "was a damaged record")
            write_durably(path, json.dumps(record, indent=1, sort_keys=True))
        except OSError as e:
            raise UserError(f"cannot write the record of job {record['hash'][:10]} under {self.root}: "
                            f"{e.strerror}") from None

    def check_writable(self):
        """Before any training: a results directory that cannot take a record fails now, not after hours of a
        job (a read-only mount, a full disk, no permission)."""
        if (self.root / "runs").exists() and not (self.root / "runs").is_dir():
            raise UserError(f"--results {self.root}: runs there is a file, where the jobs' folders belong; "
                            f"nothing was run")
        probe_writable(self.root, f"--results {self.root}", "; nothing was run")

    def set_aside(self, h):
        """For `bench run --rerun`: the job's record, checkpoint, metrics log and weights are moved aside (kept:
        the new run would start the log again and write the weights over), so it runs again."""
        moved = []
        for path in (self.path(h), *(self.run_dir(h) / f for f in ("checkpoint.pt", "metrics.jsonl", "weights.pt"))):
            if path.exists():
                moved.append(aside(path, "is set aside for --rerun", tag="replaced"))
        return moved

    def put_launch(self, h, info):
        path = self.run_dir(h) / "launch.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_durably(path, json.dumps(info, indent=1))

    _LAUNCH = {"launcher": str, "job_id": str, "submitted": (int, float), "stdout": str, "stderr": str, "log": str,
               "job": dict, "name": str}

    def launch(self, h):
        """What the launcher noted when it sent the job, or None: never sent, or a note that cannot be read or is
        not of the shape written here (cut short, hand-edited): only where a job was sent, and status does without."""
        try:
            info = json.loads((self.run_dir(h) / "launch.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(info, dict) or "launcher" not in info or (
                info["launcher"] == "slurm" and not {"job_id", "submitted"} <= set(info)):
            return None
        odd = [k for k, t in self._LAUNCH.items()
               if k in info and (isinstance(info[k], bool) or not isinstance(info[k], t))]
        return None if odd else info

    def state(self, h):
        """done / failed / partial (a checkpoint exists) / pending."""
        rec = self.get(h)
        if rec is not None:
            return rec["status"]
        return "partial" if (self.run_dir(h) / "checkpoint.pt").exists() else "pending"


def _started(pid):
    """When process `pid` started (clock ticks since boot, from /proc), to tell it from a later process that was
    given the same pid; None where /proc cannot say."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _restarts():
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


_HELD_HERE: set = set()  # tokens of the locks this process holds now


class Lock:
    """A job's lock: RUNDIR/lock, created whole (written aside, then linked into place: no reader ever sees it
    empty), naming its owner: host, pid and the pid's start time, SLURM job and restart count, and a token. While
    it is held, a thread refreshes its mtime every HEARTBEAT_S, whatever the owner is doing (decoding, compiling,
    training between checkpoints). It is taken over when its owner is gone: on the owner's host, when no live
    process is the one that took it; from another host, when it has been silent for STALE_S, or when it is this
    same SLURM job before a requeue (a lower restart count). `acquire()` / `release()`, or `with Lock(d) as held`."""

    HEARTBEAT_S = 60.0
    STALE_S = 600.0
    TAKEOVER_S = 60.0  # lock.takeover is held for microseconds: one older was left by a process that died in it

    def __init__(self, run_dir: Path):
        self.path, self.held, self.owner = Path(run_dir) / "lock", False, None
        self._body, self._token, self._beat = None, None, None

    def _owner_alive(self):
        try:
            owner = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return False  # a lock is created whole: one that does not parse was damaged, not being written
        if not isinstance(owner, dict):
            return False
        self.owner = f"{owner.get('host')}:{owner.get('pid')}"
        if owner.get("host") == socket.gethostname():
            pid = owner.get("pid")
            if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2 ** 31:
                return False  # (os.kill(0 or -1, 0) asks of a group or of every process: any answers)
            if pid == os.getpid():  # this process: alive if it holds that lock now, else an earlier one's pid
                return owner.get("token") in _HELD_HERE
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # another user's live process
                pass
            return owner.get("start") is None or _started(pid) in (None, owner["start"])
        if owner.get("slurm_job") and owner["slurm_job"] == os.environ.get("SLURM_JOB_ID") \
                and (owner.get("restart") or 0) < _restarts():
            return False  # this job itself, before SLURM requeued it (perhaps onto another node)
        return age < self.STALE_S

    def _create(self, body: bytes, path: Path | None = None):
        """Put `body` in place as the lock (or at `path`) unless one exists; False if one does."""
        path = path or self.path
        tmp = self.path.with_name(f".lock.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(body)
        except OSError as e:  # a job's folder of another user's, or a read-only mount below a writable store
            raise UserError(f"{self.path.parent}: cannot write there ({e.strerror}); the job was not run") from None
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: create, then write (a reader may see it empty)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, judged: bytes):
        """Remove the lock of an owner found gone if it still holds `judged` (False: another process's is there,
        or is being taken over now). One process at a time, under lock.takeover: moving a lock aside to compare
        it, as a release does, could move away the lock a second process had just taken, while a third created
        its own, and the second's could then not be put back: two owners."""
        mutex = self.path.with_name("lock.takeover")
        try:
            if time.time() - mutex.stat().st_mtime > self.TAKEOVER_S:
                mutex.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        if not self._create(b"", mutex):
            return False
        try:
            if self.path.read_bytes() != judged:
                return False
            self.path.unlink()
            return True
        except FileNotFoundError:
            return True
        finally:
            mutex.unlink(missing_ok=True)

    def _remove_if(self, body: bytes):
        """Remove this process's lock if it still holds `body`; a lock another process put there meanwhile stays.
        Moved to a unique name first, so that of two processes removing one lock, one does."""
        moved = self.path.with_name(f"lock.stale-{os.getpid()}-{threading.get_ident()}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return True
        there = moved.read_bytes()
        if there != body:  # put back the lock another process took meanwhile, unless a third has taken it since
            self._create(there)  # (as a lock is created: with or without hard links)
        moved.unlink(missing_ok=True)
        return there == body

    def holder(self):
        """Who holds the lock now ("host:pid"), or None when no live owner does."""
        return self.owner if self.path.is_file() and self._owner_alive() else None

    def acquire(self):
        """Take the lock (True), or say who holds it (False, `self.owner`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir():  # not ours to remove: it may hold something
            raise UserError(f"{self.path}: a folder where a job's lock file belongs; move it away and run again")
        token = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{time.time_ns()}"
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": _started(os.getpid()),
                           "slurm_job": os.environ.get("SLURM_JOB_ID"), "restart": _restarts(),
                           "since": time.time(), "token": token}).encode()
        for _ in range(3):
            if self._create(body):
                _HELD_HERE.add(token)
                self.held, self._body, self._token = True, body, token
                self._beat = threading.Event()
                threading.Thread(target=self._heartbeat, args=(self._beat,), daemon=True).start()
                return True
            try:
                judged = self.path.read_bytes()
            except FileNotFoundError:
                continue
            if self._owner_alive() or not self._take_over(judged):
                return False
        return False

    def _heartbeat(self, stop: threading.Event):
        while not stop.wait(self.HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self):
        if self.held:
            self._beat.set()
            _HELD_HERE.discard(self._token)
            self._remove_if(self._body)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def hardware():
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "host": platform.node()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpus"] = torch.cuda.device_count()
    return info


def versions():
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("bench", "torch", "torchvision", "timm", "lightly"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    out["commit"] = _commit()
    return out


def _commit():
    """The project's git commit (with -dirty when files differ from it), or None outside a checkout."""
    import subprocess

    here = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip()[:12] + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
