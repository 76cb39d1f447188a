"""Every training objective pinned to numbers its reference implementation produced.

How the numbers were made (the scripts ran outside the project, in /tmp, and are not part of it):
the same tiny network on both sides, in float64,

    F(x, c) = tanh(x W1 + b1 + c U) W2 + b2    per pixel, x (B, H, W, C) = (4, 4, 4, 2), hidden 4,

with W1, b1, U, W2, b2 from ``_params(seed)`` below (numpy default_rng), data ``_data()`` (uniform
in [-1, 1], seed 1), and the reference's random draws (torch.randn / randn_like, jax.random) replaced
by the numbers cmjax draws from the key each test passes (its documented key use: ``split`` into
the time/index key and the noise key).  For sCM and MeanFlow the network receives c = t / 1000, the
image UNet's time convention (``algorithms.unet_time``).  Each test names the repository, commit
and function; ``loss`` is the batch mean the reference's training loop backpropagates and
``grad`` its gradient with respect to (W1, b1, U, W2, b2) (sCM: then logvar's w and b).

* ECT: locuslab/ect ``main`` 4311059770f54821d151a9b0e1f76770a5f3930e, ``training/loss.py``
  ``ECMLoss`` (q 2, k 8, b 1, c 0, stage 1 and 3) with ``training/networks.py`` ``ECMPrecond`` in
  train mode (its float32 casts made float64; torch.cuda rng state calls made no-ops on CPU), and
  ``training/ct_training_loop.py`` ``generator_fn`` with the net in eval mode (mid_t 0.821);
  ``imgnet`` 75aa88a240467a4a1e9acc44e7ceac5e02c6b0e6 ``ECMLoss`` (weight ``snrpk``) for
  ``ect.weighting="snr_plus"``.
* CT and CD: openai/consistency_models_cifar10 d086e77dfdc30b51671685f9eec90c90d4f4eaa6,
  ``jcm/losses.py`` ``get_consistency_loss_fn`` (l2, uniform weighting; CT ``dsm_target=True``,
  CD the Heun step of an EDM teacher) and ``get_ema_scales_fn`` (adaptive/progressive), run
  unchanged on jax 0.10 with dm-haiku 0.0.17 (blobfile stubbed: checkpoint I/O only); its
  ``randint`` indices i are cmjax's n as N - 2 - n (its grid decreases).
* EDM: NVlabs/edm 008a4e5316c8e3bfe61a62f874bddba254295afb, ``training/loss.py`` ``EDMLoss`` with
  ``training/networks.py`` ``EDMPrecond`` (float32 casts made float64), reduced as
  ``training/training_loop.py`` does (sum over pixels, mean over the batch).  cmjax averages over
  pixels (configs/cifar10_edm.py), so its loss and gradient are the reference's / (H W C).
* iCT: no official code; the paper's formulas (Song & Dhariwal 2023: N(k), Karras grid, discrete
  lognormal p(n), pseudo-Huber c = 0.00054 sqrt(d), lambda = 1/(t_{n+1} - t_n); CM paper App. C
  scalings) written in torch, n drawn with jax.random.categorical from the paper's log p(n).
* MeanFlow: Gsunshine/meanflow d70cb55d298ee03c53bf6da67bec281082e4e2d9, ``meanflow.py``
  ``MeanFlow.forward`` (norm_p 0.75, norm_eps 1e-3, guidance off) and ``solver_step``, in a
  subclass whose ``net`` is the tiny net, dtype float64, ``sample_tr`` returning cmjax's (t, r);
  jnp.clip's removed a_min/a_max keywords mapped to min/max.
* sCT and sCD: NVlabs/FastGen 34f30e8ff1a563555fc0c7d59f1c1409dacd8af2,
  ``fastgen/methods/consistency_model/sCM.py`` ``SCMModel._compute_scm_loss`` / ``_jvp`` /
  ``_scm_pred_to_loss`` on a stand-in ``self`` (EDM and Trig schedules; the tiny net as
  F(x/sd, t); logvar = positional_features(1000 t, 64) . w + b; warm-up 100, c 0.1) with its
  departures from the paper off (prior_weighting_enabled, g_norm_spatial_invariance,
  divide_x_0_spatial_dim: its loss already averages over pixels); sCD's teacher is FastGen's
  ``TrigFlowPrecond`` around NVlabs/edm's ``EDMPrecond`` on the tiny net with ``_params(3)``.

Samplers run in float32 (the references in float64): compared to 2e-6.
"""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmjax import consistency as C
from cmjax.training import algorithms, families
from configs import digits_ect, digits_meanflow, digits_sct, digits_tiny

