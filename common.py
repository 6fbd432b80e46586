"""
Shared pieces of the few-step distillation files: distributed setup, Config -> CLI, data (the exact
Gaussian-mixture worlds, image folders, .npz arrays, CIFAR-10), the two backbones, the teacher
interface, the flow-matching teacher trainer, training utilities, pictures and toy metrics.

One time convention everywhere (rectified flow, as FLUX / SD3 / pi-Flow):
    x_t = (1 - t) * x0 + t * eps,  t in [0, 1],  t = 1 is pure noise,
    u = eps - x0 (velocity),  dx/dt = u,  sampling integrates t from 1 down to 0,
    x0_hat = x_t - t * u,  eps_hat = x_t + (1 - t) * u.

Train a flow-matching teacher (the learned counterpart of the analytic mixture teacher):
    python common.py teacher                                  # 2D checkerboard, ~1 min on a laptop CPU
    python common.py teacher --data glyphs16 --steps 4000
    python common.py teacher --data /datasets/cifar10 --image-size 32 --steps 400000 --batch 512
    torchrun --standalone --nproc_per_node=8 common.py teacher --data /datasets/cifar10 ...

Measure the methods:
    python common.py compare       # every method's defaults on checkerboard and glyphs16, one table and picture
    python common.py claims        # the papers' ablations, distilled from a teacher trained on 4000 glyphs16 samples
"""
import argparse
import atexit
import contextlib
import copy
import dataclasses
import gc
import hashlib
import json
import math
import os
import pickle
import random
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm


def fail(message):
    """Stop with a one-line error (non-zero exit, no traceback): the message says what to do."""
    raise SystemExit(f"error: {message}")


# ---------------------------------------------------------------------------------------------------
# Distributed: torchrun (RANK / LOCAL_RANK / WORLD_SIZE) or one plain process

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    seed: int = 0


DIST = Dist()  # filled in by setup_dist; read by the helpers below


def setup_dist(device="auto", seed=0):
    """Initialise torch.distributed when launched by torchrun; choose the device; seed per rank."""
    global DIST
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # DDP wrappers outlive train() through reference cycles; left to the interpreter's final teardown,
        # their process-group state can abort a finished run (SIGABRT). Free them while Python is alive.
        atexit.register(gc.collect)
    DIST = Dist(rank, local_rank, world, device, seed)
    seed_all(seed + rank)  # different noise per rank, reproducible per (seed, rank)
    return DIST


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def is_main():
    return DIST.rank == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def reduce_mean(scalars):
    """All-reduced mean over ranks of a dict of floats (for logging)."""
    if not dist.is_initialized():
        return {k: float(v) for k, v in scalars.items()}
    keys = sorted(scalars)
    t = torch.tensor([float(scalars[k]) for k in keys], dtype=torch.float64, device=DIST.device)
    dist.all_reduce(t)
    return {k: v / DIST.world for k, v in zip(keys, t.tolist())}


def broadcast_int(value):
    """Rank 0's integer, on every rank (e.g. one backward-simulation depth shared by all ranks)."""
    if not dist.is_initialized():
        return int(value)
    t = torch.tensor([int(value)], device=DIST.device)
    dist.broadcast(t, 0)
    return int(t.item())


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model):
    """DDP for a trainable network when world > 1 (no device_ids on CPU)."""
    if DIST.world == 1:
        return model
    ids = [DIST.device.index] if DIST.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


@torch.no_grad()
def broadcast_module(module):
    """Give every rank rank 0's parameters and buffers (for networks built outside build_backbone with
    per-rank random state, e.g. small heads, before they are copied or wrapped)."""
    if dist.is_initialized():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, 0)
    return module


def unwrap(model):
    """The plain module: torch.func.jvp and checkpoints use it, never the DDP wrapper."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------------
# Config -> CLI: every dataclass field becomes --field-name value (bools: --flag / --no-flag)

def parse_config(config_cls, argv=None):
    """Flags -> Config. A Config may carry IMAGE_RECIPE, a dict of field values that replace the defaults
    when --data is an image-shaped mixture world (C, H, W); flags given on the command line still win."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=True)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        # SUPPRESS: only the flags actually given appear in args, so the recipe knows what not to touch
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"(default: {f.default})")
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            parser.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=f"(default: {f.default})")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        valid = " ".join("--" + f.name.replace("_", "-") for f in dataclasses.fields(config_cls))
        fail(f"unknown argument(s) {' '.join(unknown)}; valid flags are: {valid}")
    given = vars(args)
    cfg = config_cls(**given)
    recipe = getattr(config_cls, "IMAGE_RECIPE", None)
    if recipe and is_image_world(cfg.data):
        cfg = dataclasses.replace(cfg, **{k: v for k, v in recipe.items() if k not in given})
    check_ranges(cfg)
    return cfg


