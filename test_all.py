"""
All tests. `python test_all.py` runs them in two processes side by side (prints `N passed, N failed`, exits
non-zero on failure); `python test_all.py mixture` runs those whose name contains "mixture"; `--serial` runs them
one after another in this process; pytest collects the same tests. CPU only, a few minutes on 2 cores.
"""
import contextlib
import copy
import dataclasses
import inspect
import io
import json
import math
import multiprocessing
import os
import queue
import re
import runpy
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import common
import dmd2
import eval_fid
import freeflow
import piflow
import scm
import undistill_flux as uf

HERE = os.path.dirname(os.path.abspath(__file__))


def run(args, **kwargs):
    """Run a command in the repository folder; returns the CompletedProcess (output captured)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
    return subprocess.run(args, cwd=kwargs.pop("cwd", HERE), env=env, capture_output=True, text=True, timeout=600, **kwargs)


def torchrun(script_args, nproc=2, **kwargs):
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script_args],
               **kwargs)


def small_labelled_world(dim=5, k=6, seed=0):
    rng = np.random.default_rng(seed)
    return common.GaussianMixture(rng.uniform(0.5, 1.5, k), rng.normal(size=(k, dim)), rng.uniform(0.2, 0.6, k),
                                  labels=np.arange(k) % 3)


def quick_teacher_fit(tmp, asked_lrs=None):
    """common.fit_to_world with a short fit and a private cache (the fit's quality does not matter here); the lr
    each call asks for (None: fit_to_world's default) is appended to asked_lrs."""
    full = common.fit_to_world

    def fit(world, arch_kwargs=None, device="cpu", **kw):
        if asked_lrs is not None:
            asked_lrs.append(kw.get("lr"))
        return full(world, arch_kwargs, steps=200, device=device, cache_dir=os.path.join(tmp, "cache"))
    return full, fit


def labelled_mixture_and_teacher(tmp, **arch):
    """A class-conditional 2D mixture saved as mix.npz and an (untrained) learned-teacher checkpoint
    teacher.pt for it, in tmp: the inputs of the DDP smoke runs. Returns (mix path, teacher path)."""
    world = small_labelled_world(dim=2)
    np.savez(os.path.join(tmp, "mix.npz"), weights=world.weights.numpy(), means=world.means.numpy(),
             stds=world.stds.numpy(), labels=world.labels.numpy())
    net = common.new_backbone(world.shape, world.num_classes, hidden=32, depth=2, **arch)
    common.save_checkpoint(os.path.join(tmp, "teacher.pt"), {"backbone": net._spec, "ema": net.state_dict()})
    return os.path.join(tmp, "mix.npz"), os.path.join(tmp, "teacher.pt")


# ---------------------------------------------------------------------------------------------------
# common.py: the Gaussian-mixture world

def velocity_by_score(world, x, t, y=None):
    """The velocity by an independent route: autograd of the closed-form log p_t, then Tweedie:
    E[eps|x_t] = -t * score,  E[x0|x_t] = (x_t + t^2 * score) / (1 - t),  u = E[eps] - E[x0]."""
    x = x.clone().requires_grad_(True)
    score, = torch.autograd.grad(world.log_prob_t(x, t, y).sum(), x)
    tb = t.view(-1, *[1] * (x.ndim - 1))
    return (-tb * score - (x + tb ** 2 * score) / (1 - tb)).detach()


def test_mixture_velocity_matches_score_route():
    torch.manual_seed(0)
    for world in (small_labelled_world(), common.make_world("checkerboard")):
        x = torch.randn(64, world.dim, dtype=torch.float64) * 1.5
        t = torch.rand(64, dtype=torch.float64) * 0.96 + 0.02
        err = (world.velocity(x, t) - velocity_by_score(world, x, t)).abs().max()
        assert err < 1e-9, f"unconditional velocity off by {err}"
        if world.num_classes:
            y = torch.randint(0, world.num_classes, (64,))
            u_c, u_u = velocity_by_score(world, x, t, y), velocity_by_score(world, x, t)
            assert (world.velocity(x, t, y) - u_c).abs().max() < 1e-9
            cfg = torch.rand(64, dtype=torch.float64) * 3 + 1  # per-sample guidance scales
            expect = u_u + cfg[:, None] * (u_c - u_u)
            assert (world.velocity(x, t, y, cfg) - expect).abs().max() < 1e-8
            inside = (t >= 0.3) & (t <= 0.7)  # guidance interval: CFG only inside, conditional outside
            got = world.velocity(x, t, y, cfg, interval=(0.3, 0.7))
            assert (got[inside] - expect[inside]).abs().max() < 1e-8
            assert (got[~inside] - u_c[~inside]).abs().max() < 1e-9
            assert (u_c - u_u).abs().max() > 1e-2  # conditioning actually changes the field
            null = torch.full_like(y, world.num_classes)  # the null label means unconditional
            assert (world.velocity(x, t, null) - u_u).abs().max() < 1e-9


def test_mixture_x0_mean_and_log_prob():
    world = small_labelled_world()
    x = torch.randn(32, world.dim, dtype=torch.float64)
    t = torch.full((32,), 0.4, dtype=torch.float64)
    x0 = world.x0_mean(x, t)
    x = x.clone().requires_grad_(True)
    score, = torch.autograd.grad(world.log_prob_t(x, t).sum(), x)
    assert (x0 - (x + 0.16 * score) / 0.6).abs().max() < 1e-9
    # log p0 against a direct density of the mixture
    xs = torch.randn(16, world.dim, dtype=torch.float64)
    dens = sum(w * torch.exp(torch.distributions.Normal(m, s).log_prob(xs).sum(1))
               for w, m, s in zip(world.weights, world.means, world.stds))
    assert (world.log_prob(xs) - dens.log()).abs().max() < 1e-9


def test_mixture_distances_scale_to_768_by_1000():
    rng = np.random.default_rng(0)
    world = common.GaussianMixture(np.ones(1000), rng.normal(size=(1000, 768)), np.full(1000, 0.3))
    x = torch.randn(256, 768)
    start = time.perf_counter()
    u = world.velocity(x, torch.rand(256))
    assert u.shape == x.shape and torch.isfinite(u).all()
    print(f"  D=768, K=1000, batch 256 velocity: {1000 * (time.perf_counter() - start):.0f} ms")


def test_reference_ode_converges_and_matches_single_gaussian_flow_map():
    mu, s0 = torch.tensor([[1.5, -0.5, 0.25]], dtype=torch.float64), 0.3
    world = common.GaussianMixture([1.0], mu, [s0])
    z = torch.randn(128, 3, dtype=torch.float64)
    sigma = lambda t: math.sqrt((1 - t) ** 2 * s0 ** 2 + t ** 2)
    exact = mu + sigma(0.0) / sigma(1.0) * (z - 0 * mu)  # x_0 = mu + sigma(0)/sigma(1) (x_1 - 0 * mu)
    errors = []
    for steps in (8, 16, 32):
        x, est = common.reference_ode(world.velocity, z, steps=steps)
        errors.append(float((x - exact).pow(2).mean().sqrt()))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 1e-6, errors
    # a partial map t=1 -> s=0.4 as well
    s = 0.4
    x, est = common.reference_ode(world.velocity, z, steps=32, t_from=1.0, t_to=s)
    exact_s = (1 - s) * mu + sigma(s) / sigma(1.0) * z
    assert (x - exact_s).abs().max() < 1e-6
    # the error estimate (gap to half the steps) is honest on a multi-modal world
    w2 = common.make_world("checkerboard")
    z2 = torch.randn(256, 2, dtype=torch.float64)
    x64, est64 = common.reference_ode(w2.velocity, z2, steps=64)
    x256, _ = common.reference_ode(w2.velocity, z2, steps=256)
    true_err = float((x64 - x256).pow(2).mean().sqrt())
    assert true_err <= est64 * 1.5 + 1e-9, (true_err, est64)


def test_presets_and_custom_mixture_npz():
    for name in common.WORLD_PRESETS:
        world = common.make_world(name)
        x, y = world.sample(500, None if not world.num_classes else torch.arange(500) % world.num_classes,
                            generator=torch.Generator().manual_seed(0))
        assert x.shape == (500, *world.shape) and torch.isfinite(x).all()
        assert common.mode_tv(x, world) < 0.5 if world.dim > 2 else common.mode_tv(x, world) < 0.25
    glyphs = common.make_world("glyphs16")
    assert glyphs.shape == (1, 16, 16) and glyphs.num_classes == 10
    counts = torch.bincount(glyphs.labels)
    assert (counts >= 32).all(), counts
    assert glyphs.means.min() >= -1 and glyphs.means.max() <= 1 and glyphs.stds.max() <= 0.1
    x, y = glyphs.sample(200, torch.arange(200) % 10, generator=torch.Generator().manual_seed(1))
    assert common.cond_acc(x, y, glyphs) > 0.99  # small per-component std: samples keep their class
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mix.npz")
        np.savez(path, weights=[1, 3], means=np.zeros((2, 4)) + [[0], [2]], stds=[0.1, 0.2], labels=[0, 1], shape=[1, 2, 2])
        world = common.make_world(path)
        assert world.shape == (1, 2, 2) and world.num_classes == 2 and abs(float(world.weights[1]) - 0.75) < 1e-12
        np.savez(os.path.join(tmp, "bad.npz"), means=np.zeros((2, 4)))
        try:
            common.make_world(os.path.join(tmp, "bad.npz"))
            raise AssertionError("a mixture without weights/stds was accepted")
        except SystemExit as e:
            assert "weights" in str(e)


def test_metrics_respond_to_distribution_errors():
    world = common.make_world("8gaussians")
    g = torch.Generator().manual_seed(0)
    a, _ = world.sample(2000, generator=g)
    b, _ = world.sample(2000, generator=g)
    assert common.swd(a, a) == 0
    noise_floor = common.swd(a, b)
    assert common.swd(a, b + 0.5) > 3 * noise_floor  # a shift is seen
    collapsed = world.means[torch.zeros(2000, dtype=torch.long)].float()  # everything at one mode
    assert common.mode_tv(collapsed, world) > 0.8 and common.mode_tv(b, world) < 0.1
    assert common.mean_nll(collapsed, world) < common.mean_nll(b, world)  # why nll is shown next to the data's value


def _contract_spray_drop(world, x, gen):
    """Samples of a world made wrong three ways: contracted toward their component, sprayed with extra noise,
    and with one mode (one class, when the world has classes) left out."""
    comp = world.nearest_component(x.double().reshape(len(x), -1))
    mu = world.means[comp].float().reshape(x.shape)
    sprayed = x + world.stds[comp].float().reshape(-1, *[1] * (x.ndim - 1)) * torch.randn(x.shape, generator=gen)
    dropped = x[(world.labels[comp] if world.num_classes else comp) != 0]
    return {"contracted": mu + 0.8 * (x - mu), "sprayed": sprayed, "dropped": dropped}


def test_mmd_is_zero_for_true_samples_and_sees_shrinking_spraying_and_a_missing_mode():
    """The headline distance: true samples score 0 within 3 standard errors (a biased V-statistic would not:
    k(x, x) = sum of the scales is far above the SE); contracted, sprayed and mode-dropping samples score far
    above 0, where swd against a second sample let contraction beat the data's own row."""
    for name in ("8gaussians", "glyphs16"):  # 2 dimensions and 256, 8 modes and 320
        world = common.make_world(name)
        gen = torch.Generator().manual_seed(0)
        x, _ = world.sample(4000, generator=gen)
        value, se = common.mmd(x, world)
        assert abs(value) < 3 * se, (name, value, se)
        for kind, wrong in _contract_spray_drop(world, x, gen).items():
            v, s = common.mmd(wrong, world)
            assert v > 8 * s and v > value + 8 * se, (name, kind, v, s)


def test_mmd_of_a_shifted_gaussian_matches_its_closed_form():
    """World N(0, s^2 I) in D = 16, samples from N(delta, s^2 I). With h2 = D s^2 / 2 and D s^2 (a mode's width
    and the total variance; one mode has no neighbours) and f_h(v) = (h2 / (h2 + v))^(D/2), each kernel scaled by
    c_h = 1 / (f_{h/sqrt2}(2 s^2) - f_h(2 s^2)^2)^1/2, MMD^2 = sum_h c_h 2 f_h(2 s^2) (1 - exp(-|delta|^2 / (2 (h2 + 2 s^2))))."""
    D, s = 16, 0.3
    world = common.GaussianMixture([1.0], np.zeros((1, D)), [s])
    assert np.allclose(world.kernel_bandwidths(), [D * s * s / 2, D * s * s])
    f = lambda h2, v: (h2 / (h2 + v)) ** (D / 2)
    delta = torch.zeros(D, dtype=torch.float64)
    delta[:4] = 0.25
    expected = sum(2 * f(h2, 2 * s * s) * (1 - math.exp(-float(delta @ delta) / (2 * (h2 + 2 * s * s))))
                   / math.sqrt(f(h2 / 2, 2 * s * s) - f(h2, 2 * s * s) ** 2) for h2 in (D * s * s / 2, D * s * s))
    x = delta + s * torch.randn(4000, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    value, se = common.mmd(x, world)
    assert abs(value - expected) < 3 * se and se < expected / 5, (value, se, expected)


def test_swd_against_a_mixture_uses_its_exact_quantiles():
    """swd(x, world) meets each projection's exact quantiles (here checked by root-finding with scipy on a 1-D
    mixture of unequal weights and widths): samples placed at those quantiles score ~0, true samples score their
    own sampling noise only (below the two-sample swd), and a shrunk law is seen."""
    from scipy.optimize import brentq
    from scipy.stats import norm
    w, mu, s = np.array([0.2, 0.5, 0.3]), np.array([-2.0, 0.5, 3.0]), np.array([0.3, 0.8, 0.1])
    world = common.GaussianMixture(w, mu[:, None], s)
    n = 500
    u = (np.arange(n) + 0.5) / n
    exact = np.array([brentq(lambda q: (w * norm.cdf((q - mu) / s)).sum() - p, -10, 10, xtol=1e-12) for p in u])
    got = world.projected_quantiles(torch.ones(1, 1, dtype=torch.float64), n)[:, 0].numpy()
    assert np.abs(got - exact).max() < 1e-3, np.abs(got - exact).max()
    assert common.swd(torch.tensor(exact)[:, None], world) < 1e-3
    glyphs = common.make_world("glyphs16")
    gen = torch.Generator().manual_seed(0)
    a, _ = glyphs.sample(2000, generator=gen)
    b, _ = glyphs.sample(2000, generator=gen)
    assert common.swd(a, glyphs) < common.swd(a, b)
    assert common.swd(0.9 * a, glyphs) > 2 * common.swd(a, glyphs)  # the whole law shrunk toward 0


def test_evaluate_scores_a_sampler_against_its_own_target_law():
    """A sampler's optional "target" samples give swd_target (distance to the law it aims at, e.g. a guided
    one): small when the sampler draws that law, large when the target is another law; absent otherwise."""
    world = common.make_world("8gaussians")
    target, _ = world.sample(1000, generator=torch.Generator().manual_seed(5))
    draw = lambda z, y: world.sample(len(z), generator=torch.Generator().manual_seed(len(z)))[0]
    samplers = [{"sampler": "right", "nfe": 1, "fn": draw, "target": target},
                {"sampler": "wrong", "nfe": 1, "fn": draw, "target": target + 1.0},
                {"sampler": "none", "nfe": 1, "fn": draw}]
    with tempfile.TemporaryDirectory() as tmp:
        rows = common.evaluate(samplers, world, world, types.SimpleNamespace(steps=0), tmp, "test", 0.0, n=1000)
    by = {r["sampler"]: r for r in rows}
    assert by["right"]["swd_target"] < 0.15 < 0.6 < by["wrong"]["swd_target"], (by["right"], by["wrong"])
    assert all("swd_target" not in r for r in rows if r["sampler"] not in ("right", "wrong"))



class ExactVelocityNet(torch.nn.Module):
    """A 'network' that returns a mixture's exact velocity (y = num_classes is the null label): its Euler
    rows must equal the analytic teacher's."""

    def __init__(self, world, bias=0.0):
        super().__init__()
        self.world, self.num_classes, self.bias = world, world.num_classes, bias

    def forward(self, x, t, y=None):
        return self.world.velocity(x, t, y) + self.bias


def test_evaluate_adds_the_fitted_networks_own_euler_rows_with_the_analytic_teacher_only():
    world = common.make_world("glyphs16")
    draw = lambda z, y: world.sample(len(z), y)[0]
    cfg = types.SimpleNamespace(steps=0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = common.evaluate([{"sampler": "student", "nfe": 1, "fn": draw}], world, world, cfg, tmp, "test", 0.0, n=300,
                               guidance=2.0, teacher_net=ExactVelocityNet(world))
        teacher = {r["nfe"]: r for r in rows if r["sampler"] == "teacher"}
        net = {r["nfe"]: r for r in rows if r["sampler"] == "teacher_net"}
        assert sorted(net) == list(common.TEACHER_NFES)
        for n in common.TEACHER_NFES:  # same noise, labels and guidance: the exact network reproduces the teacher
            for k in ("mmd", "swd", "mode_tv", "nll", "cond_acc"):
                assert abs(net[n][k] - teacher[n][k]) < 1e-6 * max(1.0, abs(teacher[n][k])), (n, k, net[n], teacher[n])
        shifted = common.evaluate([], world, world, cfg, tmp, "test", 0.0, n=300, guidance=2.0,
                                  teacher_net=ExactVelocityNet(world, 0.5))
        assert all(r["mmd"] > teacher[r["nfe"]]["mmd"] + 5 * r["mmd_se"] for r in shifted if r["sampler"] == "teacher_net")
        learned = common.NetTeacher(ExactVelocityNet(world))  # a learned teacher is its own network: no extra rows
        rows = common.evaluate([], world, learned, cfg, tmp, "test", 0.0, n=100, teacher_net=learned.net)
        assert not any(r["sampler"] == "teacher_net" for r in rows)


# ---------------------------------------------------------------------------------------------------
# common.py: backbones

def jvp_vs_central_difference(net, x, t, y, s=None, g=None):
    net = net.double().eval()
    x, t = x.double(), t.double()
    vx, vt = torch.randn_like(x), torch.rand_like(t)
    f = lambda xx, tt: net(xx, tt, y, s, g)
    with torch.no_grad():
        _, tangent = common.jvp(f, (x, t), (vx, vt))
        h = 1e-6
        fd = (f(x + h * vx, t + h * vt) - f(x - h * vx, t - h * vt)) / (2 * h)
    return float((tangent - fd).abs().max() / fd.abs().max().clamp_min(1e-12))


def randomize(net):
    """Zero-initialised gates/outputs would make the JVP trivially zero: give every weight a value
    (moderate, so that the float64 central difference's own O(h^2) error stays below the tolerance)."""
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net


def test_jvp_through_both_trunks_matches_float64_central_difference():
    torch.manual_seed(0)
    for norm in ("adaln_zero", "adn"):
        mlp = randomize(common.new_backbone((2,), 3, hidden=32, depth=2, use_s=True, use_g=True, norm=norm))
        x, t, y = torch.randn(8, 2), torch.rand(8), torch.randint(0, 4, (8,))
        err = jvp_vs_central_difference(mlp, x, t, y, s=torch.rand(8).double(), g=torch.ones(8).double())
        assert err < 1e-6, f"MLP ({norm}) JVP relative error {err}"
        dit = randomize(common.new_backbone((1, 8, 8), 3, hidden=32, depth=2, heads=2, norm=norm))
        x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.randint(0, 4, (4,))
        err = jvp_vs_central_difference(dit, x, t, y)
        assert err < 1e-6, f"DiT ({norm}) JVP relative error {err}"
        # ordinary passes take the fused attention, the JVP its explicit form: both are the same function
        fused = dit(x.double(), t.double(), y)
        with common.explicit_attention():
            explicit = dit(x.double(), t.double(), y)
        assert torch.allclose(fused, explicit, rtol=0, atol=1e-10) and fused.abs().max() > 1e-2


def test_jvp_takes_one_tangent_product_per_linear_layer_and_keeps_weight_tangents_exact():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 4))
    x, v = torch.randn(5, 8), torch.randn(5, 8)

    def matrix_products(jvp):
        with torch.no_grad(), torch.profiler.profile() as prof:
            tangent = jvp(net, (x,), (v,))[1]
        return tangent, sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))
    ours, ours_products = matrix_products(common.jvp)
    torchs, torchs_products = matrix_products(torch.func.jvp)
    assert torch.allclose(ours, torchs, rtol=0, atol=1e-6) and ours.abs().max() > 1e-2
    assert ours_products == 4 and torchs_products > 4  # two layers: a primal and a tangent product each
    # a weight that is a primal of the JVP (not a module Parameter) keeps its tangent
    params = dict(net.named_parameters())
    directions = {k: torch.randn_like(p) for k, p in params.items()}
    f = lambda p: torch.func.functional_call(net, p, (x,))
    with torch.no_grad():
        ours, exact = common.jvp(f, (params,), (directions,))[1], torch.func.jvp(f, (params,), (directions,))[1]
    assert torch.allclose(ours, exact, rtol=0, atol=1e-6) and exact.abs().max() > 1e-1


def test_backbone_signature_features_and_teacher_init():
    dit = common.new_backbone((1, 8, 8), 10, hidden=32, depth=2, heads=2)
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])
    out, feats = dit(x, t, y, return_features=True)
    assert out.shape == x.shape and feats.shape == (3, 32)
    wide = common.build_backbone({**dit._spec, "out_channels": 4})
    assert wide(x, t, y).shape == (3, 4, 8, 8)
    randomize(dit)
    student = common.build_backbone({**dit._spec, "use_s": True, "use_g": True})
    fresh = common.init_from_teacher(student, dit)
    assert fresh and all(k.startswith(("s_embed", "g_embed")) for k in fresh), fresh
    s, g = torch.rand(3), torch.full((3,), 2.0)
    # new inputs start as no-ops: the student equals the teacher whatever s and g are
    assert torch.allclose(student(x, t, y, s=s, g=g), dit(x, t, y), atol=1e-6)
    for depth in (1, 2):  # the features come from the middle block, and from the only one at depth 1
        mlp = common.new_backbone((2,), 0, hidden=16, depth=depth)
        out, feats = mlp(torch.randn(5, 2), torch.rand(5), return_features=True)
        assert out.shape == (5, 2) and feats.shape == (5, 16)
        shallow = common.new_backbone((1, 8, 8), 10, hidden=32, depth=depth, heads=2)
        assert shallow(x, t, y, return_features=True)[1].shape == (3, 32)


# ---------------------------------------------------------------------------------------------------
# common.py: data

def test_data_sources_folder_npz_cifar_sharding_flips():
    from PIL import Image
    import pickle
    with tempfile.TemporaryDirectory() as tmp:
        for cls in ("cat", "dog"):
            os.makedirs(os.path.join(tmp, "folder", cls))
            for i in range(3):
                Image.fromarray(np.full((20, 30, 3), 40 * i + (100 if cls == "dog" else 0), np.uint8)).save(
                    os.path.join(tmp, "folder", cls, f"{i}.png"))
        src = common.DataSource(os.path.join(tmp, "folder"), image_size=8)
        assert src.shape == (3, 8, 8) and src.num_classes == 2 and len(src.data) == 6
        x, y = src.next_batch(10, "cpu")  # crosses an epoch boundary
        assert x.shape == (10, 3, 8, 8) and x.min() >= -1 and x.max() <= 1 and set(y.tolist()) <= {0, 1}
        # each epoch visits every item once
        src2 = common.DataSource(os.path.join(tmp, "folder"), image_size=8)
        _, y6 = src2.next_batch(6, "cpu")
        assert sorted(y6.tolist()) == [0, 0, 0, 1, 1, 1]
        arr = np.random.default_rng(0).integers(0, 255, (10, 4, 4, 3), dtype=np.uint8)
        arr[..., :2, :] = 0  # left half black: a flip is visible
        np.savez(os.path.join(tmp, "imgs.npz"), arr_0=arr)
        src = common.DataSource(os.path.join(tmp, "imgs.npz"), hflip=True, seed=3)
        x, y = src.next_batch(200, "cpu")
        left_black = (x[..., :, :2] == -1).all(dim=(1, 2, 3))
        right_black = (x[..., :, 2:] == -1).all(dim=(1, 2, 3))
        assert y is None and left_black.any() and right_black.any()
        # CIFAR-10 python batches (tiny fake ones with the real layout)
        cdir = os.path.join(tmp, "cifar-10-batches-py")
        os.makedirs(cdir)
        for i in range(1, 6):
            with open(os.path.join(cdir, f"data_batch_{i}"), "wb") as f:
                pickle.dump({b"data": np.full((4, 3072), i, np.uint8), b"labels": [i % 10] * 4}, f)
        common.DIST.rank, common.DIST.world = 1, 2  # as rank 1 of 2: every other item
        try:
            src = common.DataSource(tmp)
        finally:
            common.DIST.rank, common.DIST.world = 0, 1
        assert src.shape == (3, 32, 32) and len(src.data) == 10
        with tarfile_of(cdir, tmp) as tar_path:
            assert len(common.DataSource(tar_path).data) == 20


def test_train_size_keeps_a_fixed_set_from_a_world_or_the_first_examples_of_data():
    # A world with --train-size: the same N samples for every run seed, cycled epoch by epoch, while the
    # world itself stays attached for exact scoring
    a, b = common.DataSource("glyphs16", seed=3, train_size=40), common.DataSource("glyphs16", seed=5, train_size=40)
    assert torch.equal(a.data, b.data) and torch.equal(a.labels, b.labels) and a.world is not None
    assert a.data.shape == (40, 1, 16, 16) and a.num_classes == 10
    seen = torch.cat([a.next_batch(10, "cpu")[0] for _ in range(8)])  # two epochs
    assert torch.equal(seen[:40].flatten(1).unique(dim=0), a.data.flatten(1).unique(dim=0))
    assert torch.equal(seen[40:].flatten(1).unique(dim=0), a.data.flatten(1).unique(dim=0))
    state = a.state_dict()
    after = a.next_batch(7, "cpu")[0]
    b.load_state_dict(state)
    assert torch.equal(b.next_batch(7, "cpu")[0], after)  # resume is exact
    fresh = common.DataSource("glyphs16")
    assert fresh.data is None and not torch.equal(fresh.next_batch(40, "cpu")[0], a.data)
    with tempfile.TemporaryDirectory() as tmp:  # data on disk: the first N examples
        arr = np.arange(10 * 4 * 4 * 3, dtype=np.uint8).reshape(10, 4, 4, 3)
        np.savez(os.path.join(tmp, "imgs.npz"), arr_0=arr, labels=np.arange(10) % 3)
        src = common.DataSource(os.path.join(tmp, "imgs.npz"), train_size=4)
        assert len(src.data) == 4 and src.labels.tolist() == [0, 1, 2, 0]
        assert torch.equal(src.data, torch.from_numpy(arr[:4]).permute(0, 3, 1, 2).float() / 127.5 - 1)
        expect_fail(lambda: common.DataSource(os.path.join(tmp, "imgs.npz"), train_size=11), "imgs.npz", "exceeds the 10")
    expect_fail(lambda: common.DataSource("glyphs16", train_size=-1), "--train-size -1", "must be >= 0")


class tarfile_of:
    """Pack a folder as cifar-10-python.tar.gz (the published layout) for the duration of a with-block."""

    def __init__(self, folder, tmp):
        self.folder, self.path = folder, os.path.join(tmp, "cifar-10-python.tar.gz")

    def __enter__(self):
        import tarfile
        with tarfile.open(self.path, "w:gz") as tar:
            tar.add(self.folder, arcname="cifar-10-batches-py")
        return self.path

    def __exit__(self, *exc):
        os.remove(self.path)


# ---------------------------------------------------------------------------------------------------
# common.py: the teacher trainer, resume, distributed, CLI errors

def test_logger_does_not_redraw_its_bar_per_log_line_off_a_tty():
    """On a pipe the bar redraws at most every 10 s; 300 log calls must not print 300 bars (the postfix
    used to force a redraw each time). The jsonl log still gets every line."""
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import common\nlog = common.Logger(%r, total=300)\n"
                "for i in range(300):\n    log.step()\n    log.log(i + 1, {'loss': 1.0 / (i + 1)})\nlog.close()" % tmp)
        r = run([sys.executable, "-c", code])
        assert r.returncode == 0, r.stderr
        draws = r.stderr.count("\r") + r.stderr.count("\n")
        assert 1 <= draws <= 10, f"{draws} bar draws for 300 log lines: {r.stderr[-300:]!r}"
        assert "300/300" in r.stderr, r.stderr[-300:]
        with open(os.path.join(tmp, "log.jsonl")) as f:
            assert len(f.readlines()) == 300


def test_logger_training_seconds_add_up_over_the_segments_of_a_resumed_run():
    """A run resumed at step 20 keeps the log up to there and counts the seconds recorded with it: the
    train_seconds of metrics.json is the whole run's, not the last segment's."""
    with tempfile.TemporaryDirectory() as tmp:
        log = common.Logger(tmp, total=40)
        log.log(10, {"loss": 1.0})
        assert json.loads(open(os.path.join(tmp, "log.jsonl")).read())["seconds"] < 5
        log.close()
        with open(os.path.join(tmp, "log.jsonl"), "w") as f:  # a first segment of 200 s, cut after step 30
            f.writelines(json.dumps({"step": s, "loss": 1.0, "seconds": 100.0 * s / 10}) + "\n" for s in (10, 20, 30))
        log = common.Logger(tmp, total=40, start=20)
        assert 200.0 <= log.seconds() < 205.0
        log.log(30, {"loss": 0.5})
        log.close()
        lines = [json.loads(line) for line in open(os.path.join(tmp, "log.jsonl"))]
        assert [line["step"] for line in lines] == [10, 20, 30] and 200.0 <= lines[-1]["seconds"] < 205.0
        fresh = common.Logger(tmp, total=40)  # a fresh run starts from zero
        assert fresh.seconds() < 5
        fresh.close()


