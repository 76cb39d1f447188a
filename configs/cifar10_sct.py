"""sCT on CIFAR-10: Lu & Song 2024 (arXiv 2410.11081), the CIFAR-10 column of the training
settings table in Appendix G (sCT: 1-step FID 2.97, 2-step 2.06 in Table 2 with NCSN++).

TrigFlow with sigma_d = 0.5; proposal lognormal(P_mean = -1.0, P_std = 1.4) of sd tan(t);
tangent normalisation c = 0.1; tangent warm-up over 10k iterations; Adam lr 1e-3 with
betas (0.9, 0.99); batch 512; dropout 0.2; positional time embeddings with c_noise(t) = t;
2-step sampling at t = (arctan(80 / 0.5), 1.1).  P_mean/P_std were checked against a public
re-implementation's comment citing App. G.2; the optimizer, batch, dropout, EMA and length are as
recalled from the paper (no copy of the PDF here): check them before quoting a result.  The
network is cmjax.models.image_unet, not NCSN++.
"""
from configs import cifar10_ict


def get_config():
    c = cifar10_ict.get_config()
    c.algorithm = "sct"
    c.batch_size = 512
    c.total_steps = 400_000
    c.optim.name, c.optim.lr, c.optim.b1, c.optim.b2 = "adam", 1e-3, 0.9, 0.99
    c.model.dropout = 0.2
    c.model.embedding = "positional"
    c.ema_decay = 0.9999
    c.scm.sigma_data, c.scm.p_mean, c.scm.p_std = 0.5, -1.0, 1.4
    c.scm.tangent_warmup_steps, c.scm.tangent_norm_c, c.scm.mid_t = 10_000, 0.1, 1.1
    return c
