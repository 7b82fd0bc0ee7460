import contextlib
import io
import os
import subprocess
import sys

import pytest
import timm
import torch

from bench.data import ImageSet

# The demo recipe cut to one epoch per stage: enough to run every code path, fast on 2 CPU cores.
FAST = ["--set", "pretrain.epochs=1", "--set", "finetune.epochs=1"]


@pytest.fixture
def tiny_vit():
    def make(num_classes=0, img_size=16):
        torch.manual_seed(0)
        return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=4,
                                 embed_dim=32, depth=1, num_heads=2, num_classes=num_classes)
    return make


@pytest.fixture
def tiny_images():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 24, 24), dtype=torch.uint8, generator=g)
    return ImageSet(images, torch.arange(12) % 3, ["a", "b", "c"], "random")



def in_process(*args, cwd=None):
    """`bench ARGS` in this process, without a new interpreter's seconds of imports, as a CompletedProcess.
    Tests of the real process (its exit status, signals, kill -9) run `python -m bench` instead."""
    from bench.cli import main

    out, err, here, env = io.StringIO(), io.StringIO(), os.getcwd(), dict(os.environ)
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse's usage errors
                code = e.code
    finally:
        os.chdir(here)
        os.environ.clear()  # what the command set for its jobs (--compile, --checkpoint-every) ends with it
        os.environ.update(env)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def without_root(*args):
    """`bench ARGS` in a new process that permission bits bind (root, as CI runs, ignores them otherwise)."""
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
    return subprocess.run([*(drop if os.geteuid() == 0 else []), sys.executable, "-m", "bench", *map(str, args)],
                          capture_output=True, text=True)
