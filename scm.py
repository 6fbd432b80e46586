"""
sCM: continuous-time consistency models with TrigFlow, trained by consistency training (sCT) or
distillation (sCD). Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency
Models", arXiv 2410.11081 (ICLR 2025). Algorithm 1 of the paper, top to bottom:

  TrigFlow (§3):  x_t = cos(t) x0 + sin(t) z,  z ~ N(0, sigma_d^2 I),  t in [0, pi/2]
  consistency function (Eq. 5):  f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t)
  tangent (Eq. 6, rearranged as in §5.1):
      g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt)
  loss (Alg. 1):  exp(w(t)) / D * ||F - F^- - g / (||g|| + c)||^2 - w(t)
with dx_t/dt = cos(t) z - sin(t) x0 (sCT) or the teacher's PF-ODE velocity (sCD), F^- = stopgrad(F)
and dF^-/dt by forward-mode AD (torch.func.jvp). Sampling: one step from t_max, or a few steps with
re-noising in between.

    python scm.py                                  # sCD, 2D checkerboard, analytic teacher, a few minutes on CPU
    python scm.py --mode sct                       # consistency training from data (no teacher velocity)
    python scm.py --data glyphs16                  # class-conditional 16x16 glyphs with the image recipe (Config)
    python scm.py --data glyphs16 --guidance 2 --guidance-range 1,3   # CFG scale drawn per example, fed to F
    python scm.py --jvp fd                         # finite-difference tangent (nets without forward-mode AD)
    python scm.py --bench                          # one sCM step vs one flow-matching step (glyphs16 DiT)
    python scm.py --data /datasets/cifar10 --teacher runs/teacher/ckpt.pt --batch 512 --lr 1e-4
    torchrun --standalone --nproc_per_node=8 scm.py --data /datasets/cifar10 --teacher ckpt.pt \\
        --batch 512 --steps 400000 --lr 1e-4 --p-mean -1.0 --p-std 1.4 --warmup 10000 --ema-decay 0.9999 \\
        --fid-ref ref.npz --fid-weights pt_inception.pth

Conventions. The project's teachers are rectified flows, x_r = (1 - r) x0 + r eps, u = eps - x0 (eps ~ N(0, I)).
Paper Eq. 29 maps any x' = alpha x0 + sigma eps onto TrigFlow: tan t = sigma / (sigma_d alpha) and
x_t = sigma_d x' / sqrt(alpha^2 sigma_d^2 + sigma^2). With alpha = 1 - r, sigma = r this reads
    r = sigma_d sin t / (cos t + sigma_d sin t),     x_r = x_t / (cos t + sigma_d sin t),     z = sigma_d eps,
and the TrigFlow velocity is dx_t/dt = cos(t) z - sin(t) x0, so from the teacher's posterior means
x0_hat = x_r - r u, eps_hat = x_r + (1 - r) u:   sigma_d F_teacher = cos(t) sigma_d eps_hat - sin(t) x0_hat.
"""
import copy
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from common import (DataSource, Logger, autocast, barrier, bench, build_backbone, check_finite, cleanup, ema_update,
                    evaluate, evaluate_real, fail, floats, flow_matching_loss, format_table, init_from_teacher, is_main,
                    jvp, load_training_state, maybe_compile, parse_config, prepare_out, print0, save_training_state,
                    setup_dist, teacher_for, timestep_embedding, unwrap, wrap_ddp)


