import json

import pytest

from bench import plan as planner
from bench.errors import UserError
from bench.results import Store
from conftest import in_process


def test_config_hash_is_stable_and_key_order_free():
    # a literal: if this changes, every stored result silently stops matching its job
    assert planner.config_hash({"a": 1, "b": [1, 2], "c": {"d": 0.5}}) == "052908e35693c377"
    assert planner.config_hash({"c": {"d": 0.5}, "b": [1, 2], "a": 1}) == planner.config_hash(
        {"a": 1, "b": [1, 2], "c": {"d": 0.5}})


def test_plan_is_deterministic_and_chains_parents():
    preset = planner.load_preset("demo")
    a = planner.plan("comparison", preset, methods=["idmm", "random"])
    b = planner.plan("comparison", planner.load_preset("demo"), methods=["random", "idmm"])
    assert [j.hash for j in a] == [j.hash for j in b]
    pre = next(j for j in a if j.config["stage"] == "pretrain")
    fine = next(j for j in a if j.parent == pre.hash)
    assert fine.config["init"] == pre.hash and fine.cells == [("comparison", "deit_tiny/idmm", "digits")]
    assert [j.hash for j in a].index(pre.hash) < [j.hash for j in a].index(fine.hash)


def test_a_recipe_change_changes_the_job_and_its_children_only():
    base = {j.cells[0][1] if j.cells else "pre": j.hash
            for j in planner.plan("comparison", planner.load_preset("demo"), methods=["idmm", "random"])}
    changed = {j.cells[0][1] if j.cells else "pre": j.hash
               for j in planner.plan("comparison", planner.load_preset("demo", ["methods.idmm.label_smoothing=0"]),
                                     methods=["idmm", "random"])}
    assert base["pre"] != changed["pre"] and base["deit_tiny/idmm"] != changed["deit_tiny/idmm"]
    assert base["deit_tiny/random"] == changed["deit_tiny/random"]


def test_seeds_multiply_jobs_and_unknown_names_are_user_errors():
    jobs = planner.plan("comparison", planner.load_preset("demo"), methods=["idmm"], seeds=[0, 1, 2])
    assert len(jobs) == 6 and len({j.hash for j in jobs}) == 6
    with pytest.raises(UserError, match="choose from"):
        planner.plan("comparison", planner.load_preset("demo"), methods=["nope"])
    with pytest.raises(UserError, match="unknown table 'nope'"):
        planner.table("nope")
    with pytest.raises(UserError, match="^--preset nope: no such preset: choose from demo, paper"):
        planner.load_preset("nope")
    with pytest.raises(UserError, match="^--preset /nowhere/mine.yaml: no such file$"):
        planner.load_preset("/nowhere/mine.yaml")
    with pytest.raises(UserError, match="^--preset /tmp: a folder, not a preset file$"):  # it said: no such file
        planner.load_preset("/tmp")


def test_paper_preset_resolves_the_authors_recipe():
    jobs = planner.plan("comparison", planner.load_preset("paper"), methods=["idmm"])
    pre = [j for j in jobs if j.config["stage"] == "pretrain"]
    assert {j.config["data"] for j in pre} == {"flowers102", "pets", "dtd", "indoor67", "cub200", "aircraft", "cars"}
    c = pre[0].config
    assert (c["epochs"], c["batch_size"], c["resolution"], c["lr"], c["warmup_epochs"]) == (800, 256, 112, 5e-4, 2)
    assert planner.describe(pre[0])["crops"] == "2x112+4x112"
    assert c["method_cfg"]["views"]["crops"][1]["scale"] == [0.05, 0.4]


def test_store_round_trip_leaves_only_the_record(tmp_path):  # atomic on a full disk: test_reliability
    store = Store(tmp_path)
    assert store.get("abc") is None and store.state("abc") == "pending"
    rec = {"hash": "abc", "status": "done", "stage": "pretrain", "seed": 0, "preset": "demo", "cells": [],
           "metrics": {}, "config": {"data": "digits"}, "hardware": {"cpus": 2}}
    store.put(rec)
    assert store.get("abc") == rec and store.state("abc") == "done"
    assert [p.name for p in tmp_path.iterdir()] == ["abc.json"]  # no temporary file left behind
    assert json.loads((tmp_path / "abc.json").read_text()) == rec
    store.run_dir("def").mkdir(parents=True)
    (store.run_dir("def") / "checkpoint.pt").write_bytes(b"x")
    assert store.state("def") == "partial"


