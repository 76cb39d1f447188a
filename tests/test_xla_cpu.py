"""cmjax.xla_cpu: ``import cmjax`` keeps XLA:CPU's convolutions off YNNPACK, only when it may."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmjax import xla_cpu
from tests.conftest import REPO

# A conv followed by elementwise ops (what XLA fuses into one YNNPACK call by default); prints whether
# the compiled program calls YNNPACK, XLA_FLAGS, what apply() returned, and the output.
PROBE = """
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
if sys.argv[1] == "jax-first":
    jnp.ones(1).block_until_ready()  # a backend starts before cmjax is imported
import cmjax
from cmjax import xla_cpu
x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 8, 32)), jnp.float32)
k = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 32, 16)), jnp.float32)
f = jax.jit(lambda x, k: jax.nn.silu(jax.lax.conv_general_dilated(
    x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + 1.0))
text = f.lower(x, k).compile().as_text()
print(json.dumps({"ynn": "ynn_fusion" in text, "flags": os.environ.get("XLA_FLAGS", ""),
                  "out": np.asarray(f(x, k)).ravel().tolist()}))
"""


def _probe(env_extra: dict, mode: str = "cmjax-first") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.OFF_ENV)}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_test_process_runs_what_users_run():
    """conftest imports cmjax before JAX starts: the suite compiles with the setting users get."""
    assert f"{xla_cpu.FLAG}={xla_cpu.VALUE}" in os.environ["XLA_FLAGS"]
    x = jnp.ones((1, 6, 8, 32), jnp.float32)
    k = jnp.ones((3, 3, 32, 16), jnp.float32)
    text = jax.jit(lambda x, k: jax.nn.silu(jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))).lower(x, k).compile().as_text()
    assert "convolution" in text and "ynn_fusion" not in text


@pytest.mark.cli  # fresh processes (XLA reads XLA_FLAGS once per process)
def test_import_moves_convolutions_off_ynnpack_and_changes_only_rounding():
    on = _probe({})
    off = _probe({xla_cpu.OFF_ENV: "0"})
    assert not on["ynn"] and f"{xla_cpu.FLAG}={xla_cpu.VALUE}" in on["flags"]
    assert off["ynn"] and off["flags"] == ""  # XLA's default does call YNNPACK: the setting is not a no-op
    np.testing.assert_allclose(on["out"], off["out"], rtol=1e-5, atol=1e-5)


@pytest.mark.cli
def test_a_users_flags_are_kept():
    mine = "--xla_force_host_platform_device_count=2"
    kept = _probe({"XLA_FLAGS": mine})
    assert kept["flags"] == f"{mine} {xla_cpu.FLAG}={xla_cpu.VALUE}" and not kept["ynn"]
    own = f"{xla_cpu.FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"  # the user's choice of the flag itself wins
    assert _probe({"XLA_FLAGS": own})["flags"] == own


@pytest.mark.cli
def test_nothing_is_changed_once_jax_has_started():
    late = _probe({}, mode="jax-first")
    assert late["flags"] == "" and late["ynn"]
