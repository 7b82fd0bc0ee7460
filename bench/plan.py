"""Table spec + preset + CLI filters -> Jobs.

A Job is a frozen, fully resolved config (every number that affects training) and the sha256 of it. A
fine-tuning job's config names its parent's hash as `init`, so a hash covers the whole chain of stages. The
same job planned by two tables is one job.
"""
from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import inspect
import json
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import timm
import yaml

from bench import data as datasets
from bench import models  # registers bench's own backbones with timm before names are checked
from bench.data.views import randaugment
from bench.engine import LR_SCHEDULES, PRECISIONS
from bench.errors import UserError, is_int, load_yaml, read_yaml, whole
from methods import METHODS

PRESET_DIR = Path(str(resources.files("bench") / "presets"))


@dataclass
class Job:
    hash: str
    config: dict
    parent: str | None = None
    cells: list = field(default_factory=list)  # [(table, row id, column)] this job's result fills
    skip: str | None = None                    # why the job cannot run (shown in dry-run and report)
    method: str = ""                           # the table row's method (a fine-tuning config names only `init`)
    init_path: str | None = None               # a weights file to start from (its content hash is in `init`)

    @property
    def short(self):
        return self.hash[:10]


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _words(v):
    return isinstance(v, str) and v != ""


def _stages(v):  # a chain of fine-tuning stages, [{res, epochs}]
    return isinstance(v, list) and v != [] and all(isinstance(x, dict) and set(x) == {"res", "epochs"} and
                                                   is_int(x["res"]) and x["res"] >= 1 and
                                                   is_int(x["epochs"]) and x["epochs"] >= 0 for x in v)


_LABEL_FIELDS = ("pretrain_data", "pretrain_epochs", "finetune_res", "finetune_epochs")
# a table's fields and a row's, each with what it must be (rows: id, method and backbone required)
_TABLE_FIELDS = {
    "title": (_words, "a title"),
    "columns": (lambda v: isinstance(v, list) and v != [] and all(map(_words, v)), "a list of dataset names"),
    "row_columns": (lambda v: isinstance(v, list) and all(_words(c) or isinstance(c, dict) and len(c) == 1 and
                                                          next(iter(c.values())) in _LABEL_FIELDS for c in v),
                    f"a list of labels, or {{Label: field}} with field one of {', '.join(_LABEL_FIELDS)}"),
    "finetune": (_stages, "fine-tuning stages, [{res: 224, epochs: 200}, ...]"),
    "rows": (lambda v: isinstance(v, list), "a list of rows"),
}
_ROW_FIELDS = {
    "id": (_words, "a name"), "method": (_words, "a method's key"), "backbone": (_words, "a timm model name"),
    "pretrain_epochs": whole(0),
    "pretrain_data": (_words, "a dataset name"), "finetune": _TABLE_FIELDS["finetune"],
    "show": (lambda v: isinstance(v, dict) and all(map(_words, v)), "a map of column label -> text"),
    "paper": (lambda v: isinstance(v, list) and all(x is None or isinstance(x, (int, float)) and
                                                    not isinstance(x, bool) for x in v),
              "a list of published top-1 (%), null where the paper has none"),
}


def user_tables_file() -> Path:
    return Path(os.environ.get("BENCH_TABLES", "~/.config/bench/tables.yaml")).expanduser()


