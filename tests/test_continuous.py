"""Tests pinning the continuous-time objectives of cmjax.continuous (sCM/TrigFlow, ECT, MeanFlow).

Each would fail if a sign, scale or factor were wrong:
  * JVP tangents equal central finite differences along the same path (float64, 1e-6 relative);
  * the sCT gradient is the dt -> 0 limit of the discrete CT gradient with weight 1/(sd tan t),
    the error falling about linearly in dt; the same for ECT's r -> t limit;
  * MeanFlow: r = t gives the flow-matching target v exactly; for Gaussian data the closed-form
    average velocity satisfies the MeanFlow identity to float64 precision, and one sampler step
    with it maps noise exactly onto the data distribution's scaling;
  * TrigFlow's boundary f(x, 0) = x; the proposal distributions' moments; hand values of the
    tangent warm-up and of ECT's r(t) mapping.
Tiny pure-JAX networks (a tanh MLP over pixels and time) keep every test well under a second of
compute; float64 runs inside ``jax.enable_x64(True)``.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmjax import consistency as C
from cmjax import continuous as CT

SD = 0.5
SHAPE = (3, 2, 2, 1)  # (B, H, W, C): D = 4 pixels


def mlp_params(key, d=4, hidden=16, time_inputs=1, dtype=jnp.float64):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w1": jax.random.normal(k1, (d + time_inputs, hidden), dtype) / math.sqrt(d + 1),
            "b1": jnp.zeros((hidden,), dtype) + 0.1,
            "w2": jax.random.normal(k2, (hidden, d), dtype) / math.sqrt(hidden),
            "b2": jax.random.normal(k3, (d,), dtype) * 0.1}


def mlp(params, x, *times):
    """(B, H, W, C), times (B,) each -> (B, H, W, C): a smooth function of pixels and times."""
    b = x.shape[0]
    h = jnp.concatenate([x.reshape(b, -1)] + [t.reshape(b, 1) for t in times], axis=-1)
    h = jnp.tanh(h @ params["w1"] + params["b1"])
    return (h @ params["w2"] + params["b2"]).reshape(x.shape)


def _data(seed=0, dtype=jnp.float64):
    k0, k1 = jax.random.split(jax.random.key(seed))
    x0 = jax.random.uniform(k0, SHAPE, dtype, -1, 1)
    z = SD * jax.random.normal(k1, SHAPE, dtype)
    return x0, z


# --------------------------------------------------------------------------------------------
# TrigFlow / sCM


def test_trigflow_boundary_and_edm_time_map():
    p = mlp_params(jax.random.key(0), dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), SHAPE) * 3
    net = lambda u, t: mlp(p, u, t)
    f0 = CT.trigflow_consistency(net, x, jnp.zeros((SHAPE[0],)))
    np.testing.assert_array_equal(np.asarray(f0), np.asarray(x))  # exactly: cos 0 = 1, sin 0 = 0
    # At t = pi/2 only the network term is left: f = -sd F(x / sd, pi/2).
    tp = jnp.full((SHAPE[0],), math.pi / 2)
    np.testing.assert_allclose(np.asarray(CT.trigflow_consistency(net, x, tp)),
                               np.asarray(-SD * net(x / SD, tp)), atol=1e-6)
    # sigma = sd tan t and back; sigma_max 80 -> T = arctan(160) (sCM's T = 1.5645).
    assert float(CT.trigflow_time(80.0)) == pytest.approx(math.atan(160.0))
    assert float(CT.edm_sigma(CT.trigflow_time(0.821))) == pytest.approx(0.821, rel=1e-6)


def test_trigflow_proposal_moments():
    t = CT.sample_trigflow_times(jax.random.key(0), 200_000, p_mean=-1.0, p_std=1.4)
    assert float(t.min()) > 0 and float(t.max()) < math.pi / 2
    log_sigma = np.log(SD * np.tan(np.asarray(t, np.float64)))
    assert log_sigma.mean() == pytest.approx(-1.0, abs=0.01)
    assert log_sigma.std() == pytest.approx(1.4, abs=0.01)


def test_tangent_warmup_hand_values():
    assert float(CT.tangent_warmup(0, 10_000)) == 0.0
    assert float(CT.tangent_warmup(2_500, 10_000)) == 0.25
    assert float(CT.tangent_warmup(10_000, 10_000)) == 1.0
    assert float(CT.tangent_warmup(50_000, 10_000)) == 1.0
    assert float(CT.tangent_warmup(7, 0)) == 1.0


def _path(x0, z, t):
    c, s = jnp.cos(t)[:, None, None, None], jnp.sin(t)[:, None, None, None]
    return c * x0 + s * z


def test_scm_jvp_tangent_equals_central_differences():
    with jax.enable_x64(True):
        p = mlp_params(jax.random.key(3))
        net = lambda u, t: mlp(p, u, t)
        x0, z = _data()
        t = jnp.array([0.3, 0.9, 1.4], jnp.float64)
        x_t = _path(x0, z, t)
        dxdt = jnp.cos(t)[:, None, None, None] * z - jnp.sin(t)[:, None, None, None] * x0
        F, g, cs_dF = CT.trigflow_tangent(net, x_t, t, dxdt, warmup=1.0, norm_c=None, sigma_data=SD)
        h = 1e-5
        Fp, Fm = net(_path(x0, z, t + h) / SD, t + h), net(_path(x0, z, t - h) / SD, t - h)
        cs = (jnp.cos(t) * jnp.sin(t))[:, None, None, None]
        np.testing.assert_allclose(np.asarray(cs_dF), np.asarray(cs * (Fp - Fm) / (2 * h)), rtol=1e-6, atol=1e-10)
        np.testing.assert_array_equal(np.asarray(F), np.asarray(net(x_t / SD, t)))
        # g = cos(t) df/dt along the path (f = cos t x_t - sin t sd F).
        f = lambda s: CT.trigflow_consistency(net, _path(x0, z, s), s, SD)
        g_fd = jnp.cos(t)[:, None, None, None] * (f(t + h) - f(t - h)) / (2 * h)
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_fd), rtol=1e-6, atol=1e-9)
        # The warm-up factor scales only the second term; r = 0 leaves -cos^2 t (sd F - dx/dt).
        _, g0, _ = CT.trigflow_tangent(net, x_t, t, dxdt, warmup=0.0, norm_c=None, sigma_data=SD)
        np.testing.assert_allclose(np.asarray(g0), np.asarray(-jnp.cos(t)[:, None, None, None] ** 2
                                                             * (SD * F - dxdt)), rtol=1e-12)
        _, g3, _ = CT.trigflow_tangent(net, x_t, t, dxdt, warmup=0.3, norm_c=None, sigma_data=SD)
        np.testing.assert_allclose(np.asarray(g3), np.asarray(g0 + 0.3 * (g - g0)), rtol=1e-10, atol=1e-14)
        # Tangent normalisation: g / (||g|| + c) per example.
        _, gn, _ = CT.trigflow_tangent(net, x_t, t, dxdt, warmup=1.0, norm_c=0.1, sigma_data=SD)
        norms = np.sqrt((np.asarray(g) ** 2).sum(axis=(1, 2, 3)))
        np.testing.assert_allclose(np.asarray(gn), np.asarray(g) / (norms + 0.1)[:, None, None, None], rtol=1e-12)


def test_sct_gradient_is_the_limit_of_discrete_ct():
    """grad scm_loss (logvar 0, no normalisation, r = 1) = lim_{dt->0} grad L_dt / (B D dt) with
    L_dt = sum_b w_b ||f_theta(x_t, t) - sg f(x_{t-dt}, t-dt)||^2 and w = 1 / (sd tan t)."""
    with jax.enable_x64(True):
        p = mlp_params(jax.random.key(4))
        x0, _ = _data(1)
        key = jax.random.key(11)
        B, D = SHAPE[0], math.prod(SHAPE[1:])

        def scm(params):
            net = lambda u, t: mlp(params, u, t)
            sg = jax.tree.map(jax.lax.stop_gradient, params)
            return CT.scm_loss(net, lambda u, t: mlp(sg, u, t), lambda t: jnp.zeros_like(t), x0, key,
                               warmup=1.0, norm_c=None, sigma_data=SD)[0]

        g_cont = jax.grad(scm)(p)
        k_t, k_z = jax.random.split(key)  # scm_loss's documented draws
        t = CT.sample_trigflow_times(k_t, B, -1.0, 1.4, SD, jnp.float64)
        z = SD * jax.random.normal(k_z, SHAPE, jnp.float64)
        w = (1.0 / (SD * jnp.tan(t)))[:, None, None, None]

        def discrete(params, dt):
            f = lambda prm, s: CT.trigflow_consistency(lambda u, tt: mlp(prm, u, tt), _path(x0, z, s), s, SD)
            target = jax.lax.stop_gradient(f(p, t - dt))
            return jnp.sum(w * (f(params, t) - target) ** 2) / (B * D * dt)

        flat = lambda tree: np.concatenate([np.ravel(v) for v in jax.tree.leaves(tree)])
        ref = flat(g_cont)
        errs = [np.linalg.norm(flat(jax.grad(discrete)(p, dt)) - ref) / np.linalg.norm(ref)
                for dt in (4e-3, 2e-3, 1e-3, 5e-4)]
        ratios = [a / b for a, b in zip(errs[:-1], errs[1:])]
        assert errs[-1] < 2e-3, errs
        assert all(1.7 < r < 2.3 for r in ratios), (errs, ratios)  # first order in dt


def test_scd_with_an_exact_teacher_is_sct():
    """sCD's teacher velocity (cos t x_t - D) / sin t equals sCT's cos t z - sin t x0 when the
    teacher's x0 estimate D is exact, so the two losses coincide."""
    with jax.enable_x64(True):
        p = mlp_params(jax.random.key(5))
        x0, _ = _data(2)
        key = jax.random.key(12)
        net = lambda u, t: mlp(p, u, t)
        kw = dict(warmup=0.7, norm_c=0.1, sigma_data=SD)
        l_sct = CT.scm_loss(net, net, lambda t: 0.1 * t, x0, key, **kw)[0]
        exact = lambda x_t, t: (jnp.cos(t)[:, None, None, None] * x_t - x0) / jnp.sin(t)[:, None, None, None]
        l_scd = CT.scm_loss(net, net, lambda t: 0.1 * t, x0, key, teacher_velocity=exact, **kw)[0]
        assert float(l_scd) == pytest.approx(float(l_sct), rel=1e-10)


