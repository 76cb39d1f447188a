"""Zero-shot image editing with a consistency model (CM paper, Algorithm 4).

Every function here is pure over a consistency function ``f(x_t (B,H,W,C), t (B,)) -> x0_hat``
(any model: ``cmjax.consistency.consistency_function`` over a network with its params closed
over, or an analytic function) and can be jitted with ``f`` closed over.

Images are NHWC in [-1, 1]. Noise levels follow EDM (``x_t = x + t z``); ``sigmas`` are static,
strictly **decreasing** sequences (e.g. :func:`cmjax.consistency.sampling_sigmas`).

Algorithm 4: an orthogonal linear map ``A`` and a mask ``Omega`` in A's coefficient space
(1 = generate, 0 = keep the reference ``y``) define

    replacement(y, x) = A^T [ (A y) * (1 - Omega) + (A x) * Omega ]

    y <- replacement(y, 0);  x <- y + t_1 z
    for t_n in sigmas:  x0 <- replacement(y, clip(f(x, t_n)));  x <- x0 + sqrt(t_{n+1}^2 - eps^2) z

and returns the last ``x0``. Because the replacement comes last, what is kept is kept exactly:

* inpainting: ``A = I``; the pixels outside the mask equal the input's;
* colorization: per pixel, a 3x3 orthonormal basis whose first column is proportional to the luma
  weights (0.2989, 0.5870, 0.1140); the luma of the output equals the input's;
* super-resolution: per ``p x p`` patch and channel, a ``p^2 x p^2`` orthonormal basis whose first
  column is uniform; every patch mean of the output equals the low-resolution input's pixel.

Plus denoising (one step ``f(y, sigma)`` from a known noise level), interpolation (spherical
interpolation between two noises, then one step) and stroke-guided editing (SDEdit: noise a
stroke painting to an intermediate sigma, then run the multistep loop without replacement).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cmjax import consistency as C

ConsistencyFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, t (B,)) -> x0_hat

LUMA = (0.2989, 0.5870, 0.1140)

__all__ = [
    "LUMA", "Edit", "orthonormal_basis", "luma_basis", "patch_basis",
    "inpainting_edit", "colorization_edit", "superres_edit", "replacement", "iterative_edit",
    "inpaint", "colorize", "super_resolve", "denoise", "slerp", "interpolate", "stroke_edit",
    "luma", "patch_means", "upsample_patches",
]


# --------------------------------------------------------------------------------------------
# Orthonormal bases


def orthonormal_basis(first: Sequence[float]) -> np.ndarray:
    """An ``(n, n)`` orthonormal matrix (float64) whose first column is ``first / |first|``.

    Gram-Schmidt (via QR) of ``[first, e_j for j != k]`` with ``k = argmax |first_j|`` (always a
    basis of R^n), signs fixed so that column 0 points along ``first``. Columns are the basis
    vectors: the coefficients of ``x`` are ``Q^T x``. (Which completion is chosen does not change
    an edit: the replacement only depends on the span of the first column.)
    """
    v = np.asarray(first, np.float64).reshape(-1)
    norm = np.linalg.norm(v)
    if norm == 0:
        raise ValueError("the first basis vector must be non-zero")
    m = np.concatenate([(v / norm)[:, None], np.delete(np.eye(v.size), int(np.argmax(np.abs(v))), axis=1)], 1)
    q, _ = np.linalg.qr(m)
    return -q if q[:, 0] @ v < 0 else q


def luma_basis() -> np.ndarray:
    """3x3 orthonormal basis of RGB space whose first column is proportional to :data:`LUMA`."""
    return orthonormal_basis(LUMA)


def patch_basis(patch: int) -> np.ndarray:
    """``(p^2, p^2)`` orthonormal basis whose first column is uniform (``1/p`` everywhere)."""
    if patch < 1:
        raise ValueError(f"patch size must be >= 1, got {patch}")
    return orthonormal_basis(np.ones(patch * patch))


def luma(images: jax.Array) -> jax.Array:
    """``0.2989 R + 0.5870 G + 0.1140 B``: (B, H, W, 3) -> (B, H, W)."""
    return jnp.asarray(images) @ jnp.asarray(LUMA, jnp.float32)


def _to_patches(x: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p, W/p, C, p*p), row-major inside each patch."""
    b, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // p, w // p, c, p * p)


def _from_patches(x: jax.Array, p: int) -> jax.Array:
    b, hp, wp, c, _ = x.shape
    x = x.reshape(b, hp, wp, c, p, p).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, hp * p, wp * p, c)


