"""The one XLA setting cmjax changes: on CPU, convolutions on XLA's own kernels rather than YNNPACK.

jaxlib 0.10's XLA:CPU hands convolutions (alone, and fused with the elementwise ops around them) to
YNNPACK, which was 1.2-3x slower than XLA's own (Eigen) convolution on every conv shape of the
decoder measured, in float32 and bfloat16, forward and backward (Intel Xeon, family 6 model 167,
2 cores; ``benchmarks/README.md``): a 2x8x12x2048->1024 3x3 conv 75 ms against 37 ms, one network
evaluation of the full-size decoder at 32x48 px 1.68 s against 0.96 s, a 64x16x16x64 conv's
gradients 52 ms against 17 ms. Dots and reductions stay with YNNPACK (its reductions were 2x
faster there).

``apply()`` (called by ``import cmjax``) adds ``--xla_cpu_experimental_ynn_fusion_type`` with
only those two kinds to ``XLA_FLAGS``, where all of these hold:

* the variable does not name that flag already (yours wins; set it to anything to keep XLA's default);
* ``CMJAX_XLA_CPU`` is not ``0`` (``0``: cmjax leaves ``XLA_FLAGS`` alone);
* jaxlib is a version this flag was measured on (``MEASURED_JAXLIB``): XLA aborts the process on a
  flag it does not know, so an unknown version is left alone;
* JAX has not started a backend yet (XLA reads ``XLA_FLAGS`` once, when the first one starts:
  import cmjax before running anything with JAX for the setting to apply).

It is a compiler setting, not a numeric one: results agree with XLA's default to float32 rounding.
It changes nothing on GPU or TPU (the flag is read by XLA:CPU only). The variable is set in this
process's environment, so subprocesses inherit it.
"""
from __future__ import annotations

import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type"
VALUE = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
MEASURED_JAXLIB = ("0.10.",)  # version prefixes where FLAG exists and was measured
OFF_ENV = "CMJAX_XLA_CPU"


def apply() -> bool:
    """Add ``FLAG=VALUE`` to ``XLA_FLAGS`` when the module docstring's conditions hold; True if it did."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get(OFF_ENV, "1") == "0" or FLAG in flags:
        return False
    from jaxlib.version import __version__ as jaxlib_version

    if not jaxlib_version.startswith(MEASURED_JAXLIB):
        return False
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}={VALUE}".strip()
    return True
