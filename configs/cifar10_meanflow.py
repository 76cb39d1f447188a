"""MeanFlow on CIFAR-10: Geng et al. 2025, "Mean Flows for One-step Generative Modeling"
(arXiv 2505.13447).  The paper reports unconditional CIFAR-10 with a U-Net and 1-NFE (Table 3; the
CIFAR-10 implementation details are in the appendix).

Sources.  The paper's appendix was not read directly here.  The values were checked against the
authors' official PyTorch port, github Gsunshine/py-meanflow.  Its README says the CIFAR-10
"original configuration used in the paper is in cifar10_v0.sh".  The official JAX repo,
Gsunshine/meanflow, contains only the ImageNet experiments.  Files in py-meanflow:
  meanflow/scripts/cifar10_v0.sh    torchrun on 8 GPUs with --batch_size=128 (global 1024),
                                    --lr=0.0006, --epochs=16000, --warmup_epochs 200,
                                    --tr_sampler=v0, --P_mean_t/--P_mean_r -2.0,
                                    --P_std_t/--P_std_r 2.0, --ratio 0.75, --norm_p 0.75,
                                    --dropout 0.2, --use_edm_aug
  meanflow/train_arg_parser.py      betas default [0.9, 0.999]; norm_eps default 1e-3;
                                    ratio = "probability of sampling r DIFFERENT from t"
  meanflow/train.py                 torch.optim.Adam ("Adam, not AdamW"), linear warm-up, then constant lr
  meanflow/models/time_sampler.py   v0 ("used in paper"): t and r are independent logit-normal
                                    draws, swapped so that t >= r, then r = t with probability
                                    1 - ratio
  meanflow/models/meanflow.py       u = net(z, (t, t - r)); squared error summed over pixels;
                                    weight sg(1 / (loss + norm_eps) ** norm_p)
Three values come from the paper's appendix as quoted by secondary summaries; they are not in the
v0 script: 800K iterations with 10K warm-up, and EMA decay 0.99995.  The v0 script gives 16000
epochs at 48 steps per epoch (~768k steps) and 200 warm-up epochs (~9.6k steps).  py-meanflow keeps
EMAs at 0.9999 (main) and at 0.99995 and 0.9996 (extras).

The loss and the sampler equal Gsunshine/meanflow's ``MeanFlow.forward`` / ``solver_step`` on pinned
inputs (tests/test_reference_values.py).  One departure in the time proposal: r = t is drawn per
example with probability ``equal_fraction`` (py-meanflow's v0 sampler); Gsunshine/meanflow sets it
for the first fraction of the batch.

Not reproduced by this config:
  * EDM augmentation with augment labels as conditioning (use_edm_aug; train_loop.py
    AugmentPipe p = 0.12, x-flip/scale/aniso/translate, no y-flip or rotation).  cmjax applies
    only random horizontal flips.
  * The network.  py-meanflow uses EDM's SongUNet (DDPM++, ~55M parameters: channel_mult [2, 2, 2],
    4 blocks, attention at 16, positional embedding, channel_mult_noise 2).  This config uses
    cmjax.models.image_unet with two time inputs, as inherited from cifar10_ict.
"""
from configs import cifar10_ict


def get_config():
    c = cifar10_ict.get_config()
    c.algorithm = "meanflow"
    c.model.time_inputs = 2                # u(z, r, t) = net(z, (t, t - r))  (models/meanflow.py)
    c.model.embedding = "positional"       # SongUNet embedding_type='positional' (models/unet.py)
    c.batch_size = 1024                    # 128 per GPU x 8 (cifar10_v0.sh)
    c.total_steps = 800_000                # paper appendix (secondary); v0 script: 16000 epochs ~ 768k
    # Adam, lr 6e-4, betas (0.9, 0.999), linear warm-up then constant (cifar10_v0.sh, train.py);
    # 10k warm-up per the paper's appendix (secondary); v0 script: 200 epochs ~ 9.6k.
    c.optim.name, c.optim.lr, c.optim.b1, c.optim.b2, c.optim.warmup_steps = "adam", 6e-4, 0.9, 0.999, 10_000
    c.model.dropout = 0.2                  # cifar10_v0.sh
    c.ema_decay = 0.99995                  # paper appendix (secondary); an extra EMA in py-meanflow
    # v0 sampler: t, r ~ logit-normal(-2.0, 2.0); r = t with probability 1 - ratio = 0.25
    c.meanflow.p_mean, c.meanflow.p_std, c.meanflow.equal_fraction = -2.0, 2.0, 0.25
    c.meanflow.weight_p, c.meanflow.weight_c = 0.75, 1e-3   # --norm_p 0.75; norm_eps default 1e-3
    return c