@pytest.mark.parametrize("table", ["comparison", "transfer", "sota", "imagenet"])
@pytest.mark.parametrize("preset", ["paper", "demo"])
def test_every_table_plans_and_describes_under_every_preset(table, preset):
    spec = planner.table(table)
    jobs = planner.plan(table, planner.load_preset(preset))
    cells = {c for j in jobs for c in j.cells}
    cols = planner.columns(spec, planner.load_preset(preset))
    assert cells == {(table, r["id"], c) for r in spec["rows"] for c in cols}  # every cell is accounted for
    for j in jobs:
        assert planner.describe(j)["stage"] in ("pretrain", "finetune", "skipped")
    for r in spec["rows"]:
        assert len(r["paper"]) == len(spec["columns"])


def _cell_chain(table, row_id, column, methods, backbones):
    jobs = planner.plan(table, planner.load_preset("paper"), methods=methods, datasets_=[column], backbones=backbones)
    by_hash = {j.hash: j for j in jobs}
    final = next(j for j in jobs if (table, row_id, column) in j.cells)
    return [j.config for j in planner.chain(final, by_hash)]


def test_paper_sota_idmm_cell_is_the_authors_224_to_448_recipe():
    pre, ft224, ft448 = _cell_chain("sota", "deit_tiny/idmm", "flowers102", ["idmm"], ["deit_tiny_patch16_224"])
    assert (pre["stage"], pre["epochs"], pre["batch_size"], pre["resolution"], pre["lr"], pre["warmup_epochs"],
            pre["weight_decay"], pre["drop_path"]) == ("pretrain", 800, 256, 112, 5e-4, 2, 1e-3, 0.1)
    assert pre["method_cfg"]["label_smoothing"] == 0.1 and pre["method_cfg"]["cutmix_beta"] == 0.5
    assert (ft224["resolution"], ft224["epochs"], ft224["batch_size"], ft224["lr"], ft224["warmup_epochs"]) == (
        224, 800, 256, 5e-4, 2)
    assert (ft448["resolution"], ft448["epochs"], ft448["batch_size"], ft448["lr"]) == (448, 100, 128, 5e-5)
    for ft in (ft224, ft448):
        assert ft["label_smoothing"] == 0.1 and ft["drop_path"] == 0.1 and ft["weight_decay"] == 1e-3
        assert ft["mixing"] == {"mixup_alpha": 0.5, "cutmix_alpha": 0.5, "schedule": "mixup_even_cutmix_odd",
                                "parts": 4}
        assert ft["views"]["crops"] == [{"count": 1, "size": ft["resolution"], "scale": [0.08, 1.0]}]
        assert ft["views"]["jitter"] == [0.4, 0.4, 0.4, 0.1] and ft["views"]["jitter_p"] == 0.4
        assert ft["views"]["randaugment"] == {"ops": 2, "p": 0.5, "magnitude": [1, 9]}
        assert round(ft["resolution"] * ft["eval_resize"]) == {224: 256, 448: 512}[ft["resolution"]]
    assert ft224["init"] == planner.config_hash(pre) and ft448["init"] == planner.config_hash(ft224)


def test_paper_pvt_and_t2t_cells_use_their_own_lr_and_warmup():
    (ft,) = _cell_chain("sota", "pvt_v2_b0/random", "cub200", ["random"], ["pvt_v2_b0"])
    assert (ft["lr"], ft["warmup_epochs"], ft["epochs"], ft["init"]) == (1e-3, 10, 800, "random")
    pre, ft224, ft448 = _cell_chain("sota", "t2t_vit_7/idmm", "cars", ["idmm"], ["t2t_vit_7"])
    assert (pre["lr"], pre["warmup_epochs"], ft224["lr"], ft224["warmup_epochs"], ft448["lr"]) == (
        1e-3, 10, 1e-3, 10, 5e-5)
    (ft,) = _cell_chain("sota", "deit_base/random", "dtd", ["random"], ["deit_base_patch16_224"])
    assert (ft["resolution"], ft["epochs"], ft["lr"]) == (224, 800, 5e-4)


def test_set_rejects_a_setting_the_preset_does_not_have_and_user_presets_load_by_path(tmp_path):
    with pytest.raises(UserError, match="no setting 'pretrain.epoch'"):
        planner.load_preset("demo", ["pretrain.epoch=2"])
    assert planner.load_preset("demo", ["finetune.stages.224.batch_size=8"])["finetune"]["stages"][224]["batch_size"] == 8
    assert planner.load_preset("demo", ["methods.idmm.pretrain.lr=1e-2"])["methods"]["idmm"]["pretrain"]["lr"] == 0.01
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: demo\npretrain: {epochs: 3}\n")
    preset = planner.load_preset(str(mine))
    assert preset["pretrain"]["epochs"] == 3 and preset["name"] == str(mine.resolve())
    assert planner.load_preset(preset["name"])["pretrain"]["resolution"] == 16  # the report re-loads it by name


