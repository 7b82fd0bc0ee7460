"""The pretraining methods. A method is one small file: its heads, its loss, its views, its momentum state.

To add one: write `methods/<name>.py` with a `bench.engine.Method` subclass, add it to METHODS below, and give
its hyper-parameters (with their source) under `methods: <name>:` in bench/presets/paper.yaml.
"""
from methods.idmm import IDMM


class RandomInit:
    """No pretraining: fine-tuning starts from timm's random initialisation (the tables' "random init.")."""
    pretrains = False
    summary = "no pretraining: fine-tune from random initialisation"
    defaults_source = "fine-tuning recipe only (official main_deit.py)"


METHODS = {
    "random": RandomInit,
    "idmm": IDMM,
}
