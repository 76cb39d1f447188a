"""FLOPs of one configs/decoder_newspace.py train step, from XLA's cost analysis of the compiled step.

    python benchmarks/cost_newspace.py [--image-size 256] [--vae sd3|sdxl] [--dtype bfloat16]

Nothing is allocated: the full-size decoder (621M params), optimizer state and a full-size VAE
encoder (SD3/FLUX-shaped: 16 channels, no quant conv; or SDXL-shaped) are abstract
(``jax.ShapeDtypeStruct``), the step is lowered and compiled for batch 1 on this machine's backend,
and ``compiled.cost_analysis()["flops"]`` is printed with the iCT step's parts: the student's
forward + backward, the target's forward and the VAE encoder that makes the latents on the fly.
The decoder UNet has no attention, so its FLOPs are linear in the batch and in the pixel count;
the README's costed plan multiplies this per-image number out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmjax import parallel  # noqa: E402
from cmjax.models import vae as vae_lib  # noqa: E402
from cmjax.models.layers import compute_dtype  # noqa: E402
from cmjax.training import families, optim  # noqa: E402
from cmjax.training import state as state_lib  # noqa: E402
from cmjax.training import step as step_lib
from cmjax.weights import checkpoint  # noqa: E402
from configs import decoder_newspace  # noqa: E402

VAES = {"sd3": dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                    shift_factor=0.0609),
        "sdxl": dict(latent_channels=4, scaling_factor=0.13025)}


def flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--vae", choices=sorted(VAES), default="sd3")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()

    vcfg = vae_lib.VAEConfig(**VAES[args.vae])  # SD's full-size architecture
    with tempfile.TemporaryDirectory() as tmp:
        # decoder_newspace reads the VAE's config from its checkpoint: write one (random encoder weights)
        params = jax.jit(lambda k: vae_lib.init_params(vcfg, k, parts=("encoder",)))(jax.random.key(0))
        checkpoint.save_vae(vae_lib.VAE(vcfg, params), os.path.join(tmp, "vae"))
        c = decoder_newspace.get_config()
        c.model.init_checkpoint = ""  # the SD 1.x decoder's architecture (config.model.unet), no weights
        c.data.vae_checkpoint = os.path.join(tmp, "vae")
        c.data.image_size, c.batch_size, c.compute_dtype, c.fsdp = args.image_size, 1, args.dtype, False
        fam = families.make_family(c)
    mesh = parallel.make_mesh(jax.devices()[:1])
    tx, sched = optim.make_optimizer(c)
    abstract_state, _ = state_lib.train_state_layout(fam.init_params, tx, c, mesh, keeps_target=False)
    s = args.image_size
    batch = {"image": jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)}
    frozen = {"encoder": vae_lib.abstract_params(vcfg, parts=("encoder",))}
    step = jax.jit(step_lib.make_train_step(fam, c, tx, sched))
    t0 = time.perf_counter()
    total = flops_of(step.lower(abstract_state, batch, frozen).compile())
    compile_s = time.perf_counter() - t0

    # the parts, each compiled on its own: one decoder forward, and the VAE encoder
    dcfg = fam.config
    from cmjax.models.decoder_config import abstract_params, make_network

    net = make_network(dcfg, dtype=compute_dtype(c.compute_dtype))
    fwd = jax.jit(lambda p, x, t: net.apply({"params": p}, x, t))
    x = jax.ShapeDtypeStruct((1, s, s, dcfg.unet.in_channels), jnp.float32)
    forward = flops_of(fwd.lower(abstract_params(dcfg), x, jax.ShapeDtypeStruct((1,), jnp.int32)).compile())
    enc = jax.jit(lambda p, im: vae_lib.encode_latents(p, im, config=vcfg, dtype=compute_dtype(c.compute_dtype)))
    encoder = flops_of(enc.lower(frozen["encoder"], batch["image"]).compile())
    n_params = sum(a.size for a in jax.tree.leaves(abstract_state.params))
    print(json.dumps({"vae": args.vae, "latent_channels": dcfg.latent_channels, "image_size": s,
                      "compute_dtype": c.compute_dtype, "decoder_params": int(n_params),
                      "backend": jax.default_backend(), "compile_s": round(compile_s, 1),
                      "train_step_flops_per_image": total, "decoder_forward_flops": forward,
                      "vae_encoder_flops": encoder,
                      "step_over_forward": round((total - encoder) / forward, 3)}))


if __name__ == "__main__":
    main()
