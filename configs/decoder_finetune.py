"""Fine-tune the released consistency decoder (621M params) with iCT on its own 64-slot grid,
latents from the SD VAE encoder on the fly (or precomputed: data.latents='file', data.source='npz').

    python train.py --config configs/decoder_finetune.py --workdir runs/dec \
        --config.model.init_checkpoint=ckpt/consistency-decoder \
        --config.data.vae_checkpoint=ckpt/sd-vae --config.data.path=/data/images
"""
from configs import default


def get_config():
    c = default.get_config()
    c.family, c.algorithm = "decoder", "ict"
    c.model.init_checkpoint = ""            # set: a checkpoint written by `python -m cmjax.convert`
    c.model.spacing, c.model.t_max = 16, 1008
    c.data.source, c.data.path = "folder", ""
    c.data.image_size, c.data.channels, c.data.random_flip = 256, 3, True
    c.data.latents, c.data.vae_checkpoint = "vae", ""
    c.data.worker_count = 8
    c.compute_dtype = "bfloat16"
    c.total_steps = 100_000
    c.batch_size = 64
    c.fsdp = True
    c.optim.name, c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip = "adamw", 1e-5, 1000, 1.0
    c.optim.weight_decay = 0.0
    c.ema_decay = 0.9999
    # Fine-tuning a converged CM: start the curriculum at the full 63-interval grid.
    c.ict.s0, c.ict.s1 = 63, 63
    c.log_every, c.checkpoint_every, c.sample_every = 50, 2000, 2000
    c.num_eval_images = 8
    return c