def test_teacher_resume_is_bit_exact():
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(steps=12, ckpt_every=6, log_every=6, eval_samples=200, batch=64, hidden=32, depth=2)
        straight = common.train_teacher(common.TeacherConfig(out=os.path.join(tmp, "a"), **base))
        common.train_teacher(common.TeacherConfig(out=os.path.join(tmp, "b"), **{**base, "steps": 6}))
        resumed = common.train_teacher(common.TeacherConfig(out=os.path.join(tmp, "b"), resume=True, **base))
        for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), f"{k} differs after resume"
        ca = torch.load(os.path.join(tmp, "a", "ckpt.pt"), weights_only=True)
        cb = torch.load(os.path.join(tmp, "b", "ckpt.pt"), weights_only=True)
        assert all(torch.equal(ca["optimizer"]["state"][i]["exp_avg"], cb["optimizer"]["state"][i]["exp_avg"])
                   for i in ca["optimizer"]["state"])
        metrics = json.load(open(os.path.join(tmp, "a", "metrics.json")))
        assert {"method", "data", "teacher", "steps", "train_seconds", "results"} <= set(metrics)
        assert [r["nfe"] for r in metrics["results"] if r["sampler"] == "teacher"] == [1, 2, 4, 8, 16, 32]


DRIVER = """
import os, sys, torch, common
out = sys.argv[1]
ema = common.train_teacher(common.TeacherConfig(out=out, steps=8, batch=64, hidden=32, depth=2, log_every=4, ckpt_every=4,
                                                eval_samples=100, data=sys.argv[2]))
torch.save(ema.state_dict(), os.path.join(out, f"rank{os.environ['RANK']}.pt"))
"""


def test_teacher_two_process_torchrun_identical_ranks_and_single_writes():
    with tempfile.TemporaryDirectory() as tmp:
        driver = os.path.join(tmp, "driver.py")
        open(driver, "w").write(DRIVER)
        for data in ("checkerboard", "glyphs16"):  # one launch each: train_teacher ends the process group
            out = os.path.join(tmp, data)
            r = torchrun([driver, out, data])
            assert r.returncode == 0, r.stderr[-2000:]
            a, b = (torch.load(os.path.join(out, f"rank{i}.pt"), weights_only=True) for i in (0, 1))
            assert all(torch.equal(a[k], b[k]) for k in a), "ranks hold different parameters after DDP training"
            lines = open(os.path.join(out, "log.jsonl")).read().splitlines()
            assert [json.loads(l)["step"] for l in lines] == [4, 8], lines  # written once, by rank 0
            assert r.stdout.count("wrote ") == 1
            assert sorted(f for f in os.listdir(out) if not f.startswith("rank")) == \
                ["ckpt.pt", "log.jsonl", "metrics.json", "samples.png"]


def test_cli_errors_are_one_line_and_nonzero():
    with tempfile.TemporaryDirectory() as tmp:
        r = run([sys.executable, "common.py", "teacher", "--stepz", "3"])
        assert r.returncode != 0 and "unknown argument" in r.stderr and "--steps" in r.stderr
        assert "Traceback" not in r.stderr
        r = run([sys.executable, "common.py", "teacher", "--data", os.path.join(tmp, "missing")])
        assert r.returncode != 0 and "missing" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        out = os.path.join(tmp, "t")
        common.train_teacher(common.TeacherConfig(steps=2, hidden=16, eval_samples=100, out=out))
        expect_fail(lambda: common.train_teacher(common.TeacherConfig(steps=4, hidden=32, out=out, resume=True)),
                    "another config", "hidden")
        expect_fail(lambda: common.train_teacher(common.TeacherConfig(steps=4, out=os.path.join(tmp, "none"), resume=True)),
                    "no checkpoint", "drop --resume")


# ---------------------------------------------------------------------------------------------------
# Bad input and faults: a one-line error, a non-zero exit, and nothing lost

def expect_fail(fn, *words):
    """fn() must stop through common.fail (SystemExit "error: ...", one line) with every word in the message."""
    try:
        fn()
    except SystemExit as e:
        message = str(e)
        assert message.startswith("error:") and "\n" not in message and all(w in message for w in words), message
        return message
    raise AssertionError(f"no error; expected one naming {words}")


def test_non_finite_weights_are_never_saved_and_resume_takes_a_lower_lr():
    """A finite loss can still give a NaN update: the checkpoint of the step before stays intact, metrics.json
    is never written with NaN, and --resume accepts the lower --lr the error advises (and applies it)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = common.TeacherConfig(out=tmp, lr=1e-3)
        net = torch.nn.Linear(3, 2)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        path = os.path.join(tmp, "ckpt.pt")
        expect_fail(lambda: common.save_training_state(path, cfg, 1, {"model": _nan_copy(net), "opt": opt}),
                    "non-finite weights at step 1", "before any checkpoint", "lower --lr")
        assert not os.path.exists(path)
        common.save_training_state(path, cfg, 5, {"model": net, "opt": opt})
        good = {k: v.clone() for k, v in net.state_dict().items()}
        expect_fail(lambda: common.save_training_state(path, cfg, 6, {"model": _nan_copy(net), "opt": opt}),
                    "step 6", path, "keeps the last finite checkpoint", "--resume", "lower --lr")
        kept = torch.load(path, weights_only=True)
        assert kept["step"] == 5 and all(torch.equal(kept["model"][k], good[k]) for k in good)
        lower = dataclasses.replace(cfg, lr=1e-4, resume=True)
        common.check_resume_config(kept["config"], lower, path)  # accepted: --lr may change on resume
        assert common.load_training_state(path, lower, {"model": net, "opt": opt}) == 5
        assert abs(opt.param_groups[0]["lr"] - 1e-4) < 1e-15
        common.write_json(os.path.join(tmp, "m.json"), {"results": [{"nll": float("nan"), "swd": float("inf"), "ok": 1.5}]})
        assert json.load(open(os.path.join(tmp, "m.json")))["results"] == [{"nll": None, "swd": None, "ok": 1.5}]
    with tempfile.TemporaryDirectory() as tmp:  # end to end: lr 1 blows the weights up after a finite first loss
        r = run([sys.executable, "common.py", "teacher", "--lr", "1e3", "--lr-warmup", "1", "--grad-clip", "1e9",
                 "--steps", "4", "--ckpt-every", "1", "--hidden", "16", "--eval-samples", "100", "--out", tmp])
        assert r.returncode != 0 and "non-finite" in r.stderr and "Traceback" not in r.stderr, r.stderr[-500:]
        assert not os.path.exists(os.path.join(tmp, "metrics.json"))
        if os.path.exists(os.path.join(tmp, "ckpt.pt")):
            kept = torch.load(os.path.join(tmp, "ckpt.pt"), weights_only=True)
            assert all(torch.isfinite(v).all() for v in kept["ema"].values())


def _nan_copy(net):
    bad = copy.deepcopy(net)
    with torch.no_grad():
        next(bad.parameters())[0, 0] = float("nan")
    return bad


def test_out_and_resume_guard_earlier_runs():
    """A new run refuses an --out holding a run (even another method's); --resume needs a checkpoint, the same
    config and --steps at least its step, checked before any fit; log.jsonl keeps one line per step after a
    resume; --steps 0 and other out-of-range values fail before anything is written."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        base = dict(hidden=16, depth=1, batch=64, eval_samples=100, log_every=1, ckpt_every=2, out=out)
        common.train_teacher(common.TeacherConfig(steps=4, **base))
        expect_fail(lambda: common.train_teacher(common.TeacherConfig(steps=4, **base)), "holds an earlier run", "--resume")
        fits = []
        original_fit, common.fit_to_world = common.fit_to_world, lambda *a, **k: fits.append(1)
        try:  # another method into it, or resuming with another teacher: refused before any fit
            expect_fail(lambda: scm.train(scm.Config(steps=2, out=out)), "holds an earlier run")
            expect_fail(lambda: scm.train(scm.Config(steps=9, out=out, resume=True, teacher="other.pt")), "another config")
        finally:
            common.fit_to_world = original_fit
        assert not fits
        expect_fail(lambda: common.train_teacher(common.TeacherConfig(steps=3, resume=True, **base)), "past --steps 3")
        with open(os.path.join(out, "log.jsonl"), "a") as f:  # lines logged after the last checkpoint, then a kill
            f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")
        common.train_teacher(common.TeacherConfig(steps=6, resume=True, **base))
        steps = [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))]
        assert steps == [1, 2, 3, 4, 5, 6], steps
        for flags, words in [(["--steps", "0"], ("--steps 0", "at least 1")), (["--steps", "-1"], ("--steps -1",)),
                             (["--batch", "0"], ("--batch",)), (["--lr", "-1"], ("--lr", "positive")),
                             (["--log-every", "0"], ("--log-every",)), (["--ckpt-every", "0"], ("--ckpt-every",)),
                             (["--eval-samples", "0"], ("--eval-samples",)), (["--ema-decay", "2"], ("--ema-decay", "[0, 1)")),
                             (["--warmup", "-5"], ("--warmup",)), (["--lr", "nan"], ("--lr",)),
                             (["--device", "nonsense"], ("--device",))]:
            fresh = os.path.join(tmp, "fresh")
            expect_fail(lambda: common.parse_config(scm.Config, [*flags, "--out", fresh]), *words)
            assert not os.path.exists(fresh)
        if not torch.cuda.is_available():
            expect_fail(lambda: common.parse_config(dmd2.Config, ["--device", "cuda"]), "no CUDA", "--device cpu")
        open(os.path.join(tmp, "file"), "w").write("x")
        expect_fail(lambda: common.prepare_out(common.TeacherConfig(out=os.path.join(tmp, "file", "sub"))),
                    "cannot write to --out", "file")


def test_teacher_checkpoints_of_students_are_refused():
    """A student's checkpoint as --teacher (FreeFlow's has backbone and ema keys; sCM's wraps the network)
    stops with an error that names the file, instead of running or a load_state_dict traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in [("freeflow", small_freeflow_config(os.path.join(tmp, "ff"), steps=1, eval_samples=50)),
                          ("scm", scm_config(os.path.join(tmp, "scm"), steps=1, eval_samples=50))]:
            METHODS[name].train(cfg)
            path = os.path.join(cfg.out, "ckpt.pt")
            expect_fail(lambda: common.load_teacher_net(path), path, "student", "python common.py teacher")
        spec = common.new_backbone((2,), 0, hidden=16, depth=1)._spec
        wrong = common.new_backbone((2,), 0, hidden=32, depth=1).state_dict()
        torch.save({"backbone": spec, "ema": wrong}, os.path.join(tmp, "w.pt"))
        expect_fail(lambda: common.load_teacher_net(os.path.join(tmp, "w.pt")), "w.pt", "do not fit")


def test_malformed_data_files_fail_with_the_file_and_the_fix():
    with tempfile.TemporaryDirectory() as tmp:
        good = dict(weights=np.ones(3), means=np.zeros((3, 4)), stds=np.full(3, 0.1), labels=np.array([0, 1, 1]))
        cases = [({"stds": np.ones((3, 2))}, "stds"), ({"means": np.zeros((2, 4))}, "means"),
                 ({"means": np.full((3, 4), np.nan)}, "finite"), ({"weights": np.array([1.0, -1, 1])}, "weights"),
                 ({"labels": np.array([0.5, 1, 2])}, "labels"), ({"labels": np.array([0, 1])}, "labels"),
                 ({"stds": np.zeros(3)}, "stds"), ({"shape": np.array([3, 3])}, "shape")]
        for change, word in cases:
            path = os.path.join(tmp, f"bad_{word}.npz")
            np.savez(path, **{**good, **change})
            expect_fail(lambda: common.make_world(path), path, word)
        text = os.path.join(tmp, "text.npz")
        open(text, "w").write("not an archive")
        expect_fail(lambda: common.make_world(text), text, "not an .npz")
        expect_fail(lambda: common.DataSource(text), text, "not an .npz")
        nhw = os.path.join(tmp, "nhw.npz")
        np.savez(nhw, np.zeros((4, 8, 8), np.uint8))
        expect_fail(lambda: common.DataSource(nhw), nhw, "(N, H, W, C)")
        r = run([sys.executable, "common.py", "compare", "--methods", "foo", "--out", os.path.join(tmp, "cmp")])
        assert r.returncode != 0 and "--methods" in r.stderr and not os.path.exists(os.path.join(tmp, "cmp"))


def test_eval_fid_and_safetensors_bad_files_fail_with_their_name():
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "imgs")
        os.makedirs(folder)
        Image.new("RGB", (8, 8)).save(os.path.join(folder, "a.png"))
        open(os.path.join(folder, "b.png"), "wb").write(b"\x89PNG\r\n\x1a\n truncated")
        expect_fail(lambda: eval_fid.image_batch(eval_fid.read_images(folder)), "b.png", "cannot read image")
        text = os.path.join(tmp, "t.npz")
        open(text, "w").write("text")
        expect_fail(lambda: eval_fid.stats_of(text, None), text, "not an .npz")
        # --save-stats that cannot be written fails first: before the corrupt image would be read
        r = fid_cli([folder, "--save-stats", os.path.join(tmp, "missing", "s.npz"), "--random-weights"])
        assert r.returncode != 0 and "cannot write" in r.stderr and "Traceback" not in r.stderr, r.stderr[-300:]
        for name, mu, sigma, word in [("nan", np.full(4, np.nan), np.eye(4), "NaN"), ("sizes", np.zeros(4), np.eye(3), "fit")]:
            path = os.path.join(tmp, f"{name}.npz")
            np.savez(path, mu=mu, sigma=sigma)
            expect_fail(lambda: eval_fid.load_stats(path), path, word)
        for name, data in [("garbage", b"not safetensors at all"), ("truncated", None)]:
            path = os.path.join(tmp, f"{name}.safetensors")
            if data is None:
                save_file({"w": torch.zeros(1000)}, path)
                data = open(path, "rb").read()[:500]
            open(path, "wb").write(data)
            expect_fail(lambda: uf.read_safetensors(path), path, "safetensors")
            expect_fail(lambda: uf.load_flux(path, "tiny"), path, "safetensors")


# ---------------------------------------------------------------------------------------------------
# eval_fid.py: pytorch-fid's InceptionV3, preprocessing, statistics, Frechet distance, CLI

def fid_cli(args, env_update=None, nproc=1):
    """Run eval_fid.py (under torchrun when nproc > 1) in a clean environment; returns the CompletedProcess."""
    repo = os.path.dirname(os.path.abspath(eval_fid.__file__))
    env = {k: v for k, v in os.environ.items() if k != "FID_WEIGHTS"}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": repo, **(env_update or {})})
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    return subprocess.run([*launch, os.path.join(repo, "eval_fid.py"), *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)


def random_spd(dim, rng, floor=0.1):
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + floor * np.eye(dim)


def sqrtm_fid(mu1, s1, mu2, s2):
    """The textbook formula with scipy's general matrix square root (pytorch-fid's route)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real


def write_tiny_image_sets(folder, n_png=3, n_ref=4):
    """A folder of small images (one in a subfolder, one JPEG, a stray text file) and an arr_0 .npz."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "samples", "sub"))
    for i in range(n_png):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            os.path.join(folder, "samples", "sub" if i == 0 else "", f"{i}.png"))
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(folder, "samples", "x.jpg"))
    open(os.path.join(folder, "samples", "notes.txt"), "w").write("not an image")
    ramps = np.linspace(0, 1, 32)[None, None, :, None] * rng.uniform(50, 255, (n_ref, 1, 1, 3))  # NHWC, all different
    np.savez(os.path.join(folder, "ref.npz"), arr_0=ramps.astype(np.uint8))
    return os.path.join(folder, "samples"), os.path.join(folder, "ref.npz")


def test_fid_inception_state_dict_matches_pytorch_fid_layout():
    model = eval_fid.inception_model(random_weights=True)
    sd = model.state_dict()
    assert len(sd) == 566 and len([k for k in sd if not k.endswith("num_batches_tracked")]) == 472
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("fc.")) == 21_785_568
    assert len([k for k in sd if k.endswith(".conv.weight")]) == 94
    expected = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
                "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3), "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
                "Mixed_5b.branch1x1.bn.running_mean": (64,), "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
                "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3), "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
                "Mixed_6c.branch7x7dbl_2.conv.weight": (160, 160, 7, 1), "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
                "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3), "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
                "Mixed_7b.branch3x3dbl_2.conv.weight": (384, 448, 3, 3), "Mixed_7b.branch1x1.bn.running_var": (320,),
                "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
                "fc.weight": (1008, 2048), "fc.bias": (1008,)}
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, f"{key}: {tuple(sd[key].shape)} != {shape}"
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert not model.training
    # the grid sizes of the table: 35x35 after Mixed_5d, 17x17 after 6e, 8x8 after 7c, 2048 features
    shapes = {}
    for name in ("Mixed_5d", "Mixed_6e", "Mixed_7c"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.update({name: tuple(o.shape)}))
    features, logits = model(torch.rand(1, 3, 40, 40), return_logits=True)
    assert shapes == {"Mixed_5d": (1, 288, 35, 35), "Mixed_6e": (1, 768, 17, 17), "Mixed_7c": (1, 2048, 8, 8)}
    assert features.shape == (1, 2048) and logits.shape == (1, 1008)
    assert torch.allclose(logits, model.fc(features))
    # the TF pooling: average pools ignore the padding (ones stay ones at the border), Mixed_7c max-pools
    assert torch.equal(eval_fid.tf_avg_pool(torch.ones(1, 1, 5, 5)), torch.ones(1, 1, 5, 5))
    assert model.Mixed_7c.max_pool and not model.Mixed_7b.max_pool


def test_fid_weights_load_without_num_batches_tracked_and_fail_on_missing_key():
    source = eval_fid.inception_model(random_weights=True)
    with torch.no_grad():
        for p in source.parameters():  # distinguishable from any fresh initialisation
            p.add_(torch.randn_like(p))
    sd = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pt_inception.pth")
        torch.save(sd, path)
        loaded = eval_fid.inception_model(path).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in sd.items())
        assert not loaded["fc.weight"].requires_grad
        # a truncated download is refused with a one-line message
        with open(path, "rb") as f, open(path + ".part", "wb") as g:
            g.write(f.read(818_371))
        try:
            eval_fid.inception_model(path + ".part")
            raise AssertionError("a truncated weight file loaded")
        except SystemExit as e:
            assert "cannot read" in str(e) and eval_fid.WEIGHTS_URL in str(e)
    # a real key missing, or a wrong shape, is refused, naming the key
    for key, broken in (("Mixed_6b.branch7x7_2.bn.running_var", {k: v for k, v in sd.items() if k != "Mixed_6b.branch7x7_2.bn.running_var"}),
                        ("fc.weight", {**sd, "fc.weight": sd["fc.weight"][:1000]})):
        try:
            eval_fid.load_inception_weights(eval_fid.InceptionV3(), broken)
            raise AssertionError("incomplete weights loaded")
        except SystemExit as e:
            assert "\n" not in str(e) and key in str(e), str(e)


def test_fid_preprocess_is_pytorch_fid_bilinear_resize():
    x = torch.rand(2, 3, 17, 23)
    reference = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    assert torch.equal(eval_fid.preprocess(x), reference)
    # one pixel by hand: a 2x2 gray image; source coordinate of output index i is (i + 0.5) * 2 / 299 - 0.5
    img = torch.tensor([[[[0, 100], [200, 255]]]], dtype=torch.uint8)
    out = eval_fid.preprocess(img)
    assert out.shape == (1, 3, 299, 299) and torch.equal(out[:, 0], out[:, 2])  # gray repeated to RGB
    wy, wx = (149 + 0.5) * 2 / 299 - 0.5, (200 + 0.5) * 2 / 299 - 0.5  # 0.5 and 0.841...
    top, bottom = (1 - wx) * 0 + wx * 100, (1 - wx) * 200 + wx * 255
    by_hand = ((1 - wy) * top + wy * bottom) / 255 * 2 - 1
    assert abs(out[0, 0, 149, 200].item() - by_hand) < 1e-6
    assert abs(out[0, 0, 0, 0].item() + 1) < 1e-6 and abs(out[0, 0, 298, 298].item() - 1) < 1e-6  # corners: edge pixels
    assert torch.equal(out, eval_fid.preprocess(img.float() / 255))


def test_fid_features_same_for_uint8_float_and_every_layout():
    model = eval_fid.inception_model(random_weights=True)
    x = torch.randint(0, 256, (2, 3, 20, 24), dtype=torch.uint8)
    features = model(x)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert (features[0] - features[1]).abs().max() > 1e-3  # the features do depend on the image
    assert torch.allclose(model(x.float() / 255), features, atol=1e-6)
    # the layouts the readers produce: NHWC and grayscale NHW arrays become NCHW batches
    assert torch.equal(eval_fid.image_batch(x.permute(0, 2, 3, 1).numpy()), x)
    assert torch.equal(eval_fid.image_batch(x[:, 0].numpy()), x[:, :1])
    # an NHWC array and image files give the statistics of these features: float64 mean, unbiased covariance
    f64 = features.double().numpy()
    with tempfile.TemporaryDirectory() as tmp:
        for i, img in enumerate(x.permute(0, 2, 3, 1).numpy()):
            Image.fromarray(img).save(os.path.join(tmp, f"{i}.png"))
        for images in (x.permute(0, 2, 3, 1).numpy(), eval_fid.read_images(tmp)):
            mu, sigma = eval_fid.feature_stats(images, model, batch=2)
            assert mu.dtype == np.float64 and mu.shape == (2048,) and sigma.shape == (2048, 2048)
            assert np.allclose(mu, f64.mean(0), atol=1e-6) and np.allclose(sigma, np.cov(f64, rowvar=False), atol=1e-6)


def test_fid_frechet_distance_matches_scipy_and_handles_rank_deficiency():
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(3):
        mu1, mu2, s1, s2 = rng.normal(size=64), rng.normal(size=64), random_spd(64, rng), random_spd(64, rng)
        worst = max(worst, abs(eval_fid.frechet_distance(mu1, s1, mu2, s2) - sqrtm_fid(mu1, s1, mu2, s2)))
    assert worst < 1e-9, f"differs from scipy sqrtm by {worst:.2e}"
    assert abs(eval_fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    # a mean shift adds exactly |shift|^2 when the covariances are equal, and FID grows with it otherwise
    shift = rng.normal(size=64)
    assert abs(eval_fid.frechet_distance(mu1, s1, mu1 + shift, s1) - (shift ** 2).sum()) < 1e-9
    grows = [eval_fid.frechet_distance(mu1, s1, mu1 + a * shift, s2) for a in (0, 0.5, 1, 2)]
    assert all(a < b for a, b in zip(grows, grows[1:]))
    # 10 samples in 256-d: rank-9 covariances. Exact reference: tr((S1^1/2 S2 S1^1/2)^1/2) is the nuclear
    # norm of B A^T when S1 = A^T A and S2 = B^T B (A, B the centred samples / sqrt(n - 1))
    x, y = rng.normal(size=(10, 256)), rng.normal(size=(10, 256)) + 0.3
    a, b = (x - x.mean(0)) / 3, (y - y.mean(0)) / 3
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    exact = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * np.linalg.svd(b @ a.T, compute_uv=False).sum()
    fd = eval_fid.frechet_distance(x.mean(0), sx, y.mean(0), sy)
    assert np.isfinite(fd) and abs(fd - exact) < 1e-9 * exact, (fd, exact)
    assert abs(eval_fid.frechet_distance(x.mean(0), sx, x.mean(0), sx)) < 1e-9 * np.trace(sx)


def test_fid_cli_end_to_end_with_random_weights():
    with tempfile.TemporaryDirectory() as tmp:
        samples, ref = write_tiny_image_sets(tmp)
        stats = os.path.join(tmp, "samples_stats.npz")
        out = fid_cli([samples, "--ref", ref, "--random-weights", "--save-stats", stats, "--batch", "3"])
        assert out.returncode == 0, out.stderr[-2000:]
        assert "MEANINGLESS" in out.stderr
        fid_printed = float(re.search(r"FID \(.*\): (\S+)", out.stdout).group(1))
        assert np.isfinite(fid_printed) and fid_printed > 0
        assert sorted(os.listdir(tmp)) == ["ref.npz", "samples", "samples_stats.npz"]  # no temp file left behind
        # the saved statistics are those of the four images (a PNG in a subfolder and a JPEG included)
        mu, sigma = eval_fid.feature_stats(eval_fid.read_images(samples), eval_fid.inception_model(random_weights=True))
        mu_saved, sigma_saved = eval_fid.load_stats(stats)
        assert mu_saved.shape == (2048,) and sigma_saved.shape == (2048, 2048)
        assert np.allclose(mu_saved, mu, atol=1e-5) and np.allclose(sigma_saved, sigma, atol=1e-5)
        eval_fid.save_stats(stats, mu, sigma)  # exact round trip in process
        assert all(np.array_equal(a, b) for a, b in zip(eval_fid.load_stats(stats), (mu, sigma)))


def test_fid_cli_stats_need_no_weights_and_errors_are_one_line():
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        samples, ref = write_tiny_image_sets(tmp)
        stats = [os.path.join(tmp, f"{name}.npz") for name in ("a", "b")]
        mu_sigma = [(rng.normal(size=64), random_spd(64, rng)) for _ in stats]
        for path, (mu, sigma) in zip(stats, mu_sigma):
            eval_fid.save_stats(path, mu, sigma)
        out = fid_cli([stats[0], "--ref", stats[1]])  # no --weights, no FID_WEIGHTS: statistics need no network
        assert out.returncode == 0, out.stderr
        assert f"FID (pytorch-fid InceptionV3 weights and preprocessing): {eval_fid.frechet_distance(*mu_sigma[0], *mu_sigma[1]):.4f}" in out.stdout
        # a weight file that is not there (here given by $FID_WEIGHTS), or a missing input
        for args, env, words in (([samples, "--ref", ref], {"FID_WEIGHTS": os.path.join(tmp, "none.pth")}, ["none.pth", eval_fid.WEIGHTS_URL]),
                                 ([os.path.join(tmp, "missing"), "--ref", ref], None, ["missing", "does not exist"])):
            out = fid_cli(args, env)
            lines = out.stderr.strip().splitlines()
            assert out.returncode != 0 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
            assert all(w in lines[0] for w in words), lines[0]


def test_fid_of_samples_quantizes_like_saved_pngs():
    source = eval_fid.inception_model(random_weights=True)
    samples = torch.rand(3, 3, 16, 16) * 2.2 - 1.1  # a little outside [-1, 1], clipped like a PNG writer
    as_png = ((samples + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        weights, ref = os.path.join(tmp, "w.pth"), os.path.join(tmp, "ref.npz")
        torch.save(source.state_dict(), weights)
        eval_fid.save_stats(ref, *eval_fid.feature_stats(as_png, source))
        fid = eval_fid.fid_of_samples(samples, ref, weights, batch=2, device="cpu")
        assert abs(fid) < 1e-6, f"samples differ from their own PNGs by FID {fid}"


def test_fid_statistics_shard_over_torchrun_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        _, ref = write_tiny_image_sets(tmp, n_ref=5)  # 5 images: ranks get 3 and 2
        stats = os.path.join(tmp, "sharded.npz")
        out = fid_cli([ref, "--save-stats", stats, "--random-weights", "--batch", "2"], nproc=2)
        assert out.returncode == 0, out.stderr[-2000:]
        mu, sigma = eval_fid.feature_stats(eval_fid.read_images(ref), eval_fid.inception_model(random_weights=True))
        mu_sharded, sigma_sharded = eval_fid.load_stats(stats)
        assert np.allclose(mu_sharded, mu, atol=1e-5) and np.allclose(sigma_sharded, sigma, atol=1e-5)


FID_SPLIT_SCRIPT = """
import json, sys, types, torch, common
common.setup_dist("cpu")
out, ref, weights = sys.argv[1:4]
cfg = types.SimpleNamespace(out=out, seed=3, fid_ref=ref, fid_weights=weights, fid_samples=10, data="t", steps=0)
noisy = lambda z, y: torch.tanh(z + 0.5 * torch.randn_like(z) + 0.2 * y.view(-1, 1, 1, 1))  # stochastic
common.evaluate_real([{"sampler": "noisy", "nfe": 1, "fn": noisy}], (3, 8, 8), 3, cfg, "t", 0.0, "cpu", batch=4)
"""


def test_method_fid_splits_samples_over_ranks_and_does_not_depend_on_their_number():
    """evaluate_real (the methods' FID on real data) on 2 ranks gives the FID of 1 process, which is the FID of
    the same 10 samples computed in one piece by eval_fid.fid_of_samples: 3 batches of 4, 4, 2 dealt over the
    ranks (2 and 1), a stochastic sampler, an image-.npz reference sharded too; rank 0 alone writes."""
    with tempfile.TemporaryDirectory() as tmp:
        _, ref = write_tiny_image_sets(tmp, n_ref=5)
        weights = os.path.join(tmp, "w.pth")
        torch.save(eval_fid.inception_model(random_weights=True).state_dict(), weights)
        script = os.path.join(tmp, "fid_split.py")
        open(script, "w").write(FID_SPLIT_SCRIPT)
        fids = {}
        for nproc in (1, 2):
            out = os.path.join(tmp, f"out{nproc}")
            os.makedirs(out)
            if nproc > 1:
                r = torchrun([script, out, ref, weights], nproc)
                assert r.returncode == 0, r.stderr[-2000:]
            else:  # the same script in this process (a launch costs seconds)
                argv, sys.argv = sys.argv, [script, out, ref, weights]
                try:
                    runpy.run_path(script)
                finally:
                    sys.argv = argv
            assert sorted(os.listdir(out)) == ["metrics.json", "samples.png"], os.listdir(out)
            with open(os.path.join(out, "metrics.json")) as f:
                fids[nproc] = json.load(f)["results"][0]["fid"]
        samples = []
        for i in (0, 4, 8):  # the documented seeding: the batch starting at sample i after manual_seed(seed * 1000003 + i)
            torch.manual_seed(3 * 1_000_003 + i)
            z, y = torch.randn(min(4, 10 - i), 3, 8, 8), torch.arange(i, min(i + 4, 10)) % 3
            samples.append(torch.tanh(z + 0.5 * torch.randn_like(z) + 0.2 * y.view(-1, 1, 1, 1)).clamp(-1, 1))
        whole = eval_fid.fid_of_samples(torch.cat(samples), ref, weights, device="cpu")
        assert fids[1] > 1e-3, fids
        assert abs(fids[1] - whole) <= 1e-6 * whole and abs(fids[2] - whole) <= 1e-6 * whole, (fids, whole)


def test_every_method_benches_the_same_workload_against_flow_matching():
    """--bench in each method file times its training step and a flow-matching step of the same network on
    --bench-data at --bench-batch (the same default in all four, so compare's cost column compares like with
    like), with an untrained stand-in teacher, and prints the table compare parses; nothing is written."""
    configs = {m: m.Config.__dataclass_fields__ for m in (scm, dmd2, freeflow, piflow)}
    assert {(f["bench_data"].default, f["bench_batch"].default) for f in configs.values()} == {("glyphs16", 64)}
    with tempfile.TemporaryDirectory() as tmp:
        for method in configs:
            cfg = method.Config(bench=True, bench_data="checkerboard", bench_batch=8, hidden=16, depth=2,
                                out=os.path.join(tmp, method.__name__), device="cpu")
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                assert method.train(cfg) is None
            rows = common._bench_rows(printed.getvalue())
            assert rows[0][0] == "flow matching" and rows[0][2] == 1.0 and len(rows) >= 2, printed.getvalue()
            assert all(ms > 0 and ratio > 0 for _, ms, ratio in rows), rows
            assert "checkerboard: MLPTrunk, batch 8" in printed.getvalue(), printed.getvalue()
            floors = {scm: ("| scd (jvp) |", ("1 x flow matching", "1 x jvp", "1 x forward")),  # + the teacher
                      freeflow: ("| freeflow (both) |", ("2 x flow matching", "0.75 x jvp", " x forward")),
                      piflow: ("| pi-ID 1 NFE (gm, data) |", ("1 x flow matching", "2 x teacher call",
                                                               "130 x policy velocity")),  # M = 128 substeps + S
                      dmd2: ("| dmd2 (1 G + 5 critic updates) |", ("6 x flow matching", "6 x forward",
                                                                     "10 x classifier pass", "1 x classifier pass to the input"))}
            start, passes = floors[method]  # the step next to its pass-count floor
            floor = [l for l in printed.getvalue().splitlines() if l.startswith(start) and l.count("|") == 6]
            assert len(floor) == 1 and all(p in floor[0] for p in passes) and float(floor[0].split("|")[3]) > 0, \
                printed.getvalue()
            out = os.path.join(tmp, method.__name__)
            assert not os.path.exists(out) or not os.listdir(out), os.listdir(out)


# ---------------------------------------------------------------------------------------------------
# freeflow.py



class ExactMapOfOneGaussian(torch.nn.Module):
    """The closed-form flow map from the prior for data N(mu, s0^2 I), in the student's parametrisation:
    x_t = (1 - t) mu + sigma(t) z with sigma(t) = sqrt((1 - t)^2 s0^2 + t^2), so
    f(z, delta) = delta mu + sigma(1 - delta) z and F = (z - f) / delta."""

    def __init__(self, mu, s0):
        super().__init__()
        self.mu, self.s0 = mu, s0

    def forward(self, x, t, y=None, s=None, g=None):
        d = s.view(-1, 1)
        f = d * self.mu + torch.sqrt(d ** 2 * self.s0 ** 2 + (1 - d) ** 2) * x
        return (x - f) / d


def test_freeflow_exact_flow_map_has_zero_prediction_residual():
    mu, s0 = torch.tensor([[1.5, -0.5, 0.25]], dtype=torch.float64), 0.3
    world = common.GaussianMixture([1.0], mu, [s0])
    z = torch.randn(512, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    delta = torch.cat([torch.linspace(0.01, 1.0, 256, dtype=torch.float64)] * 2)  # every delta, up to the full jump
    ones = torch.ones(512, dtype=torch.float64)
    residual = freeflow.prediction_residual(ExactMapOfOneGaussian(mu, s0), world, z, delta, None, ones)
    assert residual.abs().max() < 1e-9, f"exact map leaves residual {residual.abs().max():.2e}"
    # the exact map also lands where an accurate ODE solve from the same noise lands
    ode, _ = common.reference_ode(world.velocity, z[:8], t_to=0.0)
    one_step = freeflow.one_step_sample(ExactMapOfOneGaussian(mu, s0), z[:8], None, ones[:8])
    assert (one_step - ode).abs().max() < 1e-6
    # and the residual is not blind: a map to a slightly wrong mean, or a wrong spread, is caught
    for wrong in (ExactMapOfOneGaussian(mu + 0.05, s0), ExactMapOfOneGaussian(mu, s0 * 1.1)):
        residual = freeflow.prediction_residual(wrong, world, z, delta, None, ones)
        assert residual.pow(2).mean().sqrt() > 1e-2


def test_freeflow_delta_jvp_matches_float64_central_difference():
    torch.manual_seed(0)
    for shape in ((2,), (1, 8, 8)):
        kwargs = {"heads": 2} if len(shape) == 3 else {}
        net = common.new_backbone(shape, 3, hidden=32, depth=2, use_s=True, use_g=True, s_scale=1.0, **kwargs)
        with torch.no_grad():
            for p in net.parameters():  # zero-initialised gates would make the derivative trivially 0
                p.normal_(0, 0.1)
        net = net.double().eval()
        z, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 4, (6,))
        delta, gamma = torch.rand(6, dtype=torch.float64), 1 + 2 * torch.rand(6, dtype=torch.float64)
        F, dF = freeflow.velocity_and_delta_derivative(net, z, delta, y, gamma)
        h = 1e-6
        with torch.no_grad():
            fd = (freeflow.average_velocity(net, z, delta + h, y, gamma)
                  - freeflow.average_velocity(net, z, delta - h, y, gamma)) / (2 * h)
        assert (F - freeflow.average_velocity(net, z, delta, y, gamma)).abs().max() < 1e-12
        err = float((dF - fd).abs().max() / fd.abs().max())
        assert fd.abs().max() > 1e-3 and err < 1e-6, f"{shape}: JVP relative error {err}"


class AffineStudent(torch.nn.Module):
    """F(z, delta) = a z + b, so the one-step samples x = z - F(z, 1) are N(-b, (1 - a)^2 I)."""

    def __init__(self, a, b):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, x, t, y=None, s=None, g=None):
        return self.a * x + self.b

    def distribution(self):
        return -self.b.detach(), float((1 - self.a).abs())


def gaussian_kl(m_q, s_q, m_p, s_p):
    d = len(m_q)
    return float(d * (math.log(s_p / s_q) + s_q ** 2 / (2 * s_p ** 2) - 0.5) + (m_q - m_p).pow(2).sum() / (2 * s_p ** 2))


def test_freeflow_correction_gradient_moves_one_step_samples_toward_the_data():
    """Sign check of the Eq. 11 conversion: with exact velocities for the data (teacher) and for the
    student's own noised samples (the online network's target), one descent step on the correction
    loss lowers KL(student || data), moving the mean toward the data mean and the spread toward its spread."""
    m_p, s_p = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.5
    data = common.GaussianMixture([1.0], m_p[None], [s_p])
    cfg = freeflow.Config(objective="correction")
    for a, b in ((0.2, [0.3, 0.3]), (0.7, [-1.5, 0.0])):  # student too wide / too narrow
        torch.manual_seed(0)
        student = AffineStudent(a, b)
        m_q, s_q = student.distribution()
        own = common.GaussianMixture([1.0], m_q[None], [s_q])  # exact velocity of the student's noised samples
        z = torch.randn(20000, 2, dtype=torch.float64)
        ones = torch.ones(20000, dtype=torch.float64)
        loss, _ = freeflow.freeflow_loss(student, data, lambda x, t, y, g: own.velocity(x, t), z, None, ones, cfg)
        loss.backward()
        with torch.no_grad():
            for p in student.parameters():
                p -= 0.2 * p.grad / p.grad.norm()
        m_new, s_new = student.distribution()
        assert gaussian_kl(m_new, s_new, m_p, s_p) < gaussian_kl(m_q, s_q, m_p, s_p) - 1e-3
        assert float((m_new - m_q) @ (m_p - m_q)) > 0
        assert abs(s_new - s_p) < abs(s_q - s_p)


def small_freeflow_config(out, **kw):
    return freeflow.Config(**{"out": out, "hidden": 32, "depth": 2, "batch": 128, "steps": 60, "lr": 1e-3, "fake_lr": 1e-3,
                              "log_every": 20, "ckpt_every": 60, "eval_samples": 300, "device": "cpu", **kw})


def test_freeflow_loss_gradient_matches_the_papers_update_computed_independently():
    """One freeflow_loss on a labelled image-shaped mixture (CFG gamma > 1) against the combined update written
    out here: for prediction rows (delta ~ U^2) Delta_G = F + delta dF/d(delta) - u(z - delta F, 1 - delta) with a
    float64 central difference, weight (|Delta_G|^2 / d + eps)^-k; for correction rows (delta = 1) x_hat = z - F,
    x_r = (1 - r) x_hat + r n, Delta_N = v_g(x_r, r) - u(x_r, r) with CFG only for t <= corr_guidance_max;
    lambda = alpha E|Delta_G| / E|Delta_N|; the gradient is that of [sum w <F, Delta_G> + lambda sum <F, Delta_N>] / (B d),
    F always evaluated from t = 1 (the prior). Checked for k = 1 and k = 0.5."""
    world = common.GaussianMixture([1.0, 2.0, 1.5], torch.randn(3, 8, generator=torch.Generator().manual_seed(0),
                                   dtype=torch.float64), [0.3, 0.2, 0.4], labels=[0, 1, 1], shape=(2, 2, 2))
    torch.manual_seed(0)
    net = randomize(common.new_backbone((2, 2, 2), 2, hidden=16, depth=1, use_s=True, use_g=True, time_scale=1.0))
    params = list(net.parameters())
    fake = lambda x, r, y, g: 0.3 * x - scm.bc(r, x) + 0.1 * scm.bc(g, x)  # any fixed function stands in for g
    B = 8
    z = torch.randn(B, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    y, gamma = torch.tensor([0, 1] * 4), torch.full((B,), 2.0)
    for k in (1.0, 0.5):
        cfg = types.SimpleNamespace(objective="both", pred_frac=0.75, delta_power=2.0, weight_eps=1e-2, power_k=k,
                                    lambda_weighted=False, alpha=1.0, r_logit_mean=0.8, r_logit_std=1.0, corr_guidance_max=0.7)
        torch.manual_seed(2)
        loss, _ = freeflow.freeflow_loss(net, world, fake, z, y, gamma, cfg)
        grads = torch.autograd.grad(loss, params)
        torch.manual_seed(2)  # the same draws: delta, then r and n of the correction rows
        delta = torch.rand(B).pow(2.0)
        delta[6:] = 1.0
        r = torch.sigmoid(0.8 + torch.randn(2))
        n = torch.randn(2, 2, 2, 2)
        F = net(z, torch.ones(B), y, s=delta, g=gamma)
        net64 = copy.deepcopy(net).double()
        Fd = lambda dd: net64(z[:6].double(), torch.ones(6, dtype=torch.float64), y[:6], s=dd, g=gamma[:6].double())
        with torch.no_grad():
            d6, h = delta[:6].double(), 1e-5
            F6 = Fd(d6)
            dF = (Fd(d6 + h) - Fd(d6 - h)) / (2 * h)
            delta_G = (F6 + scm.bc(d6, F6) * dF - world.velocity(z[:6].double() - scm.bc(d6, F6) * F6, 1 - d6, y[:6], 2.0)).float()
            w = (delta_G.flatten(1).pow(2).mean(1) + 1e-2).pow(-k)
            x_hat = (z[6:] - F[6:]).double()
            x_r = (1 - scm.bc(r, x_hat)) * x_hat + scm.bc(r, x_hat) * n
            u = world.velocity(x_r, r.double(), y[6:], torch.where(r <= 0.7, 2.0, 1.0).double())
            delta_N = (fake(x_r, r.double(), y[6:], gamma[6:].double()) - u).float()
            lam = delta_G.flatten(1).norm(dim=1).mean() / delta_N.flatten(1).norm(dim=1).mean()
        surrogate = ((w * (F[:6] * delta_G).flatten(1).sum(1)).sum() + lam * (F[6:] * delta_N).sum()) / (B * 8)
        for a, b in zip(grads, torch.autograd.grad(surrogate, params)):
            assert (a - b).abs().max() <= 2e-3 * b.abs().max() + 1e-8, (k, float((a - b).abs().max()), float(b.abs().max()))


def test_freeflow_one_step_sample_is_z_minus_the_average_velocity_from_the_prior():
    """x0 = f(z, 1) = z - F(z, t = 1, delta = 1) (the map starts at the prior and jumps the whole interval)."""
    torch.manual_seed(0)
    net = randomize(common.new_backbone((2, 2, 2), 2, hidden=16, depth=1, use_s=True, use_g=True))
    z, y, gamma = torch.randn(5, 2, 2, 2), torch.tensor([0, 1, 0, 1, 0]), torch.full((5,), 1.5)
    expected = z - net(z, torch.ones(5), y, s=torch.ones(5), g=gamma)
    assert torch.allclose(freeflow.one_step_sample(net, z, y, gamma), expected, atol=1e-6)


class OffsetVelocity:
    """The world's exact velocity plus a constant vector: a teacher (or g) whose error is known exactly."""

    def __init__(self, world, offset):
        self.world, self.offset = world, offset

    def velocity(self, x, t, y=None, cfg=1.0, interval=None):
        return self.world.velocity(x.double(), t, y, cfg, interval).float() + self.offset


