"""Tests for cmjax.consistency: parameterisation, curricula, iCT/CT/CD/EDM losses, samplers.

Expected values are computed here with plain Python ``math`` / NumPy float64 (or written out
by hand), independently of the jnp implementation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmjax import consistency as C

EPS, T, SD, RHO = 0.002, 80.0, 0.5, 7.0


def py_karras_decreasing(i, n, eps=EPS, tmax=T, rho=RHO):
    """The CM paper's Karras grid (appendix C), written with i = 0 at T."""
    return (tmax ** (1 / rho) + i / (n - 1) * (eps ** (1 / rho) - tmax ** (1 / rho))) ** rho


def py_scalings(t, eps=EPS, sd=SD):
    return (sd ** 2 / ((t - eps) ** 2 + sd ** 2),
            (t - eps) * sd / math.sqrt(t ** 2 + sd ** 2),
            1.0 / math.sqrt(t ** 2 + sd ** 2))


def linear_apply(a=0.7, b=0.3):
    """A toy network F(x_scaled, c) = a * x_scaled + b * c."""
    def apply_fn(xs, cond):
        return a * xs + b * cond[:, None, None, None]
    return apply_fn


def np_linear_f(xt, t, a=0.7, b=0.3):
    """NumPy float64 consistency function over ``linear_apply``; t: (B,)."""
    out = np.empty_like(xt)
    for j in range(xt.shape[0]):
        cs, co, ci = py_scalings(float(t[j]))
        F = a * ci * xt[j] + b * 0.25 * math.log(float(t[j]))
        out[j] = cs * xt[j] + co * F
    return out


# ----------------------------------------------------------------------------------------
# Parameterisation
# ----------------------------------------------------------------------------------------

def test_karras_endpoints_monotone_and_values():
    n = 18
    s = np.asarray(C.karras_sigmas(n))
    assert s.shape == (n,) and s.dtype == np.float32
    assert s[0] == np.float32(EPS) and s[-1] == np.float32(T)
    assert np.all(np.diff(s) > 0)
    # increasing grid = the paper's decreasing grid reversed
    ref = np.array([py_karras_decreasing(i, n) for i in range(n)])[::-1]
    np.testing.assert_allclose(s, ref, rtol=2e-5)
    # hand value: N=3 midpoint ((eps^(1/7) + T^(1/7)) / 2)^7
    mid = ((EPS ** (1 / 7) + T ** (1 / 7)) / 2) ** 7
    assert abs(mid - 2.51522) < 1e-4
    np.testing.assert_allclose(np.asarray(C.karras_sigmas(3))[1], mid, rtol=1e-5)
    # traced-index version agrees, under jit with traced N
    f = jax.jit(lambda i, N: C.karras_sigma_at(i, N))
    np.testing.assert_allclose(np.asarray(f(jnp.arange(n), jnp.int32(n))), s, rtol=2e-6)
    with pytest.raises(ValueError):
        C.karras_sigmas(1)


def test_cm_scalings_hand_values():
    # t = 1 worked by hand: c_skip = .25/(.998^2+.25), c_out = .998*.5/sqrt(1.25), c_in = 1/sqrt(1.25)
    cs, co, ci = (float(v) for v in C.cm_scalings(1.0))
    assert cs == pytest.approx(0.2006414, rel=1e-5)
    assert co == pytest.approx(0.4463192, rel=1e-5)
    assert ci == pytest.approx(0.8944272, rel=1e-5)
    ts = [EPS, 0.01, 0.5, 2.0, 80.0]
    got = [np.asarray(v) for v in C.cm_scalings(jnp.array(ts))]
    for j, t in enumerate(ts):
        for g, e in zip(got, py_scalings(t)):
            assert g[j] == pytest.approx(e, rel=2e-6, abs=1e-9)
    # boundary values are exact
    cs, co, _ = C.cm_scalings(jnp.float32(EPS))
    assert float(cs) == 1.0 and float(co) == 0.0
    # sigma_min=0 gives the EDM scalings
    cs, co, ci = (float(v) for v in C.cm_scalings(2.0, sigma_min=0.0))
    assert cs == pytest.approx(0.25 / 4.25, rel=1e-6)
    assert co == pytest.approx(1.0 / math.sqrt(4.25), rel=1e-6)
    np.testing.assert_allclose(np.asarray(C.noise_conditioning(jnp.array([1.0, math.e, 80.0]))),
                               [0.0, 0.25, 0.25 * math.log(80.0)], rtol=1e-6)


