"""How a stride-1 2-D convolution is lowered: the lowerings (pure jnp math) and the plan that picks one per shape.

Lowerings (all NHWC input, HWIO kernel, padding k//2 on each side, same result up to fp rounding;
the output has the input's size for odd k, one more row and column for even k):
  "xla"     ``lax.conv_general_dilated``: XLA's own convolution (cuDNN on GPU, the conv units on TPU)
  "im2col"  the k*k shifted copies of the padded image concatenated on channels, one matmul
            with K = k*k*C (the kernel's HWIO flattening has the same (dy, dx, c) order)
  "im2row"  the k shifted copies along W only, then k matmuls (one per dy) over row slices:
            a k-times smaller buffer than im2col, K = k*C
  "winograd" Winograd's F(2x2, 3x3): 2.25x fewer multiplies, 3x3 float32 only

Each is a ``Lowering``: ``run(x, prepare(kernel))``, where ``prepare`` rewrites the kernel alone
(Winograd's transformed kernel; identity for the others), so that a decode can prepare every
kernel once, outside its loop over steps (``cmjax.models.layers.with_prepared_kernels``).

``upsampled_conv`` computes a 3x3 conv of a nearest-2x-upsampled image (the decoders' upsampling
layers) at the low resolution, as one 2x2 conv with 4x the output channels: 16/36 of the
multiplies and no upsampled copy of the input.

Which is fastest depends on the shape and on the machine (on CPU, XLA's convolution is slow on
tiny images with many channels, where one large matmul wins). A ``LoweringPlan`` says which one
each conv shape uses: a static, printable value that the networks take as an argument, XLA's
convolution for every shape it does not name. Nothing here measures, caches or reads the
environment: ``cmjax.tuning`` times the candidates on this machine and makes the plan.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

LOWERINGS = ("xla", "im2col", "im2row", "winograd")
SUBPIXEL = "subpixel"  # prefix of the upsampling convs' low-resolution variants (see ``candidates``)
DEFAULT = "xla"


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest-neighbour upsampling by an integer factor (torch ``interpolate(mode='nearest')``)."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
    return x.reshape(b, h * factor, w * factor, c)


def conv_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    k = kernel.shape[0]
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((k // 2, k // 2),) * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
    k, _, c, o = kernel.shape
    p = k // 2
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    h, w = padded.shape[1] - k + 1, padded.shape[2] - k + 1  # the input's size for odd k, one more for even
    cols = jnp.concatenate([padded[:, dy:dy + h, dx:dx + w, :] for dy in range(k) for dx in range(k)], -1)
    return cols @ kernel.reshape(k * k * c, o)


def conv_im2row(x: jax.Array, kernel: jax.Array) -> jax.Array:
    k, _, c, o = kernel.shape
    p = k // 2
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    h, w = padded.shape[1] - k + 1, padded.shape[2] - k + 1
    rows = jnp.concatenate([padded[:, :, dx:dx + w, :] for dx in range(k)], -1)  # (B, H+2p, W', k*C)
    return sum(rows[:, dy:dy + h] @ kernel[dy].reshape(k * c, o) for dy in range(k))


def _kernel_itself(kernel: jax.Array) -> jax.Array:
    return kernel


@dataclasses.dataclass(frozen=True)
class Lowering:
    """One way to compute a conv: ``run(x, prepare(kernel))``; calling it does both.

    ``prepare`` rewrites the kernel alone (Winograd's transformed kernel, the subpixel phase
    kernel), so a decode can prepare each kernel once for all its network evaluations instead of
    once per evaluation (``cmjax.models.layers.with_prepared_kernels``); ``form`` names what it
    makes ("" for the kernel itself): the params leaf ``kernel:<form>`` holds a prepared kernel.
    """

    run: Callable[[jax.Array, Any], jax.Array]
    prepare: Callable[[jax.Array], Any] = _kernel_itself
    form: str = ""

    def __call__(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        return self.run(x, self.prepare(kernel))


def winograd_kernel(kernel: jax.Array) -> tuple[jax.Array, ...]:
    """(3, 3, C, O) -> the 16 (C, O) matrices U[4p + q] = (G g G^T)[p, q] of Winograd's F(2x2, 3x3).

    Rows of G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]: adds and halvings, each of
    the 16 a separate array (one stacked (16, C, O) array took 3-6x longer to write in XLA on CPU,
    and slicing it again per matmul copied it).
    """
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"winograd lowering is for 3x3 kernels, got {kernel.shape[0]}x{kernel.shape[1]}")

    def g_rows(g0, g1, g2):
        return g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2

    return tuple(u for row in g_rows(kernel[0], kernel[1], kernel[2]) for u in g_rows(row[0], row[1], row[2]))


def winograd_run(x: jax.Array, u: Sequence[jax.Array]) -> jax.Array:
    """The 3x3 convolution of x by the kernel whose ``winograd_kernel`` is u (Lavin & Gray 2016,
    arXiv:1509.09308, F(2x2, 3x3)).

    Each 2x2 output tile comes from a 4x4 input tile d: V = B^T d B, M[p, q] = V[p, q] @ U[p, q]
    (16 matmuls over the tiles, 2.25x fewer multiplies than a direct conv), Y = A^T M A. B and A
    hold only 0 and +-1 and G only 0, +-1/2 (exact in binary), so the rounding error stays that of
    a direct convolution (tested: within 2x of it against float64). Odd sizes are padded to even
    and cropped. Rows first, then columns, each transform a few adds of strided slices.
    """
    b, h, w, c = x.shape
    o = u[0].shape[-1]
    th, tw = -(-h // 2), -(-w // 2)  # tiles per column / row
    # tile (i, j) reads padded rows 2i..2i+3: as (block, parity) pairs (i, 0) (i, 1) (i+1, 0) (i+1, 1)
    padded = jnp.pad(x, ((0, 0), (1, 2 * th - h + 1), (1, 2 * tw - w + 1), (0, 0)))
    blocks = padded.reshape(b, th + 1, 2, tw + 1, 2, c)

    def bt_rows(d0, d1, d2, d3):  # rows of B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]
        return d0 - d2, d1 + d2, d2 - d1, d1 - d3

    v = []
    for r in bt_rows(blocks[:, :th, 0], blocks[:, :th, 1], blocks[:, 1:, 0], blocks[:, 1:, 1]):
        v += bt_rows(r[:, :, :tw, 0], r[:, :, :tw, 1], r[:, :, 1:, 0], r[:, :, 1:, 1])  # (b, th, tw, c) each
    m = [(vi.reshape(-1, c) @ ui).reshape(b, th, tw, o) for vi, ui in zip(v, u)]

    def at_rows(m0, m1, m2, m3):  # rows of A^T = [[1,1,1,0],[0,1,-1,-1]]
        return m0 + m1 + m2, m1 - m2 - m3

    cols = [at_rows(*m[4 * p:4 * p + 4]) for p in range(4)]  # cols[p][j]: column transform done
    tile = [[at_rows(*(cols[p][j] for p in range(4)))[a] for j in range(2)] for a in range(2)]  # tile[a][j]
    y = jnp.stack([jnp.stack(tile[a], axis=3) for a in range(2)], axis=2)  # (b, th, 2, tw, 2, o)
    return y.reshape(b, 2 * th, 2 * tw, o)[:, :h, :w]


CONV = {"xla": Lowering(conv_xla), "im2col": Lowering(conv_im2col), "im2row": Lowering(conv_im2row),
        "winograd": Lowering(winograd_run, winograd_kernel, "winograd")}


def upsampled_kernel(kernel: jax.Array) -> jax.Array:
    """(3, 3, C, O) -> (2, 2, C, 4 * O): the 2x2 kernel of each output phase (a, b), phase-major on O.

    Upsampled output row 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. low-resolution
    rows (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1: two taps, of summed kernel rows
    (k0, k1 + k2) and (k0 + k1, k2); the same along columns. Adds, not an einsum: XLA's CPU dot
    with a 3-long contraction is far slower than these few passes over the kernel.
    """
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"upsampled_conv needs a 3x3 kernel, got {kernel.shape[0]}x{kernel.shape[1]}")

    def taps(k0, k1, k2):  # (phase 0's two taps, phase 1's two taps)
        return (k0, k1 + k2), (k0 + k1, k2)

    phases = []
    for row_taps in taps(kernel[0], kernel[1], kernel[2]):  # output row phase a = 0, 1
        rows = jnp.stack(row_taps)  # (2, 3, C, O)
        for col_taps in taps(rows[:, 0], rows[:, 1], rows[:, 2]):  # output column phase b = 0, 1
            phases.append(jnp.stack(col_taps, axis=1))  # (2, 2, C, O)
    return jnp.concatenate(phases, axis=-1)


def upsampled_run(x: jax.Array, phase_kernel: jax.Array, conv: Lowering = CONV["xla"]) -> jax.Array:
    """``upsampled_conv`` from the prepared ``upsampled_kernel``. (B, H, W, C) -> (B, 2H, 2W, O).

    ``conv`` (a lowering from ``CONV``) runs the 2x2 phase kernel with padding 1 on each side, giving
    (H+1, W+1) positions; output phase (a, b) is the window starting at (a, b) of its channel block.
    """
    b, h, w, _ = x.shape
    o = phase_kernel.shape[-1] // 4
    y = conv(x, phase_kernel).reshape(b, h + 1, w + 1, 4, o)
    rows = [jnp.stack([y[:, a:a + h, c:c + w, 2 * a + c] for c in (0, 1)], axis=3) for a in (0, 1)]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, o)


def upsampled_conv(x: jax.Array, kernel: jax.Array, conv: Lowering = CONV["xla"]) -> jax.Array:
    """conv3x3(upsample_nearest_2x(x)) with padding 1, computed at x's resolution: one 2x2 conv with
    4x the output channels (``upsampled_kernel``), 16/36 of the multiplies and no upsampled copy."""
    return upsampled_run(x, upsampled_kernel(kernel), conv)


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """One convolution call: input (batch, height, width, in_channels), kernel k x k -> out_channels;
    ``upsample``: the conv runs on the input upsampled 2x (nearest), the decoders' upsampling layers."""

    batch: int
    height: int
    width: int
    in_channels: int
    out_channels: int
    kernel: int
    dtype: str
    upsample: bool = False

    def key(self) -> str:
        return (f"{self.batch}x{self.height}x{self.width}x{self.in_channels}->{self.out_channels}"
                f" k{self.kernel} {self.dtype}" + (" up2" if self.upsample else ""))


def applicable(shape: ConvShape) -> tuple[str, ...]:
    """The lowerings that can run ``shape``'s k x k conv: Winograd's F(2x2, 3x3) only for 3x3 float32
    (in bf16/fp16 its transforms' extra roundings would cost accuracy that a direct conv keeps)."""
    if shape.kernel == 3 and shape.dtype == "float32":
        return LOWERINGS
    return tuple(name for name in LOWERINGS if name != "winograd")


def candidates(shape: ConvShape) -> dict[str, Lowering]:
    """name -> ``Lowering`` for every way to compute ``shape``; x is the conv's input (before any upsampling).

    A plain conv: its lowerings. An upsampling conv: each lowering on the upsampled input, and
    "subpixel+<lowering>": ``upsampled_run`` at the low resolution with that lowering.
    """
    if not shape.upsample:
        return {name: CONV[name] for name in applicable(shape)}
    ways = {name: dataclasses.replace(CONV[name], run=lambda x, w, f=CONV[name].run: f(upsample_nearest(x), w))
            for name in applicable(shape)}
    if shape.kernel == 3:  # the lowerings that can run the 2x2 phase kernel
        phase = dataclasses.replace(shape, kernel=2, out_channels=4 * shape.out_channels, upsample=False)
        ways.update({f"{SUBPIXEL}+{name}": Lowering(lambda x, w, f=CONV[name]: upsampled_run(x, w, f),
                                                    upsampled_kernel, SUBPIXEL)
                     for name in applicable(phase)})
    return ways



@dataclasses.dataclass(frozen=True)
class LoweringPlan:
    """Which lowering each convolution uses: a static, hashable value passed to the network.

    ``choices``: (``ConvShape.key()``, name from ``candidates``) pairs, sorted; ``default``: a name
    in ``LOWERINGS`` for every conv the plan does not name. A name that cannot run a shape (Winograd
    on a bf16 or 5x5 conv) gives "xla"; a default lowering on an upsampling conv runs on the
    upsampled input (only a named choice picks a subpixel variant). 1x1 convs are plain matmuls.
    ``LoweringPlan()`` is XLA's convolution everywhere. ``str(plan)`` prints it, one conv a line.
    """

    choices: tuple[tuple[str, str], ...] = ()
    default: str = DEFAULT

    def __post_init__(self):
        choices = self.choices.items() if isinstance(self.choices, dict) else self.choices
        object.__setattr__(self, "choices", tuple(sorted((str(k), str(v)) for k, v in choices)))
        if self.default not in LOWERINGS:
            raise ValueError(f"lowering plan: default {self.default!r} is not one of {', '.join(LOWERINGS)}")
        known = set(LOWERINGS) | {f"{SUBPIXEL}+{name}" for name in LOWERINGS}
        bad = [f"{key}: {name!r}" for key, name in self.choices if name not in known]
        if bad:
            raise ValueError(f"lowering plan: unknown lowering for {', '.join(bad)[:200]}")

    def name(self, shape: ConvShape) -> str:
        """The name in ``candidates(shape)`` this plan uses for ``shape``."""
        ways = candidates(shape)
        chosen = dict(self.choices).get(shape.key())
        if chosen in ways:
            return chosen
        return self.default if self.default in ways else DEFAULT

    def way(self, shape: ConvShape) -> Lowering:
        return candidates(shape)[self.name(shape)]

    @property
    def prepares(self) -> bool:
        """Whether any conv of this plan reads a prepared kernel (Winograd's, a subpixel phase kernel)."""
        names = {self.default} | {name for _, name in self.choices}
        return any(name == "winograd" or name.startswith(SUBPIXEL) for name in names)

    def __str__(self) -> str:
        lines = [f"conv lowering plan: {self.default} unless named ({len(self.choices)} named)"]
        lines += [f"  {key:40s} {name}" for key, name in self.choices]
        return "\n".join(lines)


XLA = LoweringPlan()  # XLA's convolution for every conv: the default wherever nothing was measured