def test_freeflow_correction_check_separates_the_teachers_error_from_the_correction():
    """With u = u* + c and v_g = u* + b: teacher error |c|, correction Delta_N = v_g - u = b - c, the exact
    correction v_g - u* = b, cosine (b - c).b / (|b - c| |b|), at every noise level, at student and data points."""
    world = common.GaussianMixture([0.3, 0.7], [[1.0, 0.0], [-1.0, 0.5]], [0.2], labels=[0, 1])
    c, b = torch.tensor([0.3, 0.0]), torch.tensor([0.0, 0.4])
    teacher, g = OffsetVelocity(world, c), OffsetVelocity(world, b)
    fake_velocity = lambda x, t, y, gamma: g.velocity(x, t, y, gamma, interval=(0.0, 0.7))
    student = lambda z, t, y, s=None, g=None: 0.5 * z  # one-step samples z / 2
    cfg = types.SimpleNamespace(guidance=2.0, corr_guidance_max=0.7, objective="both")
    rows = freeflow.correction_check(student, fake_velocity, teacher, world, cfg, 300, "cpu", batch=128)
    assert [r["r"] for r in rows] == list(freeflow.CHECK_NOISE_LEVELS)
    rms = lambda v: float(v.pow(2).mean().sqrt())
    for r in rows:
        assert abs(r["teacher_err_student"] - rms(c)) < 1e-5 and abs(r["teacher_err_data"] - rms(c)) < 1e-5
        assert abs(r["correction"] - rms(b - c)) < 1e-5 and abs(r["exact_correction"] - rms(b)) < 1e-5
        assert abs(r["cosine"] - 0.8) < 1e-5
    # g is trained only with the correction: prediction alone reports the teacher's error only
    rows = freeflow.correction_check(student, fake_velocity, teacher, world, types.SimpleNamespace(
        guidance=2.0, corr_guidance_max=0.7, objective="prediction"), 300, "cpu")
    assert set(rows[0]) == {"r", "teacher_err_student", "teacher_err_data"}
    # the error is measured where the samples are: a teacher wrong only far from the data is wrong at a student
    # that lands there and right at the data
    far = lambda z, t, y, s=None, g=None: z - 20.0  # samples near +20
    wrong_far = types.SimpleNamespace(velocity=lambda x, t, y=None, cfg=1.0, interval=None: world.velocity(
        x.double(), t, y, cfg, interval).float() + c * (x[:, :1] > 8))
    rows = freeflow.correction_check(far, fake_velocity, wrong_far, world, cfg, 300, "cpu")
    assert rows[0]["teacher_err_data"] < 1e-6 and abs(rows[0]["teacher_err_student"] - rms(c)) < 1e-5


def test_freeflow_training_never_touches_data():
    """The loop takes noise and labels only: from the moment the teacher exists until evaluation,
    drawing a data batch or a sample of the world raises."""
    def forbidden(*args, **kwargs):
        raise AssertionError("FreeFlow training drew a data sample")

    saved = (common.DataSource.next_batch, common.GaussianMixture.sample, common.fit_to_world,
             freeflow.teacher_for, freeflow.evaluate)
    calls = []

    def arm(*args, **kwargs):
        out = saved[3](*args, **kwargs)
        common.DataSource.next_batch = common.GaussianMixture.sample = forbidden
        return out

    def disarm_then_evaluate(*args, **kwargs):
        common.DataSource.next_batch, common.GaussianMixture.sample = saved[0], saved[1]
        calls.append("evaluate")
        return saved[4](*args, **kwargs)

    with tempfile.TemporaryDirectory() as tmp:
        _, common.fit_to_world = quick_teacher_fit(tmp)
        freeflow.teacher_for, freeflow.evaluate = arm, disarm_then_evaluate
        try:
            freeflow.train(small_freeflow_config(os.path.join(tmp, "run"), steps=20))
        finally:
            (common.DataSource.next_batch, common.GaussianMixture.sample, common.fit_to_world,
             freeflow.teacher_for, freeflow.evaluate) = saved
        assert calls == ["evaluate"]
        assert os.path.isfile(os.path.join(tmp, "run", "metrics.json"))


def test_freeflow_short_run_lowers_prediction_residual_and_resumes_exactly():
    with tempfile.TemporaryDirectory() as tmp:
        full, common.fit_to_world = quick_teacher_fit(tmp)
        try:
            ema = freeflow.train(small_freeflow_config(os.path.join(tmp, "run"), steps=80, ckpt_every=40))
            teacher_net = common.fit_to_world(common.make_world("checkerboard"), {"hidden": 32, "depth": 2})
            # resume: 40 steps, then 40 more, equals 80 straight
            freeflow.train(small_freeflow_config(os.path.join(tmp, "half"), steps=40, ckpt_every=40))
            freeflow.train(small_freeflow_config(os.path.join(tmp, "half"), steps=80, ckpt_every=40, resume=True))
        finally:
            common.fit_to_world = full
        ckpt = torch.load(os.path.join(tmp, "run", "ckpt.pt"), weights_only=True)
        half = torch.load(os.path.join(tmp, "half", "ckpt.pt"), weights_only=True)
        for name in ("model", "ema", "fake"):
            for k, v in ckpt[name].items():
                assert torch.equal(v, half[name][k]), f"resume differs in {name}.{k}"
        world = common.make_world("checkerboard")
        start = common.build_backbone(ckpt["backbone"])
        common.init_from_teacher(start, teacher_net)
        trained = common.build_backbone(ckpt["backbone"])
        trained.load_state_dict(ckpt["model"])
        g = torch.Generator().manual_seed(0)
        z, delta, ones = torch.randn(2000, 2, generator=g), torch.rand(2000, generator=g), torch.ones(2000)
        before = float(freeflow.prediction_residual(start, world, z, delta, None, ones).pow(2).mean())
        after = float(freeflow.prediction_residual(trained, world, z, delta, None, ones).pow(2).mean())
        assert after < 0.5 * before, (before, after)
        x = freeflow.one_step_sample(ema, z, None, ones)
        assert torch.isfinite(x).all() and x.abs().max() < 10
        rows = json.load(open(os.path.join(tmp, "run", "metrics.json")))["results"]
        student = [r for r in rows if r["sampler"] == "student"][0]
        assert student["nfe"] == 1 and math.isfinite(student["swd"]) and "ode_err" in student
        # with the analytic teacher the correction check finds no teacher error: Delta_N is the exact correction
        check = json.load(open(os.path.join(tmp, "run", "metrics.json")))["correction_check"]
        assert len(check) == len(freeflow.CHECK_NOISE_LEVELS)
        assert all(r["teacher_err_student"] < 1e-4 and abs(r["correction"] - r["exact_correction"]) < 1e-4
                   and r["correction"] > 0.1 for r in check), check  # float32 teacher against the float64 truth


def test_freeflow_torchrun_two_processes_class_conditional_learned_teacher():
    """DDP smoke run on a class-conditional mixture (CFG scale as a student input) with a learned
    teacher checkpoint: both ranks train, rank 0 alone writes."""
    with tempfile.TemporaryDirectory() as tmp:
        labelled_mixture_and_teacher(tmp)
        out = os.path.join(tmp, "run")
        r = torchrun(["freeflow.py", "--data", os.path.join(tmp, "mix.npz"), "--teacher", os.path.join(tmp, "teacher.pt"),
                      "--steps", "20", "--batch", "64", "--eval-samples", "300", "--guidance", "2", "--out", out,
                      "--log-every", "10"])
        assert r.returncode == 0, r.stderr[-2000:]
        metrics = json.load(open(os.path.join(out, "metrics.json")))
        assert metrics["steps"] == 20 and metrics["guidance"] == 2 and metrics["teacher"] == "learned"
        student = [row for row in metrics["results"] if row["sampler"] == "student"][0]
        assert "cond_acc" in student and math.isfinite(student["swd"])
        assert len(open(os.path.join(out, "log.jsonl")).read().splitlines()) == 2  # rank 0 alone logs
        assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl", "metrics.json", "samples.png"]


# ---------------------------------------------------------------------------------------------------
# dmd2.py




def gaussian_velocity(m, s):
    """Exact rectified-flow velocity of the data N(m, s^2 I), written out independently of common.py:
    x_t | x0-law ~ N((1 - t) m, v I), v = (1 - t)^2 s^2 + t^2, E[x0|x_t] = m + (1 - t) s^2 / v (x_t - (1 - t) m),
    E[eps|x_t] = t / v (x_t - (1 - t) m), u = E[eps] - E[x0]."""
    def velocity(x, t, y=None, cfg=1.0):
        tb = t.to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        v = (1 - tb) ** 2 * s ** 2 + tb ** 2
        r = x - (1 - tb) * m
        return tb / v * r - (m + (1 - tb) * s ** 2 / v * r)
    return velocity


class IsotropicGaussianGenerator(torch.nn.Module):
    """x = m + s z: the generator's distribution is N(m, s^2 I), known in closed form."""

    def __init__(self, m, s):
        super().__init__()
        self.m = torch.nn.Parameter(torch.tensor(m, dtype=torch.float64))
        self.s = torch.nn.Parameter(torch.tensor(s, dtype=torch.float64))

    def forward(self, z):
        return self.m + self.s * z


def dmd2_gaussian_kl(m_q, s_q, m_p, s_p):
    d = len(m_q)
    return float(d * (math.log(s_p / s_q) + s_q ** 2 / (2 * s_p ** 2) - 0.5) + (m_q - m_p).pow(2).sum() / (2 * s_p ** 2))


def test_dmd2_dm_gradient_points_to_the_data_and_vanishes_when_matched():
    """Exact real score (the data N(m_p, s_p^2), through common.GaussianMixture) and exact fake score (the
    generator's own N(m_q, s_q^2), an independent closed form): the DM gradient moves the generator's
    mean toward the data mean and its spread toward the data spread, one step lowers KL(q || p), and the
    gradient is zero (to float precision) once q = p. (With both mean and spread off, the per-sample
    normaliser of Eq. 8 down-weights the samples far from the data, so the spread component alone is not
    the KL gradient's; only the mean direction and the KL decrease are asserted there.)"""
    for cfg, m_p, s_p in ((dmd2.Config(), torch.tensor([0.7], dtype=torch.float64), 0.4),
                          (dmd2.Config(), torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64), 0.5),
                          (dmd2.Config(dm_t_dist="karras"), torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64), 0.5)):
        data = common.GaussianMixture([1.0], m_p[None], [s_p])
        D = len(m_p)
        for m_q, s_q in ((m_p - 0.8, s_p), (m_p, 0.9), (m_p, 0.2), (m_p + 0.5, 0.2), (m_p - 0.8, 0.9), (m_p, s_p)):
            torch.manual_seed(0)
            gen = IsotropicGaussianGenerator(m_q.tolist(), s_q)
            fake = gaussian_velocity(gen.m.detach(), gen.s.detach())
            z = torch.randn(40000, D, dtype=torch.float64)
            dmd2.distribution_matching_loss(gen(z), None, data, fake, cfg).backward()
            g_m, g_s = gen.m.grad, float(gen.s.grad)
            size = float(torch.cat([g_m, gen.s.grad[None]]).norm())
            if s_q == s_p and torch.equal(m_q, m_p):
                assert size < 1e-9, f"matched distributions leave a DM gradient {size}"
                continue
            if not torch.equal(m_q, m_p):
                cos = float(-g_m @ (m_p - m_q) / (g_m.norm() * (m_p - m_q).norm()))
                assert cos > 0.95, f"mean update not toward the data (cos {cos})"
            else:  # only the spread is off: the update changes the spread alone, toward s_p
                assert g_m.norm() < 0.05 * abs(g_s) and (s_q > s_p) == (g_s > 0), (s_q, s_p, g_s)
            step = 0.05 / size
            m_new, s_new = m_q - step * g_m, s_q - step * g_s
            assert dmd2_gaussian_kl(m_new, s_new, m_p, s_p) < dmd2_gaussian_kl(m_q, s_q, m_p, s_p) - 1e-4


def dmd2_tiny_parts(shape=(2,), classes=3, gan=True):
    torch.manual_seed(0)
    kwargs = {"heads": 2} if len(shape) == 3 else {}
    teacher_net = common.new_backbone(shape, classes, hidden=32, depth=2, **kwargs)
    with torch.no_grad():  # zero-initialised gates would make every network output a constant
        for p in teacher_net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    generator = common.build_backbone(teacher_net._spec)
    common.init_from_teacher(generator, teacher_net)
    score = common.build_backbone(teacher_net._spec)
    common.init_from_teacher(score, teacher_net)
    return common.NetTeacher(teacher_net), generator, dmd2.Critic(score, gan=gan)


def test_dmd2_gan_head_shapes_and_where_its_gradient_goes():
    for shape in ((2,), (1, 8, 8)):
        _, _, critic = dmd2_tiny_parts(shape)
        x, t, y = torch.randn(5, *shape), torch.rand(5), torch.randint(0, 3, (5,))
        assert critic(x, t, y).shape == x.shape  # the fake score: a velocity
        logits = critic(x, t, y, classify=True)
        assert logits.shape == (5,) and logits.dtype == torch.float32
        assert dmd2.gan_logits(critic, x, y).shape == (5,)
        logits.sum().backward()  # the head trains the fake score's trunk up to the bottleneck, not its output layer
        assert critic.score.inp.weight.grad.abs().sum() > 0 and critic.head.net[0].weight.grad.abs().sum() > 0
        assert critic.score.out.weight.grad is None
    _, _, no_gan = dmd2_tiny_parts(gan=False)
    assert no_gan.head is None


def test_dmd2_generator_turn_leaves_the_critic_untouched():
    """During the generator's turn the critic (fake score and GAN head) gets no gradient and no update,
    while the GAN term does reach the generator through the frozen critic."""
    teacher, generator, critic = dmd2_tiny_parts()
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    z, y = torch.randn(64, 2), torch.randint(0, 3, (64,))
    x_in, t = dmd2.training_inputs(generator, z, y, [1.0], 0)
    grads = {}
    for gan_g in (0.0, 1.0):
        g = copy.deepcopy(generator)
        opt = torch.optim.AdamW(g.parameters(), lr=1e-3)
        torch.manual_seed(1)
        x, stats = dmd2.generator_turn(g, critic, opt, x_in, t, y, teacher, dmd2.Config(gan_g=gan_g), 0)
        assert not x.requires_grad and ("g_gan_loss" in stats) == (gan_g > 0)
        assert all(p.grad is None for p in critic.parameters())
        assert all(p.requires_grad for p in critic.parameters())  # unfrozen again for its own turn
        assert all(torch.equal(v, before[k]) for k, v in critic.state_dict().items())
        assert any(not torch.equal(a, b) for a, b in zip(g.parameters(), generator.parameters()))
        grads[gan_g] = torch.cat([p.grad.flatten() for p in g.parameters()])
    assert not torch.allclose(grads[0.0], grads[1.0])


def test_dmd2_backward_simulation_runs_without_gradient_and_only_the_last_step_has_one():
    _, generator, _ = dmd2_tiny_parts()
    calls = []
    generator.register_forward_hook(lambda m, args, out: calls.append((torch.is_grad_enabled(), float(args[1][0]))))
    times = dmd2.generator_times(4)
    assert times == [1.0, 0.75, 0.5, 0.25]
    z, y = torch.randn(32, 2), torch.randint(0, 3, (32,))
    x_in, t = dmd2.training_inputs(generator, z, y, times, 2)
    x = dmd2.generate(generator, x_in, t, y)
    assert calls == [(False, 1.0), (False, 0.75), (True, 0.5)], calls
    assert not x_in.requires_grad and x.requires_grad and torch.all(t == 0.5)
    x.sum().backward()
    assert all(p.grad is not None for p in generator.parameters() if p.requires_grad)
    # k = 0 is the batch noise itself at t = 1; the simulation's own noise is fresh (differs per call)
    calls.clear()
    x0_in, t0 = dmd2.training_inputs(generator, z, y, times, 0)
    assert torch.equal(x0_in, z) and torch.all(t0 == 1) and calls == []
    again, _ = dmd2.training_inputs(generator, z, y, times, 2)
    assert not torch.allclose(again, x_in)
    # ablation: real data forward-noised to a schedule time per sample, no generator call
    x_real = torch.randn(32, 2)
    k_each = torch.arange(32) % 4
    x_ab, t_ab = dmd2.training_inputs(None, z, y, times, None, real=(x_real, k_each))
    assert torch.equal(t_ab, torch.tensor(times)[k_each]) and torch.allclose(x_ab, (1 - t_ab[:, None]) * x_real + t_ab[:, None] * z)


def small_dmd2_config(out, **kw):
    return dmd2.Config(**{"out": out, "hidden": 32, "depth": 2, "batch": 128, "steps": 60, "lr": 3e-4, "ttur": 5,
                          "log_every": 20, "ckpt_every": 30, "eval_samples": 300, "device": "cpu", **kw})


# Equations pinned below (rectified flow, DESIGN.md): x_t = (1 - t) x0 + t eps, x0_hat = x_t - t u.
# DMD Eq. 7-8 / official compute_distribution_matching_loss:
#   g = (x0_fake - x0_real) / mean_{C,H,W} |x - x0_real|,  loss = 0.5 mean (x - sg(x - g))^2,  dloss/dx = g / numel
# DMD2 Eq. 4 (softplus form): L_G = softplus(-D(F(G(z), t))),  L_D = softplus(D(F(fake, t))) + softplus(-D(F(real, t)))

DMD2_SHAPE, DMD2_CLASSES = (3, 4, 4), 2


def assert_close(a, b, what, rtol=1e-4, atol=1e-6):
    a, b = (torch.as_tensor(v).detach().double() for v in (a, b))
    err = float((a - b).abs().max())
    assert torch.allclose(a, b, rtol=rtol, atol=atol), f"{what}: max abs error {err:.3g} (|expected| max {float(b.abs().max()):.3g})"


@contextlib.contextmanager
def patched(obj, **attrs):
    """Temporarily replace attributes of a module or object."""
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