def test_boundary_condition_exact_and_network_inputs():
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (3, 4, 4, 3)) * 0.8
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3)) * 5.0

    def apply_fn(xs, cond):               # arbitrary nonlinear "network" with large outputs
        return jnp.tanh(xs @ w) * 100.0 + jnp.exp(cond)[:, None, None, None]

    out = C.consistency_function(apply_fn, x, EPS)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    # also at the grid's first point and per-example t vectors
    t0 = C.karras_sigma_at(jnp.zeros((3,), jnp.int32), 11)
    np.testing.assert_array_equal(np.asarray(C.consistency_function(apply_fn, x, t0)), np.asarray(x))
    # away from eps the output differs
    assert not np.allclose(np.asarray(C.consistency_function(apply_fn, x, 1.0)), np.asarray(x))

    # the network sees c_in * x_t (with the sqrt) and 0.25 ln t, per example
    seen = {}

    def rec(xs, cond):
        seen["xs"], seen["cond"] = xs, cond
        return jnp.zeros_like(xs)

    t = jnp.array([0.5, 1.0, 3.0])
    out = C.consistency_function(rec, x, t)
    for j, tj in enumerate([0.5, 1.0, 3.0]):
        cs, _, ci = py_scalings(tj)
        np.testing.assert_allclose(np.asarray(seen["xs"][j]), ci * np.asarray(x[j]), rtol=1e-6)
        assert float(seen["cond"][j]) == pytest.approx(0.25 * math.log(tj), rel=1e-6)
        np.testing.assert_allclose(np.asarray(out[j]), cs * np.asarray(x[j]), rtol=1e-6)
    assert seen["cond"].shape == (3,)


# ----------------------------------------------------------------------------------------
# Curricula
# ----------------------------------------------------------------------------------------

def test_ct_num_scales_and_ema():
    K = 1000
    assert C.ct_num_scales(0, K) == 2
    # k = K: ceil(sqrt(151^2) - 1) + 1 = 151 (s1 = 150 intervals)
    assert C.ct_num_scales(K, K) == 151
    # k = K/2: sqrt(0.5 * (151^2 - 4) + 4) = sqrt(11402.5) = 106.78 -> ceil(105.78) + 1 = 107
    assert C.ct_num_scales(500, K) == 107
    assert C.ct_num_scales(2 * K, K) == 151          # clipped past K
    ks = np.arange(K + 1)
    expect = [math.ceil(math.sqrt(k / K * (151 ** 2 - 4) + 4) - 1) + 1 for k in ks]
    assert [C.ct_num_scales(int(k), K) for k in ks] == expect
    assert all(isinstance(C.ct_num_scales(int(k), K), int) for k in (0, 7, K))
    traced = jax.jit(jax.vmap(lambda k: C.ct_num_scales(k, K)))(jnp.asarray(ks))
    assert traced.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(traced), expect)

    assert C.ct_ema_decay(0, K) == pytest.approx(0.81)            # 0.9^(2/1)
    assert C.ct_ema_decay(K, K) == pytest.approx(0.9 ** (2 / 150))
    assert C.ct_ema_decay(500, K) == pytest.approx(0.9 ** (2 / 106))
    np.testing.assert_allclose(float(jax.jit(lambda k: C.ct_ema_decay(k, K))(500)),
                               0.9 ** (2 / 106), rtol=1e-6)