@dataclass
class Config:
    mode: str = "scd"              # scd (distillation, tangent from the teacher) | sct (training, tangent from data)
    data: str = "checkerboard"     # world preset / mixture .npz (scored exactly), or an image dataset path
    teacher: str = "gmm"           # 'gmm': the analytic world; or a `python common.py teacher` checkpoint
    out: str = "runs/scm"
    steps: int = 2000              # toy scale; the paper trains 100k-400k iterations
    batch: int = 512               # global batch, split across ranks (paper CIFAR-10: 512)
    lr: float = 1e-3               # RAdam, betas (0.9, 0.99), no schedule. Paper CIFAR-10: 1e-4 at 400k iterations;
                                   # 10x here because the toy run is 2000 iterations
    ema_decay: float = 0.99        # EMA for sampling. Paper: half-life 0.5 Mimg (~0.9993/iteration at batch 512);
                                   # shorter here to match the short run
    sigma_d: float = 0.0           # TrigFlow data standard deviation. 0: the data's own, as the paper has it (data
                                   # normalised to sigma_d = 0.5): a mixture world's RMS std per dimension, or 0.5
                                   # for images in [-1, 1]. sigma_d sets where the proposal below puts its noise
                                   # levels relative to the data (README, "sCM defaults")
    p_mean: float = -2.2           # proposal tan(t) = exp(tau) / sigma_d, tau ~ N(p_mean, p_std^2). Paper CIFAR-10:
                                   # -1.0 (kept for images, below). On 2D worlds more training at low noise sharpens
    p_std: float = 1.4             # the student: -1.0 sprayed mass between the modes (README, "sCM defaults")
    warmup: int = 500              # H: tangent warmup r = min(1, step / H). Paper: 10k of 400k iterations
    tangent_c: float = 0.1         # tangent normalisation g / (||g|| + c) (paper: c = 0.1)
    tangent_norm: str = "l2"       # l2: full L2 norm as in the paper | rms: ||g|| / sqrt(D) (FastGen, sCM-mnist)
    jvp: str = "jvp"               # jvp: torch.func.jvp | fd: float64 central difference (nets without forward AD)
    fd_step: float = 1e-4          # step of the central difference along the trajectory (--jvp fd)
    sigma_max: float = 80.0        # first sampling time t_max = arctan(sigma_max / sigma_d) (paper: 80)
    mid_times: str = "0.3"         # re-noising times of the multi-step sampler. Paper 2-step: 1.1 (kept for images,
                                   # below); on 2D worlds a lower middle time refines more (README, "sCM defaults")
    guidance: float = 1.0          # CFG scale of the sCD teacher (when not drawn) and of the evaluation
    guidance_range: str = ""       # "lo,hi": draw the sCD CFG scale per example from U[lo, hi] and feed it to F
                                   # (paper ImageNet 512: U[1, 2])
    image_size: int = 32           # image folders are resized to this (must match the teacher)
    train_size: int = 0            # sCT's data: the first N examples, or N samples drawn once from a world. 0: all
    dropout: float = 0.0           # student dropout (paper: 0.2 sCT / 0 sCD on CIFAR-10); same mask in both passes
    grad_clip: float = 0.0         # 0: off (the paper does not clip)
    arch: str = "auto"             # with --teacher gmm: trunk of the network fitted to the world: auto (MLP for
                                   # vectors, DiT for images) | mlp | dit
    hidden: int = 96               # ... its width and depth. 96, not the other methods' 128: the first run, fit
                                   # included, in under five minutes; 128 met the same 2D bounds in 511 s (README)
    depth: int = 4
    time_scale: float = 10.0       # with --teacher gmm: frequency scale of the fitted network's sinusoidal time input.
                                   # §4.1 / Eq. 7: dF/dt grows with it. Measured on the default run: at the trunk's
                                   # usual 1000 the time part of the tangent blew up (rms up to ~390) and the samples
                                   # collapsed (1-NFE mmd 0.51); 1 and 10 both train stably (1-NFE mmd 0.029, 0.031;
                                   # measured at sigma_d 0.5, p_mean -1.0)
    fit_steps: int = 3000          # with --teacher gmm on vector data: steps of that fit (batch 512). sCD copies its
                                   # network closely: from the shared 1000-step fit, 8gaussians 2-NFE swd 0.062 and
                                   # nll 0.92 missed their bounds (0.053, 0.86; README, Quickstart); 3000 meets them
    eval_samples: int = 4000
    fid_ref: str = ""              # real data: reference statistics .npz for FID (eval_fid.py)
    fid_weights: str = ""          # real data: pt_inception weights for FID
    fid_samples: int = 50000
    log_every: int = 100
    ckpt_every: int = 1000
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    compile: bool = False
    bench: bool = False
    bench_data: str = "glyphs16"   # --bench times the steps on this data's backbone (the DiT trunk for images)
    bench_batch: int = 64          # ... at this global batch

    # The image recipe: on an image-shaped mixture world (glyphs16, or a mixture .npz with shape (C, H, W)) these
    # values replace the defaults above; flags given on the command line still win (README, "Images").
    # Steps and batch fit a CPU budget of 20 minutes per run, training and evaluation included
    # (paper CIFAR-10: 400k iterations at batch 512, lr 1e-4).
    # The fitted network is a wide MLP on flat pixels: on glyphs16 the DiT fit followed the label in 56 % of
    # its own 32-step samples. lr 6e-4 drew the label in 84 % / 91 % of 1- / 2-NFE samples, 3e-4 in 81 % / 87 %
    # (2000 steps). Longer runs keep helping; 3600 steps fill the budget (968-995 s wall beside a job, the fit
    # cached): seed 0 at 2800 / 3200 / 3600 steps, 1- / 2-NFE cond_acc 0.847 / 0.895 / 0.912 and 0.910 / 0.945 /
    # 0.963, nll 20.7 / 17.3 / 14.8 and 12.3 / 8.8 / 7.1; seed 1 at 3600: cond_acc 0.916 / 0.954.
    # A longer EMA lags a student that is still improving: 0.998 at 2800 steps, cond_acc 0.751 / 0.838.
    # CFG 1.5 for the teacher's tangent blurred the student (cond_acc 0.63 / 0.69).
    IMAGE_RECIPE = {"arch": "mlp", "hidden": 512, "depth": 3, "p_mean": -1.0, "mid_times": "1.1",
                    "steps": 3600, "batch": 128, "lr": 6e-4, "ema_decay": 0.995, "guidance": 1.0}