@functools.lru_cache(maxsize=1)
def _paper_tables() -> dict:
    """bench/tables.yaml, read and checked once a process (a plan, a report and the benchmark ask for it often)."""
    tables = yaml.load((resources.files("bench") / "tables.yaml").read_text(),
                       Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml's, where PyYAML has it
    for name, spec in tables.items():
        check_table(name, spec, "bench/tables.yaml")
    return tables


def load_tables() -> dict:
    """The paper's tables (bench/tables.yaml), with a user's own rows and tables from `user_tables_file()`:
    under a paper table's name, `rows:` that join it (a new method or backbone beside the paper's); under a new
    name, a whole table in the same form."""
    tables = copy.deepcopy(_paper_tables())
    path = user_tables_file()
    if path.is_dir():
        raise UserError(f"{path}: a folder, where the file of your own tables belongs ($BENCH_TABLES)")
    mine = read_yaml(path, "it should map table names to rows or tables") if path.is_file() else None
    if mine is not None and not isinstance(mine, dict):
        raise UserError(f"{path}: expected table names, each with its rows (as in bench/tables.yaml)")
    for name, spec in (mine or {}).items():
        if name in tables:  # rows that join a paper table
            if not isinstance(spec, dict) or set(spec) != {"rows"}:
                raise UserError(f"{path}: {name}: expected rows: [...], which join the paper's table")
            paper_ids = {r["id"] for r in tables[name]["rows"]}
            check_table(name, {**tables[name], "rows": spec["rows"]}, str(path), paper_ids)
            tables[name]["rows"] += spec["rows"]
        else:
            if not _words(name) or not isinstance(spec, dict) or set(spec) != set(_TABLE_FIELDS):
                raise UserError(f"{path}: {name}: expected a new table with {', '.join(_TABLE_FIELDS)} (as in "
                                f"bench/tables.yaml), or the name of one of its tables ({', '.join(tables)})")
            tables[name] = check_table(name, spec, str(path))
        for row in spec["rows"]:  # a typo in your own row is yours to fix, not a row the plan skips
            if row["method"] not in METHODS:
                raise UserError(f"{path}: {name}: row {row['id']}: method: no method '{row['method']}' "
                                f"(choose from {', '.join(METHODS)})")
            if not timm.is_model(row["backbone"]):
                near = difflib.get_close_matches(row["backbone"], timm.list_models(), n=1)
                raise UserError(f"{path}: {name}: row {row['id']}: backbone: timm has no model "
                                f"'{row['backbone']}'" + (f" (did you mean {near[0]}?)" if near else ""))
    return tables


def check_table(name: str, spec: dict, origin: str, taken=frozenset()) -> dict:
    """A table's fields and every row checked, each bad value one line naming `origin`; rows completed: no
    `paper` reads as no published numbers, no `show: {Method: ...}` as the method's key. `taken`: row ids
    already used."""
    for k, (ok, what) in _TABLE_FIELDS.items():
        if not ok(spec.get(k)):
            raise UserError(f"{origin}: {name}: {k}: expected {what}, got {spec.get(k)!r}")
    ids = set(taken)
    for i, row in enumerate(spec["rows"]):
        where = f"{origin}: {name}: row {row.get('id') if isinstance(row, dict) and _words(row.get('id')) else i + 1}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a map of {', '.join(_ROW_FIELDS)}")
        missing = [k for k in ("id", "method", "backbone") if k not in row]
        unknown = [k for k in row if k not in _ROW_FIELDS]
        if missing or unknown:
            raise UserError(f"{where}: " + (f"no {', '.join(missing)}" if missing else
                                            f"unknown field '{unknown[0]}' (known: {', '.join(_ROW_FIELDS)})"))
        for k, v in row.items():
            if not _ROW_FIELDS[k][0](v):
                raise UserError(f"{where}: {k}: expected {_ROW_FIELDS[k][1]}, got {v!r}")
        if row["id"] in ids:
            raise UserError(f"{where}: a second row with this id (ids name a row's records)")
        ids.add(row["id"])
        row.setdefault("paper", [None] * len(spec["columns"]))
        if len(row["paper"]) != len(spec["columns"]):
            raise UserError(f"{where}: paper should list a number for each of the {len(spec['columns'])} "
                            f"columns ({', '.join(spec['columns'])}; null where the paper has none)")
        row["show"] = {"Method": row["method"], **row.get("show", {})}
    return spec


def table(name: str) -> dict:
    tables = load_tables()
    if name not in tables:
        raise UserError(f"unknown table '{name}': choose from {', '.join(tables)}")
    return {**tables[name], "name": name}


def _merge(base, over):
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else _like(v, out.get(k))
    return out


def _like(new, old):
    """`new`, each whole number in it written as the number it replaces is (1 -> 1.0 where the preset has 1.0, 0.0
    -> 0 where it has 0): a job's hash reads 1 and 1.0 apart, and the same recipe must not train twice."""
    if isinstance(new, list) and isinstance(old, list) and len(new) == len(old):
        return [_like(n, o) for n, o in zip(new, old)]
    if isinstance(new, dict) and isinstance(old, dict):
        return {k: _like(v, old.get(k)) for k, v in new.items()}
    if _is_num(new) and _is_num(old) and type(new) is not type(old) and float(new).is_integer():
        return type(old)(new)
    return copy.deepcopy(new)


def preset_names():
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-3 as text (its floats need a dot); in a preset or a --set value it means a number."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _read_preset(path: Path) -> dict:
    """A preset file's own content: a map of settings, or one clear line saying why not."""
    raw = read_yaml(path, "a preset is a YAML map of settings", _Loader)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a map of settings (key: value), got a {type(raw).__name__}")
    return raw


def _preset_file(name: str) -> Path:
    # a path (a / in it) is a file of one's own whatever it ends with; a bare name, a built-in preset
    return Path(name) if name.endswith((".yaml", ".yml")) or "/" in name else PRESET_DIR / f"{name}.yaml"


def _builtin(path: Path) -> bool:  # (bench/presets/paper.yaml, given as a path, is the built-in paper)
    return path.resolve().parent == PRESET_DIR.resolve()


def preset_id(name: str) -> str:
    """How records name a preset: a built-in one by name, a file of one's own by its absolute path (so that the
    report can load it again, from any folder)."""
    path = _preset_file(name)
    return path.stem if _builtin(path) else str(path.resolve())


def _preset_path(name: str, origin="--preset") -> Path:
    path = _preset_file(name)
    if path.is_file():
        return path
    if _builtin(path):
        raise UserError(f"{origin} {name}: no such preset: choose from {', '.join(preset_names())} or a .yaml path")
    raise UserError(f"{origin} {name}: " + ("a folder, not a preset file" if path.is_dir() else "no such file"))


def _resolve(path: Path, seen=()) -> dict:
    raw = _read_preset(path)
    if "base" not in raw:
        if _builtin(path):  # paper.yaml, the root of every preset
            return raw
        raw["base"] = "paper"  # a file of one's own is the values it changes (README), an empty one the paper's
    base = raw.pop("base")
    if not isinstance(base, str):
        raise UserError(f"{path}: base: expected a preset name or a .yaml path, got {base!r}")
    base_path = _preset_path(base if not base.endswith((".yaml", ".yml")) or Path(base).is_absolute()
                             else str(path.parent / base), f"{path}: base:")
    if base_path.resolve() in seen or base_path.resolve() == path.resolve():
        raise UserError(f"{path}: base '{base}' leads back to this file")
    parent = _resolve(base_path, (*seen, path.resolve()))
    _check_keys(raw, parent, str(path))
    return _merge(parent, raw)


