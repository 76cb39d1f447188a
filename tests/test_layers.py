"""Shared layers against their torch counterparts, and the two convolution lowerings against each other."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cmjax.layers import Conv, GroupNorm, avg_pool_2x2, upsample_nearest
from tests.torch_peers import nchw, nhwc


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("im2col", [True, False])
def test_conv_matches_torch(kernel, im2col):
    rng = np.random.default_rng(kernel)
    x = rng.normal(size=(2, 6, 10, 24)).astype(np.float32)
    ref = torch.nn.Conv2d(24, 40, kernel, padding=kernel // 2)
    with torch.no_grad():
        want = nhwc(ref(nchw(x)))
    params = {"kernel": ref.weight.detach().numpy().transpose(2, 3, 1, 0), "bias": ref.bias.detach().numpy()}
    got = Conv(40, kernel, im2col=im2col).apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=0)


def test_conv_auto_lowering_picks_by_size():
    x_small, x_big = jnp.ones((1, 4, 6, 8)), jnp.ones((1, 32, 48, 8))
    for x in (x_small, x_big):
        params = Conv(8).init(jax.random.key(0), x)
        hlo = jax.jit(Conv(8).apply).lower(params, x).as_text()
        uses_conv = "convolution" in hlo
        assert uses_conv == (x.shape[1] * x.shape[2] > 128 or jax.default_backend() != "cpu")


def test_group_norm_matches_torch():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 5, 7, 32)) * 3 + 10).astype(np.float32)  # large mean: two-pass variance
    ref = torch.nn.GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
        want = nhwc(ref(nchw(x)))
    params = {"scale": ref.weight.detach().numpy(), "bias": ref.bias.detach().numpy()}
    got = GroupNorm(8, 1e-6).apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_resampling_matches_torch():
    x = np.random.default_rng(1).normal(size=(2, 4, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(avg_pool_2x2(jnp.asarray(x))),
                               nhwc(torch.nn.functional.avg_pool2d(nchw(x), 2, 2)), atol=1e-7)
    np.testing.assert_array_equal(np.asarray(upsample_nearest(jnp.asarray(x), 2)),
                                  nhwc(torch.nn.functional.interpolate(nchw(x), scale_factor=2, mode="nearest")))
