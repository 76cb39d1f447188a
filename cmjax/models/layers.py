"""Layers shared by the consistency-decoder UNet, the SD VAE and the small image UNets.

Everything is NHWC. Parameter names mirror diffusers' module names (``norm1``, ``conv1``,
``time_emb_proj``, ``conv_shortcut``, ...) so that weight conversion is a mechanical renaming.

``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of the parameters; normalisation
statistics are always computed in float32 so that bf16 compute stays close to fp32.
"""
from __future__ import annotations

import contextvars
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmjax.models.conv_lowering import ConvShape, Lowering, candidates, choose_lowering, upsample_nearest

Dtype = Any

# Every dtype name cmjax's configs and flags use, long and short: compute_dtype("bf16") is bfloat16.
DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16}


def compute_dtype(name: str) -> Any:
    """The JAX dtype for a name in :data:`DTYPES`; ValueError naming the choices otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (one of {', '.join(DTYPES)})") from None


class GroupNorm(nn.Module):
    """GroupNorm over the channel axis (last), statistics in float32, like torch.nn.GroupNorm.

    Params: ``scale`` (C,), ``bias`` (C,).
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: {channels} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, channels // self.num_groups)
        axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
        mean = jnp.mean(grouped, axis=axes, keepdims=True)
        # Two-pass variance (not E[x^2] - E[x]^2): it is what torch computes and it does not
        # cancel catastrophically for activations with a large mean.
        var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        out = normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return out.astype(self.dtype)


class Conv(nn.Module):
    """2-D convolution, NHWC, stride 1, torch's padding (k//2 each side). Params: ``kernel`` HWIO, ``bias``.

    ``upsample``: convolve the input upsampled 2x (nearest), (B, H, W, C) -> (B, 2H, 2W, features),
    as diffusers' upsampling layers do; computed at the low resolution where that measures faster.
    ``lowering``: a name from ``conv_lowering.candidates`` ("xla", "im2col", "im2row", "winograd",
    "subpixel+xla", ...) forces one; None uses $CMJAX_CONV_LOWERING, else the way measured fastest
    for this shape on this machine (cached on disk, measured once at trace time on a miss).
    A lowering that prepares its kernel (Winograd, subpixel) uses the params leaf ``kernel:<form>``
    when there is one (``with_prepared_kernels``), else prepares ``kernel`` here.
    """

    features: int
    kernel_size: int = 3
    upsample: bool = False
    lowering: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if k == 1:
            y = jnp.einsum("bhwc,co->bhwo", upsample_nearest(x) if self.upsample else x, kernel[0, 0])
        else:
            # init only needs shapes: it never measures (eval_shape of an init traces every conv)
            lowering = self.lowering or ("xla" if self.is_initializing() else None)
            shape = ConvShape(*x.shape, self.features, k, jnp.dtype(self.dtype).name, upsample=self.upsample)
            way = candidates(shape)[choose_lowering(shape, lowering)]
            y = way.run(x, self.prepared(way, kernel))
        return y + bias.astype(self.dtype)

    def prepared(self, way: Lowering, kernel: jax.Array) -> Any:
        """``way.prepare(kernel)``, read from the params leaf ``kernel:<form>`` if there is one."""
        if not way.form:
            return kernel
        leaf = f"kernel:{way.form}"
        if self.has_variable("params", leaf):
            return self.get_variable("params", leaf)
        uses = _PREPARING.get()
        if uses is not None:  # with_prepared_kernels is asking which prepared kernels this network reads
            uses[self.scope.path + (leaf,)] = (way.prepare, self.dtype)
        return way.prepare(kernel)


# Set while ``with_prepared_kernels`` traces a network: {(module path..., leaf): (prepare, compute dtype)}.
_PREPARING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("cmjax_preparing", default=None)


def prepared_kernels(params: Any, apply_fn: Callable[[Any], Any]) -> dict[tuple[str, ...], Any]:
    """{(module path..., "kernel:<form>"): prepared kernel} for each conv of ``apply_fn(params)``
    whose lowering prepares its kernel (Winograd's transform, the subpixel phase kernel).

    ``apply_fn`` is traced abstractly (``jax.eval_shape``: nothing runs) to see which lowering each
    conv takes at its real input shape; the preparations themselves are traced here (run it under
    ``jit``). ``with_prepared_kernels`` adds them to the params.
    """
    uses: dict = {}
    token = _PREPARING.set(uses)
    try:
        jax.eval_shape(apply_fn, params)
    finally:
        _PREPARING.reset(token)
    leaves = {}
    for (*module, leaf), (prepare, dtype) in uses.items():
        node = params
        for name in module:
            node = node[name]
        leaves[(*module, leaf)] = prepare(node["kernel"].astype(dtype))
    return leaves