# Ranges of the fields several Configs share, checked by parse_config: a bad value stops before anything runs.
_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_POSITIVE = (lambda v: v > 0, "positive")
_NOT_NEGATIVE = (lambda v: v >= 0, "0 or more")
FIELD_RANGES = {
    **dict.fromkeys(["steps", "batch", "log_every", "ckpt_every", "eval_samples", "fid_samples", "bench_batch",
                     "distill_steps", "distill_batch", "fit_steps"], _AT_LEAST_1),
    **dict.fromkeys(["lr", "fake_lr", "distill_lr"], _POSITIVE),
    **dict.fromkeys(["warmup", "lr_warmup", "ema_start", "grad_clip", "weight_decay"], _NOT_NEGATIVE),
    "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def check_ranges(cfg):
    for name, (ok, rule) in FIELD_RANGES.items():
        value = getattr(cfg, name, None)
        if value is not None and not ok(value):  # NaN fails every rule
            fail(f"--{name.replace('_', '-')} {value} must be {rule}")
    device = str(getattr(cfg, "device", "auto"))
    if device != "auto":
        try:
            kind = torch.device(device).type
        except RuntimeError:
            fail(f"--device {device} is not a device; use auto, cpu, cuda or cuda:N")
        if kind == "cuda" and not torch.cuda.is_available():
            fail(f"--device {device}, but this machine has no CUDA device; use --device cpu (or auto)")


def floats(text):
    """'1,0.75,0.5' -> [1.0, 0.75, 0.5] (lists of times are plain strings in a Config)."""
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        fail(f"expected a comma-separated list of numbers, got {text!r}")


# ---------------------------------------------------------------------------------------------------
# The Gaussian-mixture world: x0 ~ sum_k w_k N(mu_k, s_k^2 I). Every quantity of the rectified-flow
# path is closed form, so the world is also the exact (analytic) teacher.
#   x_t | k ~ N((1 - t) mu_k, v_k(t) I),  v_k(t) = (1 - t)^2 s_k^2 + t^2
#   E[x0 | x_t, k]  = mu_k + (1 - t) s_k^2 / v_k * (x_t - (1 - t) mu_k)
#   E[eps | x_t, k] = t / v_k * (x_t - (1 - t) mu_k)
#   u = sum_k r_k (E[eps | x_t, k] - E[x0 | x_t, k]),  r_k = responsibilities at (x_t, t)

class GaussianMixture:
    def __init__(self, weights, means, stds, labels=None, shape=None, name="mixture"):
        self.weights = torch.as_tensor(np.asarray(weights), dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(np.asarray(means), dtype=torch.float64).reshape(len(self.weights), -1)
        self.stds = torch.as_tensor(np.asarray(stds), dtype=torch.float64).reshape(-1).expand(len(self.weights)).clone()
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.num_classes = 0 if self.labels is None else int(self.labels.max()) + 1
        self.dim = self.means.shape[1]
        self.shape = tuple(int(s) for s in shape) if shape is not None else (self.dim,)
        self.name = name
        self._cache = {}
        if math.prod(self.shape) != self.dim:
            fail(f"mixture shape {self.shape} does not match mean dimension {self.dim}")

    def _params(self, ref):
        key = (ref.dtype, ref.device)
        if key not in self._cache:
            p = [self.weights.log(), self.means, self.stds]
            p = [a.to(device=ref.device, dtype=ref.dtype) for a in p]
            p.append((p[1] ** 2).sum(1))  # |mu_k|^2 for distances by matmul
            p.append(None if self.labels is None else self.labels.to(ref.device))
            self._cache[key] = p
        return self._cache[key]

    def sample(self, n, y=None, generator=None, device="cpu"):
        """n samples (shaped like the data) and their class labels (None for unconditional worlds)."""
        if y is not None and self.labels is not None:
            comp = torch.empty(n, dtype=torch.long)
            for c in range(self.num_classes):  # draw the component within each requested class
                rows = (y.cpu() == c).nonzero().flatten()
                w = self.weights * (self.labels == c)
                comp[rows] = torch.multinomial(w, len(rows), replacement=True, generator=generator) if len(rows) else comp[rows]
        else:
            comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[comp] + self.stds[comp, None] * noise
        labels = None if self.labels is None else self.labels[comp]
        x = x.float().reshape(n, *self.shape).to(device)
        return x, (None if labels is None else labels.to(device))

    def _log_gauss_t(self, x, t):
        """log N(x; (1 - t) mu_k, v_k(t) I) for every component: (B, K). t has shape (B,)."""
        logw, mu, s, mu2, _ = self._params(x)
        x = x.reshape(len(x), -1)
        a = (1 - t)[:, None]
        var = a ** 2 * s[None] ** 2 + t[:, None] ** 2
        dist2 = (x ** 2).sum(1, keepdim=True) - 2 * a * (x @ mu.T) + a ** 2 * mu2[None]
        return -0.5 * dist2.clamp_min(0) / var - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def _logits(self, x, t, y):
        """Log joint of component and x_t, with components of other classes masked when y is given.
        y == num_classes (the null label) or y None means unconditional."""
        logw = self._params(x)[0]
        return self._keep_class(logw[None] + self._log_gauss_t(x, t), y)

    def _keep_class(self, logits, y):
        labels = self._params(logits)[4]
        if y is None or labels is None:
            return logits
        keep = (labels[None] == y[:, None]) | (y[:, None] == self.num_classes)
        return logits.masked_fill(~keep, -float("inf"))

    def _t(self, t, x):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        return t.expand(len(x)) if t.ndim == 0 else t.reshape(len(x))

    def log_prob_t(self, x, t, y=None):
        """log p_t(x) (or log p_t(x | y)), closed form."""
        return torch.logsumexp(self._logits(x, self._t(t, x), y), 1)

    def log_prob(self, x, y=None):
        """log p0(x): the data density."""
        return self.log_prob_t(x, 0.0, y)

    def posterior(self, x, t, y=None):
        return torch.softmax(self._logits(x, self._t(t, x), y), 1)

    def _velocity_of(self, x, t, r):
        """u = sum_k r_k [coef_k (x - a mu_k) - mu_k] for component responsibilities r (B, K); linear in r."""
        _, mu, s, _, _ = self._params(x)
        a = (1 - t)[:, None]
        var = a ** 2 * s[None] ** 2 + t[:, None] ** 2
        coef = (t[:, None] - a * s[None] ** 2) / var
        flat = x.reshape(len(x), -1)
        u = (r * coef).sum(1, keepdim=True) * flat - (r * (coef * a + 1)) @ mu
        return u.reshape(x.shape)

    def velocity(self, x, t, y=None, cfg=1.0, interval=None):
        """The teacher interface: exact velocity, CFG u_unc + cfg (u_cond - u_unc), optionally only for
        t inside interval = (t_lo, t_hi) (guidance interval; cfg 1 outside)."""
        t = self._t(t, x)
        if y is None or self.labels is None:
            return self._velocity_of(x, t, self.posterior(x, t))
        cfg = torch.as_tensor(cfg, dtype=x.dtype, device=x.device).expand(len(x))
        if interval is not None:
            cfg = torch.where((t >= interval[0]) & (t <= interval[1]), cfg, torch.ones_like(cfg))
        joint = self._logits(x, t, None)  # one distance computation serves both posteriors
        r_cond = torch.softmax(self._keep_class(joint, y), 1)
        if bool((cfg == 1).all()):
            return self._velocity_of(x, t, r_cond)
        u_cond, u_unc = self._velocity_of(x, t, r_cond), self._velocity_of(x, t, torch.softmax(joint, 1))
        return u_unc + cfg.view(-1, *[1] * (x.ndim - 1)) * (u_cond - u_unc)

    def x0_mean(self, x, t, y=None):
        """E[x0 | x_t] (conditional on y when given)."""
        t = self._t(t, x)
        return x - t.view(-1, *[1] * (x.ndim - 1)) * self._velocity_of(x, t, self.posterior(x, t, y))

    def nearest_component(self, x):
        """Most likely component of each clean sample (for mode coverage and class accuracy)."""
        return self._logits(x, self._t(0.0, x), None).argmax(1)

    # Exact expectations under the law, for the distances of the Toy metrics section. A Gaussian kernel
    # k_h(a, b) = exp(-|a - b|^2 / (2 h2)) convolved with N(mu, s^2 I) stays a Gaussian in closed form, in any D:
    #   E_{b ~ N(mu, s^2 I)} k_h(a, b) = (h2 / (h2 + s^2))^(D/2) exp(-|a - mu|^2 / (2 (h2 + s^2))).

    def kernel_bandwidths(self):
        """Squared bandwidths h2 set by the world's own scales: one mode's width (h2 = D s^2 / 2, where the kernel
        distance is most sensitive to a mode's spread), the distance between neighbouring modes (median over
        modes), and the spread of the whole data (its total variance)."""
        s2 = float(self.stds.pow(2).median())
        h2 = [self.dim * s2 / 2]
        if len(self.weights) > 1:
            d2 = torch.cdist(self.means, self.means).pow(2).fill_diagonal_(float("inf"))
            h2.append(float(d2.min(1).values.median()))
        h2.append(self.total_variance())
        return h2

    def total_variance(self):
        """E |x - E x|^2 over all dimensions: the spread between the means plus each component's own."""
        mean = self.weights @ self.means
        return float(self.weights @ ((self.means - mean).pow(2).sum(1) + self.dim * self.stds.pow(2)))

    def kernel_mean(self, x, h2):
        """E_{b ~ p0} k_h(x_i, b) for each row of x (B, D), float64: a logsumexp over components."""
        logw, mu, s, mu2, _ = self._params(x)
        dist2 = ((x ** 2).sum(1, keepdim=True) - 2 * x @ mu.T + mu2[None]).clamp_min(0)
        v = h2 + s ** 2
        return torch.logsumexp(logw + 0.5 * self.dim * torch.log(h2 / v) - dist2 / (2 * v), 1).exp()

    def kernel_self(self, h2, chunk=1024):
        """E_{a, b ~ p0 independent} k_h(a, b): every pair of components, the two variances add."""
        logw, s, total = self.weights.log(), self.stds, []
        for i in range(0, len(logw), chunk):
            v = h2 + s[i:i + chunk, None] ** 2 + s[None] ** 2
            dist2 = torch.cdist(self.means[i:i + chunk], self.means).pow(2)
            total.append(torch.logsumexp((logw[i:i + chunk, None] + logw[None] + 0.5 * self.dim * torch.log(h2 / v)
                                          - dist2 / (2 * v)).reshape(-1), 0))
        return float(torch.logsumexp(torch.stack(total), 0).exp())

    def projected_quantiles(self, dirs, n, max_elements=2 ** 24):
        """Quantiles F^-1((i + 1/2) / n), i < n, of the law projected on each unit direction (columns of dirs,
        (D, P)): a 1-D mixture of N(mu_k . d, s_k^2), whose CDF is tabulated on a grid of s_min / 8 spacing
        and inverted by linear interpolation. The CDF is summed in float32 (erf, 4x faster than float64 ndtr;
        absolute error ~1e-7, far below the 1/n between levels). Returns (n, P), float64."""
        centers = self.means @ dirs  # (K, P)
        lo = (centers - 8 * self.stds[:, None]).min(0).values
        hi = (centers + 8 * self.stds[:, None]).max(0).values
        points = int(min(2 ** 15, max(1024, math.ceil(float((hi - lo).max() / self.stds.min()) * 8))))
        u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        inv_scale, weights = (1 / (self.stds * math.sqrt(2))).float(), (self.weights / self.weights.sum()).float()
        out, chunk = [], max(1, max_elements // (points * len(self.weights)))
        for p in range(0, dirs.shape[1], chunk):
            c, l, h = centers[:, p:p + chunk].T, lo[p:p + chunk, None], hi[p:p + chunk, None]
            grid = l + (h - l) * torch.linspace(0, 1, points, dtype=torch.float64)  # (P', G)
            erf = torch.erf((grid.float()[..., None] - c.float()[:, None]) * inv_scale)  # (P', G, K)
            cdf = (0.5 + 0.5 * (erf @ weights)).double().cummax(-1).values  # monotone despite float32 round-off
            idx = torch.searchsorted(cdf, u.expand(len(grid), n).contiguous()).clamp(1, points - 1)
            c0, c1 = cdf.gather(1, idx - 1), cdf.gather(1, idx)
            g0, g1 = grid.gather(1, idx - 1), grid.gather(1, idx)
            frac = ((u - c0) / (c1 - c0).clamp_min(1e-300)).clamp(0, 1)
            out.append((g0 + frac * (g1 - g0)).T)
        return torch.cat(out, 1)

    def spec(self):
        """Everything that identifies the world (for cache keys and checkpoints)."""
        h = hashlib.sha1()
        for a in (self.weights, self.means, self.stds) + (() if self.labels is None else (self.labels,)):
            h.update(a.numpy().tobytes())
        return f"{self.name}-{h.hexdigest()[:12]}"


def _grid_squares(cells, per_side=3, cell=1.0, std=0.12):
    """Tile each square cell (lower-left corner) with per_side^2 small Gaussians: a near-uniform square."""
    offsets = (np.arange(per_side) + 0.5) / per_side * cell
    means = [(cx + ox, cy + oy) for cx, cy in cells for ox in offsets for oy in offsets]
    return np.ones(len(means)), np.array(means), np.full(len(means), std)


def _glyph_prototypes(per_class=32, size=16, seed=0):
    """Digits 0-9 drawn with Pillow's built-in font at varying position, size and stroke, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    means, labels = [], []
    for digit in range(10):
        for _ in range(per_class):
            font = ImageFont.load_default(size=int(rng.integers(10, 15)))
            img = Image.new("L", (size, size), 0)
            draw = ImageDraw.Draw(img)
            left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
            x = (size - (right - left)) / 2 - left + rng.uniform(-2, 2)
            y = (size - (bottom - top)) / 2 - top + rng.uniform(-2, 2)
            draw.text((x, y), str(digit), fill=255, font=font, stroke_width=int(rng.integers(0, 2)), stroke_fill=255)
            means.append(np.asarray(img, dtype=np.float64).reshape(-1) / 127.5 - 1)
            labels.append(digit)
    return np.array(means), np.array(labels)


WORLD_PRESETS = ("checkerboard", "8gaussians", "spiral", "glyphs16")


def make_world(name):
    """A preset name or a path to an .npz mixture (weights, means, stds, optional labels and shape)."""
    if name == "checkerboard":  # the 4x4 board on [-2, 2]^2 with 8 filled unit cells
        cells = [(x, y) for x in range(-2, 2) for y in range(-2, 2) if (x + y) % 2 == 0]
        w, mu, s = _grid_squares(cells)
        return GaussianMixture(w, mu, s, name=name)
    if name == "8gaussians":
        angles = np.arange(8) * np.pi / 4
        return GaussianMixture(np.ones(8), 2 * np.stack([np.cos(angles), np.sin(angles)], 1), np.full(8, 0.15), name=name)
    if name == "spiral":
        r = np.linspace(0.3, 2.2, 48)
        theta = r * 2.6 * np.pi / 2.2
        return GaussianMixture(np.ones(48), np.stack([r * np.cos(theta), r * np.sin(theta)], 1), np.full(48, 0.07), name=name)
    if name == "glyphs16":
        mu, labels = _glyph_prototypes()
        return GaussianMixture(np.ones(len(mu)), mu, np.full(len(mu), 0.05), labels, shape=(1, 16, 16), name=name)
    if name.endswith(".npz") and os.path.isfile(name):
        f = read_npz(name)
        if not {"weights", "means", "stds"} & set(f):
            return None  # an .npz of images or latents: real data
        missing = {"weights", "means", "stds"} - set(f)
        if missing:
            fail(f"{name} lacks arrays {sorted(missing)}; a mixture .npz holds weights (K,), means (K, D), stds (K,)")
        check_mixture_arrays(name, f)
        return GaussianMixture(f["weights"], f["means"], f["stds"], f.get("labels"), f.get("shape"),
                               name=os.path.basename(name)[:-4])
    return None


def read_npz(path):
    """The arrays of an .npz as a dict (no pickled objects), or a one-line error naming the file."""
    if not zipfile.is_zipfile(path):
        fail(f"{path} is not an .npz file (not a zip archive of arrays); write it with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:  # not a zip, truncated, or holding pickled objects
        fail(f"cannot read {path} as an .npz of arrays ({type(e).__name__}: {str(e).splitlines()[0][:80]}); "
             f"write it with numpy.savez")


def check_mixture_arrays(name, f):
    """Shapes and values of a mixture .npz: weights (K,) >= 0 with a positive sum, means (K, D), stds (K,) or
    one value, > 0, labels (K,) integers >= 0, shape with prod = D; everything finite."""
    weights, means, stds = (np.asarray(f[k]) for k in ("weights", "means", "stds"))
    K = weights.shape[0] if weights.ndim == 1 else -1
    problems = []
    if K < 1 or not np.issubdtype(weights.dtype, np.number) or not np.isfinite(weights).all() or (weights < 0).any() \
            or weights.sum() <= 0:
        problems.append("weights must be (K,) finite, >= 0, not all 0")
    if means.ndim != 2 or means.shape[0] != K or not np.issubdtype(means.dtype, np.number) or not np.isfinite(means).all():
        problems.append(f"means must be (K, D) = ({K}, D), finite")
    if stds.size not in (1, K) or not np.issubdtype(stds.dtype, np.number) or not np.isfinite(stds).all() or (stds <= 0).any():
        problems.append(f"stds must be ({K},) or one value, finite, > 0")
    if "labels" in f:
        labels = np.asarray(f["labels"])
        if labels.shape != (K,) or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
            problems.append(f"labels must be ({K},) integers >= 0")
    if "shape" in f and means.ndim == 2:
        shape = np.asarray(f["shape"])
        if shape.ndim != 1 or not np.issubdtype(shape.dtype, np.integer) or int(np.prod(shape)) != means.shape[1]:
            problems.append(f"shape must be integers whose product is D = {means.shape[1]}")
    if problems:
        fail(f"{name}: " + "; ".join(problems))


def is_image_world(spec):
    """True for a mixture world (preset or .npz) whose samples are images (C, H, W)."""
    world = make_world(spec)
    return world is not None and len(world.shape) == 3


def euler_sample(velocity, z, nfe, y=None, cfg=1.0, t_grid=None):
    """Euler integration of dx/dt = velocity(x, t, y, cfg) from t = 1 to t = 0 in nfe uniform steps."""
    ts = torch.linspace(1, 0, nfe + 1, dtype=z.dtype) if t_grid is None else t_grid
    x = z
    for t0, t1 in zip(ts[:-1].tolist(), ts[1:].tolist()):
        x = x + (t1 - t0) * velocity(x, torch.full((len(x),), t0, dtype=z.dtype, device=z.device), y, cfg)
    return x


def reference_ode(velocity, z, y=None, cfg=1.0, steps=64, t_from=1.0, t_to=0.0, estimate_error=True):
    """Accurate ODE solution: classical RK4 on a grid that crowds toward t = 0 (where mixtures with
    small stds make the velocity stiff). Returns (x, err) where err is the RMS gap to the same solver
    with half the steps, an honest estimate of the remaining error (None with estimate_error=False,
    which saves that second solve)."""
    def solve(n):
        s = torch.linspace(0, 1, n + 1, dtype=torch.float64)
        ts = t_to + (t_from - t_to) * (1 - s) ** 3  # cubic warp: fine steps near t_to
        x = z
        for t0, t1 in zip(ts[:-1].tolist(), ts[1:].tolist()):
            h = t1 - t0
            f = lambda xx, tt: velocity(xx, torch.full((len(z),), tt, dtype=z.dtype, device=z.device), y, cfg)
            k1 = f(x, t0)
            k2 = f(x + h / 2 * k1, t0 + h / 2)
            k3 = f(x + h / 2 * k2, t0 + h / 2)
            k4 = f(x + h * k3, t1)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x
    x = solve(steps)
    if not estimate_error:
        return x, None
    return x, float((x - solve(steps // 2)).pow(2).mean().sqrt())


# ---------------------------------------------------------------------------------------------------
# Real data: image folders, .npz arrays and the CIFAR-10 python tarball, from local paths only

def _load_image_folder(path, size):
    exts = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.lower().endswith(exts))
    if not files:
        fail(f"no images (png/jpg/jpeg/bmp/webp) found under {path}")
    classes = sorted({os.path.relpath(os.path.dirname(f), path) for f in files})
    has_classes = classes != ["."]
    images, labels = [], []
    for f in tqdm(files, desc="reading images", disable=not is_main() or len(files) < 1000):
        img = Image.open(f).convert("RGB")
        s = min(img.size)  # center crop to a square, then resize
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
        images.append(np.asarray(img))
        labels.append(classes.index(os.path.relpath(os.path.dirname(f), path)) if has_classes else 0)
    return np.stack(images), (np.array(labels) if has_classes else None)


def _load_cifar10(path):
    batches = [f"data_batch_{i}" for i in range(1, 6)]
    if os.path.isfile(path):  # the tarball as published
        with tarfile.open(path) as tar:
            data = [pickle.load(tar.extractfile(f"cifar-10-batches-py/{b}"), encoding="bytes") for b in batches]
    else:
        root = path if os.path.isfile(os.path.join(path, batches[0])) else os.path.join(path, "cifar-10-batches-py")
        data = []
        for b in batches:
            with open(os.path.join(root, b), "rb") as fh:
                data.append(pickle.load(fh, encoding="bytes"))
    x = np.concatenate([d[b"data"] for d in data]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x, np.concatenate([d[b"labels"] for d in data])


def _is_cifar(path):
    return path.endswith("cifar-10-python.tar.gz") or os.path.isfile(os.path.join(path, "data_batch_1")) or \
        os.path.isfile(os.path.join(path, "cifar-10-batches-py", "data_batch_1"))


class DataSource:
    """Batches (x, y) of training data, sharded per rank, reshuffled every epoch. A mixture world draws
    fresh samples instead. The iterator state is part of checkpoints so that resume is exact."""

    def __init__(self, spec, image_size=32, hflip=False, seed=0, class_conditional=True, train_size=0):
        self.world = make_world(spec)
        self.name, self.data = spec, None
        self.hflip, self.gen = hflip, torch.Generator().manual_seed(seed * 1000 + DIST.rank)
        self.epoch, self.pos = 0, 0
        if train_size < 0:
            fail(f"--train-size {train_size} must be >= 0 (0: all the data, or fresh world samples)")
        if self.world is not None:
            self.shape, self.num_classes = self.world.shape, self.world.num_classes
            if train_size:  # a finite training set drawn once from the world, the same for every run and seed
                # (a teacher trained on it and DMD2's GAN see the same samples); scoring stays against the world
                x, labels = self.world.sample(train_size, generator=torch.Generator().manual_seed(0))
                self._keep(x, labels if self.num_classes and class_conditional else None, train_size)
            return
        if not os.path.exists(spec):
            fail(f"data {spec!r} is neither a preset ({', '.join(WORLD_PRESETS)}), a mixture .npz, nor an existing path")
        if _is_cifar(spec):
            images, labels = _load_cifar10(spec)
        elif spec.endswith(".npz"):
            f = read_npz(spec)
            if not f:
                fail(f"{spec} holds no arrays; expected images (N, H, W, C) uint8 or float latents (N, ...) as arr_0")
            images = f["arr_0"] if "arr_0" in f else next(iter(f.values()))
            labels = f.get("labels", f.get("arr_1"))
            if images.dtype == np.uint8 and (images.ndim != 4 or images.shape[3] not in (1, 3)):
                fail(f"{spec}: uint8 images must be (N, H, W, C) with C = 1 or 3, got {images.shape}")
            if labels is not None and (labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer)
                                       or (labels < 0).any()):
                fail(f"{spec}: labels must be ({len(images)},) integers >= 0")
        elif os.path.isdir(spec):
            images, labels = _load_image_folder(spec, image_size)
        else:
            fail(f"cannot read {spec}: expected an image folder, an .npz array, or CIFAR-10 (tarball or batches folder)")
        if images.dtype == np.uint8:  # NHWC images -> NCHW in [-1, 1]
            data = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        else:  # float latents, used as stored (NCHW or flat vectors)
            data = torch.from_numpy(images.astype(np.float32))
        labels = None if labels is None or not class_conditional else torch.as_tensor(labels, dtype=torch.long)
        self.shape = tuple(data.shape[1:])
        self.num_classes = 0 if labels is None else int(labels.max()) + 1
        self._keep(data, labels, train_size)

    def _keep(self, data, labels, train_size):
        """The first train_size examples (all if 0), sharded per rank, in a fresh random order."""
        if train_size > len(data):
            fail(f"--train-size {train_size} exceeds the {len(data)} examples of {self.name}")
        n = train_size or len(data)
        if DIST.world > n:
            fail(f"{self.name}: {n} training examples cannot be split across {DIST.world} processes; use more data")
        self.data = data[:n][DIST.rank::DIST.world]
        self.labels = None if labels is None else labels[:n][DIST.rank::DIST.world]
        self.order = torch.randperm(len(self.data), generator=self.gen)

    def next_batch(self, batch, device):
        if self.data is None:  # a world without a fixed training set: fresh samples
            y = None if not self.num_classes else torch.randint(0, self.num_classes, (batch,), generator=self.gen)
            return self.world.sample(batch, y, generator=self.gen, device=device)
        parts, need = [], batch
        while need:
            if self.pos == len(self.order):  # epoch boundary: a fresh permutation
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = torch.randperm(len(self.data), generator=self.gen)
            take = self.order[self.pos:self.pos + need]
            parts.append(take)
            self.pos, need = self.pos + len(take), need - len(take)
        idx = torch.cat(parts)
        x = self.data[idx]
        if self.hflip:
            flip = torch.rand(len(x), generator=self.gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = None if self.labels is None else self.labels[idx]
        return x.to(device), (None if y is None else y.to(device))

    def state_dict(self):
        return {"gen": self.gen.get_state(), "epoch": self.epoch, "pos": self.pos,
                "order": getattr(self, "order", torch.zeros(0, dtype=torch.long))}

    def load_state_dict(self, s):
        self.gen.set_state(s["gen"])
        self.epoch, self.pos = s["epoch"], s["pos"]
        if self.data is not None:
            self.order = s["order"]


# ---------------------------------------------------------------------------------------------------
# Backbones. One call signature for both:  net(x, t, y=None, s=None, g=None, return_features=False)
#   t: time in [0, 1] (B,); s: optional second time (flow maps); g: optional guidance scale;
#   y: class label, num_classes is the null label (CFG); return_features also gives (B, hidden)
#   bottleneck features for heads. Attention runs torch's fused scaled_dot_product_attention, except inside
#   jvp() below (explicit_attention): the fused kernels have no forward-mode derivative, so there it is written out as a softmax.

def timestep_embedding(t, dim, scale=1000.0):
    """Sinusoidal positional embedding of scale * t, computed in fp32 (bf16 here breaks JVP tangents)."""
    half, dtype = dim // 2, torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = scale * t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], 1)


class ScalarEmbedder(nn.Module):
    """Sinusoidal features of a scalar -> 2-layer MLP. zero_init makes a new input start as a no-op
    (students gaining a second time or a guidance input begin exactly at the teacher)."""

    def __init__(self, hidden, freq_dim=128, scale=1000.0, zero_init=False):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        if zero_init:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, v):
        emb = timestep_embedding(v, self.freq_dim, self.scale)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def pixel_norm(a, eps=1e-4):
    return a / torch.sqrt(a.pow(2).mean(-1, keepdim=True) + eps)


class Modulation(nn.Module):
    """Conditioned normalisation. 'adaln_zero' (DiT): norm(x) (1 + scale) + shift, zero-initialised.
    'adn' (sCM §4.1, adaptive double normalisation): norm(x) pnorm(1 + scale) + pnorm(shift), the
    modulations pixel-normalised over channels (the +1 offset follows sCM-mnist; the paper is silent).
    Both return a gate (zero-initialised) for the residual branch."""

    def __init__(self, hidden, norm):
        super().__init__()
        self.norm_kind = norm
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.proj = nn.Linear(hidden, 3 * hidden)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, c):
        shift, scale, gate = self.proj(F.silu(c)).chunk(3, -1)
        if self.norm_kind == "adn":
            scale, shift = pixel_norm(1 + scale), pixel_norm(shift)
        else:
            scale = 1 + scale
        if x.ndim == 3:  # tokens
            shift, scale, gate = shift[:, None], scale[:, None], gate[:, None]
        return self.norm(x) * scale + shift, gate


class Trunk(nn.Module):
    """What both backbones share: the conditioning embedding and the output layer."""

    def _init_cond(self, hidden, num_classes, use_s, use_g, time_scale, s_scale=None):
        self.num_classes = num_classes
        self.t_embed = ScalarEmbedder(hidden, scale=time_scale)
        # s_scale: frequency scale of the second time (None: as t). A JVP in s sees d/ds of the sinusoids,
        # which grows with the scale; flow maps differentiated in s can ask for a small one.
        s_scale = time_scale if s_scale is None else s_scale
        self.s_embed = ScalarEmbedder(hidden, scale=s_scale, zero_init=True) if use_s else None
        self.g_embed = ScalarEmbedder(hidden, scale=10.0, zero_init=True) if use_g else None  # g ~ O(1..10)
        self.y_embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None  # last row: null label
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)

    def cond_embedding(self, t, y=None, s=None, g=None):
        """The conditioning vector c (B, hidden) that modulates every block."""
        c = self.t_embed(t)
        if self.y_embed is not None:
            y = torch.full((len(t),), self.num_classes, device=t.device, dtype=torch.long) if y is None else y
            c = c + self.y_embed(y)
        if self.s_embed is not None and s is not None:
            c = c + self.s_embed(s)
        if self.g_embed is not None and g is not None:
            c = c + self.g_embed(g)
        return c


class ResidualMLPBlock(nn.Module):
    def __init__(self, hidden, norm, dropout):
        super().__init__()
        self.mod = Modulation(hidden, norm)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(4 * hidden, hidden))

    def forward(self, h, c):
        z, gate = self.mod(h, c)
        return h + gate * self.mlp(z)


class MLPTrunk(Trunk):
    """Residual MLP with conditioned normalisation, for vector data (2D worlds, flat latents)."""

    def __init__(self, shape, hidden=128, depth=4, out_channels=None, num_classes=0, use_s=False, use_g=False,
                 norm="adaln_zero", dropout=0.0, time_scale=1000.0, s_scale=None):
        super().__init__()
        self.shape, dim = tuple(shape), math.prod(shape)
        # out_channels per pixel of an image (C, H, W), or the output width of a vector (D,)
        self.out_channels = out_channels or self.shape[0]
        self._init_cond(hidden, num_classes, use_s, use_g, time_scale, s_scale)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualMLPBlock(hidden, norm, dropout) for _ in range(depth))
        self.out_mod = Modulation(hidden, norm)
        self.out = nn.Linear(hidden, self.out_channels * math.prod(self.shape[1:]))

    def forward(self, x, t, y=None, s=None, g=None, return_features=False):
        c = self.cond_embedding(t, y, s, g)
        h = self.inp(x.reshape(len(x), -1))
        features = None
        for i, block in enumerate(self.blocks):
            h = block(h, c)
            if i == max(len(self.blocks) // 2, 1) - 1:  # the middle block's output (the only one at depth 1)
                features = h
        z, _ = self.out_mod(h, c)
        out = self.out(z).reshape(len(x), self.out_channels, *self.shape[1:])
        return (out, features) if return_features else out


_EXPLICIT_ATTENTION = False  # set by explicit_attention(): Attention writes softmax(q k^T / sqrt(d)) v out


@contextlib.contextmanager
def explicit_attention(on=True):
    """Within: every Attention in its explicit softmax form, which forward-mode AD goes through."""
    global _EXPLICIT_ATTENTION
    previous, _EXPLICIT_ATTENTION = _EXPLICIT_ATTENTION, on
    try:
        yield
    finally:
        _EXPLICIT_ATTENTION = previous


class _LinearWithConstantWeight(torch.autograd.Function):
    """F.linear whose forward-mode rule treats weight and bias as constants: d(x W^T + b) = dx W^T. torch's own
    rule also multiplies x by the weight's tangent, which is zero for a module's parameter but still costs a
    full matrix product (a third of the matrix work of a JVP through a linear layer)."""

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[1])

    @staticmethod
    def jvp(ctx, x_tangent, weight_tangent, bias_tangent):
        return F.linear(x_tangent, ctx.saved_tensors[0])


class _ParametersAsConstants(torch.overrides.TorchFunctionMode):
    """Inside jvp() without autograd: a linear layer whose weight is an nn.Parameter (a module's, closed over by
    fn; a primal of the JVP would arrive wrapped, not as a Parameter) takes the rule above."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and not kwargs and isinstance(args[1], nn.Parameter) and not torch.is_grad_enabled():
            return _LinearWithConstantWeight.apply(args[0], args[1], args[2] if len(args) > 2 else None)
        return func(*args, **(kwargs or {}))


def jvp(fn, primals, tangents):
    """torch.func.jvp(fn, primals, tangents) with every Attention in its explicit softmax form and, without
    autograd (how every method calls it), module weights held constant in the tangent pass."""
    with explicit_attention(), _ParametersAsConstants():
        return torch.func.jvp(fn, primals, tangents)


class Attention(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if _EXPLICIT_ATTENTION:  # softmax(q k^T / sqrt(d)) v written out: forward-mode AD goes through it
            out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // self.heads), -1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class DiTBlock(nn.Module):
    def __init__(self, hidden, heads, norm, dropout):
        super().__init__()
        self.mod1, self.attn = Modulation(hidden, norm), Attention(hidden, heads)
        self.mod2 = Modulation(hidden, norm)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(4 * hidden, hidden))

    def forward(self, h, c):
        z, gate = self.mod1(h, c)
        h = h + gate * self.attn(z)
        z, gate = self.mod2(h, c)
        return h + gate * self.mlp(z)


def sincos_2d(hidden, grid):
    """Fixed 2D sine-cosine position embedding (grid x grid tokens)."""
    pos = torch.arange(grid, dtype=torch.float32)
    yy, xx = torch.meshgrid(pos, pos, indexing="ij")
    quarter = hidden // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = [f(p.reshape(-1, 1) * freqs) for p in (yy, xx) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, 1)[None]


class DiTTrunk(Trunk):
    """A small DiT (patchify -> transformer blocks with conditioned norm -> unpatchify) for images."""

    def __init__(self, shape, hidden=128, depth=4, heads=4, patch=2, out_channels=None, num_classes=0,
                 use_s=False, use_g=False, norm="adaln_zero", dropout=0.0, time_scale=1000.0, s_scale=None):
        super().__init__()
        self.shape = tuple(shape)
        C, H, W = self.shape
        if H != W or H % patch:
            fail(f"DiT trunk needs square images with side divisible by the patch size {patch}, got {H}x{W}")
        self.patch, self.out_channels, self.grid = patch, out_channels or C, H // patch
        self._init_cond(hidden, num_classes, use_s, use_g, time_scale, s_scale)
        self.inp = nn.Linear(C * patch * patch, hidden)
        self.register_buffer("pos", sincos_2d(hidden, self.grid), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, norm, dropout) for _ in range(depth))
        self.out_mod = Modulation(hidden, norm)
        self.out = nn.Linear(hidden, self.out_channels * patch * patch)

    def forward(self, x, t, y=None, s=None, g=None, return_features=False):
        B, C, H, W = x.shape
        p, n = self.patch, self.grid
        c = self.cond_embedding(t, y, s, g)
        tokens = x.reshape(B, C, n, p, n, p).permute(0, 2, 4, 1, 3, 5).reshape(B, n * n, C * p * p)
        h = self.inp(tokens) + self.pos
        features = None
        for i, block in enumerate(self.blocks):
            h = block(h, c)
            if i == max(len(self.blocks) // 2, 1) - 1:
                features = h.mean(1)
        z, _ = self.out_mod(h, c)
        out = self.out(z).reshape(B, n, n, self.out_channels, p, p).permute(0, 3, 1, 4, 2, 5)
        out = out.reshape(B, self.out_channels, H, W)
        return (out, features) if return_features else out


def resolve_arch(arch, shape):
    """'mlp' (residual MLP, images flattened) or 'dit' (images only); None or 'auto': MLP for vectors, DiT for
    images (C, H, W)."""
    if arch in (None, "auto"):
        arch = "dit" if len(shape) == 3 else "mlp"
    if arch not in ("mlp", "dit") or (arch == "dit" and len(shape) != 3):
        fail(f"--arch must be auto, mlp or dit (dit for images only), got {arch!r} for data of shape {tuple(shape)}")
    return arch


def make_backbone(shape, num_classes=0, arch=None, **kwargs):
    """The trunk resolve_arch picks; kwargs override its defaults."""
    return (DiTTrunk if resolve_arch(arch, shape) == "dit" else MLPTrunk)(shape, num_classes=num_classes, **kwargs)


def backbone_spec(net):
    """Constructor arguments of a backbone, stored in checkpoints so it can be rebuilt exactly."""
    return dict(net._spec)


def build_backbone(spec):
    """Build from a spec. The initialisation is seeded by the run's seed alone, so every rank builds the
    same weights (and the global RNG stream is left untouched)."""
    spec = dict(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DIST.seed)
        net = make_backbone(tuple(spec.pop("shape")), spec.pop("num_classes"), spec.pop("arch"), **spec)
    net._spec = {"shape": list(net.shape), "num_classes": net.num_classes,
                 "arch": "dit" if isinstance(net, DiTTrunk) else "mlp", **spec}
    return net


def new_backbone(shape, num_classes=0, arch=None, **kwargs):
    return build_backbone({"shape": list(shape), "num_classes": num_classes, "arch": arch, **kwargs})


def init_from_teacher(student, teacher_net):
    """Copy every teacher weight the student has (same name, same shape). The student's extra inputs
    (second time s, guidance g) are zero-initialised, so it starts as the teacher. Returns the names
    of student tensors left at their fresh initialisation."""
    teacher_state = teacher_net.state_dict()
    own = student.state_dict()
    copied = {k: v for k, v in teacher_state.items() if k in own and own[k].shape == v.shape}
    student.load_state_dict(copied, strict=False)
    return sorted(set(own) - set(copied))


# ---------------------------------------------------------------------------------------------------
# Teachers: anything with velocity(x, t, y=None, cfg=1.0, interval=None) -> u.
# GaussianMixture above is the analytic one; NetTeacher wraps a trained network.

class NetTeacher:
    def __init__(self, net):
        self.net = net.eval().requires_grad_(False)
        self.num_classes = net.num_classes

    def velocity(self, x, t, y=None, cfg=1.0, interval=None):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(len(x))
        if y is None or not self.num_classes:
            return self.net(x, t)
        cfg = torch.as_tensor(cfg, dtype=x.dtype, device=x.device).expand(len(x))
        if interval is not None:
            cfg = torch.where((t >= interval[0]) & (t <= interval[1]), cfg, torch.ones_like(cfg))
        if bool((cfg == 1).all()):
            return self.net(x, t, y)
        null = torch.full_like(y, self.num_classes)  # one batched call for both branches
        u_cond, u_unc = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return u_unc + cfg.view(-1, *[1] * (x.ndim - 1)) * (u_cond - u_unc)


def load_checkpoint(path, device="cpu", mmap=False):
    if not os.path.isfile(path):
        fail(f"checkpoint {path} not found; train one with `python common.py teacher --data ...` or fix the path")
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated file or a pickle with arbitrary objects
        fail(f"cannot read checkpoint {path} ({type(e).__name__}); expected a plain dict written by this project")


def load_teacher_net(path, device="cpu"):
    """The EMA network of a checkpoint written by `python common.py teacher`."""
    ckpt = load_checkpoint(path, device)
    if "backbone" not in ckpt or "ema" not in ckpt:
        fail(f"{path} is not a teacher checkpoint (needs 'backbone' and 'ema'); train one with `python common.py teacher`")
    if "teacher" in ckpt.get("config", {}):  # every method's Config names its teacher; the teacher trainer's does not
        fail(f"{path} is a student's checkpoint, not a teacher's; pass a `python common.py teacher` checkpoint")
    net = build_backbone(ckpt["backbone"]).to(device)
    try:
        net.load_state_dict(ckpt["ema"])
    except RuntimeError:
        fail(f"{path}: its 'ema' weights do not fit its 'backbone'; pass a `python common.py teacher` checkpoint")
    return net.eval().requires_grad_(False)


IMAGE_FIT = {"steps": 4000, "batch": 96, "lr": 2e-3}  # the fit to an image world (fit_to_world; claims' teacher)


def fit_to_world(world, arch_kwargs=None, steps=None, batch=None, lr=None, device="cpu", cache_dir="runs/cache"):
    """A backbone regressed onto the exact mixture velocity (with the null label for CFG), cached under
    runs/. With the analytic teacher this is the network that students copy, as the papers copy their
    teacher's weights. Image worlds fit 4000 steps at batch 96 and lr 2e-3 (on glyphs16 the recipe's MLP at
    lr 1e-3 reached 32-step Euler nll -0.07, at 2e-3 -0.82, the data's -1.56; at lr 1e-3, 2000 steps of
    batch 128 reached cond_acc 0.954 and nll 2.7 with 8 Euler steps, 4000 steps 0.994 and 0.04); a DiT
    gets 4x4 patches (16 tokens at 16x16): at patch 2 one CPU step costs seconds. Vector worlds fit 1000 steps
    at batch 512, about a minute on one core (checkerboard, 32 Euler steps: swd 0.040 and nll 1.23 against
    3000 steps' 0.037 and 1.17; the data's nll is 1.17); a method that needs a closer fit asks for more."""
    arch_kwargs = dict(arch_kwargs or {})
    image = len(world.shape) == 3
    arch_kwargs["arch"] = resolve_arch(arch_kwargs.get("arch"), world.shape)  # one cache key for 'auto' and its pick
    if arch_kwargs["arch"] == "dit":
        arch_kwargs.setdefault("patch", 4)
    fit = IMAGE_FIT if image else {"steps": 1000, "batch": 512, "lr": 1e-3}
    steps, batch, lr = steps or fit["steps"], batch or fit["batch"], lr or fit["lr"]
    key = hashlib.sha1(json.dumps([world.spec(), arch_kwargs, steps, batch, lr], sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"fit-{world.name}-{key}.pt")
    if is_main() and not os.path.isfile(path):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        net = new_backbone(world.shape, world.num_classes, **arch_kwargs).to(device)
        # fused: one kernel over all parameters. On a CPU the default (foreach) Adam step of the image
        # recipe's 10M-parameter MLP took 62 ms, more than half a forward+backward at batch 96; fused 9 ms
        opt = torch.optim.Adam(net.parameters(), lr=lr, fused=True)
        for step in tqdm(range(steps), desc=f"fitting a {type(net).__name__} to the exact velocity", leave=False,
                         mininterval=0.5 if sys.stderr.isatty() else 10):
            y = None
            if world.num_classes:  # 20 % null labels so the fit carries the unconditional velocity too
                y = torch.randint(0, world.num_classes, (batch,), generator=gen)
                y = torch.where(torch.rand(batch, generator=gen) < 0.2, world.num_classes, y)
            x0, _ = world.sample(batch, None if y is None else torch.where(y == world.num_classes, 0, y), generator=gen)
            if y is not None:  # null-label rows get samples from the whole mixture
                x_any, _ = world.sample(batch, generator=gen)
                x0 = torch.where((y == world.num_classes).view(-1, *[1] * len(world.shape)), x_any, x0)
            t = torch.sigmoid(torch.randn(batch, generator=gen))  # logit-normal, as the teacher trainer
            x_t = (1 - t.view(-1, *[1] * len(world.shape))) * x0 + t.view(-1, *[1] * len(world.shape)) * torch.randn(x0.shape, generator=gen)
            x_t, t, y = x_t.to(device), t.to(device), (None if y is None else y.to(device))
            target = world.velocity(x_t, t, y)
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, 2 * (1 - step / steps))  # linear decay over the second half
            loss = F.mse_loss(net(x_t, t, y), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if not all(torch.isfinite(p).all() for p in net.parameters()):  # never cache a diverged network
            fail(f"the fit to {world.name} diverged (non-finite weights); check the world's scale, nothing was cached")
        save_checkpoint(path, {"backbone": net._spec, "ema": net.state_dict(), "fit_loss": loss.item()})
    barrier()
    return load_teacher_net(path, device)


def teacher_for(cfg, data, device, arch_kwargs=None, fit_steps=None, fit_lr=None):
    """(teacher, teacher network to initialise students from). cfg.teacher: 'gmm' for the analytic
    mixture teacher (its network is a fit of fit_steps at fit_lr, default fit_to_world's, cached), or the path of a
    `common.py teacher` checkpoint. With cfg.bench (timing only) an untrained network of the architecture
    stands in for both."""
    if getattr(cfg, "bench", False):
        net = new_backbone(data.shape, data.num_classes, **(arch_kwargs or {})).to(device)
        return NetTeacher(copy.deepcopy(net)), net
    if cfg.teacher == "gmm":
        if data.world is None:
            fail("the analytic teacher ('--teacher gmm') needs a mixture world as --data; pass --teacher ckpt.pt for real data")
        return data.world, fit_to_world(data.world, arch_kwargs, steps=fit_steps, lr=fit_lr, device=device)
    net = load_teacher_net(cfg.teacher, device)
    if tuple(net.shape) != tuple(data.shape):
        fail(f"teacher {cfg.teacher} was trained on shape {tuple(net.shape)} but --data gives {tuple(data.shape)}")
    return NetTeacher(net), net


# ---------------------------------------------------------------------------------------------------
# Training utilities: EMA, checkpoints, exact resume, autocast, guards, logging

@torch.no_grad()
def ema_update(ema, model, decay):
    for p_ema, p in zip(ema.parameters(), unwrap(model).parameters()):
        p_ema.lerp_(p.detach(), 1 - decay)


def autocast(device):
    """bf16 autocast on CUDA; full precision on CPU (CPU bf16 is slow and would break exact resume)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": pickle.dumps(np.random.get_state()), "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["numpy"] = torch.frombuffer(bytearray(state["numpy"]), dtype=torch.uint8)  # tensors load with weights_only
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(pickle.loads(state["numpy"].numpy().tobytes()))
    random.setstate(eval(state["python"]))  # a tuple of ints, written by repr above
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, obj):
    """Atomic write: a temp file in the same folder, then rename (never a half-written ckpt.pt)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# Config fields that may change between a run and its resumption (everything else must match).
# --lr may change too (the advice after a non-finite loss): load_training_state rescales the optimizers' lr.
RESUMABLE_CHANGES = {"steps", "resume", "out", "device", "log_every", "eval_samples", "ckpt_every", "compile", "bench",
                     "fid_ref", "fid_weights", "fid_samples", "lr"}


def check_resume_config(ckpt_config, cfg, path):
    now = dataclasses.asdict(cfg)
    diff = sorted(k for k in set(now) | set(ckpt_config) if k not in RESUMABLE_CHANGES and now.get(k) != ckpt_config.get(k))
    if diff:
        shown = ", ".join(f"{k}={ckpt_config.get(k)!r} (now {now.get(k)!r})" for k in diff[:4])
        fail(f"checkpoint {path} was written with another config: {shown}; use the same flags or another --out")


def check_finite(loss, step, what="loss"):
    if not torch.isfinite(loss).all():
        fail(f"non-finite {what} at step {step}; check the data scale, or continue from the last checkpoint "
             f"(written every --ckpt-every steps) with --resume and a lower --lr")


def _finite(obj):
    """obj with every non-finite float replaced by None: metrics.json stays valid JSON (NaN is not JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(_finite(obj), f, indent=1, allow_nan=False)
    os.replace(tmp, path)


class Logger:
    """jsonl log and a tqdm bar, on rank 0 only. Each line carries the training seconds so far ("seconds"), summed
    over the segments of a resumed run, so that a run's reported training time survives its interruptions."""

    def __init__(self, out, total, start=0, desc="train"):
        self.main = is_main()
        self.file = None
        self.start_time, self.seconds_before = time.time(), 0.0
        if self.main:  # a fresh run starts the log; a resumed one keeps the lines up to its checkpoint's step
            path = os.path.join(out, "log.jsonl")
            kept = []
            if start and os.path.isfile(path):
                kept = [line for line in open(path) if line.strip() and json.loads(line).get("step", 0) <= start]
            if kept:  # the time of the previous segments, up to their last line kept (written with the checkpoint)
                self.seconds_before = json.loads(kept[-1]).get("seconds", 0.0)
            self.file = open(path, "w")
            self.file.writelines(kept)
        self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, disable=not self.main,
                        mininterval=0.5 if sys.stderr.isatty() else 10)

    def step(self, n=1):
        self.bar.update(n)

    def log(self, step, scalars):
        scalars = reduce_mean(scalars)
        if self.main:
            self.file.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in scalars.items()},
                                        "seconds": round(self.seconds(), 1)}) + "\n")
            self.file.flush()
            # refresh=False: shown at the next redraw mininterval allows (a redraw per log would flood a non-tty log)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in list(scalars.items())[:4]}, refresh=False)
        return scalars

    def seconds(self):
        """Training seconds of this run: the previous segments' (rank 0) and this one's."""
        return self.seconds_before + time.time() - self.start_time

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()