B, H, W, CH, HIDDEN = 4, 4, 4, 2, 4
ORDER = ("w1", "b1", "u", "w2", "b2")
PROJECTION = np.random.default_rng(9).standard_normal(2 * H * W * CH)


class TinyNet(nn.Module):
    """The tiny network of the module docstring, called as the image UNet is: (x, c_noise, train)."""

    time_inputs: int = 1

    @nn.compact
    def __call__(self, x, c_noise, train=False):
        zeros = nn.initializers.zeros
        w1, b1 = self.param("w1", zeros, (CH, HIDDEN)), self.param("b1", zeros, (HIDDEN,))
        u = self.param("u", zeros, (self.time_inputs, HIDDEN))
        w2, b2 = self.param("w2", zeros, (HIDDEN, CH)), self.param("b2", zeros, (CH,))
        c = jnp.broadcast_to(jnp.reshape(c_noise, (-1, self.time_inputs)), (x.shape[0], self.time_inputs))
        return jnp.tanh(x @ w1 + b1 + (c @ u)[:, None, None, :]) @ w2 + b2


def _params(seed=0, time_inputs=1):
    r = np.random.default_rng(seed)
    p = {"w1": 0.5 * r.standard_normal((CH, HIDDEN)), "b1": 0.1 * r.standard_normal(HIDDEN),
         "u": 0.5 * r.standard_normal((time_inputs, HIDDEN)), "w2": 0.5 * r.standard_normal((HIDDEN, CH)),
         "b2": 0.1 * r.standard_normal(CH)}
    return jax.tree.map(jnp.asarray, p)


def _data():
    return jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (B, H, W, CH)))


def _family(config):
    config.data.image_size, config.data.channels = H, CH
    return families.image_family(config, network=TinyNet(config.model.time_inputs))


def _flat(g):
    return np.concatenate([np.ravel(g[k]) for k in ORDER])


def _loss_and_grad(config, params, seed, k, state=None, frozen=None):
    """The algorithm entry's loss (what the train step differentiates) at key(seed), k updates done."""
    fn = algorithms.get(config.algorithm).loss(_family(config), config)
    objective = lambda p: fn(p, state, _data(), None, frozen or {}, jax.random.key(seed), jax.random.key(99),
                             jnp.int32(k))[0]
    return jax.value_and_grad(objective)(params)


def _check(name, loss, grad, scale=1.0):
    ref = REF[name]
    assert float(loss) * scale == pytest.approx(ref["loss"], rel=1e-6, abs=0), name
    np.testing.assert_allclose(np.asarray(grad) * scale, ref["grad"], rtol=1e-6,
                               atol=1e-6 * np.max(np.abs(ref["grad"])), err_msg=name)


def _check_sample(name, steps, x):
    x = np.asarray(x, np.float64).ravel()
    got = [x.sum(), (x * x).sum(), x @ PROJECTION]
    np.testing.assert_allclose(got, SAMPLES[(name, steps)], rtol=0, atol=2e-6 * x.size, err_msg=(name, steps))