def patch_means(images: jax.Array, patch: int) -> jax.Array:
    """Mean over every ``p x p`` patch: (B, H, W, C) -> (B, H/p, W/p, C)."""
    return jnp.mean(_to_patches(jnp.asarray(images), patch), axis=-1)


def upsample_patches(lowres: jax.Array, patch: int) -> jax.Array:
    """Nearest-neighbour upsampling: (B, h, w, C) -> (B, h*p, w*p, C); its patch means are ``lowres``."""
    x = jnp.asarray(lowres)
    return jnp.repeat(jnp.repeat(x, patch, axis=1), patch, axis=2)


# --------------------------------------------------------------------------------------------
# Edits: (A, A^T, Omega)


@dataclasses.dataclass(frozen=True)
class Edit:
    """An orthogonal linear map and its mask (Algorithm 4).

    ``forward(x) -> coefficients``, ``inverse(coefficients) -> x`` (``inverse = forward^T``),
    ``generate``: 1 where the coefficient is generated, 0 where it is kept from the reference;
    broadcastable against ``forward(x)``.
    """

    forward: Callable[[jax.Array], jax.Array]
    inverse: Callable[[jax.Array], jax.Array]
    generate: jax.Array


def inpainting_edit(mask) -> Edit:
    """``A = I``; ``mask`` (B or 1, H, W, 1 or C), 1 = pixels to generate, 0 = pixels to keep."""
    m = jnp.asarray(mask, jnp.float32)
    if m.ndim != 4:
        raise ValueError(f"mask must be (B, H, W, 1 or C), got shape {tuple(m.shape)}")
    return Edit(lambda x: x, lambda c: c, m)