# --------------------------------------------------------------------------------------------
# ECT


def test_ect_mapping_hand_values():
    s = 1.0 / (1.0 + math.exp(1.0))  # sigmoid(-1)
    t = jnp.array([1.0])
    assert float(CT.ect_ratio(t, 0)[0]) == pytest.approx(1 - 0.5 * (1 + 8 * s), rel=1e-6)  # negative
    assert float(CT.ect_r(t, 0)[0]) == 0.0  # clamped
    assert float(CT.ect_r(t, 3)[0]) == pytest.approx(1 - (1 + 8 * s) / 16, rel=1e-6)
    # Large t: sigmoid(-t) -> 0 and r/t -> 1 - q^-(stage+1).
    assert float(CT.ect_ratio(jnp.array([80.0]), 1, q=4.0)[0]) == pytest.approx(1 - 1 / 16, rel=1e-6)
    assert float(CT.ect_weight(jnp.array([0.5]), jnp.array([0.3]), "snr_plus")[0]) == pytest.approx(0.5 / 0.0625)
    assert float(CT.ect_weight(jnp.array([0.5]), jnp.array([0.3]))[0]) == pytest.approx(1 / 0.2)  # main's default
    with pytest.raises(ValueError, match="weighting"):
        CT.ect_weight(jnp.array([0.5]), jnp.array([0.3]), "snr")


