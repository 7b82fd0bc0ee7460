"""bench: reproduce the tables of "Training Vision Transformers with Only 2040 Images" (Cao, Yu, Wu; ECCV 2022).

Kept free of imports: `bench` the command imports torch only after it can answer a Ctrl-C with one line."""