REF = {
    "ect_main_stage1": {"loss": 4.194867582510599,
        "grad": [-0.00636654464236224, 0.06312391162490236, 0.11165862837981742, 0.058817432385169746,
        -0.06070326161311703, 0.2681876955615993, 0.18214660738605995, 0.12712118530980188,
        -0.09838253513674254, -0.15909964935668144, -0.3852176319892156, -0.3003604304634607,
        0.029087575083844658, 0.030503770097701565, 0.08345550829791751, 0.07282577539653166,
        0.20563316426133038, -0.2506704063347928, -0.11532235716545511, 0.1748005156787009,
        -0.10315218375317485, 0.32027470362453825, -0.05104987908825013, 0.21312502173479497,
        0.7825246178561069, -0.6162043159173456]},
    "ect_main_stage3": {"loss": 4.041848022544233,
        "grad": [0.5492355885802611, -0.32742689861405, 0.695418493445741, 0.8420866353319656,
        0.16202200274741335, -0.4238038241084256, -0.3476223837362934, 0.09259163568137381,
        -0.225876981355334, -0.7432826653289938, -1.3006492739613456, -1.0061713493074598,
        0.05504085551129899, 0.1429123309442692, 0.21510644468957085, 0.20397589113723688,
        0.43979573610601713, -0.21397630457935554, -0.22398836100801608, 0.1394268474077103,
        -0.9077163563595209, -0.25275905063675647, -0.3002926359573135, -0.4123592543466425,
        2.4798172305272193, -2.3197051055635862]},
    "ect_imgnet_stage3": {"loss": 7.824811991182055,
        "grad": [0.9825914204366456, -0.7654615353814631, 0.8478389878061944, 1.1902591709742172,
        -0.3029403726005263, 0.9022006927388345, 0.48009109684624907, 0.5450976700204819,
        -0.6078281962685217, -1.1493577987226862, -2.372267341757034, -1.9568303751256912,
        0.24268616072192536, 0.2935852539558201, 0.6609316927507762, 0.6245430188844967,
        1.3572417312186218, -1.4786745790501405, -0.3401086329355352, 0.8301541534680946,
        -0.9377890815197721, 0.8155544875628143, -0.12079157791137637, 0.4350171525995944,
        5.070526794777837, -4.119284583248801]},
    "ct": {"loss": 0.0825002956414134,
        "grad": [-0.004572215152384286, 0.030295837954848127, 0.011259875651584858, 0.007073226347366826,
        -0.0048883108092941715, 0.04877419524941441, 0.03642980953492011, 0.01892161482853574,
        -0.0013656529633486627, -0.020764309679353107, -0.02185345357272995, -0.022079843158207543,
        -0.0001169782431789808, -0.015639577149736846, -0.013717024291857416, -0.013929384978661299,
        -0.02521320265594368, 0.027236086349184455, -0.014597187584093362, 0.028891850980084413,
        -0.030423227656285995, 0.09270496607363406, -0.02175861108500178, 0.06404494797292093,
        0.050484897204290564, -0.06621022105369945]},
    "cd": {"loss": 0.06899800656202698,
        "grad": [-0.0029823956502295955, 0.019796200718945778, 0.0018635603159863094, 0.006027470876563106,
        -0.008860849141162263, 0.06186302420372827, 0.043479421347104065, 0.021288471962269115,
        -0.0012291333617053845, -0.00547018281013191, -0.009251308687748656, -0.011509975285274717,
        -0.0011353695745793693, 0.001278766670667398, 0.001747068325010551, -0.002938025747344514,
        -0.007501138370261379, -0.021812630636379712, -0.00978545009647294, 0.025893348628714112,
        -0.02192503459274376, 0.0774704343358735, -0.01583714110365037, 0.059813496714285416,
        0.03078134635596137, -0.029169056029959284]},
    "edm": {"loss": 33.5740628048542,
        "grad": [0.04671295555061692, 1.9447947179797764, 1.2979671829575927, 1.3335083488922033,
        -1.9893025941599485, 5.505324428960193, 2.5261919600040126, 0.14548030191116124,
        0.5895055250745496, -0.10251664228545643, 0.7706784900584941, 0.8190097029749577,
        0.07791355308865727, -0.5183924649890493, -0.9513559840775204, -0.43349233425224415,
        -1.4075577004794029, -0.889518272979914, 0.9063123869628831, 1.6628576732414504,
        1.0494799113267634, 6.830732136757682, 0.967656110912455, 4.815687622099251,
        -1.8566218520655187, 0.2845938026984529]},
    "ict": {"loss": 1.4673697906565684,
        "grad": [0.36929337451333366, -0.13079793084447136, 0.5229804605854286, 0.5798265254876775,
        0.1967300203575694, -0.781408281661535, -0.7088882953383436, -0.289105242273517,
        -0.027877744356694833, 0.09789426117515845, 0.22966824675423575, 0.07787320106776972,
        -0.007167111453779803, -0.05357965007507883, -0.10194289468325538, -0.05104621615487818,
        -0.2428046448043252, 0.5703358590610944, 0.14980080179958694, -0.3504784181434215,
        -0.33777989095613276, -0.6516227510703141, -0.028863637279613573, -0.6299457115277038,
        -0.17156427097080523, 0.33535350786286355]},
    "meanflow": {"loss": 2.5487964608341973,
        "grad": [0.06727843207537539, 0.2618377517800905, -0.27893543673977217, 0.2445319859635526,
        -0.6915622350909975, -0.0942580493406724, -0.07970484545129757, 0.4678532362168865,
        -0.2153955890141208, -0.07772527891958365, -0.0408071658337014, 0.16125177625786585,
        -6.42217375261773e-05, -2.7055101763835966e-05, -3.308218851010553e-05,
        6.308412206374993e-05, 5.782168275266276e-06, 1.4191148858884837e-05,
        -2.2126497497024806e-05, 1.741793246009744e-05, 0.03138747295560946, 0.32626281630175985,
        -0.007480770421641693, -0.16136966691217372, -0.38333961163145364, -0.5771697111714305,
        -0.17183445109242518, -0.49404678644186434, 0.030456534532048628, -0.35614603341550427]},
    "sct": {"loss": -0.18881131795855394,
        "grad": [-0.050092267662356665, 0.0647299891421909, -0.005424765275968282, -0.038088390927145985,
        -0.04336754588346102, 0.1290350246225503, 0.07722688936725908, 0.020273614107625355,
        -0.021648757976999784, 0.03871556476239696, 0.03615278779921194, -0.008548157232124728,
        -1.6075127831116356e-05, 3.1601332717281357e-05, 2.679296438996576e-05,
        -3.6343599448607577e-06, -0.003621131693852256, -0.06320652508575568, -0.011404990090384646,
        0.03429362218921687, 0.05420236140269454, 0.13196793690070868, 0.0220827069000273,
        0.10609024716549055, 0.058914643720577045, 0.04365939705403612, -0.11492980803613467,
        -0.2454494441448994, -0.12193912968031428, 0.14445706584010823, 0.40450488197844975,
        -0.38898411986733544, -0.1576716332387234, -0.21914167311966878, -0.20748289306514736,
        0.22860366185626574, 0.17854288435355256, -0.47876409836795014, 0.02438116583220874,
        0.41675869365668855, -0.04666134025921539, 0.6966844874356949, 0.041501930037075106,
        -0.3336954838640697, -0.2921485056624007, -0.1583461375781236, -0.34179228781287063,
        -0.2700877611034853, 0.021901962961004665, 0.3323882722864687, 0.5698182194437347,
        0.726733657420047, 0.8230664337723198, 0.8799278066552356, 0.9127776951072457,
        0.9315313758469872, 0.9421669286845836, 0.9481762071049304, 0.0957216273211738,
        0.01077258366294799, 0.30778405676218856, -0.06579946342676427, 0.4091028528644288,
        -0.049108004686864035, -0.08663864978621785, 0.14374257933536047, 0.14451547972011228,
        0.5995522055239482, -0.4541927330008853, -0.4575712930371183, 0.021948576130018292,
        -0.06518040007497906, -0.09289344915622712, 0.5819999748699974, -0.33055563037725205,
        -0.3278108992720724, 0.18178924239684427, 0.0821055568389546, 0.21426405850304886,
        0.5537544437809704, 0.7554193995063722, 0.7719349878818113, 0.6837644929744854,
        0.5618596000370649, 0.44327877138662525, 0.3419694062433318, 0.26054464476160494,
        0.1971291013181438, 0.14856738285166315, 0.11172347251075637, 0.9559276248100796]},
    "scd": {"loss": -0.19365216234064325,
        "grad": [-0.04668900898142614, 0.0841903115341104, 0.031182499273922987, -0.01588207347560718,
        -0.01731100830300281, 0.12079243841131058, 0.07750106801080663, 0.045798587239806975,
        -0.01656786276470308, 0.038468488952427424, 0.03938491147139778, 0.003908679424109029,
        -8.084282171472514e-06, 3.207508197974488e-05, 3.703864360050235e-05,
        1.3391200143117892e-05, 0.027219976878020122, -0.06829243248308105, -0.026793296188803425,
        0.03467461471635172, -0.013659482354009895, 0.16144699273431784, -0.03027040389866727,
        0.12055060668202602, 0.0363658512386701, 0.054979068367833686, -0.1147166124456208,
        -0.24731885256183414, -0.12233323640836032, 0.14645007126631587, 0.4075978032030244,
        -0.3906327495332608, -0.15888196933644297, -0.2214987923401227, -0.21013193797487367,
        0.22736083746258304, 0.17968560627773944, -0.4824214455307163, 0.02366112684545942,
        0.41960134610306965, -0.04909248163204436, 0.700173966711881, 0.043360701810853094,
        -0.3362819226586635, -0.29575319879452006, -0.15971293999467634, -0.3426160112671342,
        -0.2701507149019805, 0.023109790278241456, 0.33482848138864546, 0.573178938684322,
        0.7306976759031177, 0.8273995086659889, 0.8844783501363658, 0.9174537649977691,
        0.9362790743506353, 0.9469552388214417, 0.9529874603442765, 0.09369877147399518,
        0.013168000215901426, 0.3100229691177612, -0.06463380114283812, 0.41121765563670454,
        -0.04781756091013765, -0.0841888291383803, 0.14566030748031802, 0.14309627418727108,
        0.6018724985770744, -0.45822246742239187, -0.4600893899506763, 0.019768076597711376,
        -0.06426229808933903, -0.09305743251374865, 0.5850597968564277, -0.3325700307670841,
        -0.3313747916984406, 0.18319040641949907, 0.08447040926099897, 0.216830407480897,
        0.5570849354401238, 0.7591336474750325, 0.7754625819306519, 0.686791346960144,
        0.5643087402845594, 0.4451956722284632, 0.3434418986461701, 0.2616639059133231,
        0.1979748415190703, 0.14920431881128757, 0.11220225805166288, 0.960768469192169]},
}
SAMPLES = {  # (sum, sum of squares, projection on PROJECTION) of the reference's sample, clipped to [-1, 1]
    ("ect", 1): [0.19172892544161457, 4.186299616690212, -6.923977569381787],
    ("ect", 2): [0.28045433727488067, 8.833401718900362, -1.8474065749000261],
    ("meanflow", 1): [5.415185249202403, 37.19722598302894, -5.968002331087322],
    ("meanflow", 2): [5.445145431893889, 37.48487062313566, -5.934778989289553],
}
CT_CURRICULUM = {  # k: (mu(k), N(k))
    0: (0.81, 2), 1: (0.9321697517861577, 4), 57: (0.9889706931636921, 20), 123: (0.9925024964407473, 29),
    399: (0.9957944475818009, 51), 400: (0.9957944475818009, 51)}
