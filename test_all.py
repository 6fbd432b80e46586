"""
All tests. `python test_all.py` runs them (prints `N passed, N failed`, exits non-zero on failure);
`python test_all.py mixture` runs those whose name contains "mixture"; pytest collects the same tests.
CPU only, a few minutes on 2 cores.
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

import common

HERE = os.path.dirname(os.path.abspath(__file__))


def run(args, **kwargs):
    """Run a command in the repository folder; returns the CompletedProcess (output captured)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
    return subprocess.run(args, cwd=kwargs.pop("cwd", HERE), env=env, capture_output=True, text=True, timeout=600, **kwargs)


def torchrun(script_args, nproc=2):
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script_args])


def small_labelled_world(dim=5, k=6, seed=0):
    rng = np.random.default_rng(seed)
    return common.GaussianMixture(rng.uniform(0.5, 1.5, k), rng.normal(size=(k, dim)), rng.uniform(0.2, 0.6, k),
                                  labels=np.arange(k) % 3)


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


# ---------------------------------------------------------------------------------------------------
# common.py: backbones

def jvp_vs_central_difference(net, x, t, y, s=None, g=None):
    net = net.double().eval()
    x, t = x.double(), t.double()
    vx, vt = torch.randn_like(x), torch.rand_like(t)
    f = lambda xx, tt: net(xx, tt, y, s, g)
    with torch.no_grad():
        _, tangent = torch.func.jvp(f, (x, t), (vx, vt))
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
        err = jvp_vs_central_difference(dit, torch.randn(4, 1, 8, 8), torch.rand(4), torch.randint(0, 4, (4,)))
        assert err < 1e-6, f"DiT ({norm}) JVP relative error {err}"


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
    mlp = common.new_backbone((2,), 0, hidden=16, depth=2)
    out, feats = mlp(torch.randn(5, 2), torch.rand(5), return_features=True)
    assert out.shape == (5, 2) and feats.shape == (5, 16)


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
        for data in ("checkerboard", "glyphs16"):
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
        r = run([sys.executable, "common.py", "teacher", "--steps", "2", "--hidden", "16", "--eval-samples", "100", "--out", out])
        assert r.returncode == 0, r.stderr[-1000:]
        r = run([sys.executable, "common.py", "teacher", "--steps", "4", "--hidden", "32", "--out", out, "--resume"])
        assert r.returncode != 0 and "another config" in r.stderr and "hidden" in r.stderr and "Traceback" not in r.stderr
        r = run([sys.executable, "common.py", "teacher", "--steps", "4", "--out", os.path.join(tmp, "none"), "--resume"])
        assert r.returncode != 0 and "not found" in r.stderr


# ---------------------------------------------------------------------------------------------------
# runner

def main(argv):
    pattern = argv[1] if len(argv) > 1 else ""
    tests = [(name, fn) for name, fn in globals().items() if name.startswith("test_") and callable(fn) and pattern in name]
    passed, failed, start = 0, [], time.time()
    for name, fn in tests:
        t0 = time.time()
        try:
            fn()
            passed += 1
            print(f"PASS {name} ({time.time() - t0:.1f} s)", flush=True)
        except BaseException as e:  # SystemExit from common.fail counts as a failure too
            if isinstance(e, KeyboardInterrupt):
                raise
            failed.append(name)
            print(f"FAIL {name} ({time.time() - t0:.1f} s)\n{traceback.format_exc()}", flush=True)
    print(f"{passed} passed, {len(failed)} failed in {time.time() - start:.0f} s" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
