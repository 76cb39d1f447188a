"""ECT on CIFAR-10: Geng et al. 2024 (arXiv 2406.14548; Table 1: 1-step FID 3.60, 2-step 2.11),
following locuslab/ect's ``main`` branch (commit 4311059770f54821d151a9b0e1f76770a5f3930e, the
CIFAR-10 code): ``run_ecm.sh``, ``ct_train.py`` defaults, ``training/loss.py`` ``ECMLoss``,
``training/networks.py`` ``ECMPrecond`` and ``training/ct_training_loop.py`` ``generator_fn``.

batch 128, RAdam lr 1e-4, betas (0.9, 0.999), dropout 0.2, 25.6 M images (200k iterations), the
r(t) mapping with q = 2, k = 8, b = 1 advanced every 250 ticks of 12.8 k images (25k iterations,
8 stages), t ~ lognormal(-1.1, 2.0), c = 0 (distance ||.||_2, i.e. adaptive weighting p = 1/2),
weight 1 / (t - r) (``ECMLoss`` on ``main``; the ``imgnet`` branch's (t^2 + sd^2) / (t sd)^2 is
``ect.weighting="snr_plus"``), EMA 0.9999.  Training uses EDM's unshifted c_skip/c_out (``ECMPrecond``
in train mode), so an EDM run's params are the EDM function when ECT starts from them; sampling
shifts them by sigma_min = 0.003 (``ECMPrecond`` in eval mode) and runs ``generator_fn``: x = 80 z,
x0 = f(x, t_i), x = x0 + t_{i+1} z, no clip between steps; 2 steps at sigma (80, 0.821) (``--mid_t``
default).

Departures kept:
  * ECT starts from a pretrained EDM model: train configs/cifar10_edm.py first and pass its workdir
    as ``--config.ect.init=WORKDIR`` (the paper transfers NVlabs' EDM CIFAR-10 VP weights, which
    cmjax does not convert).  The network is cmjax.models.image_unet, not DDPM++.
  * The sampler runs in float32 (the reference's loop is float64) and clips the final image to
    [-1, 1] (the reference clips when it converts to uint8).
  * The stage advances every ``stage_steps`` optimizer updates from update 0; the reference counts
    ticks of 12.8 k images and switches stage one tick later ((cur_tick - 1) // double).
  * No EDM augmentation (run_ecm.sh sets --augment=0.0 anyway) and no nan_to_num of the target.
"""
from configs import cifar10_ict


def get_config():
    c = cifar10_ict.get_config()
    c.algorithm = "ect"
    c.batch_size = 128
    c.total_steps = 200_000
    c.optim.name, c.optim.lr = "radam", 1e-4
    c.model.dropout = 0.2
    c.ema_decay = 0.9999
    c.ect.p_mean, c.ect.p_std, c.ect.q, c.ect.k, c.ect.b, c.ect.c = -1.1, 2.0, 2.0, 8.0, 1.0, 0.0
    c.ect.weighting, c.ect.sample_sigma_min = "inverse_dt", 0.003
    c.ect.stage_steps = 25_000
    c.sampling.mid_sigma = 0.821
    return c