@pytest.mark.parametrize("content", ["", "pretrain: {epochs: 1}\n"])
def test_a_preset_file_without_base_is_the_paper_preset_and_its_changes(tmp_path, content):
    mine = tmp_path / "mine.yaml"
    mine.write_text(content)
    preset, paper = planner.load_preset(str(mine)), planner.load_preset("paper")
    assert preset["pretrain"]["epochs"] == (1 if content else None)
    assert {**preset, "name": "", "pretrain": {}} == {**paper, "name": "", "pretrain": {}}
    jobs = planner.plan("comparison", preset, methods=["idmm"], datasets_=["flowers102"])
    assert [j.config["epochs"] for j in jobs if j.config["stage"] == "pretrain"] == [1 if content else 800]


def _refused(item):
    with pytest.raises(UserError) as e:
        planner.load_preset("demo", [item])
    msg = str(e.value)
    assert msg.startswith(f"--set {item}: ") and "\n" not in msg
    return msg


@pytest.mark.parametrize("item,words", [
    ("pretrain.epochs=", ["no value after '='"]),  # null would leave it to the table: 800 epochs
    ("pretrain.epoch=2", ["no setting 'pretrain.epoch'", "known under pretrain: epochs, batch_size"]),
    ("finetune.lr=1", ["backbones.NAME.lr"]),
    ("pretrain.precision=fp8", ["pretrain.precision: expected one of bf16, fp32, got 'fp8'"]),
    ("methods.dino.pretrain.lr_schedule=x", ["methods.dino.pretrain.lr_schedule: expected one of cosine, official"]),
    # settings under a name no method has: accepted, and IDMM trained with its label smoothing unchanged
    ("methods.idmmm={label_smoothing: 0}", ["methods.idmmm: no method of that name (did you mean idmm?)"]),
    ("methods.idmmm.label_smoothing=0", ["methods.idmmm: no method of that name (did you mean idmm?)"]),
    # a process each (a thousand of them started by every streaming job), an op each per image and step
    ("data.workers=1000", ["data.workers: expected null or a whole number from 0 to 128, got 1000"]),
    ("finetune.views.randaugment.ops=100000", ["a whole number from 0 to 16, got 100000"]),
    # DINO's own settings passed the dry run, then failed the job (or trained a nonsense recipe to "done")
    ("methods.dino.freeze_last_layer=abc", ["methods.dino.freeze_last_layer: expected a number of epochs >= 0"]),
    ("methods.dino.teacher_temp=-1", ["methods.dino.teacher_temp: expected a finite number > 0, got -1"]),
    ("methods.dino.warmup_teacher_temp_frac=5", ["expected a fraction of the training in [0, 1], got 5"]),
    ("finetune.eval_resize=1e308", ["finetune.eval_resize: expected a number from 1 to 8"]),
])
def test_a_set_item_that_would_change_nothing_or_fail_later_is_refused_by_name(item, words):
    msg = _refused(item)
    for w in words:
        assert w in msg


def test_dino_s_global_crops_must_be_the_first_crop_groups_a_crop_each():
    for n in (5, 3):  # 3 groups; the third holds 2 local crops
        with pytest.raises(UserError, match=rf"^methods.dino: global_crops is {n}: the first {n} crop groups must"):
            planner.plan("comparison", planner.load_preset("demo", [f"methods.dino.global_crops={n}"]), ["dino"])
    planner.plan("comparison", planner.load_preset("demo", ["methods.dino.global_crops=1"]), ["dino"])


def test_a_dataset_the_preset_names_is_checked_like_one_on_the_command_line():
    with pytest.raises(UserError, match=r"^preset demo: datasets.comparison: unknown dataset 'foo'"):
        planner.plan("comparison", planner.load_preset("demo", ["datasets.comparison=[foo]"]), ["idmm"])


@pytest.mark.parametrize("value", ["[1", "@x", "!!python/object:os.system x", "9" * 5000, "!!int x",
                                   "!!timestamp x", "!!bool x", "[" * 1000],
                         ids=["unclosed", "bad-token", "python-tag", "5000-digits", "bad-int", "bad-timestamp",
                              "bad-bool", "deep"])
def test_a_set_value_yaml_cannot_read_is_one_line(value):
    assert "not valid YAML" in _refused(f"pretrain.epochs={value}")


