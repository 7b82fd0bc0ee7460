"""`python -m bench` and the `bench` command. The command line is imported inside `entry`, not above it, so
that a Ctrl-C while torch loads (a second or more) ends with the same one line as a Ctrl-C during a run."""
import sys


def entry():
    try:
        from bench.cli import main
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(entry())
