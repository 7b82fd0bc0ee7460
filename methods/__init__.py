"""The pretraining methods. A method is one small file: its heads, its loss, its views, its momentum state.

To add one: write `methods/<name>.py` with a `bench.engine.Method` subclass, add it to METHODS below, and give
its hyper-parameters (with their source) under `methods: <name>:` in bench/presets/paper.yaml (and smaller ones
in demo.yaml where the demo needs them), and a row in a table (README, "Adding a method").
"""
from methods.dino import DINO
from methods.idmm import IDMM
from methods.mocov2 import MoCoV2
from methods.mocov3 import MoCoV3
from methods.simclr import SimCLR
from methods.supcon import SupCon
from methods.supervised import Supervised


class RandomInit:
    """No pretraining: fine-tuning starts from timm's random initialisation (the tables' "random init.")."""
    pretrains = False
    summary = "no pretraining: fine-tune from random initialisation"
    defaults_source = "fine-tuning recipe only (official main_deit.py)"


class ImageNetInit:
    """No pretraining here: fine-tuning starts from ImageNet-supervised weights (the sota table's "IN super.")."""
    pretrains = False
    imagenet_init = True
    summary = "fine-tune from ImageNet-supervised weights (timm, or --init-weights FILE)"
    defaults_source = "timm's ImageNet-1k weights; the fine-tuning recipe of main_deit.py"


METHODS = {
    "random": RandomInit,
    "in_supervised": ImageNetInit,
    "simclr": SimCLR,
    "supcon": SupCon,
    "mocov2": MoCoV2,
    "mocov3": MoCoV3,
    "dino": DINO,
    "supervised": Supervised,
    "idmm": IDMM,
}
