"""bench: reproduce the tables of "Training Vision Transformers with Only 2040 Images" (Cao, Yu, Wu; ECCV 2022)."""
