"""Consistency distillation on CIFAR-10 from an EDM teacher run (--config.cd.teacher=WORKDIR)."""
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