def colorization_edit() -> Edit:
    """Per-pixel 3x3 basis, luma first; keeps the luma coefficient and generates the two others."""
    q = jnp.asarray(luma_basis(), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    return Edit(lambda x: jnp.einsum("bhwc,cd->bhwd", x, q, precision=hi),
                lambda c: jnp.einsum("bhwd,cd->bhwc", c, q, precision=hi),
                jnp.asarray([0.0, 1.0, 1.0], jnp.float32))


def superres_edit(patch: int) -> Edit:
    """Per ``p x p`` patch and channel, the uniform-first basis; keeps each patch's mean."""
    q = jnp.asarray(patch_basis(patch), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    keep_mean = jnp.ones((patch * patch,), jnp.float32).at[0].set(0.0)
    return Edit(lambda x: jnp.einsum("bhwcn,nk->bhwck", _to_patches(x, patch), q, precision=hi),
                lambda c: _from_patches(jnp.einsum("bhwck,nk->bhwcn", c, q, precision=hi), patch),
                keep_mean)


def replacement(edit: Edit, y: jax.Array, x: jax.Array) -> jax.Array:
    """``A^T[(A y)(1 - Omega) + (A x) Omega]``: ``y``'s kept coefficients, ``x``'s generated ones."""
    g = edit.generate
    return edit.inverse(edit.forward(y) * (1.0 - g) + edit.forward(x) * g)


# --------------------------------------------------------------------------------------------
# Sampling loops


def iterative_edit(f: ConsistencyFn, key: jax.Array, y: jax.Array, edit: Edit, sigmas: Sequence[float],
                   *, sigma_min: float = C.SIGMA_MIN, clip: bool = True) -> jax.Array:
    """Algorithm 4 for any :class:`Edit`: (B, H, W, C) reference in [-1, 1] -> edited (B, H, W, C).

    ``key`` draws the initial noise and one fresh noise per later step. The kept coefficients of
    the result are exactly ``y``'s (up to float32 rounding of the basis); the result is not
    clipped after the last replacement, so it can leave [-1, 1] slightly where ``A`` mixes pixels.
    """
    sig = C.check_sigmas(sigmas, sigma_min)
    y = jnp.asarray(y, jnp.float32)
    y = replacement(edit, y, jnp.zeros_like(y))
    k0, k_loop = jax.random.split(key)
    x = y + sig[0] * jax.random.normal(k0, y.shape, jnp.float32)
    return C.multistep_loop(f, jax.random.split(k_loop, len(sig)), x, sig, sigma_min, clip_denoised=clip,
                            post=lambda x0: replacement(edit, y, x0))


def inpaint(f: ConsistencyFn, key: jax.Array, images: jax.Array, mask, sigmas: Sequence[float],
            **kw) -> jax.Array:
    """Fill the pixels where ``mask == 1``; elsewhere the output equals ``images`` exactly.

    images (B, H, W, C) in [-1, 1]; mask (B or 1, H, W, 1 or C) of 0/1. Returns (B, H, W, C).
    """
    return iterative_edit(f, key, images, inpainting_edit(mask), sigmas, **kw)


def colorize(f: ConsistencyFn, key: jax.Array, images: jax.Array, sigmas: Sequence[float], **kw) -> jax.Array:
    """Colour images keeping their luma: (B, H, W, 3) RGB, or (B, H, W, 1) gray (repeated to RGB),
    in [-1, 1] -> (B, H, W, 3) with ``luma(out) == luma(images)``."""
    images = jnp.asarray(images, jnp.float32)
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    if images.shape[-1] != 3:
        raise ValueError(f"colorization needs 1- or 3-channel images, got shape {tuple(images.shape)}")
    return iterative_edit(f, key, images, colorization_edit(), sigmas, **kw)


def super_resolve(f: ConsistencyFn, key: jax.Array, lowres: jax.Array, patch: int, sigmas: Sequence[float],
                  **kw) -> jax.Array:
    """(B, h, w, C) low-resolution images in [-1, 1] -> (B, h*p, w*p, C) whose ``p x p`` patch means
    equal ``lowres`` (the model's image size must be h*p x w*p)."""
    return iterative_edit(f, key, upsample_patches(lowres, patch), superres_edit(patch), sigmas, **kw)


def denoise(f: ConsistencyFn, noisy: jax.Array, sigma, *, clip: bool = True) -> jax.Array:
    """One step from a known noise level: ``f(y, sigma)`` for ``y = x + sigma z``; (B, H, W, C)."""
    noisy = jnp.asarray(noisy, jnp.float32)
    t = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (noisy.shape[0],))
    x0 = f(noisy, t)
    return jnp.clip(x0, -1.0, 1.0) if clip else x0


def slerp(z0: jax.Array, z1: jax.Array, alpha) -> jax.Array:
    """Spherical interpolation per example: z0, z1 (B, ...), alpha scalar in [0, 1] -> (B, ...).

    ``sin((1-a) theta)/sin(theta) z0 + sin(a theta)/sin(theta) z1``, theta the angle between the
    flattened vectors (linear interpolation where they are parallel).
    """
    a = jnp.asarray(alpha, jnp.float32)
    flat0, flat1 = z0.reshape(z0.shape[0], -1), z1.reshape(z1.shape[0], -1)
    cos = jnp.sum(flat0 * flat1, -1) / (jnp.linalg.norm(flat0, axis=-1) * jnp.linalg.norm(flat1, axis=-1))
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin = jnp.sin(theta)
    small = sin < 1e-6
    safe = jnp.where(small, 1.0, sin)
    w0 = jnp.where(small, 1.0 - a, jnp.sin((1.0 - a) * theta) / safe)
    w1 = jnp.where(small, a, jnp.sin(a * theta) / safe)
    shape = (-1,) + (1,) * (z0.ndim - 1)
    return w0.reshape(shape) * z0 + w1.reshape(shape) * z1


def interpolate(f: ConsistencyFn, z0: jax.Array, z1: jax.Array, alphas: Sequence[float],
                sigma_max: float = C.SIGMA_MAX, *, clip: bool = True) -> jax.Array:
    """One-step samples along the slerp between standard-normal noises ``z0``, ``z1`` (B, H, W, C).

    Returns (B, len(alphas), H, W, C): ``clip(f(sigma_max * slerp(z0, z1, a), sigma_max))``.
    """
    outs = []
    t = jnp.full((z0.shape[0],), sigma_max, jnp.float32)
    for a in alphas:
        x0 = f(sigma_max * slerp(z0, z1, a), t)
        outs.append(jnp.clip(x0, -1.0, 1.0) if clip else x0)
    return jnp.stack(outs, axis=1)


def stroke_edit(f: ConsistencyFn, key: jax.Array, strokes: jax.Array, sigmas: Sequence[float], *,
                sigma_min: float = C.SIGMA_MIN, clip: bool = True) -> jax.Array:
    """Stroke-guided generation (SDEdit-like): ``x = strokes + sigmas[0] z``, then the multistep loop.

    strokes (B, H, W, C) in [-1, 1], a rough painting; ``sigmas`` start at an intermediate level
    (larger keeps less of the strokes), e.g. ``[5.0, 1.0, 0.3]``. Returns (B, H, W, C).
    """
    sig = C.check_sigmas(sigmas, sigma_min)
    strokes = jnp.asarray(strokes, jnp.float32)
    k0, k_loop = jax.random.split(key)
    x = strokes + sig[0] * jax.random.normal(k0, strokes.shape, jnp.float32)
    return C.multistep_loop(f, jax.random.split(k_loop, len(sig)), x, sig, sigma_min, clip_denoised=clip)
