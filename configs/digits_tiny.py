"""Tiny unconditional image CM on scikit-learn's 8x8 digits: what tests and a laptop run (CPU).

    python train.py --config configs/digits_tiny.py --workdir /tmp/digits
"""
from configs import default


def get_config():
    c = default.get_config()
    c.family, c.algorithm = "image", "ict"
    c.data.source, c.data.image_size, c.data.channels, c.data.random_flip = "digits", 8, 1, False
    c.compute_dtype = "float32"
    c.prng_impl = "rbg"  # compiles ~2x faster on CPU
    c.total_steps = 400
    c.batch_size = 64
    c.model.base_channels = 32
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = ()
    c.model.dropout = 0.0
    c.model.num_groups = 8
    c.model.embedding = "positional"
    c.model.embedding_size = 32
    c.optim.name, c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip = "adam", 2e-3, 20, 1.0
    c.ema_decay = 0.99
    c.ict.s0, c.ict.s1 = 10, 160
    c.ct.s0, c.ct.s1 = 2, 50
    c.cd.num_scales = 18
    c.log_every, c.checkpoint_every, c.sample_every = 20, 200, 200
    c.keep_checkpoints = 2
    c.num_eval_images = 64
    return c