def test_ict_num_scales():
    K = 400000                  # K' = floor(400000 / (log2 128 + 1)) = 50000
    table = {0: 11, 49999: 11, 50000: 21, 99999: 21, 100000: 41, 150000: 81, 200000: 161,
             250000: 321, 300000: 641, 349999: 641, 350000: 1281, 399999: 1281, 400000: 1281,
             10 ** 9: 1281}
    for k, n in table.items():
        assert C.ict_num_scales(k, K) == n, k
    ks = jnp.array(list(table), jnp.int32)
    got = jax.jit(jax.vmap(lambda k: C.ict_num_scales(k, K)))(ks)
    np.testing.assert_array_equal(np.asarray(got), list(table.values()))
    # non power-of-two ratio: s1/s0 = 100, K' = floor(1e5 / (log2(100) + 1)) = 13082
    kp = math.floor(100000 / (math.log2(100) + 1))
    assert kp == 13082
    assert C.ict_num_scales(kp - 1, 100000, 10, 1000) == 11
    assert C.ict_num_scales(kp, 100000, 10, 1000) == 21
    assert C.ict_num_scales(100000, 100000, 10, 1000) == 1001
    assert int(C.ict_num_scales(jnp.int32(kp), jnp.int32(100000), 10, 1000)) == 21


# ----------------------------------------------------------------------------------------
# iCT pieces
# ----------------------------------------------------------------------------------------

def py_lognormal_probs(n, pm=-1.1, ps=2.0):
    t = [py_karras_decreasing(i, n) for i in range(n)][::-1]
    w = [math.erf((math.log(t[i + 1]) - pm) / (math.sqrt(2) * ps))
         - math.erf((math.log(t[i]) - pm) / (math.sqrt(2) * ps)) for i in range(n - 1)]
    return np.array(w) / sum(w), np.array(t)


@pytest.mark.parametrize("n", [11, 161, 1281])
def test_lognormal_pair_probs(n):
    p = np.asarray(C.lognormal_pair_probs(C.karras_sigmas(n)))
    assert p.shape == (n - 1,)
    assert abs(p.sum() - 1.0) < 1e-5 and np.all(p > 0)
    ref, t = py_lognormal_probs(n)
    np.testing.assert_allclose(p, ref, rtol=2e-3, atol=1e-7)
    peak = int(np.argmax(p))
    # (the maximum is flat for large N: adjacent pairs can tie to float32 precision)
    assert ref[peak] >= ref.max() * (1 - 1e-4) and abs(peak - int(np.argmax(ref))) <= 1
    # the peak pair sits at small-to-moderate noise (around exp(Pm) = 0.33, shifted down by the
    # grid's log-spacing), far from both ends
    assert 0.02 < t[peak] < 1.0 and 0 < peak < n - 2
    # masked fixed-length version for a traced N gives the same distribution
    lg = jax.jit(lambda N: C.lognormal_pair_logits(N, 1281))(jnp.int32(n))
    pm = np.exp(np.asarray(lg))
    np.testing.assert_allclose(pm[:n - 1], p, rtol=1e-3, atol=1e-8)
    assert np.all(pm[n - 1:] == 0.0)


