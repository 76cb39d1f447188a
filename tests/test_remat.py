"""config.remat: the UNets' residual blocks recompute their activations in the backward pass.

Same params, same outputs, same gradients (to float32 rounding: XLA may fuse the recomputed forward
differently); what changes is what the backward pass keeps. XLA:CPU's buffer assignment does not
show it (its scheduler places the recomputation early: the same temporaries to the byte), the TPU
compiler's does: tests/test_tpu_compile.py::test_remat_shrinks_the_backward_pass_on_tpu.
"""
import jax
import jax.numpy as jnp
import numpy as np

from cmjax.decoding.decoder import denoise
from cmjax.models.decoder_config import abstract_params
from cmjax.models.image_unet import ImageUNet, ImageUNetConfig
from tests.random_decoder import TINY, random_params


def _loss_and_grad(loss):
    return jax.jit(jax.value_and_grad(loss))


def test_decoder_unet_remat_same_gradients():
    params = jax.tree.map(jnp.asarray, random_params(abstract_params(TINY)))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    z = jnp.asarray(rng.normal(size=(2, 16, 16, 4)), jnp.float32)
    t = jnp.asarray([1008, 512], jnp.int32)

    def grad_fn(remat):
        return _loss_and_grad(lambda p: jnp.sum(denoise(p, x, z, t, TINY, remat=remat) ** 2))

    plain, remat = grad_fn(False), grad_fn(True)
    (l0, g0), (l1, g1) = plain(params), remat(params)
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-5 * float(np.abs(a).max()) + 1e-12)
    blocks = 4 * 1 + 3 + 2 + 4 * 2 + 3  # TINY: per level 1 resnet (+ a downsampler), mid 2, per level 2 up (+ an upsampler)
    for r, count in ((False, 0), (True, blocks)):
        jaxpr = str(jax.make_jaxpr(lambda p: denoise(p, x, z, t, TINY, remat=r))(params))
        assert jaxpr.count("remat") == count  # one rematerialised call per residual block


def test_image_unet_remat_same_params_and_gradients_with_dropout():
    cfg = ImageUNetConfig(in_channels=3, out_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(), dropout=0.1, num_groups=4)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 3)), jnp.float32)
    c = jnp.asarray([0.1, -0.4], jnp.float32)
    plain, remat = ImageUNet(cfg), ImageUNet(cfg, remat=True)
    abstract = jax.eval_shape(plain.init, jax.random.key(0), x, c)["params"]
    assert jax.tree.structure(jax.eval_shape(remat.init, jax.random.key(0), x, c)["params"]) == jax.tree.structure(abstract)
    params = jax.tree.map(jnp.asarray, random_params(abstract))
    drop = jax.random.key(3)  # dropout active: the recomputed forward draws the same mask

    def grads(net):
        return _loss_and_grad(lambda p: jnp.sum(net.apply({"params": p}, x, c, train=True,
                                                            rngs={"dropout": drop}) ** 2))(params)

    (l0, g0), (l1, g1) = grads(plain), grads(remat)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-5 * float(np.abs(a).max()) + 1e-12)
