"""Tiny consistency decoder (random init, or fine-tuning a tiny checkpoint) on 16x16 digits with
2x2 latents from the fixed random 8x8-patch 'encoder' (data.latents='patch'): CPU tests and demos.

    python train.py --config configs/decoder_tiny.py --workdir /tmp/dec
"""
from configs import default


def get_config():
    c = default.get_config()
    c.family, c.algorithm = "decoder", "ict"
    c.data.source, c.data.image_size, c.data.channels, c.data.random_flip = "digits", 16, 3, False
    c.data.latents = "patch"
    c.compute_dtype = "float32"
    c.prng_impl = "rbg"  # compiles ~2x faster on CPU
    c.total_steps = 200
    c.batch_size = 16
    c.model.unet.block_out_channels = (16, 32)
    c.model.unet.layers_per_block = 1
    c.model.unet.norm_num_groups = 8
    c.model.spacing, c.model.t_max = 16, 1008   # the released model's grid: 63 intervals
    c.optim.name, c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip = "adam", 1e-3, 10, 1.0
    c.ema_decay = 0.95
    c.ict.s0, c.ict.s1 = 10, 63
    c.ct.s0, c.ct.s1 = 2, 63
    c.cd.num_scales = 18
    c.log_every, c.checkpoint_every, c.sample_every = 10, 100, 100
    c.keep_checkpoints = 2
    c.num_eval_images = 16
    return c
