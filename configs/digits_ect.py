"""ECT on scikit-learn's 8x8 digits (CPU, a few minutes), optionally from an EDM teacher run.

From scratch:
    python train.py --config configs/digits_ect.py --workdir /tmp/digits_ect
As in the paper, tuned from a diffusion model (train the teacher first, then ECT from it):
    python train.py --config configs/digits_tiny.py --workdir /tmp/digits_edm --config.algorithm=edm
    python train.py --config configs/digits_ect.py --workdir /tmp/digits_ect --config.ect.init=/tmp/digits_edm

The objective, parameterisation and sampler of configs/cifar10_ect.py (locuslab/ect ``main``:
weight 1 / (t - r), EDM's unshifted scalings while training, shift 0.003 and no clip between
steps when sampling), on the network and optimizer of configs/digits_tiny.py.  8 stages of 50
updates: r/t goes from about 1 - (1 + 8 sigmoid(-t)) / 2 (r = 0, i.e. the denoising loss, for
small t) to 1 - (1 + 8 sigmoid(-t)) / 256.
"""
from configs import digits_tiny


def get_config():
    c = digits_tiny.get_config()
    c.algorithm = "ect"
    c.ect.weighting, c.ect.sample_sigma_min = "inverse_dt", 0.003
    c.ect.stage_steps = 50
    return c
