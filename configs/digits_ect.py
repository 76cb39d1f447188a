"""ECT on scikit-learn's 8x8 digits (CPU, a few minutes), optionally from an EDM teacher run.

From scratch:
    python train.py --config configs/digits_ect.py --workdir /tmp/digits_ect
As in the paper, tuned from a diffusion model (train the teacher first, then ECT from it):
    python train.py --config configs/digits_tiny.py --workdir /tmp/digits_edm --config.algorithm=edm
    python train.py --config configs/digits_ect.py --workdir /tmp/digits_ect --config.ect.init=/tmp/digits_edm

8 stages of 50 updates: r/t goes from about 1 - (1 + 8 sigmoid(-t)) / 2 (r = 0, i.e. the
denoising loss, for small t) to 1 - (1 + 8 sigmoid(-t)) / 256.
"""
from configs import digits_tiny


def get_config():
    c = digits_tiny.get_config()
    c.algorithm = "ect"
    c.ect.stage_steps = 50
    return c