def load_preset(name: str, overrides=()) -> dict:
    """A preset by name (bench/presets/NAME.yaml) or path, its `base` merged under it, then `--set` overrides;
    every key known and every value checked (`check_values`) before anything runs."""
    path = _preset_path(name)
    preset = _resolve(path)
    check_values(preset, str(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item}: expected KEY=VALUE, e.g. pretrain.epochs=2")
        if not value.strip():  # YAML reads it as null, which leaves a setting to the table (800 epochs)
            raise UserError(f"--set {item}: no value after '=' (write null to unset a setting)")
        *parents, last = key.split(".")
        node, where = preset, ""
        for k in [*parents, last]:
            if not isinstance(node, dict):
                raise UserError(f"--set {item}: '{where}' is not a group of settings")
            if _key(node, k) not in node and where == "methods":
                _known_method(k, f"--set {item}")
            if _key(node, k) not in node and not _open(where, k):  # a typo would otherwise change nothing
                hint = " (a learning rate is a backbone's: backbones.NAME.lr)" if k == "lr" else ""
                raise UserError(f"--set {item}: the preset has no setting '{(where + '.' + k).lstrip('.')}' (known "
                                f"under {where or 'the top'}: {', '.join(map(str, node))}){hint}")
            if k is not last:
                node = node.setdefault(_key(node, k), {})
                where = f"{where}.{k}".lstrip(".")
        value, old = _scalar(value, f"--set {item}"), node.get(_key(node, last))
        if isinstance(value, dict) and isinstance(old, dict):  # a group is merged into the preset's, as a file's is
            _check_keys(value, old, f"--set {item}", key)
        node[_key(node, last)] = _merge({"v": old}, {"v": value})["v"]
        check_values(preset, f"--set {item}")
    preset["name"] = preset_id(name)
    return preset


def _known_method(name, origin):
    """A method's settings under a name no method has would change nothing, silently (`methods.idmmm`)."""
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), list(METHODS), n=1)
        raise UserError(f"{origin}: methods.{name}: no method of that name (" + (
            f"did you mean {close[0]}?" if close else f"the methods: {', '.join(METHODS)}") + ")")


def _check_keys(raw, base, origin, where=""):
    """Every key of a preset file exists in its base, except where users add entries (`_open`)."""
    for k, v in raw.items():
        here = f"{where}.{k}".lstrip(".")
        if not isinstance(base, dict):
            return
        known = _key(base, str(k)) if isinstance(k, str) else k
        if known not in base:
            if where == "methods":
                _known_method(k, origin)
            if _open(where, str(k)) or where.startswith(_OPEN_BELOW) or (where.endswith("views") and k in VIEW_KEYS):
                continue
            raise UserError(f"{origin}: unknown setting '{here}'"
                            + (f" (known under {where or 'the top'}: {', '.join(map(str, base))})" if base else ""))
        if isinstance(v, dict) and isinstance(base[known], dict):
            _check_keys(v, base[known], origin, here)


VIEW_KEYS = ("crops", "flip", "jitter", "jitter_p", "grayscale_p", "randaugment", "blur_p", "blur_sigma",
             "solarize_p")  # what bench.data.views.make_views reads

# where anything goes below: a backbone's timm keywords, a new method's or backbone's own settings
_OPEN_BELOW = ("backbones.", "pretrain_data", "finetune.resolution")


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _unit(v):
    return _is_num(v) and 0 <= v <= 1


def _names(v):  # (an empty list of columns would be the table's own, silently)
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v)


