"""sCT on CIFAR-10: Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time
Consistency Models" (arXiv 2410.11081; checked against the text of v2, 1 Mar 2025).  The paper
reports unconditional CIFAR-10 sCT with FID 2.85 for 1 step and 2.06 for 2 steps (Table 1, v2).
The earlier "1-step 2.97" figure could not be found in v2, and v1 was not checked.

Where each value comes from (section numbers are from v2):
  sigma_d = 0.5          App. G.1 says CIFAR-10 uses "the same settings of EDM", and EDM's
                         sigma_data is 0.5.  G.1 states sigma_d = 0.5 outright only for ImageNet 512.
  P_mean, P_std          -1.0, 1.4: App. G.2, "CIFAR-10" paragraph.  The proposal is lognormal
                         in sigma_d tan(t) (Sec. 4.2, Eq. 8).
  tangent norm c = 0.1   Sec. 4.2 and App. G.2 ("In all experiments, we use c = 0.1").
  tangent warm-up        H = 10000 iterations: Sec. 4.2 and App. G.2.
  batch 512              App. G.2 uses the teacher's batch size, and G.1 sets the CIFAR-10 teacher's
                         batch to 512.  App. E.3 also calls 512 the default behind Table 1.
  optimizer              RAdam, lr 1e-4, betas (0.9, 0.99), eps 1e-8, no lr schedule: App. G.2.
                         (Adam with lr 1e-3 and betas (0.9, 0.999) belongs to the G.1 *teacher*.)
  EMA                    G.2 gives an EMA half-life of 0.5 Mimg (as in EDM).  At batch 512 that is
                         976.6 updates, a per-update decay of 0.5 ** (512 / 500_000) = 0.99929.
                         EDM's EMA ramp-up (ema_rampup_ratio 0.05) is not modelled here.
  dropout 0.20           App. G.2 ("dropout rate of 0.20 for sCT").
  c_noise(t) = t         Sec. 4.1, with positional time embeddings (Sec. 4.1).
  2-step sampling        t_max = arctan(80 / sigma_d) and intermediate t = 1.1: App. G.2 and Sec. 5.2.
  total_steps 400k       NOT CONFIRMED.  G.2 does not give the length of the CIFAR-10 sCT run.  400k is
                         the G.1 teacher's length and the longest point in the sCT-vs-ECT comparison
                         (App. E.3, Table 3, which uses batch 128).

The objective equals NVlabs/FastGen's ``SCMModel`` (sCM.py) with its own departures from the paper
switched off (prior_weighting_enabled, g_norm_spatial_invariance, divide_x_0_spatial_dim), loss and
gradient, on pinned inputs (tests/test_reference_values.py).  cmjax follows the paper there.

Deviations from the paper that this config cannot fix:
  * G.2 initializes sCT on CIFAR-10 from the EMA weights of a TrigFlow teacher diffusion model
    (G.1: DDPM++, 400k iterations, Adam lr 1e-3).  cmjax's 'sct' algorithm has no init_from and
    trains from scratch.  The paper's RAdam lr of 1e-4 was tuned for that fine-tuning setup.
  * The paper's network is DDPM++ (Score SDE) with adaptive double normalization (App. G.1,
    Sec. 4.1).  This config uses cmjax.models.image_unet as inherited from cifar10_ict.
"""
from configs import cifar10_ict


def get_config():
    c = cifar10_ict.get_config()
    c.algorithm = "sct"
    c.batch_size = 512                     # App. G.1/G.2
    c.total_steps = 400_000                # not stated for CIFAR-10 sCT (see docstring)
    c.optim.name, c.optim.lr, c.optim.b1, c.optim.b2 = "radam", 1e-4, 0.9, 0.99   # App. G.2
    c.optim.eps = 1e-8                     # App. G.2
    c.model.dropout = 0.2                  # App. G.2
    c.model.embedding = "positional"       # Sec. 4.1
    c.ema_decay = 0.5 ** (c.batch_size / 500_000)   # EMA half-life 0.5 Mimg (App. G.2) -> 0.99929
    c.scm.sigma_data, c.scm.p_mean, c.scm.p_std = 0.5, -1.0, 1.4                   # G.1 (EDM) / G.2
    c.scm.tangent_warmup_steps, c.scm.tangent_norm_c, c.scm.mid_t = 10_000, 0.1, 1.1  # Sec. 4.2, G.2
    return c
