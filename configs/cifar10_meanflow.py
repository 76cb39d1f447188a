"""MeanFlow on CIFAR-10: Geng et al. 2025 (arXiv 2505.13447), the CIFAR-10 configuration table
of the appendix (unconditional U-Net, 1-NFE).

u(z, r, t) conditioned on (t, t - r); (r, t) from two logit-normal draws lognorm(-2.0, 2.0), r != t
for 75% of the batch; adaptive weight power p = 0.75 (c = 1e-3); Adam lr 6e-4 (betas 0.9, 0.999)
with 10k warm-up iterations; batch 1024; 800k iterations; dropout 0.2; EMA 0.99995.  These values
are as recalled from the paper (no copy of the PDF or of Gsunshine/meanflow here): check them
before quoting a result.  The network is cmjax.models.image_unet with two time inputs.
"""
from configs import cifar10_ict


def get_config():
    c = cifar10_ict.get_config()
    c.algorithm = "meanflow"
    c.model.time_inputs = 2
    c.model.embedding = "positional"
    c.batch_size = 1024
    c.total_steps = 800_000
    c.optim.name, c.optim.lr, c.optim.b1, c.optim.b2, c.optim.warmup_steps = "adam", 6e-4, 0.9, 0.999, 10_000
    c.model.dropout = 0.2
    c.ema_decay = 0.99995
    c.meanflow.p_mean, c.meanflow.p_std, c.meanflow.equal_fraction = -2.0, 2.0, 0.25
    c.meanflow.weight_p, c.meanflow.weight_c = 0.75, 1e-3
    return c
