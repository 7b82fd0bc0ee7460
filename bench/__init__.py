"""bench: reproduce the tables of "Training Vision Transformers with Only 2040 Images" (Cao, Yu, Wu; ECCV 2022)."""
from bench.models import t2t_vit  # noqa: F401  registers t2t_vit_7 with timm
