"""`python -m bench` and the `bench` command. The command line is imported inside `entry`, not above it, so
that a Ctrl-C or a SIGTERM while torch loads (a second or more) ends with the same one line as during a run."""
import signal
import sys


def entry():
    from bench.errors import Terminated, raise_terminated

    signal.signal(signal.SIGTERM, raise_terminated)  # a run's jobs put their own in place (save, then stop)
    try:
        # before torch, whose C++ imports numpy itself and clears any exception raised there, a Ctrl-C or
        # SIGTERM that lands in that import included: the command then went on as if not stopped
        import numpy  # noqa: F401

        from bench.cli import main
    except KeyboardInterrupt as e:
        print("bench: stopped by signal SIGTERM" if isinstance(e, Terminated) else "bench: interrupted",
              file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    return main()


if __name__ == "__main__":
    sys.exit(entry())