def dmd2_image_world(shift=0.0, std=0.3, seed=0):
    """A labelled Gaussian mixture on (3, 4, 4) images: 4 components, 2 classes; exact velocities."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(4, math.prod(DMD2_SHAPE), generator=g, dtype=torch.float64) + shift
    return common.GaussianMixture(np.ones(4), means.numpy(), np.full(4, std), labels=[0, 0, 1, 1], shape=DMD2_SHAPE)


class ExactScore(nn.Module):
    """Fake-score stand-in: the exact velocity of a labelled mixture (label num_classes = unconditional)."""

    def __init__(self, world):
        super().__init__()
        self.world, self.num_classes = world, world.num_classes

    def forward(self, x, t, y=None):
        return self.world.velocity(x, t, y)


class AffineVelocity(nn.Module):
    """u(x, t, y) = a * x + b * t + c[y]: a known velocity field with trainable parameters."""

    def __init__(self, classes=DMD2_CLASSES + 1):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(0.6)), nn.Parameter(torch.tensor(-0.4))
        self.c = nn.Parameter(torch.linspace(-0.5, 0.5, classes))
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append(t.clone())
        c = 0.0 if y is None else self.c[y].view(-1, *[1] * (x.ndim - 1))
        return self.a * x + self.b * t.view(-1, *[1] * (x.ndim - 1)) + c


class ToyCritic(nn.Module):
    """Critic stand-in with the dmd2.Critic interface: critic(x, t, y) is the fake score's velocity,
    critic(x, t, y, classify=True) the logit <w, x_t> + v t + e[y] of a linear head."""

    def __init__(self, score):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.score = score
        self.head = nn.Linear(math.prod(DMD2_SHAPE) + 1, 1)
        with torch.no_grad():
            self.head.weight.copy_(0.3 * torch.randn(self.head.weight.shape, generator=g))
            self.head.bias.fill_(0.2)
        self.e = nn.Parameter(torch.tensor([0.5, -0.7, 0.0]))

    def forward(self, x, t, y=None, classify=False):
        if not classify:
            return self.score(x, t, y)
        return self.head(torch.cat([x.flatten(1), t[:, None]], 1)).squeeze(-1) + self.e[y]


def karras_grid_t(n=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM Eq. 5 grid sigma_j = (sigma_max^(1/rho) + j/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    j = 0..n-1 (descending), flipped so that index 0 is sigma_min (official edm_guidance.py), as
    rectified-flow time t = sigma / (1 + sigma)."""
    j = np.arange(n) / (n - 1)
    sigma = (sigma_max ** (1 / rho) + j * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    sigma = sigma[::-1].copy()
    return torch.tensor(sigma / (1 + sigma))


def rf_noise(x0, t, eps):
    """x_t = (1 - t) x0 + t eps, written out here (not dmd2.noised)."""
    tb = t.view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
    return (1 - tb) * x0 + tb * eps


def cfg_x0(world, x_t, t, y, w):
    """Guided posterior mean E_w[x0 | x_t] = E[x0|x_t] + w (E[x0|x_t,y] - E[x0|x_t]) (CFG is affine, so
    guiding the velocity and guiding x0 = x_t - t u are the same)."""
    unc = world.x0_mean(x_t, t, torch.full_like(y, world.num_classes))
    return unc + w * (world.x0_mean(x_t, t, y) - unc)


def dmd2_image_batch(b=6, seed=1):
    """Image-shaped samples whose scale differs per sample and per channel (so a wrong reduction axis shows)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(b, 3, 1, 1, generator=g) * 2 + 0.2
    x = torch.randn(b, *DMD2_SHAPE, generator=g) * scale + 0.3
    return x, torch.arange(b) % DMD2_CLASSES


# ---------------------------------------------------------------------------------------------------

def test_dmd2_karras_grid_is_the_flipped_edm_grid_in_rf_time():
    """karras_times draws an index uniformly from [lo, hi) of the 1000-point EDM Karras grid (rho 7,
    sigma in [0.002, 80]) with index 0 = sigma_min, and returns t = sigma / (1 + sigma), so that
    sigma = t / (1 - t) (the EDM <-> rectified-flow conversion of the module docstring)."""
    grid = karras_grid_t()
    assert_close(grid[0], 0.002 / 1.002, "grid[0] is sigma_min", rtol=1e-12)
    assert_close(grid[-1], 80 / 81, "grid[-1] is sigma_max", rtol=1e-12)
    for lo, hi in ((0, 1000), (20, 980)):
        torch.manual_seed(0)
        t = dmd2.karras_times(4000, "cpu", lo=lo, hi=hi)
        torch.manual_seed(0)
        idx = torch.randint(lo, hi, (4000,))
        assert_close(t, grid[idx], f"karras_times(lo={lo}, hi={hi}) != flipped EDM grid at the drawn index", rtol=1e-6)
        assert t.dtype == torch.float32
    torch.manual_seed(0)
    default = dmd2.karras_times(4000, "cpu")
    torch.manual_seed(0)
    assert_close(default, grid[torch.randint(0, 1000, (4000,))], "karras_times default range is the whole grid [0, 1000)")


def test_dmd2_noised_and_generator_schedule():
    """Forward diffusion x_t = (1 - t) x0 + t eps per sample (t = 1 is pure noise, t = 0 the data), and
    the generator's fixed grid t_i = 1 - i / N (official 4-step: 999, 749, 499, 249 -> 1, .75, .5, .25)."""
    x0, _ = dmd2_image_batch()
    eps = torch.randn_like(x0)
    t = torch.tensor([0.0, 1.0, 0.25, 0.5, 0.9, 0.1])
    out = dmd2.noised(x0, t, eps)
    assert_close(out, rf_noise(x0, t, eps), "noised")
    assert torch.equal(out[0], x0[0]) and torch.equal(out[1], eps[1]), "t = 0 must be the data and t = 1 the noise"
    assert dmd2.generator_times(4) == [1.0, 0.75, 0.5, 0.25] and dmd2.generator_times(1) == [1.0]
    assert_close(torch.tensor(dmd2.generator_times(3)), torch.tensor([1.0, 2 / 3, 1 / 3]), "generator_times(3)")


def dm_expected(x, y, world_real, world_fake, t, eps, guidance):
    """The DM gradient g written from DMD Eq. 7-8 in x0 space (exact mixture posterior means, float64)."""
    x64 = x.detach().double()
    x_t = rf_noise(x64, t.double(), eps.double())
    x0_real = cfg_x0(world_real, x_t, t.double(), y, guidance)       # CFG on the real score only (DMD §3.4)
    x0_fake = world_fake.x0_mean(x_t, t.double(), y)                 # unguided fake score
    normaliser = (x64 - x0_real).abs().flatten(1).mean(1).view(-1, 1, 1, 1)  # per sample, over C, H, W
    return (x0_fake - x0_real) / normaliser


def test_dmd2_dm_loss_gradient_is_the_normalised_x0_difference_with_cfg_on_the_real_score_only():
    """DMD Eq. 7-8 as implemented: at one x_t shared by both scores (t uniform in [dm_t_min, dm_t_max], or
    the Karras grid indices [20, 980)), g = (x0_fake - x0_real) / mean_{C,H,W}|x - x0_real| per sample,
    with x0_real from the CFG-guided teacher and x0_fake from the unguided fake score; the surrogate
    0.5 * mean (x - sg(x - g))^2 has value 0.5 mean g^2 and gradient g / numel. Real and fake scores are
    exact mixture velocities; the guided x0 is computed independently from posterior means."""
    real, fake = dmd2_image_world(), dmd2_image_world(shift=0.4, std=0.5, seed=5)
    x, y = dmd2_image_batch()
    for cfg in (dmd2.Config(guidance=2.5), dmd2.Config(guidance=2.5, dm_t_min=0.3, dm_t_max=0.6),
                dmd2.Config(guidance=0.5, dm_t_dist="karras")):
        x = x.detach().requires_grad_(True)
        torch.manual_seed(7)
        loss = dmd2.distribution_matching_loss(x, y, real, ExactScore(fake), cfg)
        loss.backward()
        torch.manual_seed(7)  # replay the draws: noise level, then the one eps shared by both scores
        if cfg.dm_t_dist == "karras":
            t = karras_grid_t()[torch.randint(20, 980, (len(x),))]
        else:
            t = cfg.dm_t_min + (cfg.dm_t_max - cfg.dm_t_min) * torch.rand(len(x))
        g = dm_expected(x, y, real, fake, t, torch.randn_like(x), cfg.guidance)
        what = f"DM loss ({cfg.dm_t_dist}, t in [{cfg.dm_t_min}, {cfg.dm_t_max}], guidance {cfg.guidance})"
        assert_close(x.grad, g / x.numel(), f"{what}: gradient != (x0_fake - x0_real) / mean|x - x0_real| / numel", rtol=2e-4, atol=1e-8)
        assert_close(loss, 0.5 * g.pow(2).mean(), f"{what}: value != 0.5 mean g^2", rtol=2e-4)


def test_dmd2_dm_gradient_vanishes_when_fake_equals_guided_real():
    """When the fake score equals the (unguided) teacher and guidance is 1, x0_fake = x0_real and the DM
    gradient is exactly zero; with guidance 3 the same pair gives a non-zero gradient (CFG enters the
    real score alone, so matched scores do not cancel it)."""
    real = dmd2_image_world()
    x, y = dmd2_image_batch()
    for guidance, zero in ((1.0, True), (3.0, False)):
        x = x.detach().requires_grad_(True)
        torch.manual_seed(2)
        dmd2.distribution_matching_loss(x, y, real, ExactScore(real), dmd2.Config(guidance=guidance)).backward()
        size = float(x.grad.abs().max())
        assert (size < 1e-9) if zero else (size > 1e-4), f"guidance {guidance}: DM gradient size {size}"


def test_dmd2_generator_loss_is_dm_plus_non_saturating_gan_on_noised_samples():
    """Generator objective: L_DM + gan_g * mean softplus(-D(F(x, t))) (DMD2 Eq. 4, non-saturating form
    -log sigmoid D), where F noises x to a level from the whole Karras grid with fresh noise
    (diffusion-GAN, §4.3), gradients flowing to x through the frozen classifier. Pinned: the value and
    dL/dx against the formula, with gan_g != gan_d so that a swapped weight shows."""
    real, fake = dmd2_image_world(), dmd2_image_world(shift=0.4, std=0.5, seed=5)
    critic = ToyCritic(ExactScore(fake)).requires_grad_(False)
    cfg = dmd2.Config(gan_g=0.3, gan_d=0.07, guidance=2.0)
    x, y = dmd2_image_batch()
    x = x.requires_grad_(True)
    torch.manual_seed(11)
    loss, stats = dmd2.generator_loss(x, y, real, critic, cfg)
    loss.backward()
    torch.manual_seed(11)  # replay: DM level and noise, then the GAN level and its fresh noise
    t_dm = cfg.dm_t_min + (cfg.dm_t_max - cfg.dm_t_min) * torch.rand(len(x))
    g = dm_expected(x, y, real, fake, t_dm, torch.randn_like(x), cfg.guidance)
    t_gan = karras_grid_t()[torch.randint(0, 1000, (len(x),))].float()
    eps = torch.randn_like(x)
    x_ref = x.detach().requires_grad_(True)
    logits = critic(rf_noise(x_ref, t_gan, eps), t_gan, y, classify=True)
    gan = -F.logsigmoid(logits).mean()                                   # non-saturating: -log sigmoid(D)
    gan.backward()
    assert_close(stats["g_gan_loss"], gan, "g_gan_loss != mean -log sigmoid(D(noised x))")
    assert_close(loss, 0.5 * g.pow(2).mean() + cfg.gan_g * gan, "generator loss != L_DM + gan_g * L_GAN", rtol=2e-4)
    assert_close(x.grad, g / x.numel() + cfg.gan_g * x_ref.grad, "generator loss gradient on x", rtol=2e-4, atol=1e-8)
    assert logits.min() < 0 < logits.max(), "test setup: logits of both signs"


def test_dmd2_generator_loss_without_gan_is_the_dm_loss():
    """--gan-g 0: the generator loss is the DM loss alone (same draws, same value), no GAN statistic."""
    real, fake = dmd2_image_world(), dmd2_image_world(shift=0.4, std=0.5, seed=5)
    critic = ToyCritic(ExactScore(fake))
    x, y = dmd2_image_batch()
    cfg = dmd2.Config(gan_g=0.0, gan_d=0.0, guidance=2.0)
    torch.manual_seed(4)
    loss, stats = dmd2.generator_loss(x, y, real, critic, cfg)
    torch.manual_seed(4)
    t = cfg.dm_t_min + (cfg.dm_t_max - cfg.dm_t_min) * torch.rand(len(x))
    g = dm_expected(x, y, real, fake, t, torch.randn_like(x), cfg.guidance)
    assert_close(loss, 0.5 * g.pow(2).mean(), "generator loss with gan_g 0", rtol=2e-4)
    assert "g_gan_loss" not in stats


def test_dmd2_critic_loss_is_flow_matching_plus_gan_classification_of_noised_real_vs_fake():
    """Critic objective: flow-matching (velocity MSE) loss of the fake score on the generator samples at
    Karras-grid levels + gan_d * [mean softplus(D(F(fake))) + mean softplus(-D(F(real)))] (DMD2 Eq. 4:
    real labelled 1, fake 0), real and fake each noised to their own level with fresh noise. Pinned: the
    value, the logged accuracies, and the gradient on every critic parameter, with gan_g != gan_d."""
    critic = ToyCritic(AffineVelocity())
    cfg = dmd2.Config(gan_g=0.3, gan_d=0.07)
    x_fake, y_fake = dmd2_image_batch(8, seed=2)
    x_real, y_real = dmd2_image_batch(8, seed=3)
    x_real, y_real = x_real + 1.0, (y_real + 1) % DMD2_CLASSES
    torch.manual_seed(5)
    loss, stats = dmd2.critic_loss(critic, x_fake, y_fake, x_real, y_real, cfg)
    got = torch.autograd.grad(loss, list(critic.parameters()), allow_unused=True)
    grid = karras_grid_t().float()
    torch.manual_seed(5)  # replay: denoising level + noise, then fake level + noise, then real level + noise
    t = grid[torch.randint(0, 1000, (8,))]
    eps = torch.randn_like(x_fake)
    fm = (critic(rf_noise(x_fake, t, eps), t, y_fake) - (eps - x_fake)).pow(2).mean()   # u = eps - x0
    t_f = grid[torch.randint(0, 1000, (8,))]
    d_fake = critic(rf_noise(x_fake, t_f, torch.randn_like(x_fake)), t_f, y_fake, classify=True)
    t_r = grid[torch.randint(0, 1000, (8,))]
    d_real = critic(rf_noise(x_real, t_r, torch.randn_like(x_real)), t_r, y_real, classify=True)
    cls = -F.logsigmoid(d_real).mean() - torch.log1p(-torch.sigmoid(d_fake)).mean()  # -log D(real) - log(1 - D(fake))
    expected = fm + cfg.gan_d * cls
    want = torch.autograd.grad(expected, list(critic.parameters()))
    assert_close(stats["fake_loss"], fm, "fake score's denoising loss")
    assert_close(stats["d_gan_loss"], cls, "critic classification loss (real -> 1, fake -> 0)")
    assert_close(loss, expected, "critic loss != L_fm + gan_d * L_cls")
    for (name, _), a, b in zip(critic.named_parameters(), got, want):
        assert a is not None, f"critic loss gives no gradient to {name}"
        assert_close(a, b, f"critic loss gradient on {name}")
    assert_close(stats["d_real_acc"], (d_real > 0).float().mean(), "d_real_acc")
    assert_close(stats["d_fake_acc"], (d_fake < 0).float().mean(), "d_fake_acc")
    assert 0 < stats["d_real_acc"] < 1 or 0 < stats["d_fake_acc"] < 1, "test setup: mixed classifications"


def test_dmd2_gan_logits_classify_noised_samples_with_gradient_to_the_input():
    """Diffusion-GAN (DMD2 §4.3): D sees F(x, t) = (1 - t) x + t eps, t uniform over the whole Karras grid,
    eps fresh, and its logits are differentiable in x (the generator's GAN gradient passes through)."""
    critic = ToyCritic(AffineVelocity())
    x, y = dmd2_image_batch(8)
    x = x.requires_grad_(True)
    torch.manual_seed(9)
    logits = dmd2.gan_logits(critic, x, y)
    (dx,) = torch.autograd.grad(logits.sum(), x)
    torch.manual_seed(9)
    t = karras_grid_t().float()[torch.randint(0, 1000, (8,))]
    x_t = rf_noise(x.detach(), t, torch.randn_like(x))
    assert_close(logits, critic(x_t, t, y, classify=True), "gan_logits != D(noised x, t)")
    w = critic.head.weight[0, :-1].view(DMD2_SHAPE)
    assert_close(dx, (1 - t).view(-1, 1, 1, 1) * w, "dD/dx != (1 - t) w for a linear head")


class Rank1Broadcast:
    """broadcast_int as seen on rank 1: records its own draw, returns rank 0's (here: a different one)."""

    def __init__(self, n):
        self.n, self.local, self.shared = n, [], []

    def __call__(self, value):
        self.local.append(int(value))
        self.shared.append((int(value) + 1) % self.n)
        return self.shared[-1]


def short_training_run(steps=6, ttur=2, steps_gen=4):
    """train() for a few iterations on the 2D world as rank 1 of a simulated group, with a tiny network
    teacher and no evaluation. Returns (broadcast, k fed to training_inputs, iterations of the generator
    turns, iterations of the critic turns)."""
    tiny = common.new_backbone((2,), 0, hidden=16, depth=1)
    bcast, depths, g_turns, d_turns = Rank1Broadcast(steps_gen), [], [], []
    inputs, g_turn, d_turn = dmd2.training_inputs, dmd2.generator_turn, dmd2.critic_turn

    def recording_inputs(G, z, y, times, k, real=None):
        depths.append(k)
        return inputs(G, z, y, times, k, real)

    def recording_g_turn(*args):
        g_turns.append(args[-1])
        return g_turn(*args)

    def recording_d_turn(*args):
        d_turns.append(args[-1])
        return d_turn(*args)

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), patched(
            dmd2, broadcast_int=bcast, training_inputs=recording_inputs, generator_turn=recording_g_turn,
            critic_turn=recording_d_turn, evaluate=lambda *a, **k: [],
            teacher_for=lambda cfg, data, device, arch_kwargs=None: (common.NetTeacher(tiny), tiny)):
        dmd2.train(dmd2.Config(out=os.path.join(tmp, "run"), steps=steps, batch=8, steps_gen=steps_gen, ttur=ttur,
                               hidden=16, depth=1, device="cpu", log_every=100, ckpt_every=100, lr_warmup=1))
    return bcast, depths, g_turns, d_turns


def test_dmd2_backward_simulation_depth_is_shared_by_all_ranks():
    """DMD2 §4.4 / official sample_backward: one depth k per iteration, drawn on rank 0 and broadcast, so
    every rank and sample trains the same step. A short train() run on rank 1 (broadcast_int patched to
    hand back rank 0's draw) must feed exactly the broadcast k to training_inputs every iteration."""
    bcast, depths, _, _ = short_training_run()
    assert len(bcast.shared) == 6 and all(0 <= k < 4 for k in bcast.local), bcast.local
    assert depths == bcast.shared, f"training depth {depths} is not rank 0's broadcast {bcast.shared}"


def test_dmd2_ttur_updates_the_critic_every_iteration_and_the_generator_every_ttur_th():
    """TTUR (DMD2 §4.2, official train_one_step): iteration i runs a generator turn when i % ttur == 0,
    before that iteration's critic turn; the critic is updated every iteration."""
    _, _, g_turns, d_turns = short_training_run(steps=7, ttur=3)
    assert d_turns == list(range(7)), f"critic turns at {d_turns}"
    assert g_turns == [0, 3, 6], f"generator turns at {g_turns}"


def test_dmd2_backward_simulation_runs_g_from_fresh_noise_and_renoises_with_the_batch_noise():
    """Backward simulation (DMD2 §4.4, official sample_backward): for depth k, run the current G for k
    steps of the schedule from FRESH noise (not the batch noise z: correlated noise gave artifacts,
    official issue #9), x0_hat = x_t - t G(x_t, t), re-noising each x0_hat to the next time with fresh
    noise, then noise the last x0_hat to t_k with the batch noise z; k = 0 is z itself at t = 1."""
    G, times = AffineVelocity(), [1.0, 0.75, 0.5, 0.25]
    z, y = dmd2_image_batch(5, seed=4)
    x_in, t = dmd2.training_inputs(G, z, y, times, 0)
    assert torch.equal(x_in, z) and torch.all(t == 1), "k = 0: the input is the batch noise at t = 1"
    for k in (1, 2, 3):
        torch.manual_seed(k)
        x_in, t = dmd2.training_inputs(G, z, y, times, k)
        torch.manual_seed(k)
        x = torch.randn_like(z)                                   # fresh starting noise
        with torch.no_grad():
            for i in range(k):
                ti = torch.full((len(z),), times[i])
                x0 = x - times[i] * G(x, ti, y)
                if i + 1 < k:
                    x = rf_noise(x0, torch.full((len(z),), times[i + 1]), torch.randn_like(z))
        assert torch.all(t == times[k]), f"k = {k}: input time {t.unique()} != {times[k]}"
        assert_close(x_in, rf_noise(x0, t, z), f"k = {k}: backward-simulated input != noised(x0_hat, t_k, z)")


def test_dmd2_multistep_sampler_renoises_x0_hat_with_fresh_noise():
    """Consistency-style sampler (DMD2 §4.4, official SDXL loop): x0_hat = x_t - t G(x_t, t), then
    x_{t_next} = (1 - t_next) x0_hat + t_next eps with fresh eps; output the last x0_hat. One step at
    t = 1 is z - G(z, 1). G is called at exactly the schedule's times."""
    G = AffineVelocity()
    z, y = dmd2_image_batch(5, seed=6)
    one = dmd2.multistep_sample(G, z, y, [1.0])
    assert_close(one, z - G(z, torch.ones(5), y).detach(), "one-step sample != z - G(z, 1)")
    times = dmd2.generator_times(4)
    G.calls.clear()
    torch.manual_seed(3)
    out = dmd2.multistep_sample(G, z, y, times)
    assert [float(c[0]) for c in G.calls] == times, f"G called at {[float(c[0]) for c in G.calls]}"
    torch.manual_seed(3)
    x = z
    with torch.no_grad():
        for i, t in enumerate(times):
            x0 = x - t * G(x, torch.full((5,), t), y)
            if i + 1 < len(times):
                x = rf_noise(x0, torch.full((5,), times[i + 1]), torch.randn_like(z))
    assert_close(out, x0, "4-step sample != x0_hat / re-noise recursion")


def test_dmd2_generate_is_x0_hat_with_gradient_to_the_generator():
    """The gradient-carrying generator step: x0_hat = x_t - t G(x_t, t) per sample, differentiable in the
    generator's parameters (DMD2 §4.4: only the last step carries gradient)."""
    G = AffineVelocity()
    x_in, y = dmd2_image_batch(5, seed=8)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.75])
    r = torch.randn_like(x_in)
    got = torch.autograd.grad((dmd2.generate(G, x_in, t, y) * r).sum(), list(G.parameters()))
    expected = x_in - t.view(-1, 1, 1, 1) * G(x_in, t, y)
    want = torch.autograd.grad((expected * r).sum(), list(G.parameters()))
    assert_close(dmd2.generate(G, x_in, t, y), expected, "generate != x_t - t u")
    for a, b, name in zip(got, want, ("a", "b", "c")):
        assert_close(a, b, f"generate: gradient on G.{name}")


def test_dmd2_short_run_ttur_counts_fake_score_learns_and_resumes_exactly():
    with tempfile.TemporaryDirectory() as tmp:
        full, common.fit_to_world = quick_teacher_fit(tmp)
        try:
            dmd2.train(small_dmd2_config(os.path.join(tmp, "run")))
            teacher_net = common.fit_to_world(common.make_world("checkerboard"), {"hidden": 32, "depth": 2})
            dmd2.train(small_dmd2_config(os.path.join(tmp, "half"), steps=30))  # 30 steps, then resume to 60
            dmd2.train(small_dmd2_config(os.path.join(tmp, "half"), resume=True))
        finally:
            common.fit_to_world = full
        ckpt = torch.load(os.path.join(tmp, "run", "ckpt.pt"), weights_only=True)
        half = torch.load(os.path.join(tmp, "half", "ckpt.pt"), weights_only=True)
        for name in ("model", "fake"):
            for k, v in ckpt[name].items():
                assert torch.equal(v, half[name][k]), f"resume differs in {name}.{k}"
        # TTUR: 60 critic updates, a generator update at iterations 0, 5, ..., 55
        assert {int(s["step"]) for s in ckpt["opt"]["state"].values()} == {12}
        assert {int(s["step"]) for s in ckpt["fake_opt"]["state"].values()} == {60}
        # the fake score has moved from the teacher toward the generator's distribution: its denoising loss
        # on the trained generator's samples (same noise and times) is lower than the teacher copy's
        generator = common.build_backbone(ckpt["backbone"])
        generator.load_state_dict(ckpt["model"])
        trained = dmd2.Critic(common.build_backbone(ckpt["backbone"]), gan=True)
        trained.load_state_dict(ckpt["fake"])
        g = torch.Generator().manual_seed(0)
        x = dmd2.multistep_sample(generator, torch.randn(4000, 2, generator=g), None, [1.0])
        assert torch.isfinite(x).all() and x.abs().max() < 10
        t, eps = torch.rand(4000, generator=g), torch.randn(4000, 2, generator=g)
        x_t, target = (1 - t[:, None]) * x + t[:, None] * eps, eps - x
        with torch.no_grad():
            loss_trained = float((trained(x_t, t) - target).pow(2).mean())
            loss_teacher = float((teacher_net(x_t, t) - target).pow(2).mean())
        assert loss_trained < 0.95 * loss_teacher, (loss_trained, loss_teacher)
        log = [json.loads(line) for line in open(os.path.join(tmp, "run", "log.jsonl"))]
        assert [r["step"] for r in log] == [20, 40, 60] and {"dm_loss", "g_gan_loss", "d_gan_loss", "fake_loss"} <= set(log[0])
        rows = json.load(open(os.path.join(tmp, "run", "metrics.json")))["results"]
        student = [r for r in rows if r["sampler"] == "student"]
        assert [r["nfe"] for r in student] == [1] and math.isfinite(student[0]["swd"]) and "ode_err" not in student[0]


def test_dmd2_bad_flags_fail_before_writing():
    with tempfile.TemporaryDirectory() as tmp:
        for kw in ({"guidance": 2.0}, {"ttur": 0}, {"dm_t_min": 0.5, "dm_t_max": 0.4}, {"fid_ref": "ref.npz"},
                   {"gan_g": 3e-3, "gan_d": 0.0}, {"dm_t_dist": "edm"}):
            try:
                dmd2.train(small_dmd2_config(os.path.join(tmp, "run"), **kw))
            except SystemExit as e:
                assert str(e).startswith("error: ") and "\n" not in str(e)
            else:
                raise AssertionError(f"{kw} was accepted")
        assert not os.path.exists(os.path.join(tmp, "run"))


def test_dmd2_torchrun_two_processes_multistep_gan_cfg_learned_teacher():
    """DDP smoke run: a class-conditional mixture, a learned teacher checkpoint, CFG on the real score,
    a 2-step generator with backward simulation and the GAN head; rank 0 alone writes."""
    with tempfile.TemporaryDirectory() as tmp:
        labelled_mixture_and_teacher(tmp)
        out = os.path.join(tmp, "run")
        r = torchrun(["dmd2.py", "--data", os.path.join(tmp, "mix.npz"), "--teacher", os.path.join(tmp, "teacher.pt"),
                      "--steps", "20", "--batch", "64", "--eval-samples", "300", "--guidance", "2", "--steps-gen", "2",
                      "--out", out, "--log-every", "10"])
        assert r.returncode == 0, r.stderr[-2000:]
        metrics = json.load(open(os.path.join(out, "metrics.json")))
        assert metrics["steps"] == 20 and metrics["guidance"] == 2 and metrics["teacher"] == "learned"
        student = [row for row in metrics["results"] if row["sampler"] == "student"]
        assert [row["nfe"] for row in student] == [1, 2] and all("cond_acc" in row for row in student)
        assert len(open(os.path.join(out, "log.jsonl")).read().splitlines()) == 2  # rank 0 alone logs
        assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl", "metrics.json", "samples.png"]


def test_dmd2_torchrun_on_real_images_with_a_depth_one_teacher_reports_fid():
    """Real data end to end: a teacher of depth 1 fitted to an image .npz (its middle-block features feed
    the GAN head), DMD2 with a 2-step generator on 2 ranks, FID of both samplers with random Inception
    weights (the pipeline, not the number); every rank draws FID samples, rank 0 alone writes."""
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        images = os.path.join(tmp, "imgs.npz")
        np.savez(images, arr_0=rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8), labels=np.arange(32) % 2)
        weights = os.path.join(tmp, "w.pth")
        torch.save(eval_fid.inception_model(random_weights=True).state_dict(), weights)
        common.train_teacher(common.TeacherConfig(data=images, steps=5, batch=8, hidden=32, depth=1,
                                                  out=os.path.join(tmp, "teacher")))
        out = os.path.join(tmp, "run")
        r = torchrun(["dmd2.py", "--data", images, "--teacher", os.path.join(tmp, "teacher", "ckpt.pt"), "--steps", "3",
                      "--batch", "8", "--steps-gen", "2", "--fid-ref", images, "--fid-weights", weights,
                      "--fid-samples", "12", "--out", out])
        assert r.returncode == 0, r.stderr[-2000:]
        rows = json.load(open(os.path.join(out, "metrics.json")))["results"]
        assert [row["nfe"] for row in rows] == [1, 2] and all(math.isfinite(row["fid"]) and row["fid"] > 0 for row in rows)
        assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl", "metrics.json", "samples.png"]


# ---------------------------------------------------------------------------------------------------
# piflow.py



def shared_std_world(k=5, dim=3, std=0.4, seed=0):
    """A Gaussian-mixture world whose components share one std: its posterior p(x0 | x_s) is exactly a
    GM with one shared variance, i.e. exactly what the GM policy can hold."""
    rng = np.random.default_rng(seed)
    return common.GaussianMixture(rng.uniform(0.5, 1.5, k), rng.normal(size=(k, dim)), np.full(k, std))