@pytest.mark.parametrize("item,words", [
    ("finetune.views.crops=[{count: 1}]", ["finetune.views.crops[0]: no size, scale"]),
    ("methods.idmm.views.crops=[{count: 2, scale: [0.1, 1]}]", ["methods.idmm.views.crops[0]: no size"]),
    ("finetune.views.crops=[{count: 1, size: null, scale: [0.1, 1], bogus: 3}]",
     ["finetune.views.crops[0]: unknown setting 'bogus'", "solarize_p"]),
    ("backbones.deit_tiny_patch16_224=null", ["backbones.deit_tiny_patch16_224: expected a backbone"]),
    ("backbones.vit_small_patch16_224={}", ["backbones.vit_small_patch16_224: no lr, warmup_epochs, kwargs"]),
    ("finetune.stages.224=null", ["finetune.stages.224: expected a fine-tuning stage (a map of batch_size"]),
    ("finetune.mixing=null", ["finetune.mixing: expected a mixing group (a map of mixup_alpha"]),
    ("methods.idmm=null", ["methods.idmm: expected a method (a map of its settings), got None"]),
    ("finetune.mixing.schedule=nope", ["finetune.mixing.schedule", "mixup_even_cutmix_odd", "'nope'"]),
    ("finetune.epochs=10000000000000", ["finetune.epochs", "2**31"]),
    ("pretrain_data.sin10k=3", ["pretrain_data", "dataset name"]),
])
def test_groups_read_key_by_key_are_checked_inside(item, words):
    msg = _refused(item)
    for w in words:
        assert w in msg


def test_a_preset_file_yaml_cannot_construct_is_named(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: demo\npretrain: {epochs: !!int x}\n")
    with pytest.raises(UserError, match=f"^{mine}: not valid YAML: invalid literal"):
        planner.load_preset(str(mine))


def test_init_weights_name_a_backbone_of_the_tables_in_supervised_rows(tmp_path):
    demo = planner.load_preset("demo")
    with pytest.raises(UserError, match=r"^--init-weights foo=x.pth: .*'foo' \(choose from deit_base"):
        planner.plan("sota", demo, methods=["in_supervised"], init_weights=["foo=x.pth"])
    with pytest.raises(UserError, match="^--init-weights deit_tiny_patch16_224=x.pth: this table has no 'IN super."):
        planner.plan("comparison", demo, init_weights=["deit_tiny_patch16_224=x.pth"])
    # one for a backbone that --backbones leaves out is unused, not a mistake
    planner.plan("sota", demo, methods=["in_supervised"], backbones=["pvt_v2_b0"],
                 init_weights=["deit_tiny_patch16_224=x.pth"])
    # a path may hold '=': named or bare, the file is the whole rest
    weights = tmp_path / "lr=1" / "in1k.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    inits = {j.config["init"] for item in (f"deit_tiny_patch16_224={weights}", str(weights))
             for j in planner.plan("sota", demo, methods=["in_supervised"], backbones=["deit_tiny_patch16_224"],
                                   init_weights=[item])}
    assert len(inits) == 1 and next(iter(inits)).startswith("file:")