def flow_matching_loss(net, x0, y=None, t=None, logit_mean=0.0, logit_std=1.0):
    """Rectified-flow matching: x_t = (1 - t) x0 + t eps, regress u = eps - x0. t is logit-normal
    (SD3) unless given. The teacher trainer and every online velocity network (DMD2's fake score,
    FreeFlow's noising-velocity network) use this one loss."""
    if t is None:
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(len(x0), device=x0.device))
    eps = torch.randn_like(x0)
    tb = t.view(-1, *[1] * (x0.ndim - 1))
    return F.mse_loss(net(((1 - tb) * x0 + tb * eps).to(x0.dtype), t, y).float(), (eps - x0).float())


def save_training_state(path, cfg, step, objects, data=None, extra=None):
    """Checkpoint (rank 0 writes, atomically): state_dicts of the named modules / optimizers, the step,
    the config, and every rank's RNG and data-iterator state, so that --resume continues exactly."""
    finite = all(torch.isfinite(getattr(v, "_local_tensor", v)).all()  # this rank's shard under FSDP
                 for o in objects.values() if not isinstance(o, torch.optim.Optimizer)
                 for v in (unwrap(o) if isinstance(o, nn.Module) else o).state_dict().values()
                 if torch.is_tensor(v) and v.is_floating_point())
    if dist.is_initialized():
        flag = torch.tensor([float(finite)], device=DIST.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = bool(flag.item())
    if not finite:  # a finite loss can still give a non-finite update: keep the last finite checkpoint
        if os.path.isfile(path):
            fail(f"non-finite weights at step {step}; {path} keeps the last finite checkpoint: continue from it with "
                 f"--resume and a lower --lr")
        fail(f"non-finite weights at step {step}, before any checkpoint; start again with a lower --lr")
    local = {"rng": rng_state(), "data": None if data is None else data.state_dict()}
    states = [None] * DIST.world
    if dist.is_initialized():
        dist.all_gather_object(states, local)
    else:
        states = [local]
    if is_main():
        ckpt = {name: unwrap(o).state_dict() if isinstance(o, nn.Module) else o.state_dict() for name, o in objects.items()}
        ckpt.update(step=step, config=dataclasses.asdict(cfg), rng=[s["rng"] for s in states],
                    data=[s["data"] for s in states], **(extra or {}))
        save_checkpoint(path, ckpt)
    barrier()


def load_training_state(path, cfg, objects, data=None, device="cpu"):
    """Restore what save_training_state wrote; refuses a checkpoint of another config. Returns the step."""
    ckpt = load_checkpoint(path, device)
    check_resume_config(ckpt.get("config", {}), cfg, path)
    if len(ckpt["rng"]) != DIST.world:
        fail(f"{path} was written by {len(ckpt['rng'])} processes; resume with the same number (now {DIST.world})")
    old_lr, new_lr = ckpt.get("config", {}).get("lr"), getattr(cfg, "lr", None)
    for name, o in objects.items():
        (unwrap(o) if isinstance(o, nn.Module) else o).load_state_dict(ckpt[name])
        if isinstance(o, torch.optim.Optimizer) and old_lr and new_lr and new_lr != old_lr:
            for group in o.param_groups:  # a changed --lr (schedules that set lr every step overwrite it anyway)
                group["lr"] *= new_lr / old_lr
    if data is not None:
        data.load_state_dict(ckpt["data"][DIST.rank])
    set_rng_state(ckpt["rng"][DIST.rank])
    return ckpt["step"]


def bench(named_steps, repeats=10, warmup=3, passes=None, floors=None):
    """Wall time of training-step callables measured side by side in one run (interleaved, median),
    printed as a table with the ratio to the first (the plain flow-matching step). passes: the primitive
    passes of the same network and batch (a forward, a JVP, ...), timed in the same loop; floors: for a
    step, how many of each pass (or of another step) it cannot do without. Then a second table puts each
    such step's time next to its pass-count floor."""
    timed = {**named_steps, **(passes or {})}
    times = {name: [] for name in timed}
    for i in range(warmup + repeats):
        for name, fn in timed.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    med = {name: float(np.median(v)) * 1000 for name, v in times.items()}
    base = med[next(iter(named_steps))]
    print0("| step | ms (median of %d) | ratio |\n|---|---|---|" % repeats)
    for name in named_steps:
        print0(f"| {name} | {med[name]:.1f} | {med[name] / base:.2f} |")
    if floors:
        print0("\n| step | ms | pass-count floor, ms | floor's passes | measured / floor |\n|---|---|---|---|---|")
        for name, counts in floors.items():
            counts = {p: n for p, n in counts.items() if n}
            floor = sum(n * med[p] for p, n in counts.items())
            listed = " + ".join(f"{n} x {p} ({med[p]:.1f})" for p, n in counts.items())
            print0(f"| {name} | {med[name]:.1f} | {floor:.1f} | {listed} | {med[name] / floor:.2f} |")
    return med


def maybe_compile(model, enabled):
    return torch.compile(model) if enabled else model


def prepare_out(cfg):
    """Check the flags the method files share and the state of --out, then create it. Every method calls this
    before its first write and before any fit, so a bad flag or an occupied --out fails with nothing written:
    a new run refuses an --out that holds a checkpoint (--resume continues it, another --out starts afresh);
    --resume needs a checkpoint of the same config (--lr may change) and --steps at least its step."""
    if bool(getattr(cfg, "fid_ref", "")) != bool(getattr(cfg, "fid_weights", "")):
        fail("FID needs both --fid-ref (reference statistics) and --fid-weights (Inception weights)")
    if getattr(cfg, "bench", False):  # timing only: nothing is written
        return
    path = os.path.join(cfg.out, "ckpt.pt")
    if cfg.resume:
        if not os.path.isfile(path):
            fail(f"--resume: there is no checkpoint {path}; drop --resume to start a new run in {cfg.out}")
        ckpt = load_checkpoint(path, mmap=True)  # the config and step only: mmap reads no weights
        check_resume_config(ckpt.get("config", {}), cfg, path)
        if ckpt.get("step", 0) > cfg.steps:
            fail(f"{path} is at step {ckpt['step']}, past --steps {cfg.steps}; pass --steps {ckpt['step']} or more")
    elif os.path.exists(path):
        fail(f"--out {cfg.out} holds an earlier run ({path}); add --resume to continue it, or pick another --out")
    if is_main():
        try:
            os.makedirs(cfg.out, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=cfg.out):
                pass
        except OSError as e:
            fail(f"cannot write to --out {cfg.out} ({e.strerror or e}); pick a writable directory")
    barrier()


# ---------------------------------------------------------------------------------------------------
# Pictures (Pillow): image grids and 2D density panels with captions

def _to_uint8_images(x):
    x = x.detach().float().cpu().clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_grid(x, ncol=8, pad=1):
    """(N, C, H, W) in [-1, 1] -> an RGB grid PIL image."""
    imgs = _to_uint8_images(x)
    if imgs.shape[-1] == 1:
        imgs = np.repeat(imgs, 3, -1)
    n, h, w, _ = imgs.shape
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    return Image.fromarray(grid)


def density_image(points, lim=3.0, size=200):
    """2D histogram of points, log-scaled, dark on white."""
    p = points.detach().float().cpu().numpy().reshape(len(points), -1)[:, :2]
    hist, _, _ = np.histogram2d(p[:, 1], p[:, 0], bins=size, range=[[-lim, lim], [-lim, lim]])
    hist = np.log1p(hist[::-1])
    img = 255 - (255 * hist / max(hist.max(), 1e-9)).astype(np.uint8)
    return Image.fromarray(img).convert("RGB")


def save_panels(path, panels, scale=1):
    """Side-by-side captioned panels [(caption, PIL image)], written atomically as PNG."""
    font = ImageFont.load_default(size=12)
    imgs = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for _, im in panels]
    w, h = sum(im.width for im in imgs) + 4 * (len(imgs) + 1), max(im.height for im in imgs) + 22
    canvas = Image.new("RGB", (w, h), "white")
    draw, x = ImageDraw.Draw(canvas), 4
    for (caption, _), im in zip(panels, imgs):
        canvas.paste(im, (x, 20))
        draw.text((x, 3), caption, fill="black", font=font)
        x += im.width + 4
    tmp = f"{path}.tmp{os.getpid()}.png"
    canvas.save(tmp)
    os.replace(tmp, path)