def test_ect_gradient_tends_to_the_continuous_limit_as_r_goes_to_t():
    with jax.enable_x64(True):
        p = mlp_params(jax.random.key(6))
        x0, _ = _data(3)
        key = jax.random.key(13)
        f = lambda prm: (lambda y, s: C.consistency_function(lambda u, c: mlp(prm, u, c), y, s))
        t = jnp.array([0.2, 1.0, 5.0], jnp.float64)
        _, z = CT._ect_times(key, x0, -1.1, 2.0)
        sg = lambda prm: jax.tree.map(jax.lax.stop_gradient, prm)
        g_cont = jax.grad(lambda prm: CT.ect_continuous_loss(f(prm), f(sg(prm)), x0, z, t))(p)
        flat = lambda tree: np.concatenate([np.ravel(v) for v in jax.tree.leaves(tree)])
        ref = flat(g_cont)
        errs = []
        for rel in (4e-3, 2e-3, 1e-3, 5e-4):
            loss = lambda prm: CT.ect_loss(f(prm), f(sg(prm)), x0, key, 0, t=t, r=t * (1 - rel),
                                           weighting="snr_plus")[0]
            errs.append(np.linalg.norm(flat(jax.grad(loss)(p)) - ref) / np.linalg.norm(ref))
        ratios = [a / b for a, b in zip(errs[:-1], errs[1:])]
        assert errs[-1] < 2e-3, errs
        assert all(1.7 < r < 2.3 for r in ratios), (errs, ratios)


