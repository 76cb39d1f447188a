"""An EDM diffusion teacher on CIFAR-10 (the objective CD distils from)."""
from configs import cifar10_ict


def get_config():
    c = cifar10_ict.get_config()
    c.algorithm = "edm"
    c.optim.name, c.optim.lr, c.optim.warmup_steps = "adam", 2e-4, 10_000
    c.model.dropout = 0.13
    c.ema_decay = 0.9999
    return c
