"""What submitit pickles into a SLURM job, in a module of its own that imports neither torch nor the rest of
bench: submitit unpickles it before it installs its signal handlers, and a pre-emption's SIGUSR2 arriving while
torch was being imported for the unpickling killed the job (FAILED, its children cancelled) instead of requeueing
it. Everything heavy is imported when the job runs, with submitit's handlers in place."""
from __future__ import annotations

import os
import signal

import submitit


class Task:
    """The callable submitit pickles into the job: runs one job spec. Its `checkpoint` is submitit's requeue hook:
    the training state is already on disk (the engine saved it), so requeueing means running the same spec."""

    def __init__(self, spec):
        self.spec = spec

    def __call__(self):
        from bench.engine import Interrupted
        from bench.launch import init_distributed, run_spec

        env = submitit.JobEnvironment()
        if os.environ.get("SLURM_CPUS_PER_TASK"):  # the CPUs SLURM gave us, not every core of a shared node
            import torch
            torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
        if env.num_tasks > 1:  # one task per GPU; the port from the job id, so that two jobs on a node differ
            port = 20000 + int("".join(c for c in str(env.job_id) if c.isdigit())[-6:]) % 20000
            init_distributed(env.global_rank, env.num_tasks, env.local_rank, env.hostnames[0], port)
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: calls checkpoint(), `scontrol requeue`, exits
        try:
            record = run_spec(self.spec)
        except Interrupted as e:
            if e.signum == signal.SIGUSR2 and callable(requeue):
                requeue(e.signum, None)
            raise
        if record is not None and record["status"] != "done":  # the SLURM job fails: afterok children never run
            raise RuntimeError(f"job {record['hash'][:10]} failed: {record['error']}")
        return None if record is None else record["hash"]

    def checkpoint(self, *args, **kwargs):
        return submitit.helpers.DelayedSubmission(Task(self.spec))