def exact_gm_outputs(world, x_s, sigma_s):
    """The GM policy's network outputs (u-space means, log-weights, log-std) that encode the exact
    posterior of a shared-std world at (x_s, sigma_s): component k has posterior variance
    v = (1/s^2 + a^2/sigma^2)^-1, mean v (mu_k / s^2 + a x_s / sigma^2), weight = responsibility."""
    s2, a = float(world.stds[0]) ** 2, 1 - sigma_s
    v = 1 / (1 / s2 + (a / sigma_s) ** 2)
    m = v[:, None, None] * (world.means.to(x_s)[None] / s2 + (a / sigma_s ** 2)[:, None, None] * x_s[:, None])
    means_u = (x_s[:, None] - m) / sigma_s[:, None, None]
    return means_u, world.posterior(x_s, sigma_s).log()[:, :, None], 0.5 * torch.log(v) - torch.log(sigma_s)


class ExactGMStudent(torch.nn.Module):
    """A 'student' that outputs the exact posterior at every segment start (what pi-ID aims at)."""

    def __init__(self, world):
        super().__init__()
        self.world = world

    def forward(self, x, sigma, y=None):
        return exact_gm_outputs(self.world, x, sigma)


def test_piflow_gm_transport_equals_the_analytic_teacher():
    """Holding the exact posterior at (x_s, sigma_s), the GM policy's closed-form velocity at any later
    (x, sigma) is the world's exact velocity (reference §1a / §7), from sigma_s down to 1e-3."""
    world = shared_std_world()
    g = torch.Generator().manual_seed(0)
    x_s = torch.randn(256, 3, generator=g, dtype=torch.float64) * 1.3
    sigma_s = torch.rand(256, generator=g, dtype=torch.float64) * 0.6 + 0.4
    sigma_s[:32] = 1.0  # the 1-NFE segment start (a = 0: the posterior is the prior)
    outputs = exact_gm_outputs(world, x_s, sigma_s)
    policy = piflow.GMPolicy(*outputs, x_s, sigma_s)
    for frac in (1.0, 0.7, 0.3, 0.05, 0.001):
        sigma = sigma_s * frac
        x = torch.randn(256, 3, generator=g, dtype=torch.float64) * 1.5
        err = (policy.velocity(x, sigma) - world.velocity(x, sigma)).abs().max()
        assert err < 1e-8, f"sigma = {frac} sigma_s: policy velocity off by {err:.2e}"
    # not blind: a wrong shared std, or wrong weights, move the velocity away from the teacher's
    for wrong in (piflow.GMPolicy(outputs[0], outputs[1], outputs[2] + 0.3, x_s, sigma_s),
                  piflow.GMPolicy(outputs[0], outputs[1].flip(1), outputs[2], x_s, sigma_s)):
        x, sigma = torch.randn(256, 3, generator=g, dtype=torch.float64), sigma_s * 0.3
        assert (wrong.velocity(x, sigma) - world.velocity(x, sigma)).abs().max() > 1e-2


def test_piflow_exact_policy_sampler_reproduces_teacher_euler_at_1_and_4_nfe():
    """With the exact posterior as the student's output, the k-NFE policy sampler (shift 1, 128
    substeps) is the teacher's 128-step Euler sampler: same grid, same velocities."""
    world = shared_std_world(dim=2)
    z = torch.randn(200, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    euler = common.euler_sample(world.velocity, z, 128)
    cfg = piflow.Config()
    for nfe in (1, 4):
        x = piflow.sample(ExactGMStudent(world), z, None, nfe, cfg)
        assert (x - euler).abs().max() < 1e-8, f"{nfe} NFE differs from 128-step Euler by {(x - euler).abs().max():.2e}"


def random_gm_policy(shape, k=6, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    means_u = torch.randn(batch, k, *shape, generator=g, dtype=torch.float64)
    logweights = torch.randn(batch, k, 1, *shape[1:], generator=g, dtype=torch.float64)
    logstd = torch.randn(batch, generator=g, dtype=torch.float64) * 0.3 - 1
    x_s = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    sigma_s = torch.rand(batch, generator=g, dtype=torch.float64) * 0.5 + 0.5
    return piflow.GMPolicy(means_u, logweights, logstd, x_s, sigma_s), means_u, logweights


def test_piflow_gm_start_velocity_temperature_and_dropout():
    for shape in ((3,), (2, 4, 4)):  # a vector (one pixel) and an image (per-pixel weights)
        policy, means_u, logweights = random_gm_policy(shape)
        # at its own start point the policy velocity is the mixture mean's velocity sum_k A_k mu_k
        mixture_mean = (torch.softmax(logweights, 1) * means_u).sum(1)
        assert (policy.velocity(policy.x_s, policy.sigma_s) - mixture_mean).abs().max() < 1e-10
        x, sigma = torch.randn_like(policy.x_s), policy.sigma_s * 0.4
        before = policy.velocity(x, sigma)
        same = random_gm_policy(shape)[0].temperature_(1.0)
        assert torch.allclose(same.logweights, policy.logweights, atol=1e-12) and torch.equal(same.var, policy.var)
        assert (policy.temperature_(1.0).velocity(x, sigma) - before).abs().max() < 1e-12  # T = 1: identity
        sharp = random_gm_policy(shape)[0].temperature_(0.5)
        assert (sharp.velocity(x, sigma) - before).abs().max() > 1e-3
        assert torch.allclose(sharp.logweights.exp().sum(1), torch.ones(()).double())
        # dropout: never every component of a sample, some components at a moderate rate
        torch.manual_seed(0)
        for p, expect_drops in ((0.9, True), (0.3, True), (0.0, False)):
            dropped = random_gm_policy(shape, batch=512)[0].dropout_(p)
            alive = torch.isfinite(dropped.logweights).flatten(2).all(2)  # (B, K), same for every pixel
            assert alive.any(1).all(), f"p = {p} removed every component of some sample"
            assert bool((~alive).any()) == expect_drops
            assert torch.allclose(dropped.logweights.exp().sum(1), torch.ones(()).double())
            assert torch.isfinite(dropped.velocity(torch.randn_like(dropped.x_s), dropped.sigma_s * 0.5)).all()


def test_piflow_image_policy_is_the_per_pixel_policy():
    """An image GM policy (per-pixel log-weights, shared log-std) is a product over pixels: its velocity at every
    pixel equals that of the one-pixel policy (channels only) built from that pixel's outputs, the case the
    analytic-teacher test pins. Summing the log-weight update over pixels as well would couple them."""
    policy, means_u, logweights = random_gm_policy((2, 3, 3), k=4, batch=8)
    x, sigma = torch.randn_like(policy.x_s), policy.sigma_s * 0.4
    v = policy.velocity(x, sigma)
    logstd = (policy.var.sqrt() / policy.sigma_s).log()
    for i in range(3):
        for j in range(3):
            pixel = piflow.GMPolicy(means_u[..., i, j], logweights[..., 0, i, j][:, :, None], logstd,
                                    policy.x_s[..., i, j], policy.sigma_s)
            assert (pixel.velocity(x[..., i, j], sigma) - v[..., i, j]).abs().max() < 1e-10, (i, j)


def test_piflow_temperature_raises_the_density_to_the_power_one_over_T():
    """Temperature T samples p(x0)^(1/T): a single Gaussian's variance becomes v T, and separated components
    get mass A_k^(1/T) / Z; checked against p^(1/T) integrated numerically on a 1-D grid."""
    means_u = torch.tensor([[[-3.0], [3.0]]], dtype=torch.float64)  # (B=1, K=2, C=1): x0 means x_s - sigma_s mu
    logweights = torch.tensor([[[0.0], [1.0]]], dtype=torch.float64)
    x_s, sigma_s, logstd = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), torch.full((1,), -1.0, dtype=torch.float64)
    grid = torch.linspace(-8, 8, 20001, dtype=torch.float64)
    for T in (0.5, 2.0):
        base = piflow.GMPolicy(means_u, logweights, logstd, x_s, sigma_s)
        hot = piflow.GMPolicy(means_u, logweights, logstd, x_s, sigma_s).temperature_(T)
        comps = base.means[0, :, 0]
        log_p = torch.logsumexp(base.logweights[0, :, 0, None] - (grid - comps[:, None]) ** 2 / (2 * base.var)
                                - 0.5 * torch.log(2 * math.pi * base.var), 0)
        p_T = torch.exp(log_p / T)
        p_T = p_T / p_T.sum()
        for k in range(2):  # component k owns the half-line of its mean
            side = torch.sign(grid) == torch.sign(comps[k])
            mass = float(p_T[side].sum())
            assert abs(mass - float(hot.logweights[0, k].exp())) < 1e-3, (T, k, mass)
            var = float((p_T[side] * (grid[side] - comps[k]) ** 2).sum() / mass)
            assert abs(var / float(hot.var) - 1) < 1e-3, (T, k, var, float(hot.var))


def test_piflow_sampler_tempers_every_segment_but_the_last():
    """The sampler's temperature applies to all but the last segment (reference: T = 0.3 at 4 NFE on T2I): with
    the exact posterior as the student, 1 NFE at T = 0.3 is the untempered sampler, 2 NFE at T = 0.3 is not."""
    world = shared_std_world(dim=2)
    z = torch.randn(100, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain, hot = piflow.Config(), piflow.Config(temperature=0.3)
    student = ExactGMStudent(world)
    assert (piflow.sample(student, z, None, 1, hot) - piflow.sample(student, z, None, 1, plain)).abs().max() < 1e-12
    assert (piflow.sample(student, z, None, 2, hot) - piflow.sample(student, z, None, 2, plain)).abs().max() > 1e-2


def test_piflow_piid_segment_loss_follows_its_definition():
    """One pi-ID segment (S = 1, window W = 4 of 8 substeps, GM dropout 0.5) against its definition: the on-policy
    state x_a is rolled out by the detached policy *with* dropout from tau_s to tau_a = tau_s - U (L - window);
    the regressed velocity is the trained policy's (without dropout) mean over [tau_a - window, tau_a]; the
    target the teacher's (CFG 2) at x_a; loss = scale / 2 * mean (u_policy - u_teacher)^2."""
    world = image_mixture()
    labelled = common.GaussianMixture(world.weights, world.means, world.stds, labels=[0, 1, 1], shape=(2, 2, 2))
    teacher_net = randomize(common.new_backbone((2, 2, 2), 2, arch="mlp", hidden=16, depth=1))
    torch.manual_seed(0)
    student = piflow.Student(teacher_net, "gm", 3)
    cfg = piflow.Config(num_intermediate=1, window_substeps=4, total_substeps=16, gm_dropout=0.5, guidance=2.0, shift=1.0)
    B = 6
    x_s = torch.randn(B, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1] * 3)
    tau_s, tau_dst = torch.full((B,), 1.0, dtype=torch.float64), torch.full((B,), 0.5, dtype=torch.float64)
    torch.manual_seed(4)
    loss = piflow.piid_segment(student, labelled, x_s, tau_s, tau_dst, y, cfg)[0]
    torch.manual_seed(4)  # the same draws: dropout keep-mask (B, K), then the state's time
    with torch.no_grad():
        policy = piflow.GMPolicy(*student(x_s, tau_s.float(), y), x_s, tau_s.float())
        keep = torch.rand(B, 3) >= 0.5
        keep = keep | ~keep.any(1, keepdim=True)
        dropped = copy.copy(policy)
        dropped.logweights = torch.log_softmax(policy.logweights.masked_fill(~keep[:, :, None, None, None], -float("inf")), 1)
        window = 4 * 0.5 / round(0.5 * cfg.total_substeps)
        tau_a = tau_s - torch.rand(B, 1, dtype=torch.float64)[:, 0] * (0.5 - window)
        x_a = piflow.rollout(dropped, x_s, [tau_s, tau_a], cfg)[0]
        u_teacher = labelled.velocity(x_a, tau_a.float(), y, 2.0)
        x_e = piflow.rollout(policy, x_a, [tau_a, tau_a - window], cfg)[0]
        u_policy = (x_a - x_e) / window
        expected = cfg.loss_scale * 0.5 * (u_policy - u_teacher).pow(2).flatten(1).mean(1)
    assert (loss[:, 0] - expected).abs().max() < 1e-4 * expected.abs().max(), (loss[:, 0], expected)


def test_piflow_datafree_step_weights_each_segment_by_its_length():
    """Alg. 3: the data-free loss is sum_i (tau_i - tau_(i+1)) * mean loss of segment i (here with a final step
    scale of 0.5, so the segments differ in length), each backpropagated in turn."""
    seen = []

    def fake_segment(model, teacher, x, tau_s, tau_dst, y, cfg, mix_ratio):
        value = float(len(seen) + 1)  # segment i has mean loss i + 1
        seen.append(float(tau_s[0] - tau_dst[0]))
        return torch.full((len(x), 1), value, requires_grad=True), x, tau_dst, None
    original = piflow.piid_segment, piflow.rollout
    piflow.piid_segment, piflow.rollout = fake_segment, lambda policy, x, taus, cfg: [x]
    try:
        cfg = piflow.Config(trainer="datafree", final_step_scale=0.5)
        total = piflow.piid_step(None, None, torch.zeros(4, 2), None, 3, cfg, 0.0)
    finally:
        piflow.piid_segment, piflow.rollout = original
    lengths = piflow.segment_times(3, 0.5)
    lengths = (lengths[:-1] - lengths[1:]).tolist()
    assert np.allclose(seen, lengths) and len(set(np.round(lengths, 6))) == 2, (seen, lengths)
    assert abs(total - sum((i + 1) * L for i, L in enumerate(lengths))) < 1e-6, total


def test_piflow_dx_interpolation_and_rollout_substep_rule():
    # DX: at the N grid times of its segment (uniform in raw time) x0_hat is that grid point
    g = torch.Generator().manual_seed(0)
    B, N, shift = 8, 5, 3.2
    out_u = torch.randn(B, N, 2, 3, 3, generator=g, dtype=torch.float64)
    x_s = torch.randn(B, 2, 3, 3, generator=g, dtype=torch.float64)
    tau_s, tau_dst = torch.full((B,), 0.8, dtype=torch.float64), torch.full((B,), 0.3, dtype=torch.float64)
    policy = piflow.DXPolicy(out_u, x_s, piflow.warp(tau_s, shift), tau_s, tau_dst, shift)
    x = torch.randn_like(x_s)
    for j in range(N):
        sigma = piflow.warp(tau_dst + j / (N - 1) * (tau_s - tau_dst), shift)
        x0_hat = x - sigma.view(-1, 1, 1, 1) * policy.velocity(x, sigma)
        assert (x0_hat - policy.grid[:, j]).abs().max() < 1e-10, f"grid point {j} missed"
    mid = piflow.warp(tau_dst + 2.5 / (N - 1) * (tau_s - tau_dst), shift)  # halfway between points 2 and 3
    x0_mid = x - mid.view(-1, 1, 1, 1) * policy.velocity(x, mid)
    assert (x0_mid - 0.5 * (policy.grid[:, 2] + policy.grid[:, 3])).abs().max() < 1e-10

    # segment grid: n = 4, f = 0.5 -> tau = 1, .714, .429, .143, 0 (reference §0)
    assert torch.allclose(piflow.segment_times(4, 0.5), torch.tensor([1, 5 / 7, 3 / 7, 1 / 7, 0], dtype=torch.float64))

    # rollout: N = max(1, round(delta_tau * 128)) Euler steps per sample, in one batch. For dx/dsigma = x
    # with shift 1 the result is x (1 - delta / N)^N, which tells N apart from N +- 1.
    class Linear:
        calls = 0

        def velocity(self, x, sigma):
            Linear.calls += 1
            return x

    tau_from = torch.tensor([1.0, 1.0, 0.7, 0.5, 0.2], dtype=torch.float64)
    tau_to = torch.tensor([0.0, 0.75, 0.6, 0.499, 0.19], dtype=torch.float64)
    counts = piflow.substep_counts(tau_from, tau_to, 128)
    assert counts.tolist() == [128, 32, 13, 1, 1]
    x = piflow.rollout(Linear(), torch.ones(5, 1, dtype=torch.float64), [tau_from, tau_to], piflow.Config())[0]
    delta = tau_from - tau_to
    expected = (1 - delta / counts) ** counts
    assert (x[:, 0] - expected).abs().max() < 1e-12
    assert ((x[:, 0] - (1 - delta / (counts + 1)) ** (counts + 1)).abs()[:3] > 1e-7).all()
    assert Linear.calls == 128

    # through waypoints (pi-ID's S on-policy states): each stretch keeps its own substep grid, so the states equal
    # rolling out stretch by stretch, and the loop costs the largest per-sample total of substeps (115 + 13 for the
    # first sample), not the sum of each stretch's largest count (115 + 31)
    tau_mid = torch.tensor([0.1, 0.99, 0.65, 0.4995, 0.195], dtype=torch.float64)
    first, second = piflow.substep_counts(tau_from, tau_mid, 128), piflow.substep_counts(tau_mid, tau_to, 128)
    assert int((first + second).max()) == 128 and int(first.max() + second.max()) == 146, (first, second)
    Linear.calls = 0
    x_mid, x_end = piflow.rollout(Linear(), torch.ones(5, 1, dtype=torch.float64), [tau_from, tau_mid, tau_to], piflow.Config())
    assert Linear.calls == 128, Linear.calls
    one = lambda x, a, b: piflow.rollout(Linear(), x, [a, b], piflow.Config())[0]
    x_mid_alone = one(torch.ones(5, 1, dtype=torch.float64), tau_from, tau_mid)
    assert (x_mid - x_mid_alone).abs().max() < 1e-12 and (x_end - one(x_mid_alone, tau_mid, tau_to)).abs().max() < 1e-12


def test_piflow_student_starts_from_the_teacher():
    """Teacher head replicated K times (no bias noise here): every GM component, the mixture mean and
    every DX grid point reproduce the teacher's velocity; uniform weights, log-std log 0.05."""
    for shape in ((2,), (1, 8, 8)):
        kwargs = {"heads": 2} if len(shape) == 3 else {}
        teacher_net = common.new_backbone(shape, 3, hidden=32, depth=2, **kwargs)
        with torch.no_grad():
            for p in teacher_net.parameters():  # a non-trivial teacher (zero-initialised gates would hide errors)
                p.normal_(0, 0.1)
        x, t, y = torch.randn(4, *shape), torch.rand(4), torch.tensor([0, 1, 2, 3])
        u = teacher_net(x, t, y)
        gm = piflow.Student(teacher_net, "gm", 5, bias_noise=0.0)
        means_u, logweights, logstd = gm(x, t, y)
        assert (means_u - u[:, None]).abs().max() < 1e-5 and logweights.abs().max() == 0
        assert torch.allclose(logstd, torch.full((4,), math.log(0.05)))
        dx = piflow.Student(teacher_net, "dx", 4)
        assert (dx(x, t, y)[0] - u[:, None]).abs().max() < 1e-5
        noisy = piflow.Student(teacher_net, "gm", 5, seed=1, bias_noise=0.05)(x, t, y)[0]
        assert 0.01 < float((noisy - u[:, None]).detach().std()) < 0.1  # the symmetry-breaking noise is there


def small_piflow_config(out, **kw):
    # lr 1e-3: the reference's 5e-5 is tuned for 140k iterations and barely moves a fresh GM head in 60
    # steps (1-NFE pi-ID loss -17 %); the GM policy trains stably at 1e-3 on this toy (piflow.Config note)
    return piflow.Config(**{"out": out, "hidden": 32, "depth": 2, "batch": 128, "steps": 60, "nfes": "1,2", "lr": 1e-3,
                            "warmup": 10, "ema_start": 10, "log_every": 20, "ckpt_every": 30, "eval_samples": 300,
                            "total_substeps": 32, "device": "cpu", **kw})


def fixed_piid_loss(student, teacher, world, nfe, cfg):
    """The pi-ID loss on one fixed batch, fixed times and fixed dropout (a seeded draw)."""
    with torch.random.fork_rng():
        torch.manual_seed(123)
        x0, _ = world.sample(512, generator=torch.Generator().manual_seed(5))
        tau_s, tau_dst = piflow.pick_segments(512, nfe, cfg, "cpu")
        x_s = (1 - piflow.bc(tau_s, x0).float()) * x0 + piflow.bc(tau_s, x0).float() * torch.randn_like(x0)
        return float(piflow.piid_segment(student, teacher, x_s, tau_s, tau_dst, None, cfg)[0].mean())


def test_piflow_short_run_lowers_the_loss_resumes_exactly_and_samples():
    with tempfile.TemporaryDirectory() as tmp:
        full, common.fit_to_world = quick_teacher_fit(tmp)
        try:
            cfg = small_piflow_config(os.path.join(tmp, "run"))
            emas = piflow.train(cfg)
            teacher_net = common.fit_to_world(common.make_world("checkerboard"), {"hidden": 32, "depth": 2})
            piflow.train(small_piflow_config(os.path.join(tmp, "half"), steps=30))  # 30 steps, then 30 more
            piflow.train(small_piflow_config(os.path.join(tmp, "half"), resume=True))
        finally:
            common.fit_to_world = full
        ckpt = torch.load(os.path.join(tmp, "run", "ckpt.pt"), weights_only=True)
        half = torch.load(os.path.join(tmp, "half", "ckpt.pt"), weights_only=True)
        for name in ("model_1", "ema_1", "model_2", "ema_2"):
            for key, v in ckpt[name].items():
                assert torch.equal(v, half[name][key]), f"resume differs in {name}.{key}"
        world = common.make_world("checkerboard")
        for nfe in (1, 2):
            start = piflow.Student(teacher_net, "gm", cfg.num_components, cfg.seed, cfg.bias_noise)
            trained = piflow.Student(teacher_net, "gm", cfg.num_components)
            trained.load_state_dict(ckpt[f"model_{nfe}"])
            before, after = fixed_piid_loss(start, world, world, nfe, cfg), fixed_piid_loss(trained, world, world, nfe, cfg)
            assert after < 0.7 * before, f"{nfe} NFE: pi-ID loss {before:.4f} -> {after:.4f}"
            x = piflow.sample(emas[nfe], torch.randn(500, 2), None, nfe, cfg)
            assert torch.isfinite(x).all() and x.abs().max() < 10
        rows = json.load(open(os.path.join(tmp, "run", "metrics.json")))["results"]
        students = {r["nfe"]: r for r in rows if r["sampler"] == "student"}
        assert sorted(students) == [1, 2] and all(math.isfinite(r["swd"]) and "ode_err" in r for r in students.values())
        # the untrained 1-NFE policy is about one teacher Euler step (swd ~1.0); after 60 steps it beats 4 steps
        teacher4 = next(r["swd"] for r in rows if r["sampler"] == "teacher" and r["nfe"] == 4)
        assert students[1]["swd"] < teacher4, f"1-NFE student swd {students[1]['swd']:.3f} vs teacher 4-step {teacher4:.3f}"


def test_piflow_torchrun_two_processes_datafree_gm_and_dx_with_cfg():
    """On a class-conditional mixture with a learned teacher and CFG: a DDP smoke run of the data-free
    trainer (several backward passes per step) with the GM policy and the window / mixing options, where
    both ranks train and rank 0 alone writes; and the DX policy in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        labelled_mixture_and_teacher(tmp)
        args = {"data": os.path.join(tmp, "mix.npz"), "teacher": os.path.join(tmp, "teacher.pt"), "steps": 20, "batch": 64,
                "nfes": "1,2", "total_substeps": 32, "eval_samples": 300, "guidance": 2.0, "log_every": 10}
        gm_out, dx_out = os.path.join(tmp, "gm"), os.path.join(tmp, "dx")
        r = torchrun(["piflow.py", *[f for k, v in args.items() for f in ("--" + k.replace("_", "-"), str(v))], "--out", gm_out,
                      "--trainer", "datafree", "--window-substeps", "3", "--mix-decay-iters", "10"])
        assert r.returncode == 0, r.stderr[-2000:]
        piflow.train(piflow.Config(**args, out=dx_out, policy="dx", device="cpu"))
        for out in (gm_out, dx_out):
            metrics = json.load(open(os.path.join(out, "metrics.json")))
            assert metrics["steps"] == 20 and metrics["guidance"] == 2 and metrics["teacher"] == "learned"
            students = [row for row in metrics["results"] if row["sampler"] == "student"]
            assert [s["nfe"] for s in students] == [1, 2]
            assert all("cond_acc" in s and math.isfinite(s["swd"]) for s in students)
            assert len(open(os.path.join(out, "log.jsonl")).read().splitlines()) == 2  # rank 0 alone logs
            assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl", "metrics.json", "samples.png"]


# ---------------------------------------------------------------------------------------------------
# undistill_flux.py



def flux_reference_shapes(dev):
    """Reference §1.5, written out independently of the model code: BFL key -> shape for FLUX.1."""
    h, mlp, head = 3072, 12288, 128
    shapes = {"img_in.weight": (h, 64), "img_in.bias": (h,), "txt_in.weight": (h, 4096), "txt_in.bias": (h,),
              "final_layer.adaLN_modulation.1.weight": (2 * h, h), "final_layer.adaLN_modulation.1.bias": (2 * h,),
              "final_layer.linear.weight": (64, h), "final_layer.linear.bias": (64,)}
    for emb, width in [("time_in", 256), ("vector_in", 768)] + ([("guidance_in", 256)] if dev else []):
        shapes.update({f"{emb}.in_layer.weight": (h, width), f"{emb}.in_layer.bias": (h,),
                       f"{emb}.out_layer.weight": (h, h), f"{emb}.out_layer.bias": (h,)})
    for n in range(19):
        for s in ("img", "txt"):
            p = f"double_blocks.{n}.{s}"
            shapes.update({f"{p}_mod.lin.weight": (6 * h, h), f"{p}_mod.lin.bias": (6 * h,),
                           f"{p}_attn.qkv.weight": (3 * h, h), f"{p}_attn.qkv.bias": (3 * h,),
                           f"{p}_attn.norm.query_norm.scale": (head,), f"{p}_attn.norm.key_norm.scale": (head,),
                           f"{p}_attn.proj.weight": (h, h), f"{p}_attn.proj.bias": (h,),
                           f"{p}_mlp.0.weight": (mlp, h), f"{p}_mlp.0.bias": (mlp,),
                           f"{p}_mlp.2.weight": (h, mlp), f"{p}_mlp.2.bias": (h,)})
    for n in range(38):
        p = f"single_blocks.{n}"
        shapes.update({f"{p}.linear1.weight": (3 * h + mlp, h), f"{p}.linear1.bias": (3 * h + mlp,),
                       f"{p}.linear2.weight": (h, h + mlp), f"{p}.linear2.bias": (h,),
                       f"{p}.norm.query_norm.scale": (head,), f"{p}.norm.key_norm.scale": (head,),
                       f"{p}.modulation.lin.weight": (3 * h, h), f"{p}.modulation.lin.bias": (3 * h,)})
    return shapes


def test_undistill_flux_schnell_and_dev_keys_shapes_on_meta():
    for preset, n_tensors, n_params in (("schnell", 776, 11_891_178_560), ("dev", 780, 11_901_408_320)):
        with torch.device("meta"):
            model = uf.Flux(**uf.PRESETS[preset])
        state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert len(state) == n_tensors and sum(math.prod(s) for s in state.values()) == n_params, (preset, len(state))
        assert state == flux_reference_shapes(preset == "dev"), preset
        assert all(p.is_meta for p in model.parameters())  # no memory was allocated


def random_tiny_flux(seed=0, **overrides):
    torch.manual_seed(seed)
    model = uf.Flux(**{**uf.PRESETS["tiny"], **overrides})
    with torch.no_grad():
        for p in model.parameters():  # no zero/one parameters: every path must matter
            p.normal_(0, 0.2)
    return model.eval()


def tiny_inputs(n, text_len=8, seed=0, H=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, H, H, generator=g)
    cond = {"t5": torch.randn(n, text_len, 32, generator=g), "clip_pooled": torch.randn(n, 32, generator=g),
            "t5_mask": torch.arange(text_len)[None] < torch.randint(1, text_len, (n, 1), generator=g)}
    return x, torch.rand(n, generator=g), cond


def test_undistill_flux_bool_mask_equals_removing_padding():
    model = random_tiny_flux()
    x, t, cond = tiny_inputs(4)
    with torch.no_grad():
        masked = uf.predict(model, x, t, cond, "bool")
        soft, none = uf.predict(model, x, t, cond, "soft"), uf.predict(model, x, t, cond, "none")
        for i in range(4):
            keep = cond["t5_mask"][i]
            alone = {k: v[i:i + 1] for k, v in cond.items()}
            alone["t5"], alone["t5_mask"] = alone["t5"][:, keep], alone["t5_mask"][:, keep]
            dropped = uf.predict(model, x[i:i + 1], t[i:i + 1], alone, "none")
            # equal up to fp32 round-off, relative to outputs of size ~20 (in float64 the gap is ~1e-14)
            assert (masked[i:i + 1] - dropped).abs().max() < 1e-5 * dropped.abs().max()
            # the padding is really seen without a hard mask, and the soft (float 0/1) mask still attends to it
            assert (none[i:i + 1] - dropped).abs().max() > 1e-3 and (soft[i:i + 1] - dropped).abs().max() > 1e-3


def test_undistill_flux_rope_pairs_timestep_embedding_and_schedule():
    # RoPE rotates adjacent pairs (x[2j], x[2j+1]) by pos_i * theta^(-2j/d_i), axis by axis (complex product)
    ids = torch.tensor([[[0.0, 3.0, 5.0], [1.0, 2.0, 7.0]]])
    q = torch.randn(1, 1, 2, 32, dtype=torch.float64)
    got = uf.apply_rope(q, uf.rope(ids, (8, 12, 12), 10_000))
    freqs = torch.cat([p[..., None].double() * 10_000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
                       for p, d in zip(ids[0].T, (8, 12, 12))], -1)
    want = torch.view_as_real(torch.view_as_complex(q.reshape(1, 1, 2, 16, 2).contiguous()) * torch.polar(torch.ones_like(freqs), freqs)).flatten(-2)
    assert (got - want).abs().max() < 1e-5
    # timestep embedding: t x 1000, cos first, 256 dims
    emb = common.timestep_embedding(torch.tensor([0.5]), 256)
    assert torch.allclose(emb[0, 0], torch.cos(torch.tensor(500.0))) and torch.allclose(emb[0, 128], torch.sin(torch.tensor(500.0)))
    # pack/unpack: inverse, channel-major (c ph pw) inside a token, tokens row-major over the 2x2 grid
    z = torch.randn(3, 16, 6, 10)
    assert torch.equal(uf.unpack(uf.pack(z), 6, 10), z) and uf.pack(z).shape == (3, 15, 64)
    assert uf.pack(z)[1, 5, 4 * 7 + 2 * 1 + 0] == z[1, 7, 2 * 1 + 1, 2 * 0 + 0]  # token (row 1, col 0), c=7, ph=1, pw=0
    img_ids, txt_ids = uf.position_ids(2, 6, 10, 4, "cpu")
    assert img_ids[0, 5].tolist() == [0, 1, 0] and img_ids.shape == (2, 15, 3) and not txt_ids.any()
    # schedule: mu through (256, 0.5) and (4096, 1.15); shift = e^mu / (e^mu + 1/t - 1); schnell grid unshifted
    assert abs(uf.schedule_mu(256) - 0.5) < 1e-12 and abs(uf.schedule_mu(4096) - 1.15) < 1e-12
    for mu in (0.5, 1.15, 0.46):
        for t in (0.01, 0.25, 0.5, 0.9):
            assert abs(uf.shift_time(t, mu) - math.exp(mu) / (math.exp(mu) + 1 / t - 1)) < 1e-12
    assert uf.shift_time(0.0, 1.15) == 0.0 and abs(uf.shift_time(1.0, 1.15) - 1.0) < 1e-12


def test_undistill_flux_lora_lokr_identity_merge_and_file_roundtrip():
    # LyCORIS factorisation examples of reference §4.2, and the size of a full LoKr at factor 16
    assert uf.factorization(3072, 16) == (16, 192) and uf.factorization(3072, -1) == (48, 64)
    assert uf.factorization(3072, 10) == (8, 384) and uf.factorization(21504, 16) == (16, 1344)
    assert uf.factorization(15360, 16) == (16, 960) and uf.factorization(9216, 16) == (16, 576)
    big = uf.LoKrLinear(torch.nn.Linear(3072, 9216, device="meta"), (16, 16), 10**6, 1.0)
    assert sum(p.numel() for p in big.parameters() if p.requires_grad) == 110_848 and big.scale == 1.0
    x, t, cond = tiny_inputs(3)
    base = random_tiny_flux()
    with torch.no_grad():
        ref = uf.predict(base, x, t, cond, "bool")
    for kind, rank in (("lora", 4), ("lokr", 2), ("lokr", 1000)):  # LoKr with low-rank W2, and with full W2
        model = copy.deepcopy(base)
        names = uf.add_adapters(model, kind, "*attn.qkv,*.linear1,*_mod.lin,final_layer.linear", rank, 3.0, factor=4)
        assert len(names) == 2 * 2 + 2 + 2 * 2 + 1
        assert all(p.requires_grad == ("lora_" in n or "lokr_" in n) for n, p in model.named_parameters())
        with torch.no_grad():
            assert (uf.predict(model, x, t, cond, "bool") - ref).abs().max() == 0  # Delta W = 0 at init
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)
            adapted = uf.predict(model, x, t, cond, "bool")
            assert (adapted - ref).abs().max() > 1e-2
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "adapter.safetensors")
                uf.save_safetensors(uf.adapter_state(model), path)
                assert not any(".base." in k for k in load_file(path))
                reloaded = copy.deepcopy(base)
                assert sorted(uf.load_adapters(reloaded, path)) == sorted(names)
                assert (uf.predict(reloaded, x, t, cond, "bool") - adapted).abs().max() == 0
            merged = uf.merge_adapters(model)
            assert set(merged.state_dict()) == set(base.state_dict())  # the original BFL keys again
            assert (uf.predict(merged, x, t, cond, "bool") - adapted).abs().max() < 1e-5 * adapted.abs().max()  # fp32 round-off


def test_undistill_flux_safetensors_bf16_roundtrip_prefix_and_layout_errors():
    model = random_tiny_flux()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "flux.safetensors")
        save_file({f"model.diffusion_model.{k}": v.bfloat16() for k, v in model.state_dict().items()}, path)
        loaded = uf.load_flux(path, "tiny", dtype=torch.bfloat16)
        assert all(not p.is_meta and p.dtype == torch.bfloat16 for p in loaded.parameters())
        assert all(torch.equal(v.bfloat16(), loaded.state_dict()[k]) for k, v in model.state_dict().items())
        renamed = {("transformer_blocks.0.attn.to_q.weight" if k == "double_blocks.0.img_attn.qkv.weight" else k): v
                   for k, v in model.state_dict().items()}
        save_file(renamed, path)
        try:
            uf.load_flux(path, "tiny")
            raise AssertionError("a diffusers-layout file was accepted")
        except SystemExit as e:
            assert "diffusers layout" in str(e) and "double_blocks.N.img_attn.qkv" in str(e)
        uf.PRESETS["tiny_dev"] = {**uf.PRESETS["tiny"], "guidance_embed": True}
        try:
            save_file(random_tiny_flux(guidance_embed=True).state_dict(), path)
            uf.load_flux(path, "tiny")
            raise AssertionError("a checkpoint with guidance_in was accepted as schnell-like")
        except SystemExit as e:
            assert "--preset dev" in str(e)
        finally:
            del uf.PRESETS["tiny_dev"]


def write_tiny_shards(folder, n_shards=2, rows=24):
    """Latent shards in the documented format for the tiny preset (4-channel latents, 32-dim text)."""
    os.makedirs(folder, exist_ok=True)
    for s in range(n_shards):
        x, _, cond = tiny_inputs(rows, seed=10 + s)
        save_file({"latents": x, "t5": cond["t5"].bfloat16(), "t5_mask": cond["t5_mask"].to(torch.uint8),
                   "clip_pooled": cond["clip_pooled"]}, os.path.join(folder, f"shard{s}.safetensors"))
    save_file({"t5": torch.randn(1, 8, 32), "t5_mask": (torch.arange(8) < 1).to(torch.uint8)[None],
               "clip_pooled": torch.randn(1, 32)}, os.path.join(folder, "empty_prompt.safetensors"))


def test_undistill_flux_shards_resume_exactly_sampling_mode_and_bad_input():
    with tempfile.TemporaryDirectory() as tmp:
        data, base = os.path.join(tmp, "shards"), os.path.join(tmp, "base.safetensors")
        write_tiny_shards(data)
        save_file(random_tiny_flux().state_dict(), base)
        args = dict(data=data, base=base, adapter="lokr", batch=16, lr=1e-3, log_every=2, device="cpu")
        uf.train(uf.Config(out=os.path.join(tmp, "a"), steps=6, ckpt_every=3, **args))
        uf.train(uf.Config(out=os.path.join(tmp, "b"), steps=3, ckpt_every=3, **args))
        uf.train(uf.Config(out=os.path.join(tmp, "b"), steps=6, ckpt_every=3, resume=True, **args))
        a, b = (load_file(os.path.join(tmp, r, "adapter.safetensors")) for r in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume is not exact"
        assert any(v.abs().sum() > 0 for k, v in a.items() if "w2" in k)  # the zero factor has moved
        ckpt = torch.load(os.path.join(tmp, "a", "ckpt.pt"), weights_only=True)
        assert all("lokr" in k for k in ckpt["model"])  # checkpoints carry the adapters, not the frozen base
        prompts = os.path.join(tmp, "prompts.safetensors")
        _, _, cond = tiny_inputs(2)
        save_file({**cond, "t5_mask": cond["t5_mask"].to(torch.uint8),
                   **{f"negative_{k}": v for k, v in load_file(os.path.join(data, "empty_prompt.safetensors")).items()}}, prompts)
        uf.sample_from_prompts(uf.Config(base=base, adapter_file=os.path.join(tmp, "a", "adapter.safetensors"),
                                         sample_prompts=prompts, height=64, width=48, sample_steps=3, cfg_scale=3.0,
                                         no_cfg_steps=1, out=os.path.join(tmp, "s"), device="cpu"))
        latents = load_file(os.path.join(tmp, "s", "samples.safetensors"))["latents"]
        assert latents.shape == (2, 4, 8, 6) and torch.isfinite(latents).all()
        bad = os.path.join(tmp, "bad")
        write_tiny_shards(bad, n_shards=1)
        save_file({"latents": torch.randn(3, 4, 8, 8), "t5": torch.randn(3, 8, 64), "t5_mask": torch.ones(3, 8),
                   "clip_pooled": torch.randn(3, 32)}, os.path.join(bad, "shard1.safetensors"))
        r = run([sys.executable, "undistill_flux.py", "--data", bad, "--base", base, "--steps", "1", "--out", os.path.join(tmp, "c")])
        assert r.returncode != 0 and "shard1.safetensors" in r.stderr and "T5 width 32" in r.stderr, r.stderr[-500:]
        assert "Traceback" not in r.stderr and not os.path.exists(os.path.join(tmp, "c", "ckpt.pt"))


def test_undistill_flux_grad_ckpt_same_gradients_and_bf16_base_trains_fp32_adapters():
    """--grad-ckpt recomputes the blocks without changing a gradient; --bf16 keeps the base in bf16 and the
    LoRA factors in fp32, and a short run on shards trains with finite losses."""
    model = random_tiny_flux().train()
    x, t, cond = tiny_inputs(3)
    grads = []
    for ckpt in (False, True):
        model.grad_ckpt = ckpt
        model.zero_grad()
        uf.predict(model, x, t, cond, "bool").square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7) for n in grads[0])
    assert all(g.abs().sum() > 0 for n, g in grads[0].items() if "guidance" not in n)
    with tempfile.TemporaryDirectory() as tmp:
        data, base = os.path.join(tmp, "shards"), os.path.join(tmp, "base.safetensors")
        write_tiny_shards(data)
        save_file(random_tiny_flux().state_dict(), base)
        trained = uf.train(uf.Config(data=data, base=base, adapter="lora", bf16=True, grad_ckpt=True, steps=4, batch=8,
                                     log_every=2, out=os.path.join(tmp, "run"), device="cpu"))
        assert {p.dtype for n, p in trained.named_parameters() if "lora" not in n} == {torch.bfloat16}
        adapters = load_file(os.path.join(tmp, "run", "adapter.safetensors"))
        assert {v.dtype for v in adapters.values()} == {torch.float32}
        assert any(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith("lora_B"))  # B = 0 has moved
        losses = [json.loads(l)["loss"] for l in open(os.path.join(tmp, "run", "log.jsonl"))]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_undistill_flux_fsdp_full_finetune_matches_ddp_resumes_exactly_and_runs_the_toy():
    """--adapter full --fsdp (FSDP2 over 2 processes) takes the same steps as DDP full fine-tuning on the same
    per-rank shards, resumes exactly from its gathered checkpoint, and the toy's table runs after it."""
    with tempfile.TemporaryDirectory() as tmp:
        data, base = os.path.join(tmp, "shards"), os.path.join(tmp, "base.safetensors")
        write_tiny_shards(data)
        save_file(random_tiny_flux().state_dict(), base)

        def go(out, *flags):
            r = torchrun(["undistill_flux.py", "--data", data, "--base", base, "--adapter", "full", "--batch", "16",
                          "--lr", "1e-3", "--lr-warmup", "1", "--log-every", "3", "--out", os.path.join(tmp, out), *flags])
            assert r.returncode == 0, r.stderr[-2000:]
            return load_file(os.path.join(tmp, out, "transformer.safetensors"))
        ddp, fsdp = go("ddp", "--steps", "6"), go("fsdp", "--steps", "6", "--fsdp")
        go("resumed", "--steps", "3", "--ckpt-every", "3", "--fsdp")
        resumed = go("resumed", "--steps", "6", "--ckpt-every", "3", "--fsdp", "--resume")
        start = load_file(base)
        assert fsdp.keys() == ddp.keys() == start.keys()
        moved = max(float((fsdp[k] - start[k]).abs().max()) for k in start)
        gap = max(float((fsdp[k] - ddp[k]).abs().max()) for k in start)
        assert moved > 1e-3 and gap < 1e-3 * moved, (moved, gap)  # grad clipping is active at these norms
        assert all(torch.allclose(resumed[k], fsdp[k], rtol=0, atol=1e-6) for k in fsdp), "FSDP resume is not exact"
        r = torchrun([os.path.join(HERE, "undistill_flux.py"), "--adapter", "full", "--fsdp", "--distill-steps", "8",
                      "--distill-pool", "64", "--steps", "4", "--batch", "16", "--eval-samples", "20", "--eval-steps",
                      "2", "--eval-cfgs", "1,3", "--out", os.path.join(tmp, "toy")], cwd=tmp)
        assert r.returncode == 0, r.stderr[-2000:]
        rows = json.load(open(os.path.join(tmp, "toy", "metrics.json")))["results"]
        assert [row["sampler"] for row in rows if row["sampler"].startswith("undistilled")] == ["undistilled cfg=1", "undistilled cfg=3"]


def test_undistill_flux_perfect_schnell_is_the_guided_teacher_on_schnells_grid():
    """The perfect toy schnell's velocity, Euler on schnell's 4-step grid, lands on the exact CFG-2 teacher's ODE
    solution (its jumps are that ODE's); CFG 1 leaves it unchanged, and CFG w mixes in the unguided teacher's
    jump with weight 1 - w."""
    world = common.make_world("glyphs16")
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(24, *world.shape, generator=g), torch.randint(0, 10, (24,), generator=g)
    velocity = uf.perfect_schnell(world, 2.0)
    grid = torch.tensor(uf.SCHNELL_GRID)
    x = common.euler_sample(velocity, z, 4, y, 1.0, grid)
    x_ode, err = common.reference_ode(world.velocity, z, y, 2.0, steps=64)
    assert (x - x_ode).pow(2).mean().sqrt() < 1e-3 and err < 1e-3
    assert common.cond_acc(x, y, world) == 1.0
    t = torch.full((24,), 0.6)
    v_c, v_u = velocity(z, t, y, 1.0), uf.perfect_schnell(world, 1.0)(z, t, torch.full_like(y, 10), 1.0)
    assert torch.allclose(velocity(z, t, y, 3.0), v_u + 3.0 * (v_c - v_u), atol=1e-5)
    assert not torch.allclose(v_c, v_u, atol=1e-2)


def test_undistill_flux_last_jump_is_trained_from_the_students_own_state():
    """own_last_jump: rows drawn for the last interval start from the student's own 3-step state (the row's noise
    itself when the student predicts 0) and regress the exact CFG teacher's jump from that state to t = 0; the
    other rows keep the teacher's trajectory states."""
    world, text = common.make_world("glyphs16"), uf.ToyText(8, 32)
    g = torch.Generator().manual_seed(0)
    n, y = 6, torch.tensor([3, 7, 1, 1, 0, 9])
    noise, x_k, x_next = (torch.randn(n, 4, 8, 8, generator=g) for _ in range(3))
    k, cond = torch.tensor([3, 0, 3, 2, 1, 3]), text.encode(text.captions(y, g))
    torch.manual_seed(0)
    zero, model = uf.Flux(**uf.PRESETS["tiny"]), uf.Flux(**uf.PRESETS["tiny"])
    uf.zero_init_modulation(zero)  # output layer at 0: the student does not move
    for net, expect_state in ((zero, noise), (model, None)):
        state, nxt = uf.own_last_jump(net, world, noise, x_k, x_next, k, cond, y, 2.0)
        last, other = k == 3, k != 3
        assert torch.equal(state[other], x_k[other]) and torch.equal(nxt[other], x_next[other])
        if expect_state is not None:
            assert torch.equal(state[last], expect_state[last])
        else:  # a moving student: its own state, neither the noise nor the teacher's state
            assert not torch.allclose(state[last], noise[last]) and not torch.allclose(state[last], x_k[last])
        teacher_end, _ = common.reference_ode(world.velocity, uf.from_latent(state[last]), y[last], 2.0, steps=4,
                                              t_from=0.25, t_to=0.0)
        assert torch.allclose(nxt[last], uf.to_latent(teacher_end), atol=1e-6)
    try:  # the last interval's sampling weight must be positive
        uf.check_config(uf.Config(distill_last_weight=0.0), True)
    except SystemExit as e:
        assert str(e).startswith("error: ") and "--distill-last-weight" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("--distill-last-weight 0 was accepted")


# Math of undistill_flux.py, each piece against an independent computation (hand-computed cases, a second
# FLUX forward written from the reference notes, exact solutions)

def randomize_seeded(module, seed, std=0.2):
    """Every parameter ~ N(0, std^2): no zero or unit weights, so every path (gates, norm scales) matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


# ---------------------------------------------------------------------------------------------------
# A second FLUX forward pass, written from reference §1.2-1.4 in float64 on the model's state dict

def ref_layer_norm(x):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt((x - mean).pow(2).mean(-1, keepdim=True) + 1e-6)


def ref_rms_norm(x, scale):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * scale


def ref_gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def ref_timestep_embedding(t):
    """[cos(1000 t f_k), sin(1000 t f_k)], f_k = exp(-ln(10000) k / 128), k < 128."""
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    args = 1000 * t.double()[:, None] * freqs
    return torch.cat([args.cos(), args.sin()], 1)


def ref_rope_angles(ids, axes_dim, theta):
    """(B, L, head_dim / 2): axis i contributes pos_i * theta^(-2j / d_i) for j < d_i / 2."""
    return torch.cat([ids[..., i].double()[..., None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
                      for i, d in enumerate(axes_dim)], -1)


def ref_rotate(x, angles):
    """Rotate adjacent pairs (x[2j], x[2j+1]) by angle j: a complex product. x (B, L, H, hd)."""
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, :, None]).flatten(-2)


def ref_attention(q, k, v, angles, key_mask):
    """softmax(q k^T / sqrt(hd)) v over all tokens, padded keys hidden; q, k, v (B, L, H, hd) -> (B, L, H hd)."""
    q, k = ref_rotate(q, angles), ref_rotate(k, angles)
    logits = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhlm,bmhd->blhd", logits.softmax(-1), v).flatten(2)


def ref_flux(model, img, img_ids, txt, txt_ids, t, y, txt_mask=None, guidance=None):
    P = {k: v.double() for k, v in model.state_dict().items()}
    D = P["img_in.weight"].shape[0]
    hd = sum(model.axes_dim)
    lin = lambda name, x: x @ P[f"{name}.weight"].T + P[f"{name}.bias"]
    embed = lambda name, x: lin(f"{name}.out_layer", F.silu(lin(f"{name}.in_layer", x)))
    mlp = lambda name, x: lin(f"{name}.2", ref_gelu_tanh(lin(f"{name}.0", x)))

    def chunks(name, n):  # (shift, scale, gate) x n/3 of lin(SiLU(vec)), each (B, 1, D)
        m = lin(name, F.silu(vec))
        return [m[:, i * D:(i + 1) * D][:, None] for i in range(n)]

    def qkv(x, norm):  # packed [q; k; v], heads of hd channels, QK RMSNorm with separate scales
        q, k, v = (x[..., i * D:(i + 1) * D].unflatten(-1, (-1, hd)) for i in range(3))
        return ref_rms_norm(q, P[f"{norm}.query_norm.scale"]), ref_rms_norm(k, P[f"{norm}.key_norm.scale"]), v

    img, txt, y = lin("img_in", img.double()), lin("txt_in", txt.double()), y.double()
    vec = embed("time_in", ref_timestep_embedding(t)) + embed("vector_in", y)
    if guidance is not None:
        vec = vec + embed("guidance_in", ref_timestep_embedding(guidance))
    angles = ref_rope_angles(torch.cat([txt_ids, img_ids], 1), model.axes_dim, model.theta)
    key_mask = None if txt_mask is None else torch.cat([txt_mask.bool(), torch.ones(len(img), img.shape[1], dtype=torch.bool)], 1)
    n_txt = txt.shape[1]
    for n in range(len(model.double_blocks)):
        p = f"double_blocks.{n}"
        i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = chunks(f"{p}.img_mod.lin", 6)
        t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = chunks(f"{p}.txt_mod.lin", 6)
        iq, ik, iv = qkv(lin(f"{p}.img_attn.qkv", (1 + i_sc1) * ref_layer_norm(img) + i_sh1), f"{p}.img_attn.norm")
        tq, tk, tv = qkv(lin(f"{p}.txt_attn.qkv", (1 + t_sc1) * ref_layer_norm(txt) + t_sh1), f"{p}.txt_attn.norm")
        a = ref_attention(torch.cat([tq, iq], 1), torch.cat([tk, ik], 1), torch.cat([tv, iv], 1), angles, key_mask)
        img = img + i_g1 * lin(f"{p}.img_attn.proj", a[:, n_txt:])
        img = img + i_g2 * mlp(f"{p}.img_mlp", (1 + i_sc2) * ref_layer_norm(img) + i_sh2)
        txt = txt + t_g1 * lin(f"{p}.txt_attn.proj", a[:, :n_txt])
        txt = txt + t_g2 * mlp(f"{p}.txt_mlp", (1 + t_sc2) * ref_layer_norm(txt) + t_sh2)
    x = torch.cat([txt, img], 1)
    for n in range(len(model.single_blocks)):
        p = f"single_blocks.{n}"
        sh, sc, g = chunks(f"{p}.modulation.lin", 3)
        h = lin(f"{p}.linear1", (1 + sc) * ref_layer_norm(x) + sh)
        q, k, v = qkv(h[..., :3 * D], f"{p}.norm")
        x = x + g * lin(f"{p}.linear2", torch.cat([ref_attention(q, k, v, angles, key_mask), ref_gelu_tanh(h[..., 3 * D:])], -1))
    shift, scale = chunks("final_layer.adaLN_modulation.1", 2)
    return lin("final_layer.linear", (1 + scale) * ref_layer_norm(x[:, n_txt:]) + shift)


def tiny_batch(n, n_img=16, n_txt=8, seed=1):
    """Inputs for the tiny preset: packed image tokens of a 2*4 x 2*(n_img/4) latent, T5 with padding."""
    g = torch.Generator().manual_seed(seed)
    img_ids, txt_ids = uf.position_ids(n, 8, n_img // 2, n_txt, "cpu")
    return dict(img=torch.randn(n, n_img, 16, generator=g), img_ids=img_ids, txt=torch.randn(n, n_txt, 32, generator=g),
                txt_ids=txt_ids, t=torch.rand(n, generator=g), y=torch.randn(n, 32, generator=g),
                txt_mask=torch.arange(n_txt)[None] < torch.tensor([[3], [n_txt], [1]])[:n])


# ---------------------------------------------------------------------------------------------------
# Components, hand-computed

def test_undistill_flux_modulate_and_rmsnorm_by_hand():
    """modulate(x, shift, scale) = (1 + scale) x + shift, the (shift, scale) argument order; RMSNorm
    divides by sqrt(MEAN of squares over the last axis + 1e-6) and multiplies by its own 'scale'; QKNorm
    uses query_norm for q and key_norm for k. Hand loops over 2 x 3 tokens x 4 channels (an axis or
    sum/mean slip shows)."""
    x = torch.arange(24.0).reshape(2, 3, 4) - 11.0
    shift = torch.tensor([[[0.5, -1.0, 2.0, 0.0]], [[1.0, 1.0, -3.0, 0.25]]])
    scale = torch.tensor([[[0.1, 0.2, -0.5, 1.0]], [[-1.0, 0.0, 0.3, 2.0]]])
    got = uf.modulate(x, shift, scale)
    for b in range(2):
        for l in range(3):
            for c in range(4):
                assert abs(got[b, l, c] - ((1 + scale[b, 0, c]) * x[b, l, c] + shift[b, 0, c])) < 1e-6
    norm = uf.RMSNorm(4)
    with torch.no_grad():
        norm.scale.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
    got = norm(x).detach()
    for b in range(2):
        for l in range(3):
            rms = math.sqrt(sum(float(x[b, l, c]) ** 2 for c in range(4)) / 4 + 1e-6)
            for c in range(4):
                assert abs(got[b, l, c] - float(x[b, l, c]) / rms * float(norm.scale[c].detach())) < 1e-5, (b, l, c)
    qk = uf.QKNorm(4)
    with torch.no_grad():
        qk.query_norm.scale.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        qk.key_norm.scale.copy_(torch.tensor([-1.0, 0.5, 0.25, 2.0]))
    q, k = qk(x, x.flip(1), x)
    assert torch.allclose(q, ref_rms_norm(x, qk.query_norm.scale.detach()), atol=1e-6)
    assert torch.allclose(k, ref_rms_norm(x.flip(1), qk.key_norm.scale.detach()), atol=1e-6)


def test_undistill_flux_last_layer_reads_shift_then_scale():
    """final_layer: adaLN_modulation's output is [shift; scale] (BFL order; diffusers swaps the halves),
    applied to the parameter-free LayerNorm: out = linear((1 + scale) LN(x) + shift). The modulation is made
    constant (weight 0, bias = [shift; scale]) so the case is checked by hand on 2 tokens x 4 channels."""
    layer = uf.LastLayer(4, 3)
    shift, scale = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([0.5, 0.0, -0.75, 2.0])
    with torch.no_grad():
        layer.adaLN_modulation[1].weight.zero_()
        layer.adaLN_modulation[1].bias.copy_(torch.cat([shift, scale]))
        layer.linear.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.5, 0, 0, -1.0]]))
        layer.linear.bias.copy_(torch.tensor([0.0, 0.1, -0.2]))
    x = torch.tensor([[[1.0, 2.0, 3.0, 6.0], [-1.0, 0.0, 0.0, 1.0]]])
    got = layer(x, torch.randn(1, 4))
    for l in range(2):
        mean = sum(x[0, l].tolist()) / 4
        var = sum((v - mean) ** 2 for v in x[0, l].tolist()) / 4
        h = [(1 + float(scale[c])) * (float(x[0, l, c]) - mean) / math.sqrt(var + 1e-6) + float(shift[c]) for c in range(4)]
        want = [h[0], h[1] + 0.1, 0.5 * h[0] - h[3] - 0.2]
        assert all(abs(got[0, l, o] - want[o]) < 1e-5 for o in range(3)), (got, want)


def small_blocks_inputs(seed=0):
    """hidden 16, 2 heads of 8 (RoPE axes 2 + 2 + 4), 3 text + 5 image tokens, batch 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (2, 8, 3), generator=g).float()
    return (torch.randn(2, 5, 16, generator=g), torch.randn(2, 3, 16, generator=g), torch.randn(2, 16, generator=g),
            uf.rope(ids, (2, 2, 4), 10_000))


