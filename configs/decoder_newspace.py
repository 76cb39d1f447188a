"""A consistency decoder for another VAE's latent space (SDXL, SD 2.x, SD3, FLUX), initialised from
the SD 1.x decoder and fine-tuned with iCT (the decoder family's CT objective) on its own grid.

    python -m cmjax.convert stabilityai/sdxl-vae-folder ckpt/target-vae --kind vae
    python -m cmjax.eval latent-stats --vae ckpt/target-vae --images /data/images --resolution 256 \\
        --out ckpt/target-vae-stats.json
    python train.py --config configs/decoder_newspace.py --workdir runs/newspace \\
        --config.model.init_checkpoint=ckpt/consistency-decoder \\
        --config.data.vae_checkpoint=ckpt/target-vae \\
        --config.model.latent_stats=ckpt/target-vae-stats.json --config.data.path=/data/images

Every weight comes from the SD 1.x decoder except the latent input channels of conv_in, which start
at zero (see ``cmjax.training.families.retarget_decoder_params``); the decoder config takes the
VAE's latent channels, scaling, shift and the measured statistics, and is written with the
exported decoder (WORKDIR/decoder_ema), so decode.py and cmjax.decode normalise the new space.
"""
from configs import decoder_finetune


def get_config():
    c = decoder_finetune.get_config()
    c.model.retarget_latents = True   # the decoder reads data.vae_checkpoint's latent space
    c.model.latent_stats = ""         # JSON from `python -m cmjax.eval latent-stats` (empty: mean 0, std 1)
    # The zero-initialised latent weights have to be learned, not only adjusted: a higher peak rate
    # than decoder_finetune's 1e-5, and the curriculum starts coarse again (pairs farther apart
    # give a stronger signal from a denoiser that does not yet read its conditioning).
    c.optim.lr, c.optim.warmup_steps = 5e-5, 2000
    c.ict.s0, c.ict.s1 = 10, 63
    c.total_steps = 200_000
    return c