ICT_PAIR_PROBS = [0.018377748695120884, 0.04425524381114032, 0.0766435643158352, 0.10509341539481455,
    0.12157573163918865, 0.12392569032798166, 0.11476760819073814, 0.09872683883261617,
    0.08018835800222254, 0.06225770002167903, 0.04664115726140439, 0.03396346441543929,
    0.02417754256231123, 0.016902363660089553, 0.011646697071382271, 0.007933395169956992,
    0.005354997165042976, 0.0035888712487247825, 0.0023919900162176337, 0.0015876221980938435]
SCM_LOGVAR_W = [0.00036904600724477226, 0.08962366125254097, -0.08224135660866527, -0.26717755162718226,
    -0.13640123555151676, -0.2974939664989387, 0.018043080779231543, 0.40206457366636006,
    -0.14766195556539888, -0.18614246994598213, 0.14695261505555945, 0.10706610244801822,
    0.03162427469936956, -0.2791404134124614, -0.008775546738982046, 0.20859095833748634,
    -0.4032643641855246, -0.13728472831206545, -0.5703668219402532, -0.38686132193549283,
    -0.5525205113375197, -0.07052733932240438, -0.3802339444331109, 0.08137930764651045,
    0.047025325987267545, -0.056079283388986316, -0.7550279132461539, -0.16160786875399097,
    -0.014550283620321595, 0.03399269580099227, -0.459040729651618, -0.1433259828101792,
    -0.2935557234169918, -0.24265117182767976, 0.3182695870158236, -0.24226040259956894,
    -0.009756511483656178, 0.26531696021495216, -0.1750801298229906, -0.03351058487524789,
    0.03313924297484418, 0.019134532276518585, -0.36751674792530803, 0.022842069113102426,
    0.40764702652246126, -0.46414340343854465, 0.25781480640647947, 0.03580620770897437,
    -0.19244111823216642, 0.6001249639027268, 0.2286779136254135, -0.359786670631567,
    0.022354868631439026, 0.17300687510105558, -0.05663463760522479, 0.2048730801585618,
    -0.01995519604482467, 0.20017426825029835, 0.43155677749684557, -0.20269867530169583,
    0.060941583116882705, -0.13899227296152453, 0.03818052336774925, -0.35615835835504195]


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,stage,weighting", [("ect_main_stage1", 1, "inverse_dt"),
                                                  ("ect_main_stage3", 3, "inverse_dt"),
                                                  ("ect_imgnet_stage3", 3, "snr_plus")])
