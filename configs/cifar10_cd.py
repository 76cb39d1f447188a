"""Consistency distillation on CIFAR-10 from an EDM teacher run (--config.cd.teacher=WORKDIR):
openai/consistency_models_cifar10 ``jcm/losses.py`` ``get_consistency_loss_fn`` (Heun teacher step,
N = 18, target EMA 0.95; tests/test_reference_values.py pins the loss and gradient to it).

Departures kept: the distance is l2 (the reference's mean of squares over pixels, its ``l2``
option); the paper's best CIFAR-10 runs use LPIPS, whose weights cannot be loaded offline here.
The network is cmjax.models.image_unet, not NCSN++.
"""
from configs import cifar10_ict


def get_config():
    c = cifar10_ict.get_config()
    c.algorithm = "cd"
    c.total_steps = 800_000
    c.batch_size = 512
    c.optim.name, c.optim.lr = "radam", 4e-4
    c.model.dropout = 0.0
    c.cd.num_scales, c.cd.target_ema, c.cd.metric = 18, 0.95, "l2"
    return c