def test_sample_pair_indices_histograms():
    n, batch = 11, 100_000
    probs = np.asarray(C.lognormal_pair_probs(C.karras_sigmas(n)), np.float64)

    def chi2(idx, p):
        counts = np.bincount(idx, minlength=len(p))
        assert counts.shape == (len(p),)
        exp = p * len(idx)
        return float(np.sum((counts - exp) ** 2 / exp))

    # 9 degrees of freedom: P(chi2 > 40) ~ 1e-5
    idx = np.asarray(C.sample_pair_indices(jax.random.PRNGKey(3), C.karras_sigmas(n), batch))
    assert idx.min() >= 0 and idx.max() <= n - 2
    assert chi2(idx, probs) < 40
    # traced N, fixed max length: never indexes past N-2, same distribution
    f = jax.jit(lambda k, N: C.sample_pair_indices(k, N, batch, max_scales=41))
    idx = np.asarray(f(jax.random.PRNGKey(4), jnp.int32(n)))
    assert idx.max() <= n - 2
    assert chi2(idx, probs) < 40
    # a skewed alternative must be rejected by the same statistic
    assert chi2(idx, np.full(n - 1, 1.0 / (n - 1))) > 1000
    # uniform (CT/CD)
    idx = np.asarray(C.sample_pair_indices(jax.random.PRNGKey(5), jnp.int32(n), batch,
                                           distribution="uniform"))
    assert idx.min() == 0 and idx.max() == n - 2
    assert chi2(idx, np.full(n - 1, 1.0 / (n - 1))) < 40
    with pytest.raises(ValueError):
        jax.jit(lambda k, N: C.sample_pair_indices(k, N, 4))(jax.random.PRNGKey(0), 11)


def test_pseudo_huber_whole_image_and_c():
    x = np.zeros((2, 2, 2, 1), np.float32)
    y = np.zeros((2, 2, 2, 1), np.float32)
    y[0, 0, 0, 0] = 3.0                      # ||x-y||^2 = 9,  c = 4: sqrt(25) - 4 = 1
    y[1, 0, 0, 0] = 3.0
    y[1, 1, 1, 0] = 3.0                      # ||x-y||^2 = 18: sqrt(34) - 4
    d = np.asarray(C.pseudo_huber(jnp.asarray(x), jnp.asarray(y), 4.0))
    assert d.shape == (2,)
    assert d[0] == pytest.approx(1.0, rel=1e-6)
    assert d[1] == pytest.approx(math.sqrt(34.0) - 4.0, rel=1e-6)
    # an element-wise Huber would give 2 * (sqrt(9 + 16) - 4) = 2 for the second example
    assert abs(d[1] - 2.0) > 0.1
    assert float(C.pseudo_huber(jnp.asarray(x), jnp.asarray(x), 4.0)[0]) == 0.0
    assert C.huber_c(3 * 32 * 32) == pytest.approx(0.00054 * math.sqrt(3072))
    assert C.huber_c(3072) == pytest.approx(0.029929, rel=1e-4)
    np.testing.assert_allclose(np.asarray(C.ict_weighting(jnp.array([1.0]), jnp.array([1.25]))), [4.0])


# ----------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------

def _student_target(a=0.7, b=0.3):
    apply_fn = linear_apply(a, b)
    fn = lambda xt, t: C.consistency_function(apply_fn, xt, t)  # noqa: E731
    return fn, fn


def test_ict_loss_matches_numpy_recomputation():
    x = jax.random.uniform(jax.random.PRNGKey(10), (6, 4, 4, 3), minval=-1, maxval=1)
    key = jax.random.PRNGKey(11)
    N = 11
    student, target = _student_target()
    loss, metrics = jax.jit(lambda k: C.ict_loss(student, target, x, k, N))(key)
    # reproduce the documented key usage with public functions, then do the math in NumPy
    key_n, key_z = jax.random.split(key)
    n = np.asarray(C.sample_pair_indices(key_n, N, x.shape[0]))
    z = np.asarray(jax.random.normal(key_z, x.shape), np.float64)
    xn = np.asarray(x, np.float64)
    t_grid = [py_karras_decreasing(i, N) for i in range(N)][::-1]
    t_lo = np.array([t_grid[i] for i in n])
    t_hi = np.array([t_grid[i + 1] for i in n])
    s_out = np_linear_f(xn + t_hi[:, None, None, None] * z, t_hi)
    t_out = np_linear_f(xn + t_lo[:, None, None, None] * z, t_lo)
    c = 0.00054 * math.sqrt(4 * 4 * 3)
    d = np.sqrt(((s_out - t_out) ** 2).reshape(6, -1).sum(1) + c * c) - c
    expect = np.mean(d / (t_hi - t_lo))
    assert float(loss) == pytest.approx(expect, rel=1e-4)
    assert float(metrics["loss"]) == float(loss)
    assert float(metrics["distance"]) == pytest.approx(d.mean(), rel=1e-4)
    assert int(metrics["num_scales"]) == N
    assert loss.dtype == jnp.float32