def sample_picture(samples, shape):
    """A panel for one set of samples: density for 2D, a grid for images."""
    if len(shape) == 3:
        return image_grid(samples[:64], ncol=8)
    return density_image(samples)


# ---------------------------------------------------------------------------------------------------
# Toy metrics (same functions for every method) and the shared evaluation table

def swd(x, law, n_proj=256, seed=0):
    """Sliced Wasserstein-2 between samples x and a law (fixed random directions): a GaussianMixture, whose
    projections are exact 1-D mixtures (the sorted projections of x meet their exact quantiles), or a second
    sample set of the same size (then its sampling noise adds to the distance)."""
    x = x.reshape(len(x), -1).double().cpu()
    dirs = torch.randn(x.shape[1], n_proj, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = (x @ dirs).sort(0)
    if isinstance(law, GaussianMixture):
        key = ("quantiles", len(x), n_proj, seed)  # the same for every sampler of an evaluation: computed once
        if key not in law._cache:
            law._cache[key] = law.projected_quantiles(dirs, len(x))
        target = law._cache[key]
    else:
        target, _ = (law.reshape(len(law), -1).double().cpu()[:len(x)] @ dirs).sort(0)
        px = px[:len(target)]
    return float((px - target).pow(2).mean().sqrt())


@torch.no_grad()
def mmd(x, world, chunk=1000):
    """Kernel distance to the true law, unbiased: MMD^2 = E k(x, x') - 2 E k(x, b) + E k(b, b'), x from the
    samples, b from the world, k a sum of Gaussian kernels at world.kernel_bandwidths(), each scaled to unit
    spread under the world. The two terms with b are exact (world.kernel_mean, world.kernel_self); only
    E k(x, x') is estimated, as a U-statistic over pairs i != j. True samples score 0 in expectation; shrinking,
    spraying, dropping modes and blurring all cost. Returns (MMD^2, its standard error), the error from the
    U-statistic's variance (4 (n - 2) z1 + 2 z2) / (n (n - 1)); it errs on the large side (README)."""
    x = x.reshape(len(x), -1).double().cpu()
    n = len(x)
    if "kernel" not in world._cache:  # bandwidths, scales and E k(b, b'): once per world
        bandwidths = world.kernel_bandwidths()
        # each kernel divided by its spread between two independent draws of the world, sd = (E k_h^2 - (E k_h)^2)^1/2
        # with k_h^2 = k_{h/sqrt2}: then a wide kernel's sampling noise does not drown a narrow kernel's signal
        means = [world.kernel_self(h2) for h2 in bandwidths]
        scales = [1 / math.sqrt(max(world.kernel_self(h2 / 2) - e ** 2, 1e-300)) for h2, e in zip(bandwidths, means)]
        world._cache["kernel"] = bandwidths, scales, sum(c * e for c, e in zip(scales, means))
    bandwidths, scales, const = world._cache["kernel"]
    m = sum(c * world.kernel_mean(x, h2) for c, h2 in zip(scales, bandwidths))  # E_b k(x_i, b)
    x2 = (x ** 2).sum(1)
    row_sums, square_sum = torch.empty(n, dtype=torch.float64), 0.0
    for i in range(0, n, chunk):  # h_ij = k(x_i, x_j) - m_i - m_j + E k(b, b'), whose mean over i != j is MMD^2
        dist2 = (x2[i:i + chunk, None] - 2 * x[i:i + chunk] @ x.T + x2[None]).clamp_min(0)
        h = sum(c * torch.exp(-dist2 / (2 * h2)) for c, h2 in zip(scales, bandwidths)) - m[i:i + chunk, None] - m[None] + const
        h[torch.arange(len(h)), torch.arange(i, i + len(h))] = 0
        row_sums[i:i + chunk] = h.sum(1)
        square_sum += float(h.pow(2).sum())
    row_means = row_sums / (n - 1)
    value = float(row_means.mean())
    z2 = square_sum / (n * (n - 1)) - value ** 2  # Var h(x, x')
    z1 = max(float(row_means.var()) - z2 / (n - 1), 0.0)  # Var E[h(x, x') | x]: the row means less their own noise
    return value, math.sqrt(max(4 * (n - 2) * z1 + 2 * z2, 0.0) / (n * (n - 1)))


def mode_tv(x, world):
    """Total variation between the nearest-component histogram of x and the true weights."""
    comp = world.nearest_component(x.double().cpu())
    hist = torch.bincount(comp, minlength=len(world.weights)).double() / len(x)
    return float(0.5 * (hist - world.weights).abs().sum())


def mean_nll(x, world):
    """Mean -log p0(x) / D (lower is not always better: collapsed samples score too low)."""
    return float(-world.log_prob(x.double().cpu()).mean() / world.dim)


def cond_acc(x, y, world):
    """Fraction of samples whose nearest component carries the requested class."""
    comp = world.nearest_component(x.double().cpu())
    return float((world.labels[comp] == y.cpu()).double().mean())


def world_metrics(x, world, y=None, ode_ref=None):
    """The exact metrics of samples x against the world; mmd (with its standard error mmd_se) is the headline."""
    value, se = mmd(x, world)
    row = {"mmd": value, "mmd_se": se, "swd": swd(x, world), "mode_tv": mode_tv(x, world), "nll": mean_nll(x, world)}
    if ode_ref is not None:
        row["ode_err"] = float((x.double().cpu() - ode_ref.double().cpu()).pow(2).mean().sqrt())
    if world.num_classes and y is not None:
        row["cond_acc"] = cond_acc(x, y, world)
    return row


TEACHER_NFES = (1, 2, 4, 8, 16, 32)


@torch.no_grad()
def evaluate(samplers, world, teacher, cfg, out, method, train_seconds, teacher_name="gmm", n=4000, guidance=1.0,
             batch=1000, device="cpu", picture_teacher_nfe=32, teacher_net=None):
    """Score a list of samplers [{"sampler", "nfe", "fn": (z, y) -> x, "ode": bool, "target": x}] next to
    the teacher's Euler sampler at 1..32 NFE and the data itself, on the same noise and labels; write
    metrics.json and samples.png. With the analytic teacher, teacher_net (the network the students copy, fitted)
    adds its own Euler rows at 1..32 NFE ("teacher_net"), at the same guidance: the ceiling of what the
    students' architecture has learned. An optional "target" holds n samples (labels arange(n) % classes) of the
    law the sampler aims at when that is not the data (e.g. a CFG-guided law); it adds swd_target.
    Rank 0 only. Returns the rows."""
    gen = torch.Generator().manual_seed(1234)  # the same evaluation noise for every method
    z = torch.randn(n, *world.shape, generator=gen)
    y = torch.arange(n) % world.num_classes if world.num_classes else None
    data_other, _ = world.sample(n, y, generator=torch.Generator().manual_seed(99))
    ode_ref = None
    if any(s.get("ode") for s in samplers):
        ode_ref = torch.cat([reference_ode(teacher.velocity, z[i:i + batch].to(device),
                                           None if y is None else y[i:i + batch].to(device), guidance,
                                           estimate_error=False)[0].cpu()
                             for i in range(0, n, batch)])

    def run(fn):
        start = time.perf_counter()
        xs = [fn(z[i:i + batch].to(device), None if y is None else y[i:i + batch].to(device)).float().cpu() for i in range(0, n, batch)]
        return torch.cat(xs), 1000 * (time.perf_counter() - start) / n

    rows, pictures = [], [("data", sample_picture(data_other, world.shape))]
    for s in samplers:
        x, ms = run(s["fn"])
        row = {"sampler": s["sampler"], "nfe": s["nfe"], **world_metrics(x, world, y, ode_ref if s.get("ode") else None)}
        if s.get("target") is not None:
            row["swd_target"] = swd(x, s["target"])
        rows.append({**row, "ms_per_sample": ms})
        pictures.append((f"{s['sampler']} {s['nfe']} NFE", sample_picture(x, world.shape)))
    euler_rows = [("teacher", teacher)]
    if teacher_net is not None and isinstance(teacher, GaussianMixture):  # a learned teacher is its own network
        euler_rows.append(("teacher_net", NetTeacher(teacher_net)))
    for name, velocity_model in euler_rows:
        for nfe in TEACHER_NFES:
            x, ms = run(lambda zz, yy: euler_sample(velocity_model.velocity, zz, nfe, yy, guidance))
            rows.append({"sampler": name, "nfe": nfe, **world_metrics(x, world, y, ode_ref), "ms_per_sample": ms})
            if nfe == picture_teacher_nfe:
                pictures.insert(len(pictures) - len(samplers), (f"{name} Euler {nfe}", sample_picture(x, world.shape)))
    rows.append({"sampler": "data", "nfe": 0, **world_metrics(data_other, world, y), "ms_per_sample": 0.0})
    result = {"method": method, "data": world.name, "teacher": teacher_name, "steps": cfg.steps,
              "train_seconds": round(train_seconds, 2), "guidance": guidance, "results": rows}
    write_json(os.path.join(out, "metrics.json"), result)
    save_panels(os.path.join(out, "samples.png"), pictures, scale=1 if len(world.shape) != 3 else 2)
    return rows


def format_mmd(r):
    return f"{r['mmd']:.4f} ± {r['mmd_se']:.4f}"


def format_table(rows):
    keys = ["sampler", "nfe", "mmd", "swd", "swd_target", "mode_tv", "nll", "ode_err", "cond_acc", "ms_per_sample"]
    keys = [k for k in keys if any(k in r for r in rows)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(format_mmd(r) if k == "mmd" and k in r else f"{r[k]:.4f}" if isinstance(r.get(k), float)
                                       else str(r.get(k, "")) for k in keys) + " |")
    return "\n".join(lines)


@torch.no_grad()
def evaluate_real(samplers, shape, num_classes, cfg, method, train_seconds, device, batch=250):
    """Real data (no exact world to score against): a sample grid per sampler, and FID against reference
    statistics when --fid-ref and --fid-weights are given (cfg.fid_samples, labels cycling over the
    classes). Every rank calls it: the FID batches are dealt out over the ranks, and the batch starting at
    sample i draws all its noise (a stochastic sampler's too) after seeding with (seed, i), so the FID does
    not depend on the number of ranks. Rank 0 writes metrics.json and samples.png."""
    def draw(fn, n, offset):
        torch.manual_seed(cfg.seed * 1_000_003 + offset)
        z = torch.randn(n, *shape).to(device)
        y = (torch.arange(offset, offset + n, device=device) % num_classes) if num_classes else None
        return fn(z, y).clamp(-1, 1).float().cpu()
    if is_main():
        save_panels(os.path.join(cfg.out, "samples.png"),
                    [(f"{s['sampler']} {s['nfe']} NFE", image_grid(draw(s["fn"], 64, 0))) for s in samplers], scale=2)
    results = []
    if cfg.fid_ref:
        import eval_fid
        model = eval_fid.inception_model(cfg.fid_weights, device)
        mu_ref, sigma_ref = eval_fid.stats_of(cfg.fid_ref, model, device=device)  # image references shard too
        for s in samplers:
            sums = eval_fid.feature_sums([], model, device=device)  # zeros; this rank's batches add to them
            for i in tqdm(range(0, cfg.fid_samples, batch)[DIST.rank::DIST.world], disable=not is_main(),
                          desc=f"FID samples: {s['sampler']} {s['nfe']} NFE"):
                images = eval_fid.quantize(draw(s["fn"], min(batch, cfg.fid_samples - i), i))
                sums = [a + b for a, b in zip(sums, eval_fid.feature_sums(images, model, device=device))]
            if DIST.world > 1:
                for t in sums:
                    dist.all_reduce(t)
            fid = eval_fid.frechet_distance(*eval_fid.stats_from_sums(*sums, desc="FID samples"), mu_ref, sigma_ref)
            results.append({"sampler": s["sampler"], "nfe": s["nfe"], "fid": fid})
            print0(f"FID ({cfg.fid_samples} samples, {s['sampler']} {s['nfe']} NFE): {fid:.2f}")
    if is_main():
        write_json(os.path.join(cfg.out, "metrics.json"), {"method": method, "data": cfg.data, "teacher": "learned",
                                                           "steps": cfg.steps, "train_seconds": round(train_seconds, 2),
                                                           "guidance": getattr(cfg, "guidance", 1.0), "results": results})


# ---------------------------------------------------------------------------------------------------
# The flow-matching teacher trainer:  python common.py teacher --data <preset | path>

@dataclass
class TeacherConfig:
    data: str = "checkerboard"  # a world preset, a mixture .npz, an image folder / .npz / CIFAR-10 path
    out: str = "runs/teacher"
    steps: int = 3000           # the 2D default trains in about a minute on 2 CPU cores
    batch: int = 512            # global batch (split across ranks)
    lr: float = 1e-3
    lr_warmup: int = 100
    ema_decay: float = 0.999
    label_dropout: float = 0.1  # null-label rate, for classifier-free guidance
    logit_mean: float = 0.0     # t = sigmoid(N(logit_mean, logit_std)): logit-normal (SD3)
    logit_std: float = 1.0
    arch: str = "auto"          # trunk: auto (MLP for vectors, DiT for images) | mlp (images flattened; the image
                                # recipe's network, README "Images") | dit
    hidden: int = 128           # trunk width
    depth: int = 4
    norm: str = "adaln_zero"    # adaln_zero | adn (sCM's adaptive double normalisation)
    time_scale: float = 1000.0  # frequency scale of the sinusoidal time input (sCM students want a small one, §4.1)
    dropout: float = 0.0
    image_size: int = 32        # for image folders
    hflip: bool = False
    train_size: int = 0         # a fixed training set: the first N examples of the data, or N samples drawn once
                                # from a world (scored against the whole world). 0: all the data / fresh samples
    grad_clip: float = 1.0
    eval_samples: int = 4000
    guidance: float = 1.0       # CFG scale for the evaluation samples
    log_every: int = 100
    ckpt_every: int = 1000
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    compile: bool = False


def train_teacher(cfg):
    d = setup_dist(cfg.device, cfg.seed)
    data = DataSource(cfg.data, cfg.image_size, cfg.hflip, cfg.seed, train_size=cfg.train_size)
    prepare_out(cfg)
    if cfg.batch % d.world:
        fail(f"--batch {cfg.batch} is not divisible by the number of processes {d.world}")
    batch = cfg.batch // d.world
    net = new_backbone(data.shape, data.num_classes, cfg.arch, hidden=cfg.hidden, depth=cfg.depth, norm=cfg.norm,
                       dropout=cfg.dropout, time_scale=cfg.time_scale).to(d.device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0, fused=True)
    ckpt_path, step = os.path.join(cfg.out, "ckpt.pt"), 0
    state = {"model": net, "ema": ema, "optimizer": opt}
    if cfg.resume:
        step = load_training_state(ckpt_path, cfg, state, data, d.device)
    model = maybe_compile(wrap_ddp(net), cfg.compile)
    logger = Logger(cfg.out, cfg.steps, step, desc="teacher")

    while step < cfg.steps:
        x0, y = data.next_batch(batch, d.device)
        if y is not None:
            y = torch.where(torch.rand(len(y), device=d.device) < cfg.label_dropout, data.num_classes, y)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup)
        with autocast(d.device):
            loss = flow_matching_loss(model, x0, y, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std)
        check_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        ema_update(ema, net, cfg.ema_decay)
        step += 1
        logger.step()
        if step % cfg.log_every == 0 or step == cfg.steps:
            logger.log(step, {"loss": loss.item(), "grad_norm": grad_norm.item()})
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_training_state(ckpt_path, cfg, step, state, data, extra={"backbone": net._spec})
    train_seconds = logger.seconds()
    logger.close()
    if is_main():
        if data.world is not None:
            teacher = NetTeacher(ema)
            rows = evaluate([{"sampler": "analytic", "nfe": n, "fn": (lambda nn_: lambda z, y: euler_sample(
                data.world.velocity, z, nn_, y, cfg.guidance))(n)} for n in (8, 32)],
                data.world, teacher, cfg, cfg.out, "teacher", train_seconds, teacher_name="learned",
                n=cfg.eval_samples, guidance=cfg.guidance, device=d.device)
            print0(format_table(rows))
        else:
            z = torch.randn(64, *data.shape, device=d.device)
            y = torch.arange(64, device=d.device) % data.num_classes if data.num_classes else None
            x = euler_sample(NetTeacher(ema).velocity, z, 32, y, cfg.guidance)
            save_panels(os.path.join(cfg.out, "samples.png"), [("teacher Euler 32", image_grid(x))], scale=2)
            write_json(os.path.join(cfg.out, "metrics.json"), {"method": "teacher", "data": cfg.data, "teacher": "learned",
                                                                "steps": cfg.steps, "train_seconds": round(train_seconds, 2),
                                                                "results": []})
        print0(f"wrote {cfg.out}/ckpt.pt, metrics.json, samples.png ({train_seconds:.1f} s of training)")
    barrier()
    cleanup()
    return ema


