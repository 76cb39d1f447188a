"""ECT on CIFAR-10: Geng et al. 2024 (arXiv 2406.14548; Table 1: 1-step FID 3.60, 2-step 2.11),
with the settings of locuslab/ect's ``run_ecm.sh`` and ``ct_train.py`` defaults:

batch 128, RAdam lr 1e-4, dropout 0.2, 25.6 M images (200k iterations), the r(t) mapping with
q = 2, k = 8, b = 1 advanced every 250 ticks of 12.8 k images (25k iterations, 8 stages),
t ~ lognormal(-1.1, 2.0), c = 0 (distance ||.||_2, i.e. adaptive weighting p = 1/2), weight
(t^2 + sd^2) / (t sd)^2, EMA 0.9999, 2-step sampling at sigma (80, 0.821).  ECT starts from a
pretrained EDM model: train configs/cifar10_edm.py first and pass its workdir as
``--config.ect.init=WORKDIR`` (the paper transfers NVlabs' EDM CIFAR-10 weights, which cmjax
does not convert).  The network is cmjax.models.image_unet, not DDPM++.
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
    c.ect.stage_steps = 25_000
    c.sampling.mid_sigma = 0.821
    return c