def test_ict_loss_target_is_stop_gradient():
    x = jax.random.uniform(jax.random.PRNGKey(12), (4, 4, 4, 3), minval=-1, maxval=1)
    key = jax.random.PRNGKey(13)

    def loss_of(a_student, a_target):
        s = lambda xt, t: C.consistency_function(linear_apply(a_student), xt, t)  # noqa: E731
        tg = lambda xt, t: C.consistency_function(linear_apply(a_target), xt, t)  # noqa: E731
        return C.ict_loss(s, tg, x, key, 11)[0]

    g_student, g_target = jax.jit(jax.grad(loss_of, argnums=(0, 1)))(0.7, 0.9)
    assert float(g_target) == 0.0
    assert abs(float(g_student)) > 0.0 and np.isfinite(float(g_student))


def test_ict_loss_traced_N_compiles_once():
    x = jax.random.uniform(jax.random.PRNGKey(14), (4, 4, 4, 3), minval=-1, maxval=1)
    traces = {"n": 0}

    def step(a, key, N):
        traces["n"] += 1                  # Python side effect: runs once per trace
        s = lambda xt, t: C.consistency_function(linear_apply(a), xt, t)  # noqa: E731
        return jax.value_and_grad(
            lambda p: C.ict_loss(lambda xt, t: C.consistency_function(linear_apply(p), xt, t),
                                 s, x, key, N, max_scales=1281)[0])(a)

    jstep = jax.jit(step)
    vals = []
    for k_step in (0, 60000, 120000, 380000):
        N = C.ict_num_scales(k_step, 400000)
        loss, grad = jstep(jnp.float32(0.7), jax.random.PRNGKey(15), jnp.int32(N))
        vals.append(float(loss))
        assert np.isfinite(float(loss)) and np.isfinite(float(grad))
    assert traces["n"] == 1
    assert len(set(vals)) == 4            # N actually changes the computation
    # traced N equals the static-N computation
    s, tg = _student_target()
    static = C.ict_loss(s, tg, x, jax.random.PRNGKey(16), 41, max_scales=1281)[0]
    traced = jax.jit(lambda N: C.ict_loss(s, tg, x, jax.random.PRNGKey(16), N,
                                          max_scales=1281)[0])(jnp.int32(41))
    assert float(traced) == pytest.approx(float(static), rel=1e-6)


def test_ct_loss_metrics_and_traced_N():
    x = jax.random.uniform(jax.random.PRNGKey(20), (5, 4, 4, 3), minval=-1, maxval=1)
    key = jax.random.PRNGKey(21)
    N = 18
    student, target = _student_target()
    key_n, key_z = jax.random.split(key)
    n = np.asarray(jax.random.randint(key_n, (5,), 0, N - 1))
    assert n.max() <= N - 2
    z = np.asarray(jax.random.normal(key_z, x.shape), np.float64)
    xn = np.asarray(x, np.float64)
    t_grid = [py_karras_decreasing(i, N) for i in range(N)][::-1]
    t_lo = np.array([t_grid[i] for i in n])
    t_hi = np.array([t_grid[i + 1] for i in n])
    diff = (np_linear_f(xn + t_hi[:, None, None, None] * z, t_hi)
            - np_linear_f(xn + t_lo[:, None, None, None] * z, t_lo)).reshape(5, -1)
    c = 0.00054 * math.sqrt(48)
    expect = {"l2": (diff ** 2).mean(1).mean(),
              "l1": np.abs(diff).mean(1).mean(),
              "pseudo_huber": (np.sqrt((diff ** 2).sum(1) + c * c) - c).mean()}
    for metric, e in expect.items():
        loss, _ = C.ct_loss(student, target, x, key, N, metric=metric)
        assert float(loss) == pytest.approx(e, rel=1e-4), metric
    jl = jax.jit(lambda N: C.ct_loss(student, target, x, key, N)[0])(jnp.int32(N))
    assert float(jl) == pytest.approx(expect["l2"], rel=1e-4)
    with pytest.raises(ValueError):
        C.ct_loss(student, target, x, key, N, metric="lpips")