def test_undistill_flux_double_block_gates_switch_their_branch_off():
    """DoubleStreamBlock: each of its four gates (image attention, image MLP, text attention, text MLP;
    chunks 2 and 5 of (shift1, scale1, gate1, shift2, scale2, gate2)) multiplies its branch. With that gate's
    rows of the modulation set to 0, the branch's weights no longer change the stream's output; with the gate
    on, they do."""
    img, txt, vec, pe = small_blocks_inputs()
    cases = [("img_mod", 2, "img_attn.proj", 0), ("img_mod", 5, "img_mlp", 0),
             ("txt_mod", 2, "txt_attn.proj", 1), ("txt_mod", 5, "txt_mlp", 1)]
    for mod, gate, branch, stream in cases:
        block = randomize_seeded(uf.DoubleStreamBlock(16, 2, 2.0, True), seed=gate)
        with torch.no_grad():
            before = block(img, txt, vec, pe, None)[stream]
            for p in block.get_submodule(branch).parameters():
                p.add_(1.0)
            assert (block(img, txt, vec, pe, None)[stream] - before).abs().max() > 1e-3, (branch, "has no effect")
            lin = block.get_submodule(mod).lin
            lin.weight[gate * 16:(gate + 1) * 16] = 0
            lin.bias[gate * 16:(gate + 1) * 16] = 0
            off = block(img, txt, vec, pe, None)[stream]
            for p in block.get_submodule(branch).parameters():
                p.sub_(3.0)
            assert torch.equal(block(img, txt, vec, pe, None)[stream], off), (mod, gate, branch)


def test_undistill_flux_single_block_gate_scales_the_whole_update():
    """SingleStreamBlock: x + gate * linear2(cat(attention, GELU(mlp))). Gate 0 (chunk 2 of (shift, scale,
    gate) set to 0) returns x exactly; doubling the gate doubles the update x_out - x."""
    img, txt, vec, pe = small_blocks_inputs()
    x = torch.cat([txt, img], 1)
    block = randomize_seeded(uf.SingleStreamBlock(16, 2, 2.0), seed=3)
    with torch.no_grad():
        lin = block.modulation.lin
        update = block(x, vec, pe, None) - x
        lin.weight[32:] *= 2
        lin.bias[32:] *= 2
        assert torch.allclose(block(x, vec, pe, None) - x, 2 * update, atol=1e-5)
        lin.weight[32:] = 0
        lin.bias[32:] = 0
        assert torch.equal(block(x, vec, pe, None), x) and update.abs().max() > 1e-2


def test_undistill_flux_transformer_equals_a_second_implementation():
    """The whole tiny FLUX in float64 (2 double + 2 single blocks, random N(0, 0.2) weights) equals ref_flux above,
    written from reference §1.2-1.4 (modulation chunks, gates, LayerNorm, QK RMSNorm, [txt; img] joint
    attention with adjacent-pair RoPE, the key mask, parallel single blocks, final layer, timestep
    embedding), with a T5 padding mask and without, and with a guidance input (dev layout)."""
    b = {k: v.double() if v.is_floating_point() else v for k, v in tiny_batch(3).items()}
    for guidance_embed in (False, True):
        model = randomize_seeded(uf.Flux(**{**uf.PRESETS["tiny"], "guidance_embed": guidance_embed}), seed=7).double()
        g = torch.tensor([1.0, 3.5, 2.0], dtype=torch.float64) if guidance_embed else None
        for mask, txt_mask in (("bool", b["txt_mask"]), ("none", None)):
            with torch.no_grad():
                got = model(b["img"], b["img_ids"], b["txt"], b["txt_ids"], b["t"], b["y"], b["txt_mask"], g, mask)
            want = ref_flux(model, b["img"], b["img_ids"], b["txt"], b["txt_ids"], b["t"], b["y"], txt_mask, g)
            # float64 throughout except RoPE, which the model applies in fp32 (gap ~1e-9 relative)
            assert (got - want).abs().max() < 1e-6 * want.abs().max(), (guidance_embed, mask)


def test_undistill_flux_tiny_golden_values():
    """Golden values of the seeded tiny preset (default PyTorch initialisation, torch.manual_seed(0)),
    recorded from the version checked against BFL's reference code. A regression alarm only: the tests
    above say which part is wrong."""
    torch.manual_seed(0)
    model = uf.Flux(**uf.PRESETS["tiny"]).eval()
    b = tiny_batch(3)
    with torch.no_grad():
        out = model(b["img"], b["img_ids"], b["txt"], b["txt_ids"], b["t"], b["y"], b["txt_mask"], None, "bool")
    got = out[:, 5, :3].flatten().tolist() + [float(out.abs().mean()), float(out.mean())]
    want = [-0.777002, -0.35731, 0.280653, 0.875876, 0.567078, -0.286505, -0.611893, 0.0134812, -0.436598,
            0.514812, 0.0152036]  # out[:, 5, :3] for the 3 rows, mean |out|, mean out
    assert len(got) == len(want) and all(abs(g - w) < 1e-4 * (1 + abs(w)) for g, w in zip(got, want)), got