def test_ect_target_is_the_data_where_r_is_zero():
    x0, _ = _data(4, jnp.float32)
    key = jax.random.key(14)
    ident = lambda y, s: jnp.zeros_like(y) + 100.0  # would dominate if it were called at r = 0
    student = lambda y, s: x0 + 0.5
    loss, _ = CT.ect_loss(student, ident, x0, key, 0, t=jnp.full((3,), 0.3), r=jnp.zeros((3,)))
    d = math.sqrt(0.25 * math.prod(SHAPE[1:]))
    assert float(loss) == pytest.approx(d / 0.3, rel=1e-5)  # weight 1 / (t - r) with r = 0


# --------------------------------------------------------------------------------------------
# MeanFlow


def test_meanflow_jvp_equals_central_differences_and_r_equals_t_is_flow_matching():
    with jax.enable_x64(True):
        p = mlp_params(jax.random.key(7), time_inputs=2)
        u_fn = lambda z, r, t: mlp(p, z, r, t)
        x0, _ = _data(5)
        e = jax.random.normal(jax.random.key(8), SHAPE, jnp.float64)
        t = jnp.array([0.2, 0.6, 0.95], jnp.float64)
        r = jnp.array([0.0, 0.3, 0.5], jnp.float64)
        tb = t[:, None, None, None]
        z = (1 - tb) * x0 + tb * e
        v = e - x0
        u, u_tgt = CT.meanflow_target(u_fn, z, r, t, v)
        h = 1e-5
        dudt = (u_fn(z + h * v, r, t + h) - u_fn(z - h * v, r, t - h)) / (2 * h)
        np.testing.assert_allclose(np.asarray(u_tgt), np.asarray(v - (t - r)[:, None, None, None] * dudt),
                                   rtol=1e-6, atol=1e-10)
        np.testing.assert_array_equal(np.asarray(u), np.asarray(u_fn(z, r, t)))
        _, fm = CT.meanflow_target(u_fn, z, t, t, v)
        np.testing.assert_array_equal(np.asarray(fm), np.asarray(v))  # r = t: flow matching
    r1, t1 = CT.sample_meanflow_times(jax.random.key(0), 1000, equal_fraction=1.0)
    np.testing.assert_array_equal(np.asarray(r1), np.asarray(t1))