def bc(v, like):
    """(B,) -> (B, 1, ...) to broadcast against like."""
    return v.view(-1, *[1] * (like.ndim - 1))


# ---------------------------------------------------------------------------------------------------
# TrigFlow <-> rectified flow (paper Eq. 29, derivation in the docstring)

def rf_time_and_scale(t, sigma_d):
    """(r, scale) with r the rectified-flow time of TrigFlow time t and x_r = x_t / scale."""
    scale = torch.cos(t) + sigma_d * torch.sin(t)
    return sigma_d * torch.sin(t) / scale, scale


def teacher_trigflow_velocity(teacher, x_t, t, y, guidance, sigma_d):
    """dx_t/dt of the teacher's PF-ODE in TrigFlow units (= sigma_d F_teacher), from its RF velocity (with CFG)."""
    r, scale = rf_time_and_scale(t, sigma_d)
    x_r = x_t / bc(scale, x_t)
    u = teacher.velocity(x_r, r, y, guidance)
    x0_hat, eps_hat = x_r - bc(r, u) * u, x_r + bc(1 - r, u) * u
    return bc(torch.cos(t), x_t) * sigma_d * eps_hat - bc(torch.sin(t), x_t) * x0_hat


# ---------------------------------------------------------------------------------------------------
# The student F(x_t / sigma_d, t) and the adaptive weight w(t)
#
# F is built around the project's backbone N(x_r, r), a rectified-flow velocity network copied from the
# teacher. Writing the teacher's conversion above with N in place of u gives, with scale = cos t + sigma_d sin t,
#     F(x~, t) = ((sigma_d cos t - sin t) x~ + N(sigma_d x~ / scale, r(t))) / scale,      x~ = x_t / sigma_d,
# so at initialisation F is exactly the teacher's TrigFlow velocity (the paper initialises from the TrigFlow
# teacher). The time input is the RF time r(t), not the paper's identity c_noise(t) = t (§4.1): the copied
# weights only understand r. What §4.1 asks of c_noise is a bounded sin(t) dc_noise/dt (Eq. 7; EDM's
# log(sigma_d tan t) blows up at pi/2); here dr/dt = sigma_d / scale^2 stays within [sigma_d, 1/sigma_d]
# and scale >= min(1, sigma_d), so every coefficient above is smooth on [0, pi/2]. The embedding is the
# positional (sinusoidal) one computed in fp32 (common.timestep_embedding); its frequencies scale with
# the backbone's time_scale, which sets the size of dF/dt (§4.1: small scales are stable).