# ---------------------------------------------------------------------------------------------------
# Adapters

def test_undistill_flux_lora_scale_alpha_over_rank_forward_merge_and_gradient():
    """LoRA: y = W0 x + b + (alpha / r) B A x with alpha / r = 3 / 2 (rank / alpha would give 2 / 3), in the
    forward pass, in delta_weight / merge_adapters, and in the gradient of B: d(sum w.y)/dB =
    (alpha / r) sum_n w_n (A x_n)^T. Input (4, 3, 6): several tokens and channels."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora = uf.LoRALinear(base, rank=2, alpha=3.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    W0, b0, A, B = base.weight.detach().clone(), base.bias.detach().clone(), lora.lora_A.detach(), lora.lora_B.detach()
    x, w = torch.randn(4, 3, 6), torch.randn(4, 3, 5)
    y = lora(x)
    assert torch.allclose(y, x @ W0.T + b0 + 1.5 * (x @ A.T) @ B.T, atol=1e-5)
    (y * w).sum().backward()
    assert torch.allclose(lora.lora_B.grad, 1.5 * torch.einsum("nlo,nlr->or", w, x @ A.T), atol=1e-4)
    assert lora.lora_A.grad is not None and base.weight.grad is None  # the base is frozen
    merged = uf.merge_adapters(nn.Sequential(lora))[0]
    assert type(merged) is nn.Linear and torch.allclose(merged.weight, W0 + 1.5 * B @ A, atol=1e-6)


def kron(a, b):
    """Kronecker product by definition: K[i p + r, j q + s] = a[i, j] b[r, s] for b of shape (p, q)."""
    return torch.einsum("ij,rs->irjs", a, b).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def test_undistill_flux_lokr_is_scaled_kronecker_product():
    """LoKr: Delta W = s (W1 kron W2) with W1 (a, c), W2 (b, d) for out = a b, in = c d; W2 = W2a W2b with
    s = alpha / rank when rank < max(b, d) / 2, W2 full with s = 1 otherwise (LyCORIS, reference §4.2).
    The forward pass (which never forms W1 kron W2), delta_weight and the merge all match the definition."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6)
    for rank, alpha, scale in ((1, 3.0, 3.0), (100, 3.0, 1.0)):
        base = nn.Linear(6, 8)
        W0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
        lokr = uf.LoKrLinear(base, (2, 3), rank, alpha)  # a = 2, c = 3 -> b = 4, d = 2
        with torch.no_grad():
            for p in lokr.parameters():
                if p.requires_grad:
                    p.normal_()
        W2 = lokr.lokr_w2 if rank == 100 else lokr.lokr_w2_a @ lokr.lokr_w2_b
        delta = scale * kron(lokr.lokr_w1, W2).detach()
        assert torch.allclose(lokr(x), x @ (W0 + delta).T + b0, atol=1e-4), rank
        assert torch.allclose(lokr.delta_weight(), delta, atol=1e-5), rank
        merged = uf.merge_adapters(nn.Sequential(lokr))[0]
        assert torch.allclose(merged.weight, W0 + delta, atol=1e-5), rank


# ---------------------------------------------------------------------------------------------------
# Conversions and the toy's text encoder

def test_undistill_flux_pack_unpack_and_toy_latents_by_index():
    """pack: token (h, w) of the 2x2 grid holds channel c * 4 + ph * 2 + pw = latent[c, 2h + ph, 2w + pw],
    tokens row-major; unpack is its inverse. The toy 'VAE' is a 2x2 space-to-depth with the same rule."""
    z = torch.randn(2, 3, 4, 6)
    packed = uf.pack(z)
    assert packed.shape == (2, 6, 12)
    for b in range(2):
        for h in range(2):
            for w in range(3):
                for c in range(3):
                    for ph in range(2):
                        for pw in range(2):
                            assert packed[b, h * 3 + w, c * 4 + ph * 2 + pw] == z[b, c, 2 * h + ph, 2 * w + pw]
    assert torch.equal(uf.unpack(packed, 4, 6), z)
    img = torch.randn(2, 1, 4, 6)
    lat = uf.to_latent(img)
    assert lat.shape == (2, 4, 2, 3) and lat[1, 1 * 2 + 0, 1, 2] == img[1, 0, 3, 4]
    assert torch.equal(uf.from_latent(lat), img)


def test_undistill_flux_toy_text_pooled_is_mean_of_real_tokens():
    """ToyText: token states are table rows (padding keeps the '<pad>' row), the mask marks the caption's
    words plus '</s>', the pooled vector is the mean over those real tokens only; "" gives mask [1, 0, ...]."""
    text = uf.ToyText(8, 5, seed=0)
    enc = text.encode(["the digit 7", ""])
    ids = [text.vocab["the"], text.vocab["digit"], text.vocab["7"], 1]
    assert enc["t5_mask"].tolist() == [[True] * 4 + [False] * 4, [True] + [False] * 7]
    assert torch.equal(enc["t5"][0, :4], text.table[ids]) and torch.equal(enc["t5"][0, 4:], text.table[[0] * 4])
    assert torch.allclose(enc["clip_pooled"][0], text.table[ids].mean(0), atol=1e-6)
    assert torch.allclose(enc["clip_pooled"][1], text.table[1], atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Caption dropout, timesteps and the flow-matching objective

def dropout_inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = {"t5": torch.randn(n, 3, 5, generator=g), "t5_mask": torch.ones(n, 3, dtype=torch.bool),
            "clip_pooled": torch.randn(n, 4, generator=g)}
    empty = {"t5": torch.randn(1, 3, 5, generator=g), "t5_mask": torch.tensor([[True, False, False]]),
             "clip_pooled": torch.randn(1, 4, generator=g)}
    return cond, empty


def check_dropped_rows(out, cond, empty, dropped):
    """Rows in `dropped` carry the empty prompt in all three entries, the other rows are untouched."""
    for k in ("t5", "t5_mask", "clip_pooled"):
        for i in range(len(cond[k])):
            want = empty[k][0] if i in dropped else cond[k][i]
            assert torch.equal(out[k][i], want), (k, i, sorted(dropped))


def test_undistill_flux_caption_dropout_rows_and_rate():
    """drop_captions replaces a row's T5 states, T5 mask AND pooled vector by the empty prompt's exactly
    when its uniform draw is below p (torch.rand patched with known draws), and with a seeded generator the
    dropped fraction over 20000 rows is p, not 1 - p; p = 0 drops nothing."""
    cond, empty = dropout_inputs(6)
    draws = torch.tensor([0.05, 0.5, 0.15, 0.95, 0.09, 0.3])
    with patched(torch, rand=lambda n, **kw: draws[:n].clone()):
        for p, dropped in ((0.1, {0, 4}), (0.2, {0, 2, 4}), (0.0, set())):
            check_dropped_rows(uf.drop_captions(cond, empty, p), cond, empty, dropped)
    big, empty = dropout_inputs(20000)
    torch.manual_seed(0)
    out = uf.drop_captions(big, empty, 0.1)
    rate = float((out["t5_mask"][:, 1] == 0).float().mean())  # the empty prompt's mask is [1, 0, 0]
    assert abs(rate - 0.1) < 0.01, rate


def test_undistill_flux_training_times_logit_normal_shift_and_beta():
    """sample_t: logit-normal t = sigmoid(mean + std n) for the same normal draws n, then the resolution
    shift t' = e^mu / (e^mu + 1/t - 1) with mu the line through (256, 0.5), (4096, 1.15); without the shift
    t itself. Beta(2, 5) draws have mean 2/7 and variance 10/392 (20000 draws)."""
    cfg = uf.Config(logit_mean=0.4, logit_std=0.6)
    mu = 0.5 + (1.15 - 0.5) * (1000 - 256) / (4096 - 256)
    torch.manual_seed(3)
    n = torch.randn(50)
    s = torch.sigmoid(0.4 + 0.6 * n).double()
    for shift, want in ((True, math.exp(mu) / (math.exp(mu) + 1 / s - 1)), (False, s)):
        cfg.time_shift = shift
        torch.manual_seed(3)
        assert torch.allclose(uf.sample_t(50, cfg, uf.schedule_mu(1000), "cpu").double(), want, atol=1e-6), shift
    torch.manual_seed(0)
    t = uf.sample_t(20000, uf.Config(timesteps="beta", beta_a=2.0, beta_b=5.0, time_shift=False), 0.0, "cpu")
    assert abs(float(t.mean()) - 2 / 7) < 0.005 and abs(float(t.var()) - 10 / 392) < 0.002


class LinearVelocity(nn.Module):
    """A stand-in transformer: v = a * tokens + b (element-wise, so it commutes with pack/unpack), with a
    and b trainable; records what predict passes in."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(0.7)), nn.Parameter(torch.tensor(-0.2))
        self.calls = []

    def forward(self, img, img_ids, txt, txt_ids, t, y, txt_mask, guidance, mask):
        self.calls.append({"t": t, "t5": txt, "t5_mask": txt_mask, "clip_pooled": y, "guidance": guidance, "mask": mask})
        return self.a * img + self.b


def test_undistill_flux_loss_is_flow_matching_with_dropout_shift_and_gradient():
    """undistill_loss = mean over all elements of (v(x_t, t, c) - (eps - x0))^2 with x_t = (1 - t) x0 + t eps
    (t = 1 is noise), t = shifted sigmoid(mean + std n) with mu from the number of image TOKENS (H W / 4),
    caption dropout at rate cfg.caption_dropout, the mask mode and guidance passed on; its gradient with respect
    to the model's parameters is the analytic one. All random draws are patched with known tensors."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 4, 6, generator=g), torch.randn(4, 4, 4, 6, generator=g)
    normals, draws = torch.tensor([-1.5, 0.2, 0.8, 2.0]), torch.tensor([0.05, 0.5, 0.02, 0.95])
    cond, empty = dropout_inputs(4)
    cfg = uf.Config(caption_dropout=0.1, logit_mean=0.3, logit_std=0.7, mask="soft", time_shift=True)
    model, guidance = LinearVelocity(), torch.full((4,), 2.5)
    with patched(torch, rand=lambda n, **kw: draws.clone()), patched(torch, randn=lambda n, **kw: normals.clone()), \
            patched(torch, randn_like=lambda x, **kw: eps.clone()):
        loss = uf.undistill_loss(model, {"latents": x0, **cond}, empty, cfg, guidance)
    (call,) = model.calls
    mu = 0.5 + (1.15 - 0.5) * (4 * 6 / 4 - 256) / (4096 - 256)
    s = torch.sigmoid(0.3 + 0.7 * normals)
    t = math.exp(mu) / (math.exp(mu) + 1 / s - 1)
    assert torch.allclose(call["t"], t, atol=1e-6)
    check_dropped_rows(call, cond, empty, {0, 2})
    assert call["mask"] == "soft" and torch.equal(call["guidance"], guidance)
    tb = t.view(-1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * eps
    residual = 0.7 * x_t - 0.2 - (eps - x0)
    assert abs(loss.item() - residual.pow(2).mean().item()) < 1e-5 * residual.pow(2).mean().item()
    loss.backward()
    assert abs(float(model.a.grad) - float((2 * residual * x_t).mean())) < 1e-5
    assert abs(float(model.b.grad) - float((2 * residual).mean())) < 1e-5


# ---------------------------------------------------------------------------------------------------
# The sampler

class StraightFlow:
    """The exact velocity of rectified flow toward a single point x0(c) per prompt: v = (x - x0(c)) / t.
    Its trajectories are straight lines, so Euler on ANY grid from t = 1 to 0 lands exactly on x0(c); with
    true CFG the guided field v_u + w (v_c - v_u) points at x0_u + w (x0_c - x0_u). x0(c) uses all three
    parts of the prompt (pooled vector, T5 states, T5 mask); it is the same in every token."""

    def __init__(self):
        self.calls = []

    def __call__(self, img, img_ids, txt, txt_ids, t, y, txt_mask, guidance, mask):
        self.calls.append({"t": t.clone(), "batch": len(img), "clip_pooled": y})
        return (img - target_tokens(txt, txt_mask, y)[:, None]) / t[:, None, None]


def target_tokens(t5, t5_mask, pooled):
    return pooled[:, :16] + 0.5 * (t5 * t5_mask[..., None]).sum(1)[:, :16]


def target_latent(cond, H, W):
    """x0(c) unpacked: latent[c, h, w] = token channel c * 4 + (h % 2) * 2 + w % 2."""
    z = target_tokens(cond["t5"], cond["t5_mask"], cond["clip_pooled"])
    ch = torch.arange(4)[:, None, None] * 4 + (torch.arange(H) % 2)[:, None] * 2 + torch.arange(W) % 2
    return z[:, ch]


def sampler_prompts(n):
    g = torch.Generator().manual_seed(5)
    cond = {"t5": torch.randn(n, 3, 20, generator=g), "t5_mask": torch.arange(3)[None] < torch.tensor([[1], [3], [2]])[:n],
            "clip_pooled": torch.randn(n, 18, generator=g)}
    uncond = {"t5": torch.randn(1, 3, 20, generator=g), "t5_mask": torch.tensor([[True, False, False]]),
              "clip_pooled": torch.randn(1, 18, generator=g)}
    return cond, uncond, torch.randn(n, 4, 4, 6, generator=g)


def test_undistill_flux_sampler_euler_and_cfg_exact_on_straight_flow():
    """sample() on StraightFlow: without CFG (w = 1, or no negative prompt) it returns x0(c); with CFG w and
    the negative prompt it returns x0_u + w (x0_c - x0_u) exactly (v_u + w (v_c - v_u), integrated from t = 1
    down to 0 with steps x += (t_next - t) v), on shifted and unshifted grids and with plain first steps."""
    cond, uncond, noise = sampler_prompts(3)
    x0_c, x0_u = target_latent(cond, 4, 6), target_latent(uncond, 4, 6)
    for steps, w, shift, no_cfg, negative in ((5, 1.0, True, 0, uncond), (3, 4.0, True, 0, None),
                                              (5, 3.5, True, 0, uncond), (4, 2.0, False, 2, uncond)):
        got = uf.sample(StraightFlow(), noise, cond, negative, steps, w, shift, no_cfg)
        want = x0_c if w == 1 or negative is None else x0_u + w * (x0_c - x0_u)
        assert (got - want).abs().max() < 1e-4 * want.abs().max(), (steps, w, shift, no_cfg)


def test_undistill_flux_sampler_grid_and_cfg_call_pattern():
    """sample() asks for the velocity at t_0 = 1 > t_1 > ... of linspace(1, 0, steps + 1), shifted with mu
    from the number of image TOKENS (H W / 4) when shift (schnell: unshifted 1, .75, .5, .25); the first
    no_cfg_steps calls are conditional only (batch B), later calls evaluate [cond; uncond] together (batch 2B)."""
    cond, uncond, _ = sampler_prompts(1)
    noise = torch.randn(1, 4, 8, 12)
    mu = 0.5 + (1.15 - 0.5) * (8 * 12 / 4 - 256) / (4096 - 256)
    for shift, grid in ((True, [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in (1, 0.75, 0.5, 0.25)]),
                        (False, [1, 0.75, 0.5, 0.25])):
        flow = StraightFlow()
        uf.sample(flow, noise, cond, uncond, 4, 3.0, shift, 2)
        assert [c["batch"] for c in flow.calls] == [1, 1, 2, 2]
        assert all(abs(float(c["t"][0]) - s) < 1e-6 and (c["t"] == c["t"][0]).all() for c, s in zip(flow.calls, grid)), shift
        assert torch.equal(flow.calls[2]["clip_pooled"], torch.cat([cond["clip_pooled"], uncond["clip_pooled"]]))


# ---------------------------------------------------------------------------------------------------
# The toy's distillation into a schnell-like model

class RecordingF:
    """torch.nn.functional for undistill_flux, except that mse_loss records its (prediction, target)."""

    def __init__(self):
        self.targets = []

    def __getattr__(self, name):
        return getattr(F, name)

    def mse_loss(self, input, target, **kw):
        self.targets.append(target.detach().clone())
        return F.mse_loss(input, target, **kw)


def test_undistill_flux_toy_distillation_regresses_the_teachers_jump():
    """distilled_toy_schnell regresses v(x_tk, t_k) = (x_tk+1 - x_tk) / (t_k+1 - t_k), the jump that Euler's
    x_tk + (t_k+1 - t_k) v maps onto the teacher's next state. With a teacher 'ODE' patched to move at a
    constant velocity V (x(t_to) = x(t_from) + (t_to - t_from) V), every row's target, on every interval and
    from the student's own state on the last one, must be exactly to_latent(V). One step, 8 rows. (The first
    AdamW of a process imports torch._dynamo, ~2 s once; the test itself takes ~0.1 s.)"""
    V = torch.linspace(-1, 2, 256).reshape(1, 1, 16, 16)
    fake_ode = lambda velocity, z, y=None, cfg=1.0, steps=64, t_from=1.0, t_to=0.0, estimate_error=True: \
        (z + (t_to - t_from) * V, 0.0 if estimate_error else None)
    world = types.SimpleNamespace(spec=lambda: "constant-velocity test world", velocity=None, shape=(1, 16, 16), num_classes=10)
    cfg = uf.Config(distill_steps=1, distill_batch=8, distill_pool=8)
    recorder = RecordingF()
    with tempfile.TemporaryDirectory() as tmp, patched(uf, CACHE_DIR=tmp), patched(uf, reference_ode=fake_ode), \
            patched(uf, F=recorder), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        uf.distilled_toy_schnell(cfg, world, uf.ToyText(8, 32), "cpu")
    (target,) = recorder.targets
    assert torch.allclose(target, uf.to_latent(V).expand_as(target), atol=1e-5)


def test_undistill_flux_bench_prints_the_step_next_to_its_floor():
    """--bench times the adapter step against a full fine-tuning step of the same random-weight transformer and
    puts it next to its floor, one forward and backward of the adapted network; nothing is written."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert uf.train(uf.Config(bench=True, batch=4, out=out, device="cpu")) is None
        rows = common._bench_rows(printed.getvalue())
        assert [r[0] for r in rows] == ["flow matching (full fine-tune)", "undistill (lora)"], printed.getvalue()
        floor = [l for l in printed.getvalue().splitlines() if l.startswith("| undistill (lora) |") and l.count("|") == 6]
        assert len(floor) == 1 and "1 x forward+backward (" in floor[0] and float(floor[0].split("|")[3]) > 0, floor
        assert not os.path.exists(out) or not os.listdir(out), os.listdir(out)


def test_undistill_flux_toy_pipeline_torchrun_two_processes():
    """The embedded default end to end, shrunk (distillation, LoRA un-distillation, the table) under DDP."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        r = torchrun([os.path.join(HERE, "undistill_flux.py"), "--distill-steps", "8", "--distill-pool", "64", "--steps",
                      "6", "--batch", "16", "--eval-samples", "40", "--eval-steps", "2", "--eval-cfgs", "1,3",
                      "--log-every", "3", "--out", out], cwd=tmp)
        assert r.returncode == 0, r.stderr[-2000:]
        assert os.path.isfile(os.path.join(tmp, "runs", "cache", os.listdir(os.path.join(tmp, "runs", "cache"))[0]))
        rows = json.load(open(os.path.join(out, "metrics.json")))["results"]
        names = [(row["sampler"], row["nfe"]) for row in rows if "distilled" in row["sampler"]]
        assert names == [("distilled schnell-sampler", 4), ("distilled cfg=1", 2), ("distilled cfg=3", 2),
                         ("undistilled cfg=1", 2), ("undistilled cfg=3", 2)], names
        assert all(math.isfinite(row["swd"]) and 0 <= row["cond_acc"] <= 1 for row in rows)
        exact = [(row["sampler"], row["nfe"]) for row in rows if row["sampler"].startswith("exact")]
        assert exact == [(f"exact{kind} cfg={w}", 2) for kind in ("", " schnell") for w in (1, 3)], exact
        # every model and exact row is also scored against the exact guided law of its CFG scale
        assert all(math.isfinite(row["swd_target"]) for row in rows if "cfg=" in row["sampler"] or "schnell" in row["sampler"])
        steps = [json.loads(l)["step"] for l in open(os.path.join(out, "log.jsonl")) if "loss" in l]
        assert steps == [3, 6] and r.stdout.count("wrote ") == 1  # rank 0 alone logs and writes
        assert len(load_file(os.path.join(out, "adapter.safetensors"))) == 3 * 34  # A, B, alpha on each of the 34 linears


# ---------------------------------------------------------------------------------------------------
# scm.py

def scm_random_student(shape=(2,), classes=0, sigma_d=0.5, dropout=0.0, time_scale=1000.0, use_g=False, seed=0):
    """A TrigFlowStudent around a backbone with every weight drawn (zero-initialised gates would make dF/dt trivial)."""
    torch.manual_seed(seed)
    kwargs = {"heads": 2} if len(shape) == 3 else {}
    net = common.new_backbone(shape, classes, hidden=32, depth=2, norm="adn", dropout=dropout, time_scale=time_scale,
                              use_g=use_g, **kwargs)
    randomize(net)
    return scm.TrigFlowStudent(net, sigma_d)


def scm_trajectory(x0, z, t):
    """TrigFlow x_t = cos t x0 + sin t z and its time derivative along the same (x0, z)."""
    c, s = scm.bc(torch.cos(t), x0), scm.bc(torch.sin(t), x0)
    return c * x0 + s * z, c * z - s * x0


def test_scm_jvp_tangent_matches_float64_central_difference_with_shared_dropout_masks():
    """cos t sin t dF/dt by forward-mode AD equals a float64 central difference of F along the trajectory
    (x_t(t) / sigma_d, t), for both trunks; with dropout, the tangent pass and the gradient pass that
    follows it see the same masks; --jvp fd agrees with --jvp jvp."""
    for shape, classes in (((2,), 0), ((1, 8, 8), 3)):
        student = scm_random_student(shape, classes).double().eval()
        gen = torch.Generator().manual_seed(1)
        x0 = torch.randn(6, *shape, generator=gen, dtype=torch.float64)
        z = 0.5 * torch.randn(6, *shape, generator=gen, dtype=torch.float64)
        t = torch.tensor([0.02, 0.3, 0.7, 1.0, 1.3, 1.55], dtype=torch.float64)
        y = torch.randint(0, classes, (6,)) if classes else None
        x_t, dxdt = scm_trajectory(x0, z, t)
        cs_dF = scm.cos_sin_dF_dt(student, x_t / 0.5, t, dxdt, y, None, "jvp")
        h = 1e-6
        with torch.no_grad():
            F_at = lambda tt: student(scm_trajectory(x0, z, tt)[0] / 0.5, tt, y)
            fd = scm.bc(torch.cos(t) * torch.sin(t), x0) * (F_at(t + h) - F_at(t - h)) / (2 * h)
        err = float((cs_dF - fd).abs().max() / fd.abs().max())
        assert fd.abs().max() > 1e-2 and err < 1e-6, f"{shape}: JVP relative error {err}"
        # the finite-difference fallback on the float32 network (as in training) agrees with the JVP
        student32 = copy.deepcopy(student).float()
        args = (x_t.float() / 0.5, t.float(), dxdt.float(), y, None)
        jvp32, fd32 = scm.cos_sin_dF_dt(student32, *args, "jvp"), scm.cos_sin_dF_dt(student32, *args, "fd", fd_step=1e-4)
        err = float((jvp32 - fd32).abs().max() / jvp32.abs().max())
        assert err < 1e-3, f"{shape}: --jvp fd differs from --jvp jvp by {err}"
    # dropout: every evaluation of one step draws the masks the gradient pass will draw
    student = scm_random_student(dropout=0.5).double().train()
    x0, z = torch.randn(64, 2, dtype=torch.float64), 0.5 * torch.randn(64, 2, dtype=torch.float64)
    t = torch.rand(64, dtype=torch.float64)
    x_t, dxdt = scm_trajectory(x0, z, t)

    def F_seeded(tt):
        torch.manual_seed(7)
        return student(scm_trajectory(x0, z, tt)[0] / 0.5, tt)

    for method in ("jvp", "fd"):
        torch.manual_seed(7)
        cs_dF = scm.cos_sin_dF_dt(student, x_t / 0.5, t, dxdt, None, None, method, fd_step=1e-6)
        with torch.no_grad():
            F_grad_pass = student(x_t / 0.5, t)
            fd = scm.bc(torch.cos(t) * torch.sin(t), x0) * (F_seeded(t + 1e-6) - F_seeded(t - 1e-6)) / 2e-6
            assert torch.allclose(F_grad_pass, F_seeded(t), rtol=0, atol=1e-12), "the gradient pass drew other masks"
        err = float((cs_dF - fd).abs().max() / fd.abs().max())
        assert err < 1e-5, f"{method} with dropout: relative error {err} (different masks?)"


def test_scm_rearranged_tangent_equals_cos_t_times_df_dt():
    """Algorithm 1's g at r = 1 is cos(t) d/dt f(x_t, t) with f = cos t x_t - sin t sigma_d F (Eq. 5),
    differentiated independently (float64 central difference of f along the trajectory); warmup r < 1
    scales only the second term."""
    for sigma_d in (0.5, 1.3):
        student = scm_random_student(sigma_d=sigma_d, seed=2).double().eval()
        gen = torch.Generator().manual_seed(3)
        x0 = torch.randn(32, 2, generator=gen, dtype=torch.float64)
        z = sigma_d * torch.randn(32, 2, generator=gen, dtype=torch.float64)
        t = 0.02 + 1.5 * torch.rand(32, generator=gen, dtype=torch.float64)
        x_t, dxdt = scm_trajectory(x0, z, t)
        with torch.no_grad():
            F_minus = student(x_t / sigma_d, t)
            cs_dF = scm.cos_sin_dF_dt(student, x_t / sigma_d, t, dxdt, None, None)
            g = scm.consistency_tangent(F_minus, cs_dF, x_t, dxdt, t, 1.0, sigma_d)
            f_at = lambda tt: scm.consistency_fn(student, scm_trajectory(x0, z, tt)[0], tt)
            h = 1e-6
            df_dt = (f_at(t + h) - f_at(t - h)) / (2 * h)
            expected = scm.bc(torch.cos(t), x0) * df_dt
            assert float((g - expected).abs().max() / expected.abs().max()) < 1e-7
            g0 = scm.consistency_tangent(F_minus, cs_dF, x_t, dxdt, t, 0.0, sigma_d)
            g_half = scm.consistency_tangent(F_minus, cs_dF, x_t, dxdt, t, 0.5, sigma_d)
            c = scm.bc(torch.cos(t), x0)
            assert torch.allclose(g0, -c ** 2 * (sigma_d * F_minus - dxdt), atol=1e-12)
            assert torch.allclose(g_half, 0.5 * (g0 + g), atol=1e-10)
    # tangent normalisation: the full L2 norm per example (or RMS), g / (||g|| + c)
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(scm.normalize_tangent(g, 0.1), torch.tensor([[3 / 5.1, 4 / 5.1], [0.0, 0.0]]))
    assert torch.allclose(scm.normalize_tangent(g, 0.1, "rms")[0], g[0] / (5 / math.sqrt(2) + 0.1))


class ExactTrigFlowConsistency(torch.nn.Module):
    """For data N(mu, s0^2 I) the PF-ODE keeps xi = (x_t - cos t mu) / s(t), s(t)^2 = cos^2 t s0^2 + sin^2 t sigma_d^2,
    so the consistency function is f(x_t, t) = mu + s0 xi, and Eq. 5 gives F = (cos t x_t - f) / (sin t sigma_d)."""

    def __init__(self, mu, s0, sigma_d):
        super().__init__()
        self.mu, self.s0, self.sigma_d = mu, s0, sigma_d

    def spread(self, t):
        return torch.sqrt(torch.cos(t) ** 2 * self.s0 ** 2 + torch.sin(t) ** 2 * self.sigma_d ** 2)[:, None]

    def forward(self, x_scaled, t, y=None, g=None):
        x_t, c = self.sigma_d * x_scaled, torch.cos(t)[:, None]
        f = self.mu + self.s0 * (x_t - c * self.mu) / self.spread(t)
        return (c * x_t - f) / (torch.sin(t)[:, None] * self.sigma_d)


def test_scm_oracle_exact_consistency_function_has_zero_tangent():
    """sCD with the exact teacher of a single Gaussian: the TrigFlow velocity converted from the
    rectified-flow teacher equals the closed-form d/dt of the Gaussian PF-ODE, and the closed-form
    consistency function plugged in as F leaves g = 0 (a wrong one does not)."""
    mu, s0, sd = torch.tensor([[1.0, -0.5, 2.0]], dtype=torch.float64), 0.3, 0.5
    world = common.GaussianMixture([1.0], mu, [s0])
    gen = torch.Generator().manual_seed(0)
    x0 = mu + s0 * torch.randn(512, 3, generator=gen, dtype=torch.float64)
    z = sd * torch.randn(512, 3, generator=gen, dtype=torch.float64)
    t = torch.atan(torch.exp(-1.0 + 1.4 * torch.randn(512, generator=gen, dtype=torch.float64)) / sd)  # Alg. 1 proposal
    x_t = scm.bc(torch.cos(t), x0) * x0 + scm.bc(torch.sin(t), x0) * z
    exact = ExactTrigFlowConsistency(mu, s0, sd)
    # the conversion: the teacher's velocity in TrigFlow units = d/dt (cos t mu + s(t) xi) at fixed xi
    dxdt = scm.teacher_trigflow_velocity(world, x_t, t, None, 1.0, sd)
    s = exact.spread(t)
    xi = (x_t - torch.cos(t)[:, None] * mu) / s
    ds_dt = torch.sin(t)[:, None] * torch.cos(t)[:, None] * (sd ** 2 - s0 ** 2) / s
    assert (dxdt - (-torch.sin(t)[:, None] * mu + ds_dt * xi)).abs().max() < 1e-10
    # and the exact consistency function is consistent: g = 0 (relative to the size of its terms)
    F_minus = exact(x_t / sd, t)
    cs_dF = scm.cos_sin_dF_dt(exact, x_t / sd, t, dxdt, None, None)
    g = scm.consistency_tangent(F_minus, cs_dF, x_t, dxdt, t, 1.0, sd)
    first_term = (torch.cos(t)[:, None] ** 2 * (sd * F_minus - dxdt)).abs().max()
    assert first_term > 0.1 and g.abs().max() < 1e-9 * first_term, float(g.abs().max())
    for wrong in (ExactTrigFlowConsistency(mu + 0.1, s0, sd), ExactTrigFlowConsistency(mu, 1.2 * s0, sd)):
        g_wrong = scm.consistency_tangent(wrong(x_t / sd, t), scm.cos_sin_dF_dt(wrong, x_t / sd, t, dxdt, None, None),
                                          x_t, dxdt, t, 1.0, sd)
        assert g_wrong.pow(2).mean().sqrt() > 1e-3