_RULES = {  # setting name -> (test, what it must be); checked wherever the name appears (outside kwargs)
    "epochs": whole(1, none=True),
    "batch_size": whole(1),
    "max_side": whole(1),
    "lr": (lambda v: v is None or _is_num(v) and v > 0, "a finite number > 0"),
    "warmup_epochs": (lambda v: v is None or _is_num(v) and v >= 0, "a number >= 0"),
    "weight_decay": (lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
    "weight_decay_end": (lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
    "clip_grad": (lambda v: v is None or _is_num(v) and v > 0, "a finite number > 0"),
    "drop_last": (lambda v: isinstance(v, bool), "true or false"),
    "lr_schedule": (lambda v: v in LR_SCHEDULES, f"one of {', '.join(LR_SCHEDULES)}"),
    "precision": (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "drop_path": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "label_smoothing": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "mixup_alpha": (lambda v: _is_num(v) and v > 0, "a finite number > 0"),
    "cutmix_alpha": (lambda v: _is_num(v) and v > 0, "a finite number > 0"),
    "cutmix_beta": (lambda v: _is_num(v) and v > 0, "a finite number > 0"),
    "parts": whole(1),
    "mix_parts": whole(1),
    "eval_resize": (lambda v: _is_num(v) and 1 <= v <= 8, "a number from 1 to 8"),  # resize 256 -> crop 224: 1.14
    "teacher_temp": (lambda v: _is_num(v) and v > 0, "a finite number > 0"),
    "warmup_teacher_temp": (lambda v: _is_num(v) and v > 0, "a finite number > 0"),
    "warmup_teacher_temp_frac": (_unit, "a fraction of the training in [0, 1]"),
    "freeze_last_layer": (lambda v: _is_num(v) and v >= 0, "a number of epochs >= 0"),
    "temperature": (lambda v: _is_num(v) and v > 0, "a finite number > 0"),
    "momentum": (_unit, "a number in [0, 1]"),
    "center_momentum": (_unit, "a number in [0, 1]"),
    "count": whole(1),
    "size": whole(1, none=True),
    "scale": (lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_num, v)) and 0 < v[0] <= v[1] <= 1,
              "[low, high] with 0 < low <= high <= 1"),
    "blur_sigma": (lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_num, v)) and 0 < v[0] <= v[1],
                   "[low, high] with 0 < low <= high"),
    "jitter": (lambda v: isinstance(v, list) and len(v) == 4 and all(_is_num(x) and x >= 0 for x in v),
               "four numbers >= 0 (brightness, contrast, saturation, hue)"),
    "magnitude": (lambda v: isinstance(v, list) and len(v) == 2 and all(map(is_int, v)) and 1 <= v[0] <= v[1] <= 9,
                  "[low, high], whole numbers with 1 <= low <= high <= 9"),
    "ops": (lambda v: is_int(v) and 0 <= v <= 16, "a whole number from 0 to 16"),  # the reference applies 2
    "crops": (lambda v: isinstance(v, list) and v and all(isinstance(g, dict) for g in v),
              "a list of crop groups ({count, size, scale})"),
    "datasets": (lambda v: v is None or _names(v) or isinstance(v, dict) and all(map(_names, v.values())),
                 "a list of dataset names, or a map of table -> list of dataset names (none empty)"),
    "pretrain_data": (lambda v: isinstance(v, dict) and all(x is None or isinstance(x, str) for x in v.values()),
                      "a map of a row's pretraining set -> dataset name"),
    "stream": (lambda v: isinstance(v, bool) or v == "auto", "true, false or auto"),  # not 1: 1 == True
    "memory_gb": (lambda v: _is_num(v) and v > 0, "a finite number > 0"),
    # processes started by every job that streams: a slip of the finger (1000) would start a thousand
    "workers": (lambda v: v is None or is_int(v) and 0 <= v <= 128, "null or a whole number from 0 to 128"),
    "decode": (lambda v: v in ("auto", "pil", "device"), "auto, pil or device"),
    **{k: (_unit, "a probability in [0, 1]") for k in ("flip", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "p")},
    "hidden_dim": (whole(1, none=True)[0], "null (the encoder's width) or a whole number >= 1"),
    **{k: whole(1) for k in ("out_dim", "bottleneck_dim", "queue", "global_crops")},
    **{k: (lambda v: isinstance(v, dict), "a group of settings")
       for k in ("pretrain", "finetune", "backbones", "methods", "stages", "mixing", "views", "kwargs",
                 "randaugment", "data")},
}


# groups that are read key by key (a missing key would be a KeyError in the middle of planning or training):
# kind -> (keys it must have, other keys it may have; None: any, such as a new backbone's own settings)
_SHAPES = {
    "crop group": (("count", "size", "scale"), VIEW_KEYS[1:]),  # a group may override its views' strengths
    "backbone": (("lr", "warmup_epochs", "kwargs"), None),
    "fine-tuning stage": (("batch_size", "lr", "warmup_epochs"), ()),
    "mixing group": (("mixup_alpha", "cutmix_alpha", "parts"), ("schedule",)),
    "method": ((), None),
}


_MIXING_AT = ("finetune", "methods.supervised")  # where bench.finetune reads a mixing group; a new method's is its own


def _shape(where, k):
    """Which of _SHAPES the setting `k` under `where` is, if any."""
    if where.endswith(".crops") and is_int(k):
        return "crop group"
    if k == "mixing" and where in _MIXING_AT:
        return "mixing group"
    return {"backbones": "backbone", "finetune.stages": "fine-tuning stage", "methods": "method"}.get(where)


_SET_BY_BENCH = {"img_size": "pretrain.resolution and finetune.resolution", "num_classes": "the dataset",
                 "drop_path_rate": "pretrain.drop_path and finetune.drop_path", "pretrained": "--init-weights"}


def _check_shape(kind, v, origin, here):
    need, may = _SHAPES[kind]
    if not isinstance(v, dict):
        raise UserError(f"{origin}: {here}: expected a {kind} (a map of {', '.join(need) or 'its settings'}), "
                        f"got {v!r}")
    missing = [k for k in need if k not in v]
    unknown = [k for k in v if k not in need and may is not None and k not in may]
    if missing or unknown:
        what = f"no {', '.join(missing)}" if missing else f"unknown setting '{unknown[0]}'"
        raise UserError(f"{origin}: {here}: {what} (a {kind} has {', '.join(need)}"
                        + (f"; it may have {', '.join(may)})" if may else ")"))
    if kind == "backbone":
        name = here.split(".", 1)[1]
        if not timm.is_model(name):  # a misspelt name would otherwise be a backbone no row uses, silently
            close = difflib.get_close_matches(name, timm.list_models(), n=1)
            raise UserError(f"{origin}: {here}: timm has no model '{name}'" + (f" (did you mean {close[0]}?)"
                                                                                 if close else ""))
        taken = [k for k in v["kwargs"] if k in _SET_BY_BENCH] if isinstance(v["kwargs"], dict) else []
        if taken:
            raise UserError(f"{origin}: {here}.kwargs.{taken[0]}: set by bench ({_SET_BY_BENCH[taken[0]]})")