def _gaussian_flow(s):
    """Data N(0, s^2), noise N(0, 1), z_t = (1-t) x + t e: sigma_t^2 = (1-t)^2 s^2 + t^2,
    v(z, t) = z (t - (1-t) s^2) / sigma_t^2, and the exact average velocity
    u(z, r, t) = z (1 - sigma_r / sigma_t) / (t - r) (the flow is z_r = z_t sigma_r / sigma_t)."""
    sig = lambda t: jnp.sqrt((1 - t) ** 2 * s ** 2 + t ** 2)
    b = lambda t: t[:, None, None, None]
    v = lambda z, t: z * b((t - (1 - t) * s ** 2) / sig(t) ** 2)
    u = lambda z, r, t: z * b((1 - sig(r) / sig(t)) / (t - r))
    return v, u


def test_meanflow_identity_holds_for_the_gaussian_closed_form():
    with jax.enable_x64(True):
        s = 0.4
        v, u = _gaussian_flow(s)
        z = jax.random.normal(jax.random.key(9), SHAPE, jnp.float64)
        t = jnp.array([0.3, 0.7, 1.0], jnp.float64)
        r = jnp.array([0.0, 0.2, 0.6], jnp.float64)
        u_val, u_tgt = CT.meanflow_target(u, z, r, t, v(z, t))
        np.testing.assert_allclose(np.asarray(u_tgt), np.asarray(u_val), rtol=1e-12, atol=1e-14)
        # A wrong sign of the (t - r) term would miss by a lot.
        assert np.abs(np.asarray(2 * v(z, t) - u_tgt - u_val)).max() > 1e-2
        # One sampler step with the exact u maps noise onto data: z_0 = s * e exactly.
        e = jax.random.normal(jax.random.key(10), (4096, 1, 1, 1), jnp.float64)
        x = CT.meanflow_sample(u, e, (1.0, 0.0))
        np.testing.assert_allclose(np.asarray(x), s * np.asarray(e), rtol=1e-12)
        x2 = CT.meanflow_sample(u, e, (1.0, 0.5, 0.0))
        np.testing.assert_allclose(np.asarray(x2), s * np.asarray(e), rtol=1e-12)


def test_meanflow_time_sampler_moments():
    r, t = CT.sample_meanflow_times(jax.random.key(1), 200_000, p_mean=-0.4, p_std=1.0, equal_fraction=0.75)
    r, t = np.asarray(r, np.float64), np.asarray(t, np.float64)
    assert np.all(r <= t) and np.all((t > 0) & (t < 1))
    equal = r == t
    assert equal.mean() == pytest.approx(0.75, abs=0.005)
    pooled = np.concatenate([r[~equal], t[~equal]])  # two iid logit-normal draws, sorted
    logit = np.log(pooled / (1 - pooled))
    assert logit.mean() == pytest.approx(-0.4, abs=0.01)
    assert logit.std() == pytest.approx(1.0, abs=0.01)


def test_meanflow_loss_adaptive_weight():
    """With p = 1 the weighted per-example loss ||d||^2 / (||d||^2 + c) is below 1; with p = 0 it
    is the plain squared error of u against the flow-matching target v when r = t."""
    x0, _ = _data(6, jnp.float32)
    key = jax.random.key(15)
    u_fn = lambda z, r, t: jnp.zeros_like(z)
    l1, _ = CT.meanflow_loss(u_fn, u_fn, x0, key, equal_fraction=1.0, weight_p=1.0, weight_c=1e-3)
    l0, _ = CT.meanflow_loss(u_fn, u_fn, x0, key, equal_fraction=1.0, weight_p=0.0)
    _, k_e = jax.random.split(key)
    e = jax.random.normal(k_e, SHAPE, jnp.float32)
    sq = np.asarray(((e - x0) ** 2).sum(axis=(1, 2, 3)))
    assert float(l0) == pytest.approx(sq.mean(), rel=1e-5)
    assert float(l1) == pytest.approx((sq / (sq + 1e-3)).mean(), rel=1e-5)