class TrigFlowStudent(nn.Module):
    def __init__(self, net, sigma_d, weight_freqs=128):
        super().__init__()
        self.net, self.sigma_d, self.weight_freqs = net, sigma_d, weight_freqs
        # w_phi(t): a linear head on a sinusoidal embedding of t (as EDM2's Fourier -> linear), zero-initialised
        self.weight_head = nn.Linear(weight_freqs, 1)
        nn.init.zeros_(self.weight_head.weight)
        nn.init.zeros_(self.weight_head.bias)

    def forward(self, x_scaled, t, y=None, g=None, return_weight=False):
        r, scale = rf_time_and_scale(t, self.sigma_d)
        sd, cos, sin, scale_b = self.sigma_d, bc(torch.cos(t), x_scaled), bc(torch.sin(t), x_scaled), bc(scale, x_scaled)
        N = self.net(sd * x_scaled / scale_b, r, y, g=g)
        F = ((sd * cos - sin) * x_scaled + N) / scale_b
        if not return_weight:
            return F
        w = self.weight_head(timestep_embedding(t, self.weight_freqs, scale=10.0)).squeeze(-1)
        return F, w


def consistency_fn(net, x_t, t, y=None, g=None):
    """f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t)   (paper Eq. 5)."""
    sd = net.sigma_d
    return bc(torch.cos(t), x_t) * x_t - bc(torch.sin(t), x_t) * sd * net(x_t / sd, t, y, g)


# ---------------------------------------------------------------------------------------------------
# Objective (Algorithm 1)

def same_dropout_masks(device):
    """Every network evaluation of one step starts from the same RNG state, so the tangent pass(es) and the
    gradient pass draw the same dropout masks (F^- must be the function that F is)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


@torch.no_grad()
def cos_sin_dF_dt(net, x_scaled, t, dxdt, y, g, method="jvp", fd_step=1e-4):
    """cos(t) sin(t) dF^-/dt along the trajectory, dF/dt = grad_x~ F . (dx_t/dt) / sigma_d + dF/dt (§5.1):
    the JVP of F at (x_t / sigma_d, t) with tangent cos(t) sin(t) (dx_t/dt / sigma_d, 1). Forward-mode AD on
    the plain module (never the DDP wrapper), under no_grad so no reverse graph is kept. Scaling the tangent
    by cos t sin t keeps intermediate values bounded near t = 0 and t = pi/2 (§5.1)."""
    cs = torch.cos(t) * torch.sin(t)
    tangent_x, tangent_t = bc(cs, dxdt) * dxdt / net.sigma_d, cs
    if method == "jvp":
        with same_dropout_masks(x_scaled.device):
            return jvp(lambda xs, tt: net(xs, tt, y, g), (x_scaled, t), (tangent_x, tangent_t))[1]
    # central difference with the network evaluated in float64 (a double copy of its weights per call)
    params = {k: v.double() for k, v in list(net.named_parameters()) + list(net.named_buffers())}
    g64 = None if g is None else g.double()

    def F64(sign):
        xs = x_scaled.double() + sign * fd_step * tangent_x.double()
        with same_dropout_masks(x_scaled.device), torch.autocast(x_scaled.device.type, enabled=False):
            return torch.func.functional_call(net, params, (xs, t.double() + sign * fd_step * tangent_t.double(), y, g64))
    return ((F64(1) - F64(-1)) / (2 * fd_step)).to(x_scaled.dtype)


def consistency_tangent(F_minus, cs_dF, x_t, dxdt, t, r, sigma_d):
    """g = -cos^2 t (sigma_d F^- - dx_t/dt) - r cos t sin t (x_t + sigma_d dF^-/dt)   (Alg. 1, §5.1).
    At r = 1 this is cos(t) df^-/dt, the prior weight w(t) = 1 / (sigma_d tan t) included (App. D), so no
    extra 1/sigma weight is applied. Warmup r < 1 scales only the second term (§4.2)."""
    cos, sin = bc(torch.cos(t), x_t), bc(torch.sin(t), x_t)
    return -cos ** 2 * (sigma_d * F_minus - dxdt) - r * (cos * sin * x_t + sigma_d * cs_dF)


def normalize_tangent(g, c, kind="l2"):
    """g / (||g|| + c) per example (§4.2 tangent normalisation); the paper's norm is the full L2 norm."""
    norm = g.flatten(1).norm(dim=1)
    if kind == "rms":
        norm = norm / math.sqrt(g[0].numel())
    return g / bc(norm + c, g)