def check_values(preset, origin, node=None, where=""):
    """Types and ranges of every setting the rules name; the first bad one is one line naming `origin`."""
    node = preset if node is None else node
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for k, v in items:
        here = f"{where}.{k}".lstrip(".") if isinstance(node, dict) else f"{where}[{k}]"
        if is_int(v) and not -2 ** 31 < v < 2 ** 31:  # counts, sizes and seeds; torch's are 32 or 64 bits
            raise UserError(f"{origin}: {here}: expected a whole number of magnitude below 2**31, got a larger one")
        kind = _shape(where, k)
        if kind:
            _check_shape(kind, v, origin, here)
        rule = _RULES.get(k) if isinstance(k, str) else None
        if k == "resolution" and where == "finetune":
            rule = (lambda r: isinstance(r, dict) and all(is_int(x) and x >= 1 for x in r.values()),
                    "a map of table resolution -> trained resolution")
        elif k == "resolution":
            rule = whole(1)
        elif k == "crops" and where in {f"{m}.views" for m in _MIXING_AT}:  # Classifier.loss takes views[0]
            rule = (lambda v: isinstance(v, list) and len(v) == 1 and isinstance(v[0], dict) and v[0].get("count") == 1,
                    "one crop group of count 1 (a supervised stage trains on one crop of each image)")
        elif k == "schedule" and where in {f"{m}.mixing" for m in _MIXING_AT}:
            rule = (lambda v: v == "mixup_even_cutmix_odd", "mixup_even_cutmix_odd (the one bench.finetune has)")
        if rule and not rule[0](v):
            raise UserError(f"{origin}: {here}: expected {rule[1]}, got {v!r}")
        if where == "" and k in ("pretrain_data", "finetune") and isinstance(v, dict):
            _check_map_keys(preset, origin, k)
        if k != "kwargs" and isinstance(v, (dict, list)):
            check_values(preset, origin, v, here)


def _check_map_keys(preset, origin, top):
    """The maps a user adds entries to (`_open`) take only keys something reads: finetune.resolution a stage's
    resolution, pretrain_data a pretraining set a table's row names; any other key would change nothing."""
    if top == "finetune":
        name, what = "finetune.resolution", "a fine-tuning stage's resolution"
        keys, known = preset["finetune"].get("resolution"), list(preset["finetune"].get("stages") or {})
    else:
        name, what, keys = "pretrain_data", "a pretraining set a table's row names", preset["pretrain_data"]
        known = sorted({r["pretrain_data"] for t in load_tables().values() for r in t.get("rows") or []
                        if isinstance(r, dict) and r.get("pretrain_data")})
    for key in keys if isinstance(keys, dict) else ():
        if key not in known:  # (a resolution typed as text, '224', is not the stage 224: shown quoted)
            shown = repr(key) if isinstance(key, str) and top == "finetune" else key
            raise UserError(f"{origin}: {name}.{shown}: not {what} ({', '.join(map(str, known)) or 'none'}), so it "
                            f"would change nothing")


def _open(where, key):
    """Where a user may add entries: backbones, methods, renames, a method's own optimiser settings, kwargs."""
    return (where in ("backbones", "methods", "pretrain_data", "finetune.resolution")
            or where.endswith((".pretrain", ".kwargs"))
            or (where.startswith("methods.") and where.count(".") == 1 and key == "pretrain"))


def _scalar(text, origin):
    """A YAML value, with 3e-3 read as a number (YAML 1.1 wants 3.0e-3)."""
    value = load_yaml(text, origin, _Loader)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _key(node, k):
    """YAML reads a key of digits as a number (finetune.stages' 224, 448); `--set` gives strings."""
    return int(k) if k.isascii() and k.isdigit() else k


def _pick(value, fallback):
    return fallback if value is None else value


def _choice(key, value, valid):
    if value not in valid:
        raise UserError(f"{key}: '{value}' is not one of {', '.join(valid)}")
    return value


def _crops_label(views):
    return "+".join(f"{c['count']}x{c['size']}" for c in views["crops"])


def _split(spec):
    """The registered split sizes go into the hash: a redefined split must not reuse old results."""
    d = datasets.DATASETS.get(spec)
    return f"{d.train}/{d.test}" if d else None


def _pretrain_config(row, preset, data, seed):
    bb = preset["backbones"][row["backbone"]]
    method_cfg = copy.deepcopy(preset["methods"].get(row["method"], {}))
    pre = {**preset["pretrain"], **method_cfg.pop("pretrain", {})}  # a method's own optimiser settings win
    extra = {k: pre[k] for k in ("weight_decay_end", "clip_grad", "drop_last") if k in pre}
    if _pick(pre["epochs"], row.get("pretrain_epochs")) is None:
        raise UserError(f"table row {row['id']} has no pretrain_epochs, and preset '{preset['name']}' leaves "
                        f"pretrain.epochs to the row")
    if not (method_cfg.get("views") or {}).get("crops"):  # the engine's views come from here alone
        raise UserError(f"methods.{row['method']}: no views with crops in preset '{preset['name']}': a pretraining "
                        f"method's settings hold its crops (as methods.idmm.views in bench/presets/paper.yaml)")
    _size_crops(method_cfg["views"], pre["resolution"])
    for key, valid in getattr(METHODS[row["method"]], "choices", {}).items():
        _choice(f"methods.{row['method']}.{key}", method_cfg.get(key), valid)
    wrong = getattr(METHODS[row["method"]], "check", lambda cfg: None)(method_cfg)  # a method's own cross-checks
    if wrong:
        raise UserError(f"methods.{row['method']}: {wrong}")
    return {**extra,
        "stage": "pretrain", "method": row["method"], "backbone": row["backbone"], "model_kwargs": bb["kwargs"],
        "data": data, "split": _split(data), "resolution": pre["resolution"],
        "epochs": _pick(pre["epochs"], row.get("pretrain_epochs")), "batch_size": pre["batch_size"],
        "lr": _pick(pre["lr"], bb["lr"]), "warmup_epochs": _pick(pre["warmup_epochs"], bb["warmup_epochs"]),
        "weight_decay": pre["weight_decay"], "drop_path": pre["drop_path"], "max_side": pre["max_side"],
        "lr_schedule": _choice("pretrain.lr_schedule", pre["lr_schedule"], LR_SCHEDULES),
        "precision": _choice("pretrain.precision", pre["precision"], PRECISIONS),
        "method_cfg": method_cfg, "seed": seed,
    }