def test_scm_trigflow_teacher_reproduces_the_rectified_flow_ode_solution():
    """Integrating the converted TrigFlow velocity from t = pi/2 (x = sigma_d eps) to 0 lands where
    integrating the rectified-flow teacher from r = 1 (x = eps) to 0 lands, with CFG (exact mixture
    teacher) and for a network teacher; for sigma_d != 1 as well."""
    world = small_labelled_world(dim=3)
    net = randomize(common.new_backbone((3,), world.num_classes, hidden=32, depth=2, time_scale=1.0)).double()  # smooth
    eps = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.arange(64) % world.num_classes
    for teacher, guidance in ((world, 2.0), (common.NetTeacher(net), 1.5)):
        rf, _ = common.reference_ode(teacher.velocity, eps, y, guidance)
        for sd in (0.5, 1.0):
            trig = lambda x, t, yy, cfg: scm.teacher_trigflow_velocity(teacher, x, t, yy, cfg, sd)
            x0, _ = common.reference_ode(trig, sd * eps, y, guidance, t_from=math.pi / 2, t_to=0.0)
            assert (x0 - rf).abs().max() < 1e-4 * rf.abs().max(), (sd, float((x0 - rf).abs().max()))
    # r(t) and the scale: r(pi/2) = 1 with x_r = x_t / sigma_d, r(0) = 0 with x_r = x_t
    r, scale = scm.rf_time_and_scale(torch.tensor([0.0, math.pi / 2], dtype=torch.float64), 0.5)
    assert torch.allclose(r, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(scale, torch.tensor([1.0, 0.5], dtype=torch.float64))


def trigflow_velocity_oracle(world, x_t, t, sigma_d):
    """E[dx_t/dt | x_t] for x_t = cos t x0 + sin t z, z ~ N(0, sigma_d^2 I), from first principles: dx_t/dt =
    cos t z - sin t x0, with E[x0 | x_t] from the exact mixture posterior (x_t / (cos t + sigma_d sin t) is the
    rectified-flow state at r = sigma_d sin t / (cos t + sigma_d sin t)) and E[z | x_t] = (x_t - cos t E[x0]) / sin t."""
    scale = torch.cos(t) + sigma_d * torch.sin(t)
    x0_mean = world.x0_mean(x_t / scm.bc(scale, x_t), sigma_d * torch.sin(t) / scale)
    z_mean = (x_t - scm.bc(torch.cos(t), x_t) * x0_mean) / scm.bc(torch.sin(t), x_t)
    return scm.bc(torch.cos(t), x_t) * z_mean - scm.bc(torch.sin(t), x_t) * x0_mean


class ExactVelocityBackbone(torch.nn.Module):
    """A 'backbone' N(x_r, r, y, g) that returns the mixture's exact rectified-flow velocity."""

    def __init__(self, world):
        super().__init__()
        self.world = world

    def forward(self, x, r, y=None, g=None):
        return self.world.velocity(x, r, y)


def image_mixture(seed=0):
    """Three Gaussians of unequal weights and widths on (2, 2, 2)-shaped samples (several pixels and channels)."""
    gen = torch.Generator().manual_seed(seed)
    return common.GaussianMixture([1.0, 2.0, 1.0], torch.randn(3, 8, generator=gen, dtype=torch.float64),
                                  [0.3, 0.2, 0.4], shape=(2, 2, 2))


def test_fit_steps_default_and_scms_closer_fit_on_vector_worlds():
    """The shared fit takes 1000 steps on vector worlds; sCM asks for --fit-steps (3000) on vector worlds only (on
    images it leaves the fit's own default), and the count is part of the cache key (a different count fits anew)."""
    assert inspect.signature(common.fit_to_world).parameters["steps"].default is None
    asked = []

    class Stop(Exception):
        pass

    def record(world, arch_kwargs=None, steps=None, **kw):
        asked.append((world.name, steps))
        raise Stop
    original, common.fit_to_world = common.fit_to_world, record
    try:
        for data, fit_steps in (("checkerboard", 3000), ("checkerboard", 7), ("glyphs16", 7)):
            with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(Stop):
                scm.train(scm.Config(data=data, fit_steps=fit_steps, out=os.path.join(tmp, "run"), device="cpu"))
        with contextlib.suppress(Stop):
            common.teacher_for(dmd2.Config(), common.DataSource("checkerboard"), "cpu", {"hidden": 16, "depth": 1})
    finally:
        common.fit_to_world = original
    assert asked == [("checkerboard", 3000), ("checkerboard", 7), ("glyphs16", None), ("checkerboard", None)], asked
    with tempfile.TemporaryDirectory() as tmp:  # the defaults themselves: 1000 steps of batch 512 on a vector world
        calls = []
        original_step = torch.optim.Adam.step
        torch.optim.Adam.step = lambda self, *a, **k: (calls.append(1), original_step(self, *a, **k))[1]
        try:
            common.fit_to_world(common.make_world("checkerboard"), {"hidden": 8, "depth": 1}, cache_dir=tmp)
        finally:
            torch.optim.Adam.step = original_step
        assert len(calls) == 1000, len(calls)
        assert len(os.listdir(tmp)) == 1
        common.fit_to_world(common.make_world("checkerboard"), {"hidden": 8, "depth": 1}, steps=3, cache_dir=tmp)
        assert len(os.listdir(tmp)) == 2


def test_scm_sigma_d_defaults_to_the_datas_own_std():
    """--sigma-d 0 (the default) takes the data's standard deviation, as the paper normalises data to sigma_d:
    a vector mixture world's RMS std per dimension (its exact total variance against 200k samples), the paper's
    0.5 for image-shaped data; the resolved value is what the run records."""
    for name in ("checkerboard", "spiral"):
        world = common.make_world(name)
        x = world.sample(200_000, generator=torch.Generator().manual_seed(0))[0].double()
        assert abs(world.total_variance() / float(x.var(0).sum()) - 1) < 0.01, name
        assert math.isclose(scm.data_sigma_d(common.DataSource(name, 32)), math.sqrt(float(x.var(0).mean())), rel_tol=0.01)
    assert scm.data_sigma_d(common.DataSource("glyphs16", 32)) == 0.5
    with tempfile.TemporaryDirectory() as tmp:
        full, quick = quick_teacher_fit(tmp)
        common.fit_to_world = quick
        try:
            scm.train(scm.Config(data="8gaussians", steps=2, batch=16, hidden=16, depth=1, eval_samples=50,
                                 out=os.path.join(tmp, "run"), device="cpu"))
        finally:
            common.fit_to_world = full
        recorded = torch.load(os.path.join(tmp, "run", "ckpt.pt"), weights_only=True)["config"]["sigma_d"]
        assert math.isclose(recorded, math.sqrt(common.make_world("8gaussians").total_variance() / 2))


def test_scm_student_wrapper_starts_as_the_teachers_trigflow_velocity():
    """F(x~, t) = ((sigma_d cos t - sin t) x~ + N(sigma_d x~ / scale, r)) / scale: with N the exact rectified-flow
    velocity, sigma_d F is the exact TrigFlow velocity E[dx_t/dt | x_t] (computed from first principles), and so is
    the converted teacher; for sigma_d = 0.5 and 1.3."""
    world = image_mixture()
    gen = torch.Generator().manual_seed(1)
    x0, _ = world.sample(64, generator=gen)
    t = torch.rand(64, generator=gen, dtype=torch.float64) * 1.5 + 0.03
    for sd in (0.5, 1.3):
        x_t = scm.bc(torch.cos(t), x0) * x0.double() + scm.bc(torch.sin(t), x0) * sd * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        oracle = trigflow_velocity_oracle(world, x_t, t, sd)
        student = scm.TrigFlowStudent(ExactVelocityBackbone(world), sd)
        assert (sd * student(x_t / sd, t) - oracle).abs().max() < 1e-9, sd
        assert (scm.teacher_trigflow_velocity(world, x_t, t, None, 1.0, sd) - oracle).abs().max() < 1e-9, sd


def test_scm_multistep_sampler_renoises_its_estimate_with_sigma_d_noise():
    """Between steps the sampler draws x = cos t x0_hat + sin t z with z ~ N(0, sigma_d^2 I) (§5.2). With F = 0,
    f(x, t) = cos t x; from eps = 0 the first step gives x0_hat = 0, so the output is cos t2 sin t2 sigma_d z:
    its spread pins the re-noising scale."""
    class ZeroStudent(torch.nn.Module):
        sigma_d = 0.5

        def forward(self, x, t, y=None, g=None):
            return torch.zeros_like(x)
    torch.manual_seed(0)
    t2 = 0.9
    out = scm.sample(ZeroStudent(), torch.zeros(20000, 2, 2), None, [1.4, t2])
    expected = math.cos(t2) * math.sin(t2) * 0.5
    assert abs(out.std().item() / expected - 1) < 0.03, (out.std().item(), expected)


def test_scm_loss_value_and_gradient_match_algorithm_1_computed_independently():
    """One scm_loss on an image-shaped mixture against Algorithm 1 written out here, for sCD (the exact teacher's
    TrigFlow velocity) and sCT (dx_t/dt = cos t z - sin t x0), at warmup r = 0.7: the proposal tan t = e^tau /
    sigma_d, z ~ N(0, sigma_d^2 I), the tangent g = -cos^2 t (sigma_d F^- - dx_t/dt) - r cos t sin t (x_t + sigma_d
    dF^-/dt) with dF^-/dt by a float64 central difference, g / (||g|| + c), the stop-gradient on F^- and the
    adaptive weight e^w mse - w. The loss's gradient must equal that of e^w.detach() (-2/D) <F, target> +
    e^w mean(target^2) - w."""
    world = image_mixture()
    torch.manual_seed(0)
    net = scm.TrigFlowStudent(randomize(common.new_backbone((2, 2, 2), 0, hidden=16, depth=1, time_scale=10.0)), 0.5)
    torch.nn.init.normal_(net.weight_head.weight, std=0.3)
    torch.nn.init.constant_(net.weight_head.bias, 0.2)
    params = list(net.parameters())
    x0, _ = world.sample(6, generator=torch.Generator().manual_seed(2))
    for mode in ("scd", "sct"):
        cfg = types.SimpleNamespace(sigma_d=0.5, p_mean=-1.0, p_std=1.4, mode=mode, guidance=1.0, jvp="jvp", fd_step=1e-4,
                                    tangent_c=0.1, tangent_norm="l2")
        torch.manual_seed(3)
        loss, _ = scm.scm_loss(net, world, x0, None, None, 0.7, cfg)
        grads = torch.autograd.grad(loss, params)
        torch.manual_seed(3)  # the same draws, in the order of Algorithm 1
        tau = cfg.p_mean + cfg.p_std * torch.randn(len(x0))
        z = cfg.sigma_d * torch.randn_like(x0)
        sd, t = cfg.sigma_d, torch.atan(torch.exp(tau) / cfg.sigma_d).double()
        cos, sin = scm.bc(torch.cos(t), x0), scm.bc(torch.sin(t), x0)
        x_t = cos * x0.double() + sin * z.double()
        dxdt = cos * z.double() - sin * x0.double() if mode == "sct" else trigflow_velocity_oracle(world, x_t, t, sd)
        net64, h = copy.deepcopy(net).double(), 1e-5
        with torch.no_grad():
            F_minus = net64(x_t / sd, t)
            dF_dt = (net64((x_t + h * dxdt) / sd, t + h) - net64((x_t - h * dxdt) / sd, t - h)) / (2 * h)
        g = -cos ** 2 * (sd * F_minus - dxdt) - 0.7 * cos * sin * (x_t + sd * dF_dt)
        target = (g / scm.bc(g.flatten(1).norm(dim=1) + cfg.tangent_c, g)).float()
        F, w = net(x_t.float() / sd, t.float(), return_weight=True)
        D = target[0].numel()
        mse = target.flatten(1).pow(2).mean(1)
        assert abs(loss.item() - (torch.exp(w) * mse - w).mean().item()) < 1e-4 * abs(loss.item()), mode
        surrogate = (torch.exp(w).detach() * (-2 / D) * (F * target).flatten(1).sum(1) + torch.exp(w) * mse - w).mean()
        for a, b in zip(grads, torch.autograd.grad(surrogate, params)):
            assert (a - b).abs().max() <= 2e-3 * b.abs().max() + 1e-7, (mode, float((a - b).abs().max()), float(b.abs().max()))


def scm_config(out, **kw):
    """A short run at the paper's sigma_d 0.5 and proposal (the 2D defaults differ: README, "sCM defaults")."""
    return scm.Config(**{"out": out, "hidden": 32, "depth": 2, "batch": 128, "steps": 80, "warmup": 20, "sigma_d": 0.5,
                         "p_mean": -1.0, "log_every": 20, "ckpt_every": 40, "eval_samples": 300, "device": "cpu", **kw})


def scm_consistency_residual(student, world, cfg, n=2000):
    """RMS of the un-normalised tangent g (r = 1, exact teacher velocity) on fixed noise: zero for the exact
    consistency function, the quantity both sCT and sCD drive down."""
    gen = torch.Generator().manual_seed(5)
    x0, _ = world.sample(n, generator=gen)
    z = cfg.sigma_d * torch.randn(x0.shape, generator=gen)
    t = torch.atan(torch.exp(cfg.p_mean + cfg.p_std * torch.randn(n, generator=gen)) / cfg.sigma_d)
    x_t = scm.bc(torch.cos(t), x0) * x0 + scm.bc(torch.sin(t), x0) * z
    with torch.no_grad():
        dxdt = scm.teacher_trigflow_velocity(world, x_t, t, None, 1.0, cfg.sigma_d)
        F_minus = student(x_t / cfg.sigma_d, t)
        cs_dF = scm.cos_sin_dF_dt(student, x_t / cfg.sigma_d, t, dxdt, None, None)
        return float(scm.consistency_tangent(F_minus, cs_dF, x_t, dxdt, t, 1.0, cfg.sigma_d).pow(2).mean().sqrt())


def test_scm_short_sct_and_scd_runs_lower_the_tangent_sample_and_resume_exactly():
    world = common.make_world("checkerboard")
    with tempfile.TemporaryDirectory() as tmp:
        full, common.fit_to_world = quick_teacher_fit(tmp)
        try:
            emas = {mode: scm.train(scm_config(os.path.join(tmp, mode), mode=mode)) for mode in ("scd", "sct")}
            teacher_net = common.fit_to_world(world, {"hidden": 32, "depth": 2, "norm": "adn",
                                                      "time_scale": scm_config("").time_scale})
            scm.train(scm_config(os.path.join(tmp, "half"), steps=40))  # 40 steps, then resume to 80
            scm.train(scm_config(os.path.join(tmp, "half"), resume=True))
        finally:
            common.fit_to_world = full
        half = torch.load(os.path.join(tmp, "half", "ckpt.pt"), weights_only=True)
        for mode in ("scd", "sct"):
            ckpt = torch.load(os.path.join(tmp, mode, "ckpt.pt"), weights_only=True)
            cfg = dataclasses.replace(scm_config("", mode=mode), sigma_d=ckpt["config"]["sigma_d"])  # the data's, resolved
            start = scm.TrigFlowStudent(common.build_backbone(ckpt["backbone"]), cfg.sigma_d)
            common.init_from_teacher(start.net, teacher_net)
            trained = copy.deepcopy(start)
            trained.load_state_dict(ckpt["model"])
            before, after = scm_consistency_residual(start, world, cfg), scm_consistency_residual(trained, world, cfg)
            assert after < 0.7 * before, (mode, before, after)
            log = [json.loads(line) for line in open(os.path.join(tmp, mode, "log.jsonl"))]
            assert [row["step"] for row in log] == [20, 40, 60, 80] and log[0]["r"] == 19 / 20 and log[-1]["r"] == 1.0
            x = scm.sample(emas[mode], torch.randn(500, 2), None, [math.atan(80 / cfg.sigma_d), 1.1])
            assert torch.isfinite(x).all() and x.abs().max() < 10
            rows = json.load(open(os.path.join(tmp, mode, "metrics.json")))["results"]
            student = [r for r in rows if r["sampler"] == "student"]
            assert [r["nfe"] for r in student] == [1, 2] and "ode_err" in student[0] and "ode_err" not in student[1]
            assert all(math.isfinite(r["swd"]) for r in student)
            if mode == "scd":  # resume: 40 steps, then 40 more, equals 80 straight
                for name in ("model", "ema", "opt"):
                    a, b = (ckpt[name]["state"], half[name]["state"]) if name == "opt" else (ckpt[name], half[name])
                    for k, v in a.items():
                        if isinstance(v, dict):
                            assert all(torch.equal(v[j], b[k][j]) for j in v), f"resume differs in {name}.{k}"
                        else:
                            assert torch.equal(v, b[k]), f"resume differs in {name}.{k}"
        # bad flags: one line, before anything is written
        for bad in ({"mode": "ect"}, {"mid_times": "1.6"}, {"mode": "sct", "guidance": 2.0}, {"guidance_range": "2"}):
            try:
                scm.check_config(scm_config(os.path.join(tmp, "bad"), **bad), 1)
                raise AssertionError(f"accepted {bad}")
            except SystemExit as e:
                assert e.code != 0
        assert not os.path.exists(os.path.join(tmp, "bad"))


def test_scm_torchrun_two_processes_learned_teacher_with_drawn_guidance():
    """DDP smoke run: class-conditional mixture, learned teacher checkpoint, CFG scale drawn per example
    and fed to the student, 2-step sampler; rank 0 alone logs and writes."""
    with tempfile.TemporaryDirectory() as tmp:
        labelled_mixture_and_teacher(tmp, norm="adn")
        out = os.path.join(tmp, "run")
        r = torchrun(["scm.py", "--data", os.path.join(tmp, "mix.npz"), "--teacher", os.path.join(tmp, "teacher.pt"),
                      "--steps", "20", "--batch", "64", "--eval-samples", "300", "--guidance", "2",
                      "--guidance-range", "1,3", "--out", out, "--log-every", "10"])
        assert r.returncode == 0, r.stderr[-2000:]
        metrics = json.load(open(os.path.join(out, "metrics.json")))
        assert metrics["steps"] == 20 and metrics["guidance"] == 2 and metrics["teacher"] == "learned"
        student = [row for row in metrics["results"] if row["sampler"] == "student"]
        assert [row["nfe"] for row in student] == [1, 2]
        assert all("cond_acc" in row and math.isfinite(row["swd"]) for row in student)
        assert len(open(os.path.join(out, "log.jsonl")).read().splitlines()) == 2  # rank 0 alone logs
        assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl", "metrics.json", "samples.png"]
        ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
        assert len(ckpt["rng"]) == 2 and any(k.startswith("net.g_embed") for k in ckpt["model"])


# ---------------------------------------------------------------------------------------------------
# runner

# ---------------------------------------------------------------------------------------------------
# Image worlds: the image recipe, and any image-shaped mixture through every method

def rgb_mixture(path, size=16, per_class=3, class_weights=(0.5, 0.3, 0.2), seed=0):
    """A class-conditional RGB mixture saved as an .npz with shape (3, size, size) and unequal class weights:
    class c draws bars of its own colour (red, green, blue) at random places, on a dark background."""
    rng = np.random.default_rng(seed)
    means, weights, labels = [], [], []
    for c, wc in enumerate(class_weights):
        for _ in range(per_class):
            img = np.full((3, size, size), -0.8)
            top, left = rng.integers(0, size // 2, 2)
            img[c, top:top + size // 2, left:left + 3] = 0.9
            means.append(img.reshape(-1))
            weights.append(wc / per_class)
            labels.append(c)
    np.savez(path, weights=weights, means=np.array(means), stds=np.full(len(means), 0.05), labels=labels,
             shape=[3, size, size])
    return path


METHODS = {"scm": scm, "dmd2": dmd2, "freeflow": freeflow, "piflow": piflow}


def test_image_recipe_applies_on_image_worlds_only_and_given_flags_win():
    with tempfile.TemporaryDirectory() as tmp:
        rgb = rgb_mixture(os.path.join(tmp, "rgb.npz"))
        for name, module in METHODS.items():
            recipe = module.Config.IMAGE_RECIPE
            assert recipe and set(recipe) <= {f.name for f in dataclasses.fields(module.Config)}, name
            plain = common.parse_config(module.Config, [])
            for data in ("glyphs16", rgb):
                cfg = common.parse_config(module.Config, ["--data", data])
                for k, v in recipe.items():
                    assert getattr(cfg, k) == v, (name, data, k)
            assert common.parse_config(module.Config, ["--data", "spiral"]) == dataclasses.replace(plain, data="spiral")
            key = next(iter(recipe))  # a flag given on the command line beats the recipe
            value = {int: 7, float: 0.125, str: "mlp", bool: not recipe[key]}[type(recipe[key])]
            flag = ("--" if value is not False else "--no-") + key.replace("_", "-")
            cfg = common.parse_config(module.Config, ["--data", "glyphs16", flag] + ([] if isinstance(value, bool) else [str(value)]))
            assert getattr(cfg, key) == value, (name, key)


def test_every_method_runs_its_image_recipe_on_an_rgb_mixture_with_unequal_class_weights():
    with tempfile.TemporaryDirectory() as tmp:
        rgb = rgb_mixture(os.path.join(tmp, "rgb.npz"))
        world = common.make_world(rgb)
        assert world.shape == (3, 16, 16) and world.num_classes == 3 and not torch.allclose(world.weights, world.weights[0])
        asked_lrs = []
        full, common.fit_to_world = quick_teacher_fit(tmp, asked_lrs)
        try:
            for name, module in METHODS.items():
                out = os.path.join(tmp, name)
                # the recipe, cut to a few steps on a narrow network (the budget, not the recipe, is under test)
                cfg = common.parse_config(module.Config, ["--data", rgb, "--out", out, "--steps", "3", "--batch", "8",
                                                          "--hidden", "32", "--depth", "1", "--eval-samples", "60"])
                assert cfg.arch == module.Config.IMAGE_RECIPE["arch"]
                module.train(cfg)
                m = json.load(open(os.path.join(out, "metrics.json")))
                rows = {(r["sampler"], r["nfe"]) for r in m["results"]}
                assert {("teacher_net", n) for n in common.TEACHER_NFES} <= rows, (name, rows)
                assert any(r["sampler"] == "student" for r in m["results"]), name
                for r in m["results"]:
                    assert all(math.isfinite(r[k]) for k in ("swd", "mode_tv", "nll", "cond_acc")), (name, r)
                assert m["guidance"] == cfg.guidance
                assert Image.open(os.path.join(out, "samples.png")).mode == "RGB"
                # sCM's adaptive-double-norm network fits at 1e-3 (2e-3 blurred it); the others take the default
                assert asked_lrs.pop() == (1e-3 if name == "scm" else None), name
        finally:
            common.fit_to_world = full


def test_claims_table_averages_freeflows_correction_check_over_the_seeds():
    with tempfile.TemporaryDirectory() as tmp:
        for seed, scale in ((0, 1.0), (1, 3.0)):
            run_dir = os.path.join(tmp, "freeflow", "both", f"seed{seed}")
            os.makedirs(run_dir)
            check = [{"r": r, "teacher_err_student": scale * r, "teacher_err_data": 0.5, "correction": 0.25,
                      "exact_correction": 2 * r, "cosine": 0.1 * scale} for r in (0.1, 0.5)]
            common.write_json(os.path.join(run_dir, "metrics.json"), {"results": [
                {"sampler": "student", "nfe": 1, "mmd": scale}], "correction_check": check})
        table = common.claims_table(tmp, [("freeflow", "both")], [0, 1])
        assert "| both | 0,1 | 0.1 | 0.2000 | 0.5000 | 0.2500 | 0.2000 | 0.2000 |" in table, table
        assert "| both | 0,1 | 0.5 | 1.0000 | 0.5000 | 0.2500 | 1.0000 | 0.2000 |" in table, table
        os.remove(os.path.join(tmp, "freeflow", "both", "seed1", "metrics.json"))  # one seed only: its own numbers
        assert "| both | 0 | 0.5 | 0.5000 |" in common.claims_table(tmp, [("freeflow", "both")], [0, 1])


def test_claims_run_each_variant_and_seed_once_and_table_the_mean_and_half_range():
    with tempfile.TemporaryDirectory() as tmp:
        rgb, out = rgb_mixture(os.path.join(tmp, "rgb.npz")), os.path.join(tmp, "claims")
        args = [sys.executable, "common.py", "claims", "--data", rgb, "--train-size", "40", "--teacher-steps", "3",
                "--methods", "dmd2", "--variants", "dmd2:gan_ttur5,dmd2:no_gan", "--seeds", "0,1", "--student-steps", "2",
                "--eval-samples", "60", "--out", out]
        r = run(args)
        assert r.returncode == 0, r.stderr[-2000:]
        assert common.load_checkpoint(os.path.join(out, "teacher", "ckpt.pt"))["config"]["train_size"] == 40
        table = open(os.path.join(out, "claims.md")).read()
        assert "ttur1" not in table
        for variant in ("gan_ttur5", "no_gan"):
            ms = [json.load(open(os.path.join(out, "dmd2", variant, f"seed{s}", "metrics.json"))) for s in (0, 1)]
            assert all(m["wall_seconds"] > 0 for m in ms)
            student = [next(r for r in m["results"] if r["sampler"] == "student" and r["nfe"] == 1) for m in ms]
            assert student[0]["mmd"] != student[1]["mmd"]  # two seeds, two students
            mean, half = (student[0]["nll"] + student[1]["nll"]) / 2, abs(student[0]["nll"] - student[1]["nll"]) / 2
            line = next(l for l in table.splitlines() if l.startswith(f"| dmd2 | {variant} | student | 1 | 0,1 |"))
            assert line.split("|")[10].strip() == f"{mean:.4f} ± {half:.4f}", line
            teacher32 = next(r for r in ms[0]["results"] if r["sampler"] == "teacher" and r["nfe"] == 32)
            line = next(l for l in table.splitlines() if l.startswith(f"| dmd2 | {variant} | teacher | 32 |"))
            assert line.split("|")[10].strip() == f"{teacher32['nll']:.4f}", line
            assert (f"| dmd2 | {variant} | critic accuracy" in table) == (variant == "gan_ttur5")
        # a second call finds every run finished: it starts nothing and writes the same table
        again = run(args)
        assert again.returncode == 0 and "--seed" not in again.stdout and open(os.path.join(out, "claims.md")).read() == table
        for bad, word in ((["--methods", "foo"], "--methods"), (["--variants", "dmd2:nope"], "--variants"),
                          (["--data", "checkerboard"], "--data")):
            r = run([sys.executable, "common.py", "claims", "--out", os.path.join(tmp, "bad")] + bad)
            assert r.returncode != 0 and word in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert not os.path.exists(os.path.join(tmp, "bad"))


def test_image_fits_default_to_lr_2e3_and_vector_fits_to_1e3():
    # on glyphs16 the recipe's MLP at 2e-3 drew 32-step Euler nll -0.82 against -0.07 at 1e-3
    adam, lrs = torch.optim.Adam, []

    def recording_adam(params, lr, **kw):
        lrs.append(lr)
        return adam(params, lr=lr, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        image_world = common.make_world(rgb_mixture(os.path.join(tmp, "rgb.npz")))
        torch.optim.Adam = recording_adam
        try:
            common.fit_to_world(image_world, {"arch": "mlp", "hidden": 8, "depth": 1}, steps=1, cache_dir=tmp)
            common.fit_to_world(common.make_world("checkerboard"), {"hidden": 8, "depth": 1}, steps=1, cache_dir=tmp)
            common.fit_to_world(image_world, {"arch": "mlp", "hidden": 8, "depth": 1}, steps=1, lr=1e-3, cache_dir=tmp)
        finally:
            torch.optim.Adam = adam
    assert lrs == [2e-3, 1e-3, 1e-3], lrs


def run_one(name):
    """Run one test in this process: (name, passed, seconds, traceback text)."""
    t0 = time.time()
    try:
        globals()[name]()
        return name, True, time.time() - t0, ""
    except BaseException as e:  # SystemExit from common.fail counts as a failure too
        if isinstance(e, KeyboardInterrupt):
            raise
        return name, False, time.time() - t0, traceback.format_exc()


def run_lane(names, results):
    torch.set_num_threads(1)
    for name in names:
        results.put(run_one(name))


def lane_results(reports, lanes, names):
    """Yield each test's result as a lane reports it; a lane that dies (a crash in C code) fails what it had left."""
    left = set(names)
    while left:
        try:
            result = reports.get(timeout=5)
        except queue.Empty:
            if any(lane.is_alive() for lane in lanes):
                continue
            for name in sorted(left):
                yield name, False, 0.0, "its test process died"
            return
        left.discard(result[0])
        yield result


def main(argv):
    """Two lanes side by side, one thread each: the tests that launch torchrun (two processes, both cores: one
    launch at a time) and the rest. --serial runs every test in this process, one after another."""
    serial = "--serial" in argv
    args = [a for a in argv[1:] if a != "--serial"]
    pattern = args[0] if args else ""
    names = [name for name, fn in globals().items() if name.startswith("test_") and callable(fn) and pattern in name]
    passed, failed, start = 0, [], time.time()
    if serial or len(names) < 2:
        lanes, results = [], map(run_one, names)
    else:
        context = multiprocessing.get_context("spawn")
        launches = [n for n in names if re.search(r"torchrun\(|nproc=2", inspect.getsource(globals()[n]))]
        results = context.Queue()
        lanes = [context.Process(target=run_lane, args=(lane, results)) for lane in
                 (launches, [n for n in names if n not in launches]) if lane]
        for lane in lanes:
            lane.start()
        results = lane_results(results, lanes, names)
    for name, ok, seconds, trace in results:
        passed += ok
        failed += [] if ok else [name]
        print(f"{'PASS' if ok else 'FAIL'} {name} ({seconds:.1f} s)" + ("" if ok else f"\n{trace}"), flush=True)
    for lane in lanes:
        lane.join()
    print(f"{passed} passed, {len(failed)} failed in {time.time() - start:.0f} s" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