def scm_loss(model, teacher, x0, y, g, warmup_r, cfg):
    """One Algorithm-1 loss. model: the (DDP-wrapped) TrigFlowStudent; g: per-example CFG scale fed to the
    student (or None). Returns (loss, stats)."""
    sd, net = cfg.sigma_d, unwrap(model)
    tau = cfg.p_mean + cfg.p_std * torch.randn(len(x0), device=x0.device)
    t = torch.atan(torch.exp(tau) / sd)                      # proposal: tan t = e^tau / sigma_d
    z = sd * torch.randn_like(x0)
    cos, sin = bc(torch.cos(t), x0), bc(torch.sin(t), x0)
    x_t = cos * x0 + sin * z
    with torch.no_grad():
        if cfg.mode == "sct":
            dxdt = cos * z - sin * x0                        # unbiased single-sample estimate of dx_t/dt
        else:
            guidance = cfg.guidance if g is None else g
            dxdt = teacher_trigflow_velocity(teacher, x_t, t, y, guidance, sd)
    with autocast(x0.device):
        cs_dF = cos_sin_dF_dt(net, x_t / sd, t, dxdt, y, g, cfg.jvp, cfg.fd_step).float()
        F, w = model(x_t / sd, t, y, g, return_weight=True)  # gradient pass, through DDP
    F, w = F.float(), w.float()
    F_minus = F.detach()
    raw = consistency_tangent(F_minus, cs_dF, x_t, dxdt, t, warmup_r, sd)
    target = normalize_tangent(raw, cfg.tangent_c, cfg.tangent_norm)
    mse = (F - F_minus - target).flatten(1).pow(2).mean(1)   # ||.||^2 / D
    loss = (torch.exp(w) * mse - w).mean()                   # adaptive weighting (Alg. 1, App. D)
    stats = {"loss": loss.item(), "mse": mse.mean().item(), "tangent_rms": float(raw.flatten(1).pow(2).mean(1).sqrt().mean()),
             "w": w.mean().item(), "r": float(warmup_r)}
    return loss, stats


# ---------------------------------------------------------------------------------------------------
# Sampler: f(x, t_max) from x = sigma_d eps; multi-step re-noises x0_hat to each mid time (§5.2, App. G.2)

@torch.no_grad()
def sample(net, eps, y, times, g=None):
    """eps ~ N(0, I) (the project's noise) -> x0 with len(times) network evaluations."""
    sd, x0 = net.sigma_d, None
    for i, t in enumerate(times):
        tt = torch.full((len(eps),), t, device=eps.device)
        x = sd * eps if i == 0 else math.cos(t) * x0 + math.sin(t) * sd * torch.randn_like(x0)
        x0 = consistency_fn(net, x, tt, y, g)
    return x0


# ---------------------------------------------------------------------------------------------------
# Training

