"""iCT on CIFAR-10 with the paper's settings (Song & Dhariwal 2023): batch 1024, RAdam lr 1e-4,
dropout 0.3, 400k steps, doubling curriculum s0=10 -> s1=1280, lognormal pairs, pseudo-Huber,
eval EMA 0.99993. (The paper's network is NCSN++; this uses cmjax.models.image_unet.)"""
from configs import default


def get_config():
    c = default.get_config()
    c.family, c.algorithm = "image", "ict"
    c.data.source, c.data.name, c.data.image_size = "tfds", "cifar10", 32
    c.total_steps = 400_000
    c.batch_size = 1024
    c.optim.name, c.optim.lr = "radam", 1e-4
    c.model.dropout = 0.3
    c.ema_decay = 0.99993
    c.ict.s0, c.ict.s1 = 10, 1280
    return c
