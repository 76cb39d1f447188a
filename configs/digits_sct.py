"""sCT on scikit-learn's 8x8 digits: the TrigFlow objective with a JVP, on CPU in a few minutes.

    python train.py --config configs/digits_sct.py --workdir /tmp/digits_sct
    python -m cmjax.eval fid --ref digits --checkpoint /tmp/digits_sct --steps 2 --num-samples 1797

The network and optimizer of configs/digits_tiny.py (positional time embedding, which sCM
recommends over large-scale Fourier features); tangent warm-up over the first 100 updates.
"""
from configs import digits_tiny


def get_config():
    c = digits_tiny.get_config()
    c.algorithm = "sct"
    c.scm.tangent_warmup_steps = 100
    return c