def _size_crops(views, resolution):
    """A crop group's size null is the stage's resolution, in a pretraining method's views as in fine-tuning's."""
    for c in views["crops"]:
        c["size"] = _pick(c["size"], resolution)
    return views


def _finetune_config(row, preset, data, stage, init, seed):
    bb = preset["backbones"][row["backbone"]]
    ft = preset["finetune"]
    if stage["res"] not in ft["stages"]:
        raise UserError(f"table row {row['id']}: a fine-tuning stage at {stage['res']} px, and preset "
                        f"'{preset['name']}' has no finetune.stages.{stage['res']} (it has "
                        f"{', '.join(map(str, ft['stages']))})")
    st = ft["stages"][stage["res"]]
    res = ft["resolution"].get(stage["res"], stage["res"])
    views = _size_crops(copy.deepcopy(ft["views"]), res)
    return {
        "stage": "finetune", "backbone": row["backbone"], "model_kwargs": bb["kwargs"], "data": data,
        "split": _split(data),
        "resolution": res, "epochs": _pick(ft["epochs"], stage["epochs"]), "batch_size": st["batch_size"],
        "lr": _pick(st["lr"], bb["lr"]), "warmup_epochs": _pick(st["warmup_epochs"], bb["warmup_epochs"]),
        "weight_decay": ft["weight_decay"], "drop_path": ft["drop_path"], "max_side": ft["max_side"],
        "lr_schedule": _choice("finetune.lr_schedule", ft["lr_schedule"], LR_SCHEDULES),
        "precision": _choice("finetune.precision", ft["precision"], PRECISIONS),
        "label_smoothing": ft["label_smoothing"], "mixing": ft["mixing"], "views": views,
        "eval_resize": ft["eval_resize"], "init": init, "seed": seed,
    }


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _imagenet_init(backbone, preset, init_weights):
    """(init label for the hash, weights file or None, skip reason or None) of an "IN super." row."""
    if backbone in init_weights:
        if init_weights[backbone].startswith("file:"):  # already digested (the report re-planning a record)
            return init_weights[backbone], None, None
        path = Path(init_weights[backbone]).expanduser()
        if not path.is_file():
            raise UserError(f"--init-weights: {path} is not a file")
        return f"file:{file_digest(path)}", str(path), None
    if preset["methods"].get("in_supervised", {}).get("weights") != "timm":
        return None, None, f"preset '{preset['name']}' uses no ImageNet weights: pass --init-weights {backbone}=FILE"
    why = models.imagenet_weights_missing(backbone)
    return (None, None, why) if why else (f"timm:{backbone}", None, None)


def parse_init_weights(items, backbones, known):
    """`--init-weights [BACKBONE=]FILE ...` -> {backbone: file}; a bare FILE needs exactly one of `backbones`
    (those chosen to run), a named one must be one of `known` (every backbone of the table's "IN super." rows)."""
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if sep and name not in known and ("/" in name or Path(item).exists()):  # a file whose path holds '='
            name, sep, path = "", "", item
        digest = path.startswith("file:")  # the report re-planning its records
        if not known and not digest:
            raise UserError(f"--init-weights {item}: this table has no 'IN super.' rows, the only ones it is for")
        if not sep:
            if len(backbones) != 1:
                raise UserError(f"--init-weights {item}: say which backbone it is for, "
                                f"as BACKBONE=FILE ({', '.join(sorted(backbones))})")
            name, path = next(iter(backbones)), item
        if name not in known and not digest:
            raise UserError(f"--init-weights {item}: no 'IN super.' row of this table has backbone '{name}' "
                            f"(choose from {', '.join(sorted(known))})")
        same = lambda a, b: Path(a).expanduser().resolve() == Path(b).expanduser().resolve()  # noqa: E731
        if not digest and name in out and not same(out[name], path):
            raise UserError(f"--init-weights: two files for {name}: {out[name]} and {path}; give one")
        out[name] = path  # (the report re-plans with one digest a backbone: the newest file's records)
    return out


def columns(spec: dict, preset: dict) -> list:
    """The table's dataset columns under a preset: its `datasets` list, or its list for this table, or the
    table's own."""
    chosen = preset.get("datasets")
    if isinstance(chosen, dict):
        chosen = chosen.get(spec["name"])
    return list(chosen or spec["columns"])


def _check_choice(kind, given, valid, extra=""):
    bad = [g for g in given if g not in valid]
    if bad:
        raise UserError(f"unknown {kind} '{bad[0]}' for this table: choose from {', '.join(valid)}{extra}")