def test_init_weights_files_are_checked_against_their_backbone_before_any_job(tmp_path):
    """A file that is no state dict, or one of another width, fails the plan's check in one line (not each job,
    perhaps after hours in a queue); the same backbone given two files is refused rather than the last kept."""
    import timm
    import torch

    demo = planner.load_preset("demo")
    name = "deit_tiny_patch16_224"

    def check(path):
        planner.check_models(planner.plan("sota", demo, methods=["in_supervised"], backbones=[name],
                                          init_weights=[f"{name}={path}"]))

    for width in (64, 32):  # the demo's DeiT-Tiny is 64 wide
        torch.save(timm.create_model(name, img_size=32, patch_size=4, embed_dim=width, depth=4, num_heads=4)
                   .state_dict(), tmp_path / f"w{width}.pth")
    check(tmp_path / "w64.pth")
    with pytest.raises(UserError, match=rf"^--init-weights {tmp_path}/w32.pth: checkpoint of {name} has weights of "
                                        r"other shapes than the model's: \S+ \[.*32.*\] where the model has \[.*64"):
        check(tmp_path / "w32.pth")
    state = torch.load(tmp_path / "w64.pth")  # a distilled DeiT's: two tokens before the grid, no square past one
    state["pos_embed"] = torch.cat([state["pos_embed"], state["pos_embed"][:, :1]], 1)
    torch.save(state, tmp_path / "distilled.pth")
    tokens = state["pos_embed"].shape[1]
    with pytest.raises(UserError, match=rf"^--init-weights {tmp_path}/distilled.pth: .* pos_embed \[1, {tokens}, 64\] where"):
        check(tmp_path / "distilled.pth")
    (tmp_path / "junk.pth").write_bytes(b"weights")
    with pytest.raises(UserError, match=r"^cannot read weights file .*junk.pth: not a file torch.save wrote \(.+\)$"):
        check(tmp_path / "junk.pth")
    # a research script's checkpoint: its arguments beside the weights, read; a file whose unpickling would run
    # a command is refused without running it (it was unpickled whole)
    import argparse
    import os

    torch.save({"model": torch.load(tmp_path / "w64.pth"), "args": argparse.Namespace(lr=5e-4)},
               tmp_path / "with-args.pth")
    check(tmp_path / "with-args.pth")
    ran = tmp_path / "ran"

    class Command:
        def __reduce__(self):
            return os.system, (f"touch {ran}",)

    torch.save({"model": torch.load(tmp_path / "w64.pth"), "hook": Command()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match=r"evil.pth holds Python objects besides weights \((posix|os).system\), "):
        check(tmp_path / "evil.pth")
    assert not ran.exists()
    with pytest.raises(UserError, match=f"^--init-weights: two files for {name}: "):
        planner.plan("sota", demo, methods=["in_supervised"],
                     init_weights=[f"{name}={tmp_path / 'w64.pth'}", f"{name}={tmp_path / 'w32.pth'}"])
    planner.plan("sota", demo, methods=["in_supervised"],  # one file, two spellings
                 init_weights=[f"{name}={tmp_path / 'w64.pth'}", f"{name}={tmp_path}/./w64.pth"])


def test_numbers_written_without_a_dot_are_numbers_in_a_preset_file_and_a_set_map(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: demo\npretrain: {lr: 1e-3, weight_decay: 5E-2}\n")
    assert planner.load_preset(str(path))["pretrain"]["lr"] == 1e-3
    pre = planner.load_preset("demo", ["methods.idmm.pretrain={lr: 2e-3}", "pretrain.batch_size=64"])
    assert pre["methods"]["idmm"]["pretrain"]["lr"] == 2e-3 and pre["pretrain"]["batch_size"] == 64


def test_a_new_methods_own_schedule_and_mixing_are_its_own(tmp_path, monkeypatch):
    from methods import METHODS
    from methods.idmm import IDMM

    monkeypatch.setitem(METHODS, "mymethod", type("MyMethod", (IDMM,), {}))  # registered, as the README says
    path = tmp_path / "mine.yaml"
    path.write_text("base: demo\nmethods: {mymethod: {schedule: cosine, mixing: {cutmix_alpha: 1.0}}}\n")
    assert planner.load_preset(str(path))["methods"]["mymethod"]["schedule"] == "cosine"
    with pytest.raises(UserError, match="finetune.mixing.schedule"):
        planner.load_preset("demo", ["finetune.mixing.schedule=cosine"])


@pytest.mark.parametrize("args", [["--set", "finetune.views.crops=[{count: 1}]"], ["--set", "pretrain.epochs=@x"],
                                  ["--set", "backbones.deit_tiny_patch16_224=null"], ["--init-weights", "foo=x.pth"]])
def test_bad_input_on_the_command_line_is_one_line_and_exit_2(tmp_path, args):
    res = in_process("run", "--table", "comparison", "--preset", "demo", "--dry-run", "--results", tmp_path, *args)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert args[1].partition("=")[0] in res.stderr


def test_a_partial_randaugment_map_is_described_as_the_views_take_it():
    """--set with a map is merged into the preset's map, as a preset file's is; the job and the dry-run's
    description agree."""
    for value, label in (("{ops: 3}", "3ops-p0.5-m1-9"), ("{magnitude: [2, 5]}", "2ops-p0.5-m2-5")):
        preset = planner.load_preset("demo", [f"finetune.views.randaugment={value}"])
        job = planner.plan("comparison", preset, ["random"])[0]
        assert planner.describe(job)["randaug"] == label


# --- a user's own rows and tables ($BENCH_TABLES) ----------------------------------------------------------------

_MINE = """
comparison:
  rows:
    - {id: vit_s/random, backbone: vit_small_patch16_224, method: random, pretrain_epochs: 0}
    - {id: vit_s/idmm, backbone: vit_small_patch16_224, method: idmm, pretrain_epochs: 800, show: {Method: IDMM}}
tiny:
  title: My table
  columns: [digits]
  row_columns: [Backbone, Method]
  finetune: [{res: 224, epochs: 2}]
  rows: [{id: deit/random, backbone: deit_tiny_patch16_224, method: random, paper: [50.0]}]
"""


def _user_tables(tmp_path, monkeypatch, text):
    path = tmp_path / "tables.yaml"
    path.write_text(text)
    monkeypatch.setenv("BENCH_TABLES", str(path))
    return path


def test_a_users_rows_join_a_paper_table_and_a_new_table_stands_alone(tmp_path, monkeypatch):
    paper_rows = {r["id"] for r in planner.table("comparison")["rows"]}
    _user_tables(tmp_path, monkeypatch, _MINE)
    spec = planner.table("comparison")
    assert {r["id"] for r in spec["rows"]} == paper_rows | {"vit_s/random", "vit_s/idmm"}
    mine = {r["id"]: r for r in spec["rows"]}
    assert mine["vit_s/random"]["paper"] == [None] * 7 and mine["vit_s/random"]["show"] == {"Method": "random"}
    preset = planner.load_preset("demo", ["backbones.vit_small_patch16_224={lr: 1.0e-3, warmup_epochs: 1, "
                                          "kwargs: {patch_size: 4, embed_dim: 48, depth: 2, num_heads: 3}}"])
    jobs = planner.plan("comparison", preset, backbones=["vit_small_patch16_224"])
    assert sorted(j.config["stage"] for j in jobs) == ["finetune", "finetune", "pretrain"]
    assert not any(j.skip for j in jobs)
    planner.check_models(jobs)
    (job,) = planner.plan("tiny", planner.load_preset("paper"))  # the table's epochs where the preset has none
    assert job.cells == [("tiny", "deit/random", "digits")] and job.config["epochs"] == 2


@pytest.mark.parametrize("text, words", [
    ("comparison:\n  rows: [{backbone: deit_tiny_patch16_224, method: idmm}]\n", "row 1: no id"),
    ("comparison:\n  rows: [{id: x, backbone: b, method: idmm, epochs: 3}]\n", "unknown field 'epochs'"),
    ("comparison:\n  rows: [{id: deit_tiny/idmm, backbone: b, method: idmm}]\n", "a second row with this id"),
    ("comparison:\n  rows: [{id: x, backbone: b, method: idmm, paper: [1.0]}]\n", "for each of the 7 columns"),
    ("comparison:\n  rows: [x]\n", "row 1: expected a map"),
    ("comparison:\n  title: Mine\n  rows: []\n", "rows: [...], which join the paper's table"),
    ("mine:\n  rows: []\n", "a new table with title, columns, row_columns, finetune, rows"),
    ("- comparison\n", "expected table names"),
    ("comparison:\n  rows: [{id: [1], backbone: b, method: idmm}]\n", "row 1: id: expected a name"),
    ("comparison:\n  rows: [{id: x, backbone: 5, method: idmm}]\n", "row x: backbone: expected a timm model name"),
    ("comparison:\n  rows: [{id: x, backbone: b, method: idmm, finetune: [{epochs: 3}]}]\n",
     "finetune: expected fine-tuning stages"),
    ("comparison:\n  rows: [{id: x, backbone: b, method: idmm, show: hello}]\n", "show: expected a map"),
    ("comparison:\n  rows: [{id: x, backbone: b, method: idmm, pretrain_epochs: lots}]\n",
     "pretrain_epochs: expected a whole number"),
    ("mine: {title: T, columns: 3, row_columns: [], finetune: [{res: 224, epochs: 1}], rows: []}\n",
     "mine: columns: expected a list of dataset names"),
    ("mine: {title: T, columns: [digits], row_columns: [{Foo: bar}], finetune: [{res: 24, epochs: 1}], rows: []}\n",
     "mine: row_columns: expected a list of labels"),
    ("5: {rows: []}\n", "5: expected a new table"),
    ("comparison: [\n", "not valid YAML"),
    ("comparison:\n  rows: [{id: x, backbone: deit_tiny_patch16_224, method: idmn}]\n",
     "row x: method: no method 'idmn' (choose from"),
    ("comparison:\n  rows: [{id: x, backbone: deit_tiny_patch16_24, method: idmm}]\n",
     "row x: backbone: timm has no model 'deit_tiny_patch16_24' (did you mean deit_tiny_patch16_224?)"),
])
def test_a_users_tables_file_is_checked_row_by_row(tmp_path, monkeypatch, text, words):
    path = _user_tables(tmp_path, monkeypatch, text)
    with pytest.raises(UserError) as e:
        planner.load_tables()
    assert str(e.value).startswith(f"{path}: ") and words in str(e.value) and "\n" not in str(e.value)


def test_a_method_or_backbone_without_a_row_is_told_where_rows_go(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_TABLES", str(tmp_path / "tables.yaml"))
    for flag, name in (("methods", "in_supervised"), ("backbones", "vit_small_patch16_224")):
        with pytest.raises(UserError, match=f"'{name}' has no row in this table: give it rows in "
                                            f"{tmp_path / 'tables.yaml'}"):
            planner.plan("comparison", planner.load_preset("demo"), **{flag: [name]})
    with pytest.raises(UserError) as e:  # a typo is only a typo
        planner.plan("comparison", planner.load_preset("demo"), methods=["idmn"])
    assert "has no row" not in str(e.value)


def test_a_new_method_without_settings_is_skipped_and_one_without_views_refused(tmp_path, monkeypatch):
    from methods import METHODS
    from methods.idmm import IDMM

    monkeypatch.setitem(METHODS, "mine", type("Mine", (IDMM,), {}))
    _user_tables(tmp_path, monkeypatch, "comparison:\n  rows: [{id: deit_tiny/mine, backbone: deit_tiny_patch16_224, "
                                        "method: mine, pretrain_epochs: 800}]\n")
    jobs = planner.plan("comparison", planner.load_preset("demo"), methods=["mine"])
    assert [j.skip for j in jobs] == ["preset 'demo' has no settings for method mine (methods.mine)"]
    preset = planner.load_preset("demo", ["methods.mine={label_smoothing: 0.1}"])
    with pytest.raises(UserError, match="^methods.mine: no views with crops in preset 'demo'"):
        planner.plan("comparison", preset, methods=["mine"])
    _user_tables(tmp_path, monkeypatch, "comparison:\n  rows: [{id: deit_tiny/mine, backbone: deit_tiny_patch16_224, "
                                        "method: idmm}]\n")
    with pytest.raises(UserError, match="table row deit_tiny/mine has no pretrain_epochs"):
        planner.plan("comparison", planner.load_preset("paper"), methods=["idmm"])


def test_a_new_method_that_crashes_is_shown_with_where_it_crashed(tmp_path, monkeypatch):
    """A job run in this process has no log: `bench status` shows the last frames of the record's traceback."""
    from methods import METHODS
    from methods.idmm import IDMM

    class Broken(IDMM):
        def __init__(self, backbone, feature_dim, num_instances, num_classes, cfg):
            raise KeyError("hidden_dim")

    monkeypatch.setitem(METHODS, "broken", Broken)
    _user_tables(tmp_path, monkeypatch, "comparison:\n  rows: [{id: deit_tiny/broken, backbone: deit_tiny_patch16_224, "
                                        "method: broken, pretrain_epochs: 800}]\n")
    args = ["--table", "comparison", "--preset", "demo", "--results", tmp_path / "r"]
    run = in_process("run", *args, "--methods", "broken", "--set",
                     "methods.broken={views: {crops: [{count: 2, size: 16, scale: [0.2, 1.0]}]}}")
    assert run.returncode == 1 and "KeyError: 'hidden_dim'" in run.stderr
    status = in_process("status", "--results", tmp_path / "r").stdout
    assert "KeyError: 'hidden_dim'" in status
    assert 'test_plan_store.py", line' in status and "in __init__" in status


def test_a_pretraining_crop_of_size_null_is_the_stages_resolution():
    def idmm_pretrain(size):
        crops = f"[{{count: 2, size: {size}, scale: [0.14, 1.0]}}, {{count: 4, size: {size}, scale: [0.05, 0.4]}}]"
        jobs = planner.plan("comparison", planner.load_preset("demo", [f"methods.idmm.views.crops={crops}"]),
                            ["idmm"])
        return next(j for j in jobs if j.config["stage"] == "pretrain")

    null, explicit = idmm_pretrain("null"), idmm_pretrain(16)
    assert [c["size"] for c in null.config["method_cfg"]["views"]["crops"]] == [16, 16]
    assert null.hash == explicit.hash  # the same recipe, written either way


def _hashes(preset):
    return [j.hash for j in planner.plan("comparison", preset, ["idmm"])]


def test_a_set_map_is_merged_and_checked_as_a_preset_files_map_is(tmp_path):
    """A --set map replaced the preset's group unchecked: a partial one was a KeyError in planning or a job's
    TypeError, and a misspelt key inside it changed nothing, silently."""
    pre = planner.load_preset("demo", ["pretrain={epochs: 2}"])
    assert pre["pretrain"]["epochs"] == 2 and pre["pretrain"]["resolution"] == 16
    assert _hashes(planner.load_preset("demo", ["pretrain={}", "finetune.stages={}"])) == _hashes(
        planner.load_preset("demo"))
    assert "unknown setting 'methods.idmm.labl_smoothing'" in _refused("methods.idmm={labl_smoothing: 0.3}")
    assert "unknown setting 'finetune.views.randaugment.bogus'" in _refused("finetune.views.randaugment={bogus: 1}")


@pytest.mark.parametrize("items", [["backbones.deit_tiny_patch16_224.warmup_epochs=1.0"],
                                   ["methods.idmm.views.crops=[{count: 2, size: 16, scale: [0.14, 1]}, "
                                    "{count: 4, size: 16, scale: [0.05, 0.4]}]"],
                                   ["finetune.label_smoothing=0.10", "pretrain.epochs=10.0"]])
def test_a_number_written_as_int_or_float_is_the_same_recipe(items, tmp_path):
    """The hash reads 1 and 1.0 apart: the same recipe typed with or without a dot trained again."""
    assert _hashes(planner.load_preset("demo", items)) == _hashes(planner.load_preset("demo"))
    assert _hashes(planner.load_preset("demo", ["pretrain.weight_decay=0"])) == _hashes(
        planner.load_preset("demo", ["pretrain.weight_decay=0.0"]))
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: demo\npretrain: {weight_decay: 0}\n")
    assert _hashes(planner.load_preset(str(mine))) == _hashes(planner.load_preset("demo", ["pretrain.weight_decay=0.0"]))


def test_set_reaches_a_map_keyed_by_resolution_that_the_preset_leaves_empty():
    """paper's finetune.resolution is {}: the key stayed the text '224', which no stage (224) ever read."""
    jobs = planner.plan("comparison", planner.load_preset("paper", ["finetune.resolution.224=112"]), ["idmm"],
                        ["digits"])
    assert {j.config["resolution"] for j in jobs if j.config["stage"] == "finetune"} == {112}


def test_plan_refuses_what_would_skip_every_cell_or_crash_a_job(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"^preset demo: pretrain_data.sin10k: unknown dataset 'digitz_extra'"):
        planner.plan("transfer", planner.load_preset("demo", ["pretrain_data.sin10k=digitz_extra"]), ["idmm"])
    assert "expected one crop group of count 1" in _refused("finetune.views.crops=[{count: 2, size: null, "
                                                            "scale: [0.08, 1.0]}]")
    assert "none empty" in _refused("datasets={comparison: []}")
    with pytest.raises(UserError, match="^no row of the transfer table has method dino and backbone t2t_vit_7$"):
        planner.plan("transfer", planner.load_preset("demo"), ["dino"], backbones=["t2t_vit_7"])
    jobs = planner.plan("comparison", planner.load_preset("paper", ["finetune.resolution.224=120"]), ["idmm"],
                        ["digits"])
    with pytest.raises(UserError, match=r"^finetune resolution of 120 px for deit_tiny_patch16_224 \(backbones.deit_"
                                        r"tiny_patch16_224.kwargs {}\): not a whole number of its 16-px patches"):
        planner.check_models(jobs)
    path = _user_tables(tmp_path, monkeypatch, "mine: {title: T, columns: [digitz], row_columns: [Method], "
                        "finetune: [{res: 24, epochs: 1}], rows: [{id: r, backbone: deit_tiny_patch16_224, "
                        "method: random, finetune: [{res: 300, epochs: 1}]}]}\n")
    with pytest.raises(UserError, match=rf"^table mine \({path}\): columns: unknown dataset 'digitz'"):
        planner.plan("mine", planner.load_preset("demo"))
    with pytest.raises(UserError, match=r"^table row r: a fine-tuning stage at 300 px, and preset 'demo' has no "
                                        r"finetune.stages.300 \(it has 224, 448\)"):
        planner.plan("mine", planner.load_preset("demo"), datasets_=["digits"])


def test_the_built_in_preset_given_by_a_relative_path_is_the_built_in_one(monkeypatch):
    monkeypatch.chdir(planner.PRESET_DIR.parent.parent)
    assert planner.load_preset("bench/presets/paper.yaml")["name"] == "paper"  # (it led "back to this file")
    assert planner.preset_id("./bench/presets/demo.yaml") == "demo"  # so report --preset demo finds its records


def test_a_run_counts_the_cells_it_skips_not_the_placeholders(tmp_path, monkeypatch):
    """A pretraining that cannot run is a placeholder of its own beside its cell's: 2 cells for 1."""
    _user_tables(tmp_path, monkeypatch, "mine: {title: T, columns: [digits], row_columns: [Method], "
                 "finetune: [{res: 24, epochs: 1}], rows: [{id: r, backbone: deit_tiny_patch16_224, "
                 "method: idmm, pretrain_data: nosuch}]}\n")
    res = in_process("run", "--table", "mine", "--preset", "demo", "--results", tmp_path / "r")
    assert res.returncode == 0 and "1 cell skipped: pretraining set 'nosuch' is not defined" in res.stderr, res.stderr