# ---------------------------------------------------------------------------------------------------
# One comparison of the methods, measured the same way:  python common.py compare

@dataclass
class CompareConfig:
    methods: str = "scm,dmd2,freeflow,piflow"  # the few-step distillation files (undistill_flux reverses one)
    worlds: str = "checkerboard,glyphs16"
    steps: int = 1500          # the same training-step budget for every method on 2D worlds; image worlds run
                               # each method's image recipe (its Config.IMAGE_RECIPE) unchanged
    seed: int = 0
    eval_samples: int = 4000
    out: str = "runs/compare"
    rerun: bool = True         # --no-rerun keeps finished runs and bench ratios under --out and runs only the missing


def _bench_rows(stdout):
    """Parse the table that bench() prints: [(name, ms, ratio)]."""
    rows = []
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("step", "---"):
            try:
                rows.append((cells[0], float(cells[1]), float(cells[2])))
            except ValueError:
                pass
    return rows


def _names(text):
    return [v.strip() for v in str(text).split(",") if v.strip()]


def compare(cfg):
    """Run every method's default on the same worlds with the same seed and step budget (analytic
    teacher), collect metrics.json and the --bench step-cost ratios, and write compare.md and one
    picture per world with every method's samples next to the teacher's and the data's."""
    import shutil
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    unknown = [m for m in _names(cfg.methods) if m not in ("scm", "dmd2", "freeflow", "piflow")]
    if unknown or not _names(cfg.methods):
        fail(f"--methods {cfg.methods!r}: choose from scm, dmd2, freeflow, piflow (comma-separated)")
    for world in _names(cfg.worlds) or [""]:
        if make_world(world) is None:
            fail(f"--worlds: {world!r} is neither a preset ({', '.join(WORLD_PRESETS)}) nor a mixture .npz")
    os.makedirs(cfg.out, exist_ok=True)
    columns = ["world", "sampler", "NFE", "mmd ± se", "swd", "mode_tv", "nll (data)", "ode_err", "cond_acc", "train s",
               "step cost (x FM)", "ms/sample", "teacher NFE at equal mmd", "speed-up at equal mmd"]
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    costs_path = os.path.join(cfg.out, "bench.json")
    costs = json.load(open(costs_path)) if os.path.isfile(costs_path) and not cfg.rerun else {}
    for method in _names(cfg.methods):
        if method not in costs:
            r = subprocess.run([sys.executable, os.path.join(here, f"{method}.py"), "--bench"], capture_output=True, text=True)
            rows = _bench_rows(r.stdout)  # row 0 is the flow-matching baseline, row 1 the method's step
            costs[method] = rows[1][2] if r.returncode == 0 and len(rows) > 1 else float("nan")
            write_json(costs_path, costs)
        print(f"{method} --bench: one step costs {costs[method]:.2f}x a flow-matching step", flush=True)
    for world in _names(cfg.worlds):
        image = is_image_world(world)
        panels, teacher = [], []
        for method in _names(cfg.methods):
            out = os.path.join(cfg.out, world, method)
            if cfg.rerun or not os.path.isfile(os.path.join(out, "metrics.json")):
                shutil.rmtree(out, ignore_errors=True)  # a fresh run (a method refuses an --out holding a run)
                cmd = [sys.executable, os.path.join(here, f"{method}.py"), "--data", world,
                       "--seed", str(cfg.seed), "--eval-samples", str(cfg.eval_samples), "--out", out]
                cmd += [] if image else ["--steps", str(cfg.steps)]
                print(" ".join(cmd[1:]), flush=True)
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    print(f"  failed: {(r.stderr.strip().splitlines() or ['exit %d' % r.returncode])[-1]}", flush=True)
                    continue
            m = json.load(open(os.path.join(out, "metrics.json")))
            data_nll = next(r["nll"] for r in m["results"] if r["sampler"] == "data")
            teacher = sorted((r for r in m["results"] if r["sampler"] == "teacher"), key=lambda r: r["nfe"])
            rows = [(f"{method} ({r['sampler']})", r, m["train_seconds"], costs[method])
                    for r in m["results"] if r["sampler"] not in ("teacher", "teacher_net", "data")]
            for name, row, seconds, cost in rows:
                equal = next((t for t in teacher if t["mmd"] <= row["mmd"]), None)  # cheapest teacher as good
                table.append(_compare_row(world, name, row, data_nll, f"{seconds:.0f}", f"{cost:.2f}",
                                          equal["nfe"] if equal else "> 32",
                                          f"{equal['ms_per_sample'] / max(row['ms_per_sample'], 1e-9):.1f}x" if equal else "-"))
            for r in m["results"]:  # the network this method's students copy, under its own Euler sampler
                if r["sampler"] == "teacher_net" and r["nfe"] in (1, 4, 32):
                    table.append(_compare_row(world, f"{method} (teacher_net Euler)", r, data_nll, "-", "1", "-", "-"))
            panels.append((method, Image.open(os.path.join(out, "samples.png")).convert("RGB")))
        for t in teacher:  # the teacher's Euler rows of the last run (identical in every run: same noise)
            table.append(_compare_row(world, "teacher (Euler)", t, data_nll, "-", "1", t["nfe"], "1.0x"))
        if panels:  # each method's samples.png (data | teacher | student ...) stacked, one row per method
            font = ImageFont.load_default(size=14)
            canvas = Image.new("RGB", (max(p.width for _, p in panels) + 90, sum(p.height for _, p in panels)), "white")
            draw, y = ImageDraw.Draw(canvas), 0
            for name, p in panels:
                draw.text((4, y + p.height // 2), name, fill="black", font=font)
                canvas.paste(p, (90, y))
                y += p.height
            canvas.save(os.path.join(cfg.out, f"samples_{world}.png"))
    text = [f"Measured by `python common.py compare` on {time.strftime('%Y-%m-%d')}: seed {cfg.seed}, analytic teacher, "
            f"{cfg.steps} training steps on 2D worlds, each method's image recipe on image worlds, "
            f"{cfg.eval_samples} evaluation samples.",
            ""] + table
    with open(os.path.join(cfg.out, "compare.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text))
    print(f"wrote {cfg.out}/compare.md and {cfg.out}/samples_<world>.png")


def _compare_row(world, name, r, data_nll, seconds, cost, equal_nfe, speedup):
    fmt = lambda k: f"{r[k]:.4f}" if k in r else "-"
    return (f"| {world} | {name} | {r['nfe']} | {format_mmd(r)} | {fmt('swd')} | {fmt('mode_tv')} | {r['nll']:.3f} ({data_nll:.3f}) | "
            f"{fmt('ode_err')} | {fmt('cond_acc')} | {seconds} | {cost} | {r['ms_per_sample']:.3f} | {equal_nfe} | {speedup} |")


# ---------------------------------------------------------------------------------------------------
# The papers' claims where the teacher has error:  python common.py claims
# A teacher trained on a finite sample of an exact world has error, measured against the whole world. Each method
# is distilled from it with its image recipe, next to its paper's ablation, over several seeds.

CLAIM_RUNS = {  # method: {variant: extra flags}; the first variant is the method's recipe, the others its ablation
    "dmd2": {"gan_ttur5": [], "no_gan": ["--gan-g", "0", "--gan-d", "0"], "ttur1": ["--ttur", "1"]},
    "freeflow": {"both": [], "prediction": ["--objective", "prediction"], "correction": ["--objective", "correction"]},
    "scm": {"scd": [], "sct": ["--mode", "sct"]},
    "piflow": {"gm_data": [], "dx_data": ["--policy", "dx"], "gm_datafree": ["--trainer", "datafree"]},
}


@dataclass
class ClaimsConfig:
    data: str = "glyphs16"      # an image-shaped mixture world: the truth every sampler is scored against
    train_size: int = 4000      # the teacher's finite training set, drawn once from the world; also the real data
                                # of DMD2's GAN, sCT and pi-Flow's data trainer
    teacher_steps: int = IMAGE_FIT["steps"]  # the recipe's fit budget (IMAGE_FIT) on the finite set: on glyphs16
                                # its 32-step Euler nll is 2.7 (the fit to the exact velocity: -1.0; the data: -1.6)
    methods: str = "dmd2,freeflow,scm,piflow"
    variants: str = ""          # e.g. dmd2:no_gan,freeflow:prediction; empty: every variant of --methods
    seeds: str = "0,1"
    jobs: int = 2               # runs side by side, each with OMP_NUM_THREADS=1
    student_steps: int = 0      # 0: each recipe's own; N: every student trains N steps (smoke runs)
    eval_samples: int = 4000
    out: str = "runs/claims"


def claims(cfg):
    """Train the teacher with error once, run every (method, variant, seed) that has no metrics.json yet (a run
    cut short resumes from its checkpoint), and write claims.md: each student's metrics as mean ± half the range
    over the seeds, next to its teacher's 32-step Euler sampler and the data, all scored against the true world."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    if not is_image_world(cfg.data):
        fail(f"--data {cfg.data!r}: claims need an image-shaped mixture world (glyphs16 or a mixture .npz with shape (C, H, W))")
    unknown = [m for m in _names(cfg.methods) if m not in CLAIM_RUNS]
    if unknown or not _names(cfg.methods):
        fail(f"--methods {cfg.methods!r}: choose from {', '.join(CLAIM_RUNS)} (comma-separated)")
    runs = [(m, v) for m in _names(cfg.methods) for v in CLAIM_RUNS[m]]
    if cfg.variants:
        wanted = _names(cfg.variants)
        bad = [w for w in wanted if tuple(w.split(":", 1)) not in runs]
        if bad:
            fail(f"--variants {', '.join(bad)}: choose from {', '.join(f'{m}:{v}' for m, v in runs)}")
        runs = [r for r in runs if f"{r[0]}:{r[1]}" in wanted]
    try:
        seeds = [int(s) for s in _names(cfg.seeds)]
    except ValueError:
        fail(f"--seeds {cfg.seeds!r}: give comma-separated integers, e.g. 0,1")
    if not seeds or cfg.jobs < 1 or cfg.train_size < 1:
        fail("--seeds needs at least one seed, --jobs and --train-size at least 1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    teachers = {}
    for method in sorted({m for m, _ in runs}, key=lambda m: m != "scm"):  # sCM's own network first, if any
        name = "teacher_scm" if method == "scm" else "teacher"
        teacher_dir = os.path.join(cfg.out, name)
        teachers[method] = os.path.join(teacher_dir, "ckpt.pt")
        if os.path.isfile(os.path.join(teacher_dir, "metrics.json")):
            continue
        # the image recipe's fit (IMAGE_FIT) on the finite set; sCM's teacher is its own network (adaptive
        # double normalisation, time scale 10, §4.1) at the rate that suits it, 1e-3, as its fit to the world
        cmd = [sys.executable, os.path.join(here, "common.py"), "teacher", "--data", cfg.data, "--train-size",
               str(cfg.train_size), "--arch", "mlp", "--hidden", "512", "--depth", "3", "--steps", str(cfg.teacher_steps),
               "--batch", str(IMAGE_FIT["batch"]), "--eval-samples", str(cfg.eval_samples), "--out", teacher_dir]
        cmd += ["--norm", "adn", "--time-scale", "10", "--lr", "1e-3"] if method == "scm" else ["--lr", str(IMAGE_FIT["lr"])]
        cmd += ["--resume"] if os.path.isfile(teachers[method]) else []
        print(" ".join(cmd[1:]), flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            fail(f"training {name} failed; fix the error above and rerun (a checkpoint in {teacher_dir} resumes)")
    pending, running = [], []
    for seed in seeds:  # every variant at the first seed first: a cut-short session still has each one once
        for method, variant in runs:
            out = os.path.join(cfg.out, method, variant, f"seed{seed}")
            if os.path.isfile(os.path.join(out, "metrics.json")):
                continue
            cmd = [sys.executable, os.path.join(here, f"{method}.py"), "--data", cfg.data, "--teacher", teachers[method],
                   "--seed", str(seed), "--out", out] + CLAIM_RUNS[method][variant]
            cmd += [] if method == "freeflow" else ["--train-size", str(cfg.train_size)]  # FreeFlow sees no data
            cmd += ["--steps", str(cfg.student_steps)] if cfg.student_steps else []
            cmd += ["--eval-samples", str(cfg.eval_samples)]
            cmd += ["--resume"] if os.path.isfile(os.path.join(out, "ckpt.pt")) else []
            pending.append((cmd, out))
    failed = []
    while pending or running:
        while pending and len(running) < cfg.jobs:
            cmd, out = pending.pop(0)
            os.makedirs(out, exist_ok=True)
            print(" ".join(cmd[1:]), flush=True)
            log = open(os.path.join(out, "run.log"), "a")
            running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), out, log, time.time()))
        time.sleep(2)
        for job in [j for j in running if j[0].poll() is not None]:
            proc, out, log, start = job
            running.remove(job)
            log.close()
            if proc.returncode != 0:
                failed.append(out)
                print(f"  failed: {out} (exit {proc.returncode}; see {out}/run.log)", flush=True)
            else:
                m = json.load(open(os.path.join(out, "metrics.json")))
                m["wall_seconds"] = time.time() - start
                write_json(os.path.join(out, "metrics.json"), m)
                print(f"  done: {out} in {m['wall_seconds']:.0f} s", flush=True)
    text = claims_table(cfg.out, runs, seeds)
    with open(os.path.join(cfg.out, "claims.md"), "w") as f:
        f.write(text)
    print(text + f"wrote {cfg.out}/claims.md")
    if failed:
        fail(f"{len(failed)} run(s) failed: {', '.join(failed)}; fix and rerun (finished runs are kept)")


def claims_table(root, runs, seeds):
    """Markdown of every finished (method, variant): student rows as mean ± half the range over the seeds found,
    then the teacher's 32-step Euler row and the data row (the same noise and labels in every run); DMD2's critic
    accuracy and FreeFlow's correction check, where the runs recorded them."""
    keys = ["mmd", "swd", "mode_tv", "cond_acc", "nll", "ode_err"]  # ode_err: distance to the teacher's own ODE map
    lines = ["Scored against the true world; mean ± half the range over the seeds listed.", "",
             "| method | variant | sampler | NFE | seeds | " + " | ".join(keys) + " | train s | wall s |",
             "|" + "---|" * (len(keys) + 7)]
    stat = lambda vs, digits=4: f"{np.mean(vs):.{digits}f} ± {(max(vs) - min(vs)) / 2:.{digits}f}"
    check_rows = []
    for method, variant in runs:
        found = {s: os.path.join(root, method, variant, f"seed{s}", "metrics.json") for s in seeds}
        found = {s: json.load(open(p)) for s, p in found.items() if os.path.isfile(p)}
        if not found:
            continue
        groups = {}
        for m in found.values():
            for r in m["results"]:
                key = (r["sampler"], r["nfe"])
                if r["sampler"] not in ("teacher", "teacher_net", "data") or key in (("teacher", 32), ("data", 0)):
                    groups.setdefault(key, []).append(r)
        seconds = lambda k: stat([m.get(k, float("nan")) for m in found.values()], 0)
        for (sampler, nfe), rs in groups.items():
            ours = sampler not in ("teacher", "data")
            cells = [("-" if any(k not in r for r in rs) else stat([r[k] for r in rs]) if ours else f"{rs[0][k]:.4f}")
                     for k in keys]
            lines.append(f"| {method} | {variant} | {sampler} | {nfe or '-'} | {','.join(map(str, found))} | "
                         + " | ".join(cells) + f" | {seconds('train_seconds') if ours else '-'} | "
                         + f"{seconds('wall_seconds') if ours else '-'} |")
        logs = [[json.loads(line) for line in open(os.path.join(root, method, variant, f"seed{s}", "log.jsonl"))
                 if "d_real_acc" in line] for s in found] if method == "dmd2" else []
        if all(logs) and logs:  # the GAN critic's accuracy on real and generated samples, first and last quarter of
            # each seed's training, averaged over the seeds
            quarter = lambda log, last: log[-max(1, len(log) // 4):] if last else log[:max(1, len(log) // 4)]
            acc = lambda k, last: np.mean([np.mean([g[k] for g in quarter(log, last)]) for log in logs])
            lines.append(f"| {method} | {variant} | critic accuracy real / fake, first quarter -> last quarter | | | "
                         f"{acc('d_real_acc', False):.3f} / {acc('d_fake_acc', False):.3f} -> "
                         f"{acc('d_real_acc', True):.3f} / {acc('d_fake_acc', True):.3f} | | | | | | | |")
        checks = [m["correction_check"] for m in found.values() if "correction_check" in m]
        if checks and len(checks) == len(found):  # FreeFlow: the teacher's error where the correction queries it
            check_rows.append((variant, ",".join(map(str, found)), checks))
    if check_rows:
        keys = ["teacher_err_student", "teacher_err_data", "correction", "exact_correction", "cosine"]
        lines += ["", "FreeFlow's correction check (freeflow.correction_check): RMS per dimension at the noise level r, "
                  "mean over the seeds; u the teacher's velocity, u* the exact one, v_g the online network's.", "",
                  "| variant | seeds | r | u - u* at student | u - u* at data | correction v_g - u | v_g - u* | cosine |",
                  "|" + "---|" * 8]
        for variant, seed_list, checks in check_rows:
            for i, row in enumerate(checks[0]):
                cells = [f"{np.mean([c[i][k] for c in checks]):.4f}" if k in row else "-" for k in keys]
                lines.append(f"| {variant} | {seed_list} | {row['r']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bench_attention():
    """Forward and forward+backward of a DiT with attention written out (the form inside jvp()) against the fused
    scaled_dot_product_attention (every other pass), side by side in one run, at two sizes."""
    setup_dist("cpu")
    sizes = {"glyphs16 DiT (16 tokens, hidden 128, depth 4), batch 64": ((1, 16, 16), dict(patch=4), 64),
             "DiT of 256 tokens, hidden 384, depth 4, batch 16": ((3, 32, 32), dict(hidden=384, heads=6, patch=2), 16)}
    for title, (shape, kwargs, batch) in sizes.items():
        net = new_backbone(shape, 10, "dit", **kwargs)
        x, t, y = torch.randn(batch, *shape), torch.rand(batch), torch.randint(0, 10, (batch,))

        def attention(explicit, backward):
            def step():
                with explicit_attention(explicit):
                    if backward:
                        net.zero_grad(set_to_none=True)
                        net(x, t, y).square().mean().backward()
                    else:
                        with torch.no_grad():
                            net(x, t, y)
            return step
        for backward in (False, True):
            passes = "forward+backward" if backward else "forward"
            print(f"{title}: {passes}")
            bench({"explicit softmax attention (before)": attention(True, backward),
                   "scaled_dot_product_attention (now)": attention(False, backward)})


def bench_jvp():
    """A forward, torch.func.jvp with torch's own rule for linear layers, and jvp() with the one-product rule, side
    by side in one run, on the networks the methods differentiate: sCM's 2D MLP, the image recipe's MLP, the DiT."""
    setup_dist("cpu")
    nets = {"2D MLP, hidden 96 (sCM's default), batch 512": ((2,), 0, dict(arch="mlp", hidden=96, norm="adn", time_scale=10.0), 512),
            "glyphs16 MLP, hidden 512, depth 3 (image recipe), batch 128": ((1, 16, 16), 10, dict(arch="mlp", hidden=512, depth=3), 128),
            "glyphs16 DiT (16 tokens, hidden 128, depth 4), batch 64": ((1, 16, 16), 10, dict(arch="dit", patch=4), 64)}
    for title, (shape, num_classes, kwargs, batch) in nets.items():
        net = new_backbone(shape, num_classes, **kwargs)
        x, t, dx, dt = torch.randn(batch, *shape), torch.rand(batch), torch.randn(batch, *shape), torch.rand(batch)
        y = torch.randint(0, num_classes, (batch,)) if num_classes else None
        f = lambda x, t: net(x, t, y)

        def torch_rule():
            with explicit_attention():
                torch.func.jvp(f, (x, t), (dx, dt))
        print(f"{title} (ratio: in forwards)")
        with torch.no_grad():
            bench({"forward": lambda: f(x, t), "jvp, torch's linear rule (before)": torch_rule,
                   "jvp, one tangent product per linear layer (now)": lambda: jvp(f, (x, t), (dx, dt))})


if __name__ == "__main__":
    commands = ("teacher", "compare", "claims", "bench-attention", "bench-jvp")
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        fail("usage: python common.py teacher [--data checkerboard|glyphs16|mix.npz|path ...] | python common.py compare"
             " | python common.py claims | python common.py bench-attention | python common.py bench-jvp; --help lists flags")
    if sys.argv[1] == "teacher":
        train_teacher(parse_config(TeacherConfig, sys.argv[2:]))
    elif sys.argv[1] == "compare":
        compare(parse_config(CompareConfig, sys.argv[2:]))
    elif sys.argv[1] == "claims":
        claims(parse_config(ClaimsConfig, sys.argv[2:]))
    elif sys.argv[1] == "bench-attention":
        bench_attention()
    else:
        bench_jvp()