def test_heun_step_exact_for_point_mass_and_accurate_for_gaussian():
    x_data = jax.random.uniform(jax.random.PRNGKey(30), (2, 4, 4, 3), minval=-1, maxval=1)
    z = jax.random.normal(jax.random.PRNGKey(31), x_data.shape)
    t_hi, t_lo = 3.0, 1.7
    # point mass at x_data: D(x, t) = x_data, ODE solution x(t) = x_data + t z
    out = C.heun_step(lambda x, s: x_data, x_data + t_hi * z, t_hi, t_lo)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x_data + t_lo * z), atol=1e-5)
    # Gaussian data N(0, s^2): D(x, t) = x s^2/(s^2+t^2); x(t) = x(t1) sqrt(s^2+t^2)/sqrt(s^2+t1^2)
    s2 = 0.25
    den = lambda x, s: x * s2 / (s2 + s[:, None, None, None] ** 2)  # noqa: E731
    t_hi, t_lo = 3.0, 2.7
    x1 = z * math.sqrt(s2 + t_hi ** 2)
    exact = np.asarray(x1) * math.sqrt(s2 + t_lo ** 2) / math.sqrt(s2 + t_hi ** 2)
    heun = np.asarray(C.heun_step(den, x1, t_hi, t_lo))
    euler = np.asarray(x1 + (t_lo - t_hi) * (x1 - den(x1, jnp.full((2,), t_hi))) / t_hi)
    err_h, err_e = np.abs(heun - exact).max(), np.abs(euler - exact).max()
    assert err_h < 0.2 * err_e and err_h < 5e-4
    # and it is exactly the Heun formula (float64 NumPy recomputation)
    xn = np.asarray(x1, np.float64)
    D = lambda v, t: v * s2 / (s2 + t ** 2)  # noqa: E731
    d1 = (xn - D(xn, t_hi)) / t_hi
    xe = xn + (t_lo - t_hi) * d1
    d2 = (xe - D(xe, t_lo)) / t_lo
    np.testing.assert_allclose(heun, xn + (t_lo - t_hi) * (d1 + d2) / 2, atol=1e-5)


def test_cd_loss_with_exact_point_mass_teacher_equals_ct():
    x = jax.random.uniform(jax.random.PRNGKey(40), (4, 4, 4, 3), minval=-1, maxval=1)
    key = jax.random.PRNGKey(41)
    student, target = _student_target()
    # the exact denoiser of a point mass at each example (D = x) makes Heun land on x + t_n z
    cd, _ = C.cd_loss(student, target, lambda xt, s: x, x, key, 11)
    ct, _ = C.ct_loss(student, target, x, key, 11)
    assert float(cd) == pytest.approx(float(ct), rel=1e-4)
    # a wrong teacher gives a different loss
    cd_bad, _ = C.cd_loss(student, target, lambda xt, s: jnp.zeros_like(xt), x, key, 11)
    assert abs(float(cd_bad) - float(ct)) > 1e-3 * float(ct)