def plan(table_name, preset, methods=None, datasets_=None, backbones=None, seeds=(0,), init_weights=()):
    """Every job the table needs under `preset`, parents before children, deduplicated by hash."""
    spec = table(table_name)
    rows = spec["rows"]
    in_rows = {r["backbone"] for r in rows if r["method"] == "in_supervised"}
    # a weights file for a backbone that --backbones leaves out is unused, not a mistake
    init_weights = parse_init_weights(init_weights, {b for b in in_rows if not backbones or b in backbones}, in_rows)
    for kind, given, known in (("method", methods, METHODS.__contains__), ("backbone", backbones, timm.is_model)):
        in_table = sorted({r[kind] for r in rows})
        new = [g for g in given or [] if g not in in_table and known(g)]
        hint = (f" ('{new[0]}' has no row in this table: give it rows in {user_tables_file()}, as bench/tables.yaml "
                f"has them)") if new else ""
        _check_choice(kind, given or [], in_table, hint)
    cols = columns(spec, preset)
    by_preset = cols != list(spec["columns"])  # which file to name when one is unknown
    for c in [] if datasets_ else cols:
        if not c.startswith("folder:"):
            try:
                datasets.info(c)
            except UserError as e:  # else every cell is skipped as a pretraining set not defined, and exit 0
                raise UserError((f"preset {preset['name']}: datasets.{table_name}" if by_preset else
                                 f"table {table_name} ({user_tables_file()}): columns") + f": {e}") from None
    if datasets_:
        for d in datasets_:
            if not d.startswith("folder:"):
                datasets.info(d)  # names the valid choices when unknown
        cols = list(datasets_)
    cols = list(dict.fromkeys(datasets.canonical(c) for c in cols))  # folder:x and folder:./x/ are one column
    for name, target in preset["pretrain_data"].items():  # a misspelt one would skip its rows' cells, and exit 0
        if target and not target.startswith("folder:"):
            try:
                datasets.info(target)
            except UserError as e:
                raise UserError(f"preset {preset['name']}: pretrain_data.{name}: {e}") from None
    chosen = [r for r in rows if not (methods and r["method"] not in methods or backbones and r["backbone"]
                                      not in backbones)]
    if not chosen:  # else "all 0 jobs are done" and exit 0
        asked = " and ".join(f"{k} {' or '.join(v)}" for k, v in (("method", methods), ("backbone", backbones)) if v)
        raise UserError(f"no row of the {table_name} table has {asked}" if rows else f"the {table_name} table has no "
                        f"rows (give it rows in {user_tables_file()}, as bench/tables.yaml has them)")
    jobs: dict[str, Job] = {}

    def add(config, parent, skip):
        h = config_hash(config)
        return jobs.setdefault(h, Job(h, config, parent, [], skip, row["method"]))

    for row in chosen:
        method = METHODS.get(row["method"])
        skip = None if method else f"method '{row['method']}' is not implemented yet"
        if not timm.is_model(row["backbone"]):
            skip = skip or f"backbone {row['backbone']} is not in this version of bench"
        if row["backbone"] not in preset["backbones"]:
            skip = skip or f"preset '{preset['name']}' has no settings for backbone {row['backbone']}"
        if method and method.pretrains and row["method"] not in preset["methods"]:
            skip = skip or (f"preset '{preset['name']}' has no settings for method {row['method']} "
                            f"(methods.{row['method']})")
        init, init_path = "random", None
        if skip is None and getattr(method, "imagenet_init", False):
            init, init_path, skip = _imagenet_init(row["backbone"], preset, init_weights)
        for col in cols:
            for seed in seeds:
                parent = None
                if skip is None and method.pretrains:
                    pdata = row.get("pretrain_data")
                    pdata = datasets.canonical(preset["pretrain_data"].get(pdata, pdata) or col)
                    pskip = None
                    if not (pdata.startswith("folder:") or pdata in datasets.DATASETS
                            or pdata in datasets.user_datasets()):
                        pskip = f"pretraining set '{pdata}' is not defined"
                    parent = add(_pretrain_config(row, preset, pdata, seed), None, pskip)
                job_skip = skip or (parent.skip if parent else None)
                if job_skip:  # a placeholder so the dry-run and the report can say why the cell is empty
                    job = add({"stage": "skipped", "table": table_name, "row": row["id"], "data": col,
                               "seed": seed}, None, job_skip)
                else:
                    for stage in row.get("finetune", spec["finetune"]):
                        job = add(_finetune_config(row, preset, col, stage, parent.hash if parent else init,
                                                   seed), parent.hash if parent else None, None)
                        if parent is None:
                            job.init_path = init_path
                        parent = job
                job.cells.append((table_name, row["id"], col))
    return list(jobs.values())


