"""What every part of bench shares and the command line needs before torch (seconds to import, more on a
cluster's network file system, and `bench status`, `bench cancel` and `--help` need none of it)."""
import importlib
from pathlib import Path

COMPILE_CHOICES = ("auto", "on", "off")  # the engine's BENCH_COMPILE / `--compile`, here for the parser


class lazy:
    """A module imported on first use of one of its attributes: `torch = lazy("torch")` at the top of a module
    the command line imports, where only some commands need torch."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)


class Terminated(KeyboardInterrupt):
    """SIGTERM where a command stops as on Ctrl-C (importing torch, planning, waiting on SLURM): one line and exit
    143, rather than the signal's default, silent end."""


def raise_terminated(signum, frame):
    """The SIGTERM handler that makes the signal a Terminated, caught where Ctrl-C's KeyboardInterrupt is."""
    raise Terminated


class UserError(Exception):
    """A mistake the user can fix (bad flag, unknown name, missing or corrupt data).

    The CLI prints its message as one line on stderr and exits with code 2, without a traceback.
    """


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def whole(low, none=False):
    """The rule of a setting that is a whole number >= low (or null, where `none`), and how it is described."""
    return (lambda v: none and v is None or is_int(v) and v >= low), f"a whole number >= {low}"


def jobs(n: int, noun: str = "job") -> str:
    """'1 job', '3 jobs' (or of another noun): counts in messages."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def load_yaml(text, origin, loader=None):
    """yaml.safe_load (or `loader`), or one line naming `origin` and what is wrong where.

    PyYAML's own message spans lines and its first says only what it was parsing; safe_load's constructors raise
    plain Python errors on bad tagged or huge values. A key written twice in one map is refused: PyYAML keeps the
    last silently, and a user who set `epochs` twice in a preset would train with the one they did not read.
    """
    import yaml

    try:
        return yaml.load(text, Loader=_unique_keys(loader or yaml.SafeLoader))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        why = ": ".join(filter(None, (e.context, e.problem))) + (
            f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")
    except yaml.YAMLError as e:
        why = " ".join(str(e).split())
    except RecursionError:
        why = "nested too deeply"
    except Exception as e:  # ValueError (`!!int x`, an integer past Python's 4300 digits, whose advice is for
        # programmers), KeyError, AttributeError
        why = str(e).split(";")[0] if isinstance(e, ValueError) else "a tagged value YAML cannot construct"
    raise UserError(f"{origin}: not valid YAML: {why}")


def _unique_keys(loader):
    import yaml

    class Unique(loader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then a key of its own overrides
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        if key in seen:
                            raise yaml.constructor.ConstructorError(
                                None, None, f"the key {key!r} is written twice in one map", key_node.start_mark)
                        seen.add(key)
                    except TypeError:  # an unhashable key: the base class says so
                        break
            return super().construct_mapping(node, deep)

    return Unique


def read_yaml(path, expected, loader=None):
    """A YAML file's content, or one line naming the file and why not; `expected` says what it should hold."""
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not text (byte {e.start} is not UTF-8): {expected}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it: {e.strerror}") from None
    return load_yaml(text, str(path), loader)
