"""Layers shared by the consistency-decoder UNet, the SD VAE and the small image UNets.

Everything is NHWC. Parameter names mirror diffusers' module names (``norm1``, ``conv1``,
``time_emb_proj``, ``conv_shortcut``, ...) so that weight conversion is a mechanical renaming.

``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of the parameters; normalisation
statistics are always computed in float32 so that bf16 compute stays close to fp32.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmjax.models.conv_lowering import XLA, ConvShape, Lowering, LoweringPlan, upsample_nearest

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
    as diffusers' upsampling layers do (computed at the low resolution where the plan says subpixel).
    ``lowering``: the ``LoweringPlan`` that names this conv's lowering by its shape (default XLA's
    convolution). A lowering that prepares its kernel (Winograd, subpixel) reads the params leaf
    ``kernel:<form>`` when there is one (``with_prepared_kernels``), else prepares ``kernel`` here.
    """

    features: int
    kernel_size: int = 3
    upsample: bool = False
    lowering: LoweringPlan = XLA
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
            way = self.way(x.shape)
            y = way.run(x, self.prepared(way, kernel))
        return y + bias.astype(self.dtype)

    def shape(self, x_shape: tuple[int, ...]) -> ConvShape:
        """This conv's ``ConvShape`` for an input of ``x_shape`` (B, H, W, C)."""
        return ConvShape(*x_shape, self.features, self.kernel_size, jnp.dtype(self.dtype).name, upsample=self.upsample)

    def way(self, x_shape: tuple[int, ...]) -> Lowering:
        return self.lowering.way(self.shape(x_shape))

    def prepared(self, way: Lowering, kernel: jax.Array) -> Any:
        """``way.prepare(kernel)``, read from the params leaf ``kernel:<form>`` if there is one."""
        if not way.form:
            return kernel
        leaf = f"kernel:{way.form}"
        if self.has_variable("params", leaf):
            return self.get_variable("params", leaf)
        return way.prepare(kernel)


def _each_conv(apply_fn: Callable[..., Any], visit: Callable[[Conv, tuple[int, ...]], None], *args) -> None:
    """Trace ``apply_fn(*args)`` abstractly (``jax.eval_shape``: nothing runs or is allocated) and call
    ``visit(conv module, input shape)`` for each k x k conv (k > 1) it applies, in order."""
    def interceptor(next_fun, call_args, kwargs, context):
        if isinstance(context.module, Conv) and context.method_name == "__call__" and context.module.kernel_size > 1:
            visit(context.module, tuple(call_args[0].shape))
        return next_fun(*call_args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(apply_fn, *args)


def conv_shapes(apply_fn: Callable[..., Any], *args) -> tuple[ConvShape, ...]:
    """The distinct ``ConvShape`` of every k x k conv (k > 1) that ``apply_fn(*args)`` applies, in first-use
    order; traced abstractly (arguments may be ``jax.ShapeDtypeStruct``). What a plan is made for."""
    shapes: dict[ConvShape, None] = {}
    _each_conv(apply_fn, lambda module, x_shape: shapes.setdefault(module.shape(x_shape)), *args)
    return tuple(shapes)


def prepared_kernels(params: Any, apply_fn: Callable[[Any], Any]) -> dict[tuple[str, ...], Any]:
    """{(module path..., "kernel:<form>"): prepared kernel} for each conv of ``apply_fn(params)``
    whose lowering (by the plan the network was given) prepares its kernel (Winograd's transform,
    the subpixel phase kernel).

    ``apply_fn`` is traced abstractly to see which lowering each conv takes at its real input
    shape; the preparations themselves are traced here (run it under ``jit``).
    ``with_prepared_kernels`` adds them to the params.
    """
    uses: dict = {}

    def visit(module: Conv, x_shape: tuple[int, ...]) -> None:
        way = module.way(x_shape)
        leaf = f"kernel:{way.form}"
        if way.form and not module.has_variable("params", leaf):  # params that hold it: nothing to prepare
            uses[module.scope.path + (leaf,)] = (way.prepare, module.dtype)

    _each_conv(apply_fn, visit, params)
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


def conv(features: int, kernel: int, name: str, dtype: Dtype, param_dtype: Dtype, upsample: bool = False,
         lowering: LoweringPlan = XLA) -> Conv:
    """A stride-1 convolution with torch's default padding for odd kernels (of the 2x-upsampled input
    if ``upsample``), lowered as ``lowering`` says."""
    return Conv(features, kernel, upsample=upsample, lowering=lowering, name=name, dtype=dtype,
                param_dtype=param_dtype)


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

    x: (B, H, W, C_in); temb: (B, T) or None. Returns (B, H', W', out_channels). ``lowering``: the
    convs' ``LoweringPlan``.
    """

    out_channels: int
    num_groups: int = 32
    epsilon: float = 1e-5
    time_scale_shift: bool = True
    resample: str | None = None  # None, "down" or "up"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lowering: LoweringPlan = XLA

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.num_groups, self.epsilon, name="norm1", **kw)(x)
        h = nn.silu(h)
        if self.resample == "down":
            x, h = avg_pool_2x2(x), avg_pool_2x2(h)
        elif self.resample == "up":
            x = upsample_nearest(x)  # h is upsampled by conv1, which may do so at the low resolution
        h = conv(self.out_channels, 3, "conv1", upsample=self.resample == "up", lowering=self.lowering, **kw)(h)
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
        h = conv(self.out_channels, 3, "conv2", lowering=self.lowering, **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", **kw)(x)
        return x.astype(self.dtype) + h


def resnet_block(remat: bool = False) -> type[ResnetBlock]:
    """``ResnetBlock``, or with ``remat`` the same block under ``nn.remat``: its backward pass
    recomputes the block's activations from its input instead of keeping them (the network keeps
    one array per block; about one more forward pass of compute). Same params and names; call it
    positionally, ``block(x, temb, deterministic)``."""
    return nn.remat(ResnetBlock, static_argnums=(3,)) if remat else ResnetBlock


def spatial_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Single-head attention over positions: softmax(q k^T / sqrt(C)) v, (B, N, C) each -> (B, N, C).

    Logits and softmax in float32 (diffusers' ``upcast_softmax``), the weighted sum in v's dtype.
    Shared by the SD VAE's mid-block attention and the image UNet's attention blocks.
    """
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    return jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