def check_config(cfg, world_size):
    if cfg.mode not in ("scd", "sct"):
        fail(f"--mode must be scd or sct, got {cfg.mode!r}")
    if cfg.jvp not in ("jvp", "fd") or cfg.tangent_norm not in ("l2", "rms"):
        fail("--jvp must be jvp or fd, and --tangent-norm l2 or rms")
    if (cfg.bench_batch if cfg.bench else cfg.batch) % world_size:
        fail(f"--batch / --bench-batch must be divisible by the number of processes {world_size}")
    if cfg.sigma_d <= 0 or cfg.sigma_max <= 0 or cfg.tangent_c < 0 or cfg.p_std <= 0:
        fail("--sigma-d (0: the data's own), --sigma-max and --p-std must be positive and --tangent-c non-negative")
    times = [math.atan(cfg.sigma_max / cfg.sigma_d)] + floats(cfg.mid_times)
    if any(a <= b for a, b in zip(times, times[1:])) or times[-1] <= 0:
        fail(f"--mid-times must decrease from below t_max = {times[0]:.4f} and stay above 0, got {cfg.mid_times!r}")
    g_range = floats(cfg.guidance_range) if cfg.guidance_range else None
    if g_range is not None and (len(g_range) != 2 or not 0 < g_range[0] <= g_range[1]):
        fail(f"--guidance-range takes 'lo,hi' with 0 < lo <= hi, got {cfg.guidance_range!r}")
    if cfg.mode == "sct" and (g_range or cfg.guidance != 1):
        fail("classifier-free guidance is part of sCD (--mode scd); sCT has no teacher to guide")
    return times, g_range


def data_sigma_d(data):
    """The data's standard deviation: exact for a 2D/vector mixture world (RMS over dimensions); the paper's 0.5
    for images in [-1, 1], image-shaped mixture worlds included."""
    if data.world is None or len(data.shape) == 3:
        return 0.5
    return math.sqrt(data.world.total_variance() / data.world.dim)


