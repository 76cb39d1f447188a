"""An EDM diffusion teacher on CIFAR-10 (the objective CD distils from): NVlabs/edm
``training/loss.py`` ``EDMLoss`` (P_mean -1.2, P_std 1.2, weight (sigma^2 + sd^2)/(sigma sd)^2) with
``training/networks.py`` ``EDMPrecond``'s scalings (tests/test_reference_values.py pins both).

Departures kept:
  * The loss is averaged over pixels; EDM's training loop sums them (``loss.sum() / batch``).  The
    gradient is the reference's / (H W C) (3072 here): Adam/RAdam are nearly scale-invariant, and
    ``optim.grad_clip`` and ``optim.eps`` act on the averaged scale.
  * The network is cmjax.models.image_unet, not DDPM++/NCSN++; no EDM augmentation.
"""
from configs import cifar10_ict


def get_config():
    c = cifar10_ict.get_config()
    c.algorithm = "edm"
    c.optim.name, c.optim.lr, c.optim.warmup_steps = "adam", 2e-4, 10_000
    c.model.dropout = 0.13
    c.ema_decay = 0.9999
    return c