def test_ect_matches_locuslab_ect(name, stage, weighting):
    """Stage 1 has r = 0 (target = data) for three of the four examples; stage 3 has none."""
    with jax.enable_x64(True):
        c = digits_ect.get_config()
        c.ect.weighting = weighting
        loss, g = _loss_and_grad(c, _params(), 21, c.ect.stage_steps * stage + 7)
        _check(name, loss, _flat(g))


def test_ect_sampler_matches_generator_fn():
    with jax.enable_x64(True):
        c = digits_ect.get_config()
        model = algorithms.get("ect").model(_family(c), c)
        for steps in (1, 2):
            _check_sample("ect", steps, model.sample(_params(), jax.random.key(22), 2, steps))


@pytest.mark.parametrize("algorithm", ["ct", "cd"])
def test_ct_and_cd_match_openai_consistency_models_cifar10(algorithm):
    with jax.enable_x64(True):
        c = digits_tiny.get_config()  # ct: s0 2, s1 50 over K = 400 updates; cd: N = 18
        c.algorithm = algorithm
        state = types.SimpleNamespace(target_params=_params(2))
        loss, g = _loss_and_grad(c, _params(), 41 if algorithm == "ct" else 42, 123, state=state,
                                 frozen={"teacher": _params(3)})
        _check(algorithm, loss, _flat(g))