def train(cfg):
    d = setup_dist(cfg.device, cfg.seed)
    data = DataSource(cfg.bench_data if cfg.bench else cfg.data, cfg.image_size, seed=cfg.seed,
                      train_size=0 if cfg.bench else cfg.train_size)
    if cfg.sigma_d == 0:
        cfg = replace(cfg, sigma_d=data_sigma_d(data))
    times, g_range = check_config(cfg, d.world)
    prepare_out(cfg)
    batch = (cfg.bench_batch if cfg.bench else cfg.batch) // d.world
    # The fitted stand-in for a teacher checkpoint uses the paper's adaptive double normalisation and a small
    # time-embedding scale (§4.1); a checkpoint brings its own architecture (train it with
    # `common.py teacher --norm adn --time-scale 10`).
    # It fits at lr 1e-3 on images too: on glyphs16 this network at the other methods' 2e-3 drew blurrier 32-step
    # Euler samples (nll 0.09 against -0.40, mmd 0.060 against 0.050).
    arch = {"arch": cfg.arch, "hidden": cfg.hidden, "depth": cfg.depth, "norm": "adn", "time_scale": cfg.time_scale}
    teacher, teacher_net = teacher_for(cfg, data, d.device, arch_kwargs=arch,  # --bench: an untrained stand-in
                                       fit_steps=cfg.fit_steps if len(data.shape) == 1 else None, fit_lr=1e-3)
    if data.num_classes != teacher_net.num_classes:
        fail(f"--data has {data.num_classes} classes but the teacher network knows {teacher_net.num_classes}")

    # student: the teacher network (+ a zero-initialised CFG-scale input when the scale is drawn), wrapped into F
    net = build_backbone({**teacher_net._spec, "dropout": cfg.dropout, "use_g": g_range is not None})
    init_from_teacher(net, teacher_net)
    student = TrigFlowStudent(net, cfg.sigma_d).to(d.device)
    ema = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.RAdam(student.parameters(), lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8)  # App. G.2
    state = {"model": student, "ema": ema, "opt": opt}
    ckpt_path, step = os.path.join(cfg.out, "ckpt.pt"), 0
    if cfg.resume:
        step = load_training_state(ckpt_path, cfg, state, data, d.device)
    model = maybe_compile(wrap_ddp(student), cfg.compile)

    def draw_guidance(n):
        if g_range is None:
            return None
        return g_range[0] + (g_range[1] - g_range[0]) * torch.rand(n, device=d.device)

    def train_step():
        x0, y = data.next_batch(batch, d.device)
        warmup_r = min(1.0, step / cfg.warmup) if cfg.warmup > 0 else 1.0
        loss, stats = scm_loss(model, teacher, x0, y, draw_guidance(len(x0)), warmup_r, cfg)
        check_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        opt.step()
        return {**stats, "grad_norm": float(grad_norm)}

    if cfg.bench:  # one sCM iteration vs one flow-matching step of the same backbone and batch
        x0, y = data.next_batch(batch, d.device)

        def fm_step():
            loss = flow_matching_loss(lambda x, t, yy: unwrap(model).net(x, t, yy, g=draw_guidance(len(x))), x0, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        # the passes an iteration cannot do without: the flow-matching step's forward+backward+update, plus the
        # teacher's forward (sCD) and one JVP of the student (the tangent), on the same network and batch
        t = torch.rand(len(x0), device=d.device)
        tangent = (torch.randn_like(x0), torch.ones_like(t))

        @torch.no_grad()
        def forward():
            unwrap(model)(x0, t, y)

        @torch.no_grad()
        def student_jvp():
            jvp(lambda xs, tt: unwrap(model)(xs, tt, y), (x0, t), tangent)
        step_name = f"{cfg.mode} ({cfg.jvp})"
        teacher_forwards = 1 if cfg.mode == "scd" else 0
        floor = ({"flow matching": 1, "jvp": 1, "forward": teacher_forwards} if cfg.jvp == "jvp"
                 else {"flow matching": 1, "forward": teacher_forwards + 2})  # fd: two forwards for the JVP
        print0(f"{cfg.bench_data}: {type(net).__name__}, batch {batch}, {sum(p.numel() for p in net.parameters())} parameters")
        bench({"flow matching": fm_step, step_name: train_step}, passes={"forward": forward, "jvp": student_jvp},
              floors={step_name: floor})
        cleanup()
        return None

    logger = Logger(cfg.out, cfg.steps, step, desc=cfg.mode)
    while step < cfg.steps:
        stats = train_step()
        ema_update(ema, model, cfg.ema_decay)
        step += 1
        logger.step()
        if step % cfg.log_every == 0 or step == cfg.steps:
            logger.log(step, stats)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_training_state(ckpt_path, cfg, step, state, data, extra={"backbone": net._spec})
    train_seconds = logger.seconds()
    logger.close()

    def sampler(steps):
        return lambda z, y: sample(ema, z, y, steps, None if g_range is None else torch.full((len(z),), cfg.guidance,
                                                                                            device=z.device))
    samplers = [{"sampler": "student", "nfe": 1, "fn": sampler(times[:1]), "ode": True}]
    if len(times) > 1:  # re-noising leaves the teacher's ODE map, so no ode_err for it
        samplers.append({"sampler": "student", "nfe": len(times), "fn": sampler(times), "ode": False})
    if data.world is not None:
        if is_main():  # exact metrics of a few thousand samples: rank 0 alone
            rows = evaluate(samplers, data.world, teacher, cfg, cfg.out, "scm", train_seconds,
                            "gmm" if cfg.teacher == "gmm" else "learned", n=cfg.eval_samples, guidance=cfg.guidance,
                            device=d.device, teacher_net=teacher_net)
            print0(format_table(rows))
    else:
        evaluate_real(samplers, data.shape, data.num_classes, cfg, "scm", train_seconds, d.device)
    print0(f"wrote {cfg.out}/ckpt.pt, metrics.json, samples.png ({train_seconds:.1f} s of training)")
    barrier()
    cleanup()
    return ema


def main():
    train(parse_config(Config))


if __name__ == "__main__":
    main()
