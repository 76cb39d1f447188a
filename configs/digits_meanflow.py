"""MeanFlow on scikit-learn's 8x8 digits (CPU, a few minutes): u(z, r, t) with two time inputs.

    python train.py --config configs/digits_meanflow.py --workdir /tmp/digits_meanflow
    python -m cmjax.eval fid --ref digits --checkpoint /tmp/digits_meanflow --steps 1 --num-samples 1797
"""
from configs import digits_tiny


def get_config():
    c = digits_tiny.get_config()
    c.algorithm = "meanflow"
    c.model.time_inputs = 2
    return c