def test_ct_curriculum_matches_get_ema_scales_fn():
    for k, (mu, n) in CT_CURRICULUM.items():
        assert C.ct_num_scales(k, 400, 2, 50) == n == int(C.ct_num_scales(jnp.int32(k), jnp.int32(400), 2, 50))
        assert C.ct_ema_decay(k, 400, 0.9, 2, 50) == pytest.approx(mu, rel=1e-12)


def test_edm_matches_nvlabs_edm():
    with jax.enable_x64(True):
        c = digits_tiny.get_config()
        c.algorithm = "edm"
        loss, g = _loss_and_grad(c, _params(), 31, 5)
        _check("edm", loss, _flat(g), scale=H * W * CH)  # EDM sums over pixels, cmjax averages


def test_ict_matches_the_papers_formulas():
    with jax.enable_x64(True):
        assert C.ict_num_scales(123, 400, 10, 160) == len(ICT_PAIR_PROBS) + 1 == 21
        probs = C.lognormal_pair_probs(C.karras_sigmas(21))  # float32: sampling only
        np.testing.assert_allclose(np.asarray(probs), ICT_PAIR_PROBS, rtol=1e-4)
        loss, g = _loss_and_grad(digits_tiny.get_config(), _params(), 71, 123)
        _check("ict", loss, _flat(g))


def test_meanflow_matches_gsunshine_meanflow():
    with jax.enable_x64(True):
        c = digits_meanflow.get_config()
        c.meanflow.weight_p = 0.75
        loss, g = _loss_and_grad(c, _params(time_inputs=2), 51, 3)
        _check("meanflow", loss, _flat(g))
        model = algorithms.get("meanflow").model(_family(c), c)
        for steps in (1, 2):
            _check_sample("meanflow", steps, model.sample(_params(time_inputs=2), jax.random.key(52), 2, steps))


@pytest.mark.parametrize("algorithm", ["sct", "scd"])
def test_sct_and_scd_match_nvlabs_fastgen(algorithm):
    with jax.enable_x64(True):
        c = digits_sct.get_config()  # tangent warm-up 100 updates, c = 0.1, P(-1.0, 1.4)
        c.algorithm = algorithm
        params = {"net": _params(), "logvar": {"w": jnp.asarray(SCM_LOGVAR_W), "b": jnp.asarray(0.2)}}
        loss, g = _loss_and_grad(c, params, 61, 37, frozen={"teacher": _params(3)})
        flat = np.concatenate([_flat(g["net"]), np.ravel(g["logvar"]["w"]), [float(g["logvar"]["b"])]])
        _check(algorithm, loss, flat)