def add_leaves(params: Any, leaves: dict[tuple[str, ...], Any]) -> Any:
    """A copy of the nested dicts ``params`` with ``leaves`` ({path: value}) added; arrays are shared."""
    if not leaves:
        return params
    params = dict(params)
    for *module, leaf in leaves:
        node = params
        for name in module:  # copy the dicts on the path; the rest is shared
            node[name] = dict(node[name])
            node = node[name]
        node[leaf] = leaves[(*module, leaf)]
    return params


def with_prepared_kernels(params: Any, apply_fn: Callable[[Any], Any]) -> Any:
    """``params`` plus each conv's kernel prepared for the lowering it uses in ``apply_fn(params)``.

    Winograd's transformed kernel and the subpixel phase kernel depend on the weights alone; a
    decode that evaluates its network once per step would otherwise prepare them in every step
    (inside the loop XLA does not hoist them). Each is added as a leaf ``kernel:<form>`` next to
    ``kernel`` (``prepared_kernels``), which ``Conv`` then reads. Call it under ``jit``, once,
    outside the loop; params that already hold their prepared kernels come back unchanged.
    """
    return add_leaves(params, prepared_kernels(params, apply_fn))


def conv(features: int, kernel: int, name: str, dtype: Dtype, param_dtype: Dtype, upsample: bool = False) -> Conv:
    """A stride-1 convolution with torch's default padding for odd kernels (of the 2x-upsampled input
    if ``upsample``)."""
    return Conv(features, kernel, upsample=upsample, name=name, dtype=dtype, param_dtype=param_dtype)


def dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Dense:
    return nn.Dense(features, name=name, dtype=dtype, param_dtype=param_dtype)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 average pooling with stride 2 (torch ``avg_pool2d(2, 2)``); H and W must be even."""
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"avg_pool_2x2 needs even spatial sizes, got {h}x{w}")
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ResnetBlock(nn.Module):
    """Pre-norm residual block (diffusers ``ResnetBlock2D``), optionally resampling.

    h = conv1(silu(norm1(x)))  [avg-pool / nearest x2 applied after silu(norm1) and on the skip]
    temb: scale_shift -> norm2(h) * (1 + scale) + shift; default -> norm2(h + temb); None -> norm2(h)
    h = conv2(dropout(silu(h))); out = shortcut(x) + h, shortcut a 1x1 conv iff C_in != C_out.

    x: (B, H, W, C_in); temb: (B, T) or None. Returns (B, H', W', out_channels).
    """

    out_channels: int
    num_groups: int = 32
    epsilon: float = 1e-5
    time_scale_shift: bool = True
    resample: str | None = None  # None, "down" or "up"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.num_groups, self.epsilon, name="norm1", **kw)(x)
        h = nn.silu(h)
        if self.resample == "down":
            x, h = avg_pool_2x2(x), avg_pool_2x2(h)
        elif self.resample == "up":
            x = upsample_nearest(x)  # h is upsampled by conv1, which may do so at the low resolution
        h = conv(self.out_channels, 3, "conv1", upsample=self.resample == "up", **kw)(h)
        if temb is not None:
            proj_width = 2 * self.out_channels if self.time_scale_shift else self.out_channels
            t = dense(proj_width, "time_emb_proj", **kw)(nn.silu(temb))[:, None, None, :]
            if self.time_scale_shift:
                scale, shift = jnp.split(t, 2, axis=-1)
                h = GroupNorm(self.num_groups, self.epsilon, name="norm2", **kw)(h)
                h = h * (1 + scale) + shift
            else:
                h = GroupNorm(self.num_groups, self.epsilon, name="norm2", **kw)(h + t)
        else:
            h = GroupNorm(self.num_groups, self.epsilon, name="norm2", **kw)(h)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv(self.out_channels, 3, "conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", **kw)(x)
        return x.astype(self.dtype) + h


def spatial_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Single-head attention over positions: softmax(q k^T / sqrt(C)) v, (B, N, C) each -> (B, N, C).

    Logits and softmax in float32 (diffusers' ``upcast_softmax``), the weighted sum in v's dtype.
    Shared by the SD VAE's mid-block attention and the image UNet's attention blocks.
    """
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    return jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