def test_edm_denoising_loss():
    x = jax.random.uniform(jax.random.PRNGKey(50), (8, 4, 4, 3), minval=-1, maxval=1)
    key = jax.random.PRNGKey(51)
    loss, m = jax.jit(lambda k: C.edm_denoising_loss(lambda y, s: jnp.zeros_like(y), x, k))(key)
    assert np.isfinite(float(loss)) and float(loss) > 0
    # perfect denoiser -> 0
    assert float(C.edm_denoising_loss(lambda y, s: x, x, key)[0]) == 0.0
    # identity denoiser: D - x = sigma z, so loss = mean((s^2 + sd^2)/sd^2 * mean(z^2))
    k_s, k_z = jax.random.split(key)
    sig = np.exp(-1.2 + 1.2 * np.asarray(jax.random.normal(k_s, (8,)), np.float64))
    z = np.asarray(jax.random.normal(k_z, x.shape), np.float64)
    expect = np.mean((sig ** 2 + 0.25) / 0.25 * (z ** 2).reshape(8, -1).mean(1))
    loss_id, _ = C.edm_denoising_loss(lambda y, s: y, x, key)
    assert float(loss_id) == pytest.approx(expect, rel=1e-4)
    # gradient through an EDM-preconditioned linear network is finite
    g = jax.jit(jax.grad(lambda a: C.edm_denoising_loss(
        lambda y, s: C.edm_denoiser(linear_apply(a), y, s), x, key)[0]))(0.5)
    assert np.isfinite(float(g)) and float(g) != 0.0


# ----------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------

def test_sample_multistep_shapes_clipping_and_noise():
    shape = (3, 4, 4, 3)
    calls = []

    def fn(xt, t):
        calls.append((xt, t))
        return 5.0 * xt                   # far outside [-1, 1] -> must be clipped

    key = jax.random.PRNGKey(60)
    sigmas = [80.0, 10.0, 0.005]        # small last sigma: sqrt(t^2 - eps^2) != t visibly
    out = C.sample_multistep(fn, key, shape, sigmas)
    assert out.shape == shape and out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out))) <= 1.0
    assert len(calls) == 3
    keys = jax.random.split(key, 3)
    np.testing.assert_allclose(np.asarray(calls[0][0]),
                               80.0 * np.asarray(jax.random.normal(keys[0], shape)), rtol=1e-6)
    for i, t in enumerate(sigmas):
        assert calls[i][1].shape == (3,) and np.allclose(np.asarray(calls[i][1]), t)
    # re-noising: x = clip(f(x, t_i)) + sqrt(t_{i+1}^2 - eps^2) z
    x0 = np.clip(5.0 * np.asarray(calls[0][0]), -1, 1)
    expect = x0 + math.sqrt(10.0 ** 2 - EPS ** 2) * np.asarray(jax.random.normal(keys[1], shape))
    np.testing.assert_allclose(np.asarray(calls[1][0]), expect, rtol=1e-5, atol=1e-5)
    x0 = np.clip(5.0 * np.asarray(calls[1][0]), -1, 1)
    std = math.sqrt(0.005 ** 2 - EPS ** 2)          # 0.0045826, not 0.005
    expect = x0 + std * np.asarray(jax.random.normal(keys[2], shape))
    np.testing.assert_allclose(np.asarray(calls[2][0]), expect, rtol=0, atol=1e-6)
    # no clipping when disabled
    out_nc = C.sample_multistep(lambda xt, t: 5.0 * xt, key, shape, sigmas, clip_denoised=False)
    assert float(jnp.max(jnp.abs(out_nc))) > 1.0
    # one step == multistep with [sigma_max]; works under jit with a real consistency function
    f = lambda xt, t: C.consistency_function(linear_apply(), xt, t)  # noqa: E731
    one = jax.jit(lambda k: C.sample_onestep(f, k, shape))(key)
    np.testing.assert_allclose(np.asarray(one),
                               np.asarray(C.sample_multistep(f, key, shape, [80.0])), atol=1e-6)
    assert one.shape == shape and float(jnp.max(jnp.abs(one))) <= 1.0
    with pytest.raises(ValueError):
        C.sample_multistep(fn, key, shape, [0.821, 80.0])