def check_models(jobs):
    """Each backbone as the jobs will build it (the preset's kwargs, at each resolution), built once on the meta
    device, which allocates and computes nothing, and run there on each size of crop its job's views make:
    kwargs timm cannot take, or a shape that does not fit, fail here in one line rather than in every job,
    perhaps after hours in a SLURM queue."""
    import warnings

    import torch

    seen = set()
    for job in jobs:
        c = job.config
        if job.skip or c["stage"] not in ("pretrain", "finetune"):
            continue
        res, views = c["resolution"], c["views"] if c["stage"] == "finetune" else c["method_cfg"]["views"]
        crops = sorted({x["size"] for x in views["crops"]} - {res})  # every size is set by now (_size_crops)
        key = (c["backbone"], res, json.dumps(c["model_kwargs"], sort_keys=True), tuple(crops))
        if key in seen:
            continue
        seen.add(key)
        where = f"backbones.{c['backbone']}.kwargs {c['model_kwargs'] or {}}: cannot build or run it at {res} px"
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the error, not what torch warned on the way, is the one line
                model = models.create(c["backbone"], res, 2, c["drop_path"], c["model_kwargs"])
                for size in [res, *crops]:
                    if size != res:
                        where = (f"{'finetune' if c['stage'] == 'finetune' else 'methods.' + job.method}.views: "
                                 f"crops of {size} px, but {c['stage']}.resolution builds {c['backbone']} for {res} px")
                    model(torch.empty(2, 3, size, size))
                _whole_patches(model, [res, *crops], c)  # (what runs, but not on the whole image)
        except UserError:
            raise
        except Exception as e:  # timm's own checks: TypeError, AssertionError, ZeroDivisionError, RuntimeError
            raise UserError(f"{where}: {_said(e)}") from None
    _check_init_files(jobs)


def _whole_patches(model, sizes, c):
    """A ViT's patch projection is a strided convolution: the pixels past the last whole patch of a side are
    dropped without a word (120 px in 16-px patches trains on 112)."""
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        p = model.patch_embed.patch_size[0]
        for size in sizes:
            if size % p:
                what = "resolution" if size == c["resolution"] else "crops"
                raise UserError(f"{c['stage']} {what} of {size} px for {c['backbone']} (backbones.{c['backbone']}"
                                f".kwargs {c['model_kwargs'] or {}}): not a whole number of its {p}-px patches "
                                f"(the last {size % p} px of each side would be dropped)")


def _said(e):
    """An exception of torch's or timm's in one line: its type and its message's first line."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _check_init_files(jobs):
    """Each --init-weights file read and fitted to its backbone (built on the meta device) now, not when its job
    starts: a file that is not a state dict, or of another width, is one line before any job runs."""
    import torch

    seen = set()
    for job in jobs:
        c = job.config
        key = (job.init_path, c.get("backbone"), json.dumps(c.get("model_kwargs"), sort_keys=True))
        if job.skip or not job.init_path or key in seen:
            continue
        seen.add(key)
        saved = models.read_weights(job.init_path, c["backbone"])
        try:
            with torch.device("meta"):
                model = models.create(c["backbone"], c["resolution"], 2, c["drop_path"], c["model_kwargs"])
            models.fitted(model, saved, c["backbone"])
        except Exception as e:  # a UserError of fitted's, or whatever else the file's tensors make torch raise
            raise UserError(f"--init-weights {job.init_path}: {e if isinstance(e, UserError) else _said(e)}") from None


def chain(job, by_hash):
    """The job and its ancestors, first stage first."""
    stages = []
    while job is not None:
        stages.append(job)
        job = by_hash.get(job.parent)
    return stages[::-1]


def recipe(stages):
    """The derived row fields of one planned chain (pretrain?, finetune, finetune, ...)."""
    ft = [c for c in stages if c["stage"] == "finetune"]
    pre = [c["epochs"] for c in stages if c["stage"] == "pretrain"]
    data = [c["data"] for c in stages if c["stage"] == "pretrain"]
    return {"pretrain_data": data[0] if data else "-", "pretrain_epochs": pre[0] if pre else 0,
            "finetune_res": "→".join(str(c["resolution"]) for c in ft),
            "finetune_epochs": "→".join(str(c["epochs"]) for c in ft)}


def describe(job: Job) -> dict:
    """The resolved recipe of a job as short fields for the dry-run and `bench status`."""
    c = job.config
    if c["stage"] == "skipped":
        return {"stage": "skipped", "row": c["row"], "data": c["data"]}
    out = {"stage": c["stage"], "method": job.method, "backbone": c["backbone"], "data": c["data"],
           "epochs": c["epochs"], "res": c["resolution"], "batch": c["batch_size"], "lr": c["lr"],
           "warmup": c["warmup_epochs"], "wd": c["weight_decay"], "drop_path": c["drop_path"],
           "sched": c["lr_schedule"], "precision": c["precision"], "max_side": c["max_side"]}
    if c["stage"] == "pretrain":
        mc = c["method_cfg"]
        if "views" in mc:
            out["crops"] = _crops_label(mc["views"])
        for k, short in (("label_smoothing", "ls"), ("cutmix_beta", "cutmix"), ("mix_parts", "mix_parts"),
                         ("export", "export")):
            if k in mc:
                out[short] = mc[k]
    else:
        out["crops"] = _crops_label(c["views"])
        m = c["mixing"]
        out["mixing"] = f"mixup{m['mixup_alpha']}-even/cutmix{m['cutmix_alpha']}-odd/{m['parts']}parts"
        ra = c["views"].get("randaugment")
        if ra:  # a partial map: the rest as the job's views take it, from randaugment's defaults
            ra = {**{k: p.default for k, p in inspect.signature(randaugment).parameters.items() if k != "x"}, **ra}
            out["randaug"] = f"{ra['ops']}ops-p{ra['p']}-m{ra['magnitude'][0]}-{ra['magnitude'][1]}"
        out["ls"] = c["label_smoothing"]
        out["init"] = c["init"][:10]
    out["seed"] = c["seed"]
    return out
