"""
pi-Flow: policy-based few-step generation via imitation distillation.
Chen, Zhang, Tan, Guibas, Wetzstein, Bi, arXiv 2510.14974 (ICLR 2026); official code github.com/Lakonik/piFlow.

The student G_phi is called once per segment, at the segment start (x_s, sigma_s). It does not output
a velocity but a network-free *policy* pi(x, sigma) that gives the velocity anywhere later in the
segment; the segment is then integrated by cheap Euler substeps of the policy (128 over the whole
trajectory). Two policies (official `piflow_policies/`):
  GM (GMFlow): K Gaussian components over x0 with per-pixel weights and one std per sample; the
      velocity at a later (x, sigma) is the closed-form transport of that mixture (GMFlow, arXiv 2504.05304):
        zeta = (a/sigma)^2 - (a_s/sigma_s)^2,  nu = a x / sigma^2 - a_s x_s / sigma_s^2      (a = 1 - sigma)
        m'_k = (m_k + v nu) / (1 + v zeta),  log A'_k = log A_k + <m_k, nu - zeta m_k / 2> / (1 + v zeta)
        pi(x, sigma) = (x - sum_k softmax(log A')_k m'_k) / sigma
  DX: N x0 predictions over the segment, linearly interpolated in raw time.
Imitation distillation (pi-ID, paper Algorithm 2 / data-free Algorithm 3): roll the detached,
dropout-perturbed policy out to S random times of its segment, query the teacher (with CFG) there,
and regress the policy's velocity at those on-policy states onto the teacher's with
scale * 1/2 * MSE. No JVP, no auxiliary network, no GAN.

Conventions: the project's rectified flow x_t = (1 - t) x0 + t eps, u = eps - x0, is pi-Flow's own
(sigma = t). Raw time tau maps to sigma by the SD3/FLUX shift sigma = s tau / (1 + (s - 1) tau).

    python piflow.py                                   # GM policy, 1- and 4-NFE students, 2D checkerboard, analytic teacher
    python piflow.py --policy dx                       # DX policy (10 x0 predictions per segment)
    python piflow.py --trainer datafree                # data-free pi-ID: chained rollouts from noise
    python piflow.py --window-substeps 3 --num-intermediate 4 --mix-decay-iters 500   # the FLUX recipe's extras
    python piflow.py --data glyphs16                   # class-conditional 16x16 glyphs with the image recipe (Config)
    python piflow.py --teacher runs/teacher/ckpt.pt    # a learned teacher (python common.py teacher)
    python piflow.py --bench                           # one pi-ID step vs one flow-matching step
    torchrun --standalone --nproc_per_node=8 piflow.py --data /datasets/cifar10 --teacher ckpt.pt --nfes 2 \\
        --batch 512 --steps 100000 --warmup 400 --ema-start 400 --fid-ref ref.npz --fid-weights pt_inception.pth
"""
import copy
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (DataSource, Logger, autocast, barrier, bench, broadcast_module, build_backbone,
                    check_finite, cleanup, ema_update, evaluate, evaluate_real, fail, floats, flow_matching_loss,
                    format_table, init_from_teacher, is_main, load_training_state, maybe_compile, parse_config,
                    prepare_out, print0, save_training_state, setup_dist, teacher_for, wrap_ddp)


@dataclass
class Config:
    data: str = "checkerboard"     # world preset / mixture .npz (scored exactly), or an image dataset path
    teacher: str = "gmm"           # 'gmm': the analytic world; or a `python common.py teacher` checkpoint
    out: str = "runs/piflow"
    policy: str = "gm"             # gm | dx
    nfes: str = "1,4"              # one student per NFE count, trained side by side (paper: 1, 2 on ImageNet; 4 on T2I)
    trainer: str = "data"          # data: segment starts are noised data (PiFlowImitation) | datafree: chained rollouts
    train_size: int = 0            # the data trainer's data: the first N examples, or N samples drawn once from a world
    steps: int = 400               # toy scale (ImageNet 1-NFE: 140k iterations at batch 4096)
    batch: int = 256               # global batch, split across ranks
    num_components: int = 32       # K of the GM policy (ImageNet 32, FLUX/Qwen 8)
    dx_grid: int = 10              # N of the DX policy (FLUX/Qwen 10)
    num_intermediate: int = 2      # S on-policy states (teacher calls) per segment (ImageNet 2, FLUX 4)
    window_substeps: int = 0       # W: regress the policy velocity averaged over ~W substeps (ImageNet 0, FLUX/Qwen 3)
    total_substeps: int = 128      # M: policy Euler substeps over the whole trajectory, uniform in raw time
    final_step_scale: float = 1.0  # f: the last segment is f times as long (ImageNet 1, T2I 0.5)
    shift: float = 1.0             # s of the time shift (ImageNet 1, FLUX/Qwen 3.2)
    gm_dropout: float = 0.05       # component dropout of the rollout policy (ImageNet 0.05, T2I 0.1)
    mix_decay_iters: int = 0       # D of scheduled trajectory mixing (FLUX 2000; off elsewhere)
    temperature: float = 1.0       # GM sampling temperature on all but the last segment (ImageNet 1.0, T2I 0.3 at 4 NFE)
    loss_scale: float = 3.0        # scale of 1/2 MSE (ImageNet 3, T2I 30)
    lr: float = 5e-5               # AdamW, betas (0.9, 0.95), no weight decay (reference ImageNet value; GM also
                                   # trains at 1e-3 here, DX diverges there: its loss ~ |x0 error / sigma|^2 spikes)
    warmup: int = 100              # linear lr warm-up from 1e-3 x lr (reference: 400); the clip starts after it
    grad_clip: float = 50.0        # gradient-norm clip from the end of warm-up (reference: 50)
    ema_gamma: float = 7.0         # power EMA beta_t = (1 - 1/t)^(gamma + 1), t counted from --ema-start (reference: 7)
    ema_start: int = 100           # reference: 400
    bias_noise: float = 0.05       # std of the noise added to each replicated mean bias (breaks the K-fold symmetry)
    guidance: float = 1.0          # teacher CFG scale inside the target (and of the teacher rows in the evaluation)
    guidance_interval: str = "0,1"  # CFG only for t in this interval (ImageNet REPA: 0,0.7)
    arch: str = "auto"             # with --teacher gmm: trunk of the network fitted to the world: auto (MLP for
                                   # vectors, DiT for images) | mlp | dit
    hidden: int = 128              # ... its width and depth
    depth: int = 4
    eval_samples: int = 4000
    fid_ref: str = ""              # real data: reference statistics .npz for FID (eval_fid.py)
    fid_weights: str = ""          # real data: pt_inception weights for FID
    fid_samples: int = 50000
    log_every: int = 100
    ckpt_every: int = 500
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
    # (paper ImageNet 1-NFE: 140k iterations at batch 4096).
    # The fitted network is a wide MLP on flat pixels: on glyphs16 the DiT fit followed the label in 56 % of
    # its own 32-step samples. Teacher CFG 1.5 (the paper's ImageNet teachers: 2.7-3.2) sharpens the 4-NFE student
    # on two seeds: mmd 0.039 / 0.037 -> 0.032 / 0.029, nll 0.79 / 0.85 -> 0.51 / 0.53 (mode_tv 0.19 -> 0.21).
    # 4000 steps fill the budget (1046 / 1082 s wall beside a job, seeds 0 / 1) and sharpen the 4-NFE student
    # further (seed 0: mmd 0.030 -> 0.023, nll 0.25 -> 0.03 against 2000 steps; seed 1 at 4000: 0.025, 0.06).
    IMAGE_RECIPE = {"arch": "mlp", "hidden": 512, "depth": 3,
                    "steps": 4000, "batch": 64, "lr": 1e-4, "guidance": 1.5,
                    "num_components": 8}  # K of the FLUX/Qwen recipe: at K = 32 the GM rollout made a step 4x slower


SIGMA_MIN, DENOM_MIN, LOGSTD_INIT = 1e-4, 1e-6, math.log(0.05)  # clamps and init of the official GMFlow policy


def bc(v, like):
    """Per-sample (B,) -> broadcastable against like."""
    return v.view(-1, *[1] * (like.ndim - 1))


def warp(tau, shift):
    """Raw time -> sigma (SD3/FLUX shift): sigma = s tau / (1 + (s - 1) tau)."""
    if shift == 1:
        return tau
    return shift * tau / (1 + (shift - 1) * tau)


def segment_times(nfe, final_step_scale):
    """Raw segment boundaries 1 = tau_0 > ... > tau_nfe = 0: base length L = 1 / (n - 1 + f), the last one f L."""
    L = 1.0 / (nfe - 1 + final_step_scale)
    return torch.tensor([1 - i * L for i in range(nfe)] + [0.0], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------
# Policies: built from one network output at (x_s, sigma_s); velocity(x, sigma) anywhere later in the segment

class GMPolicy:
    """p(x0 | x_s) ~ sum_k A_k N(x0; m_k, v I) per pixel, from u-space means (B, K, C, ...), per-pixel
    log-weights (B, K, 1, ...) and one log-std per sample (B,). Computed in (at least) fp32."""

    def __init__(self, means_u, logweights, logstd, x_s, sigma_s):
        dtype = torch.promote_types(x_s.dtype, torch.float32)
        self.x_s, self.sigma_s = x_s.to(dtype), sigma_s.to(dtype).clamp_min(SIGMA_MIN)
        self.means = self.x_s[:, None] - bc(self.sigma_s, means_u) * means_u.to(dtype)  # m_k = x_s - sigma_s mu_k
        self.logweights = torch.log_softmax(logweights.to(dtype), 1)
        self.var = (self.sigma_s * logstd.to(dtype).exp()) ** 2                             # v = sigma_s^2 s^2
        self.sq_means = self.means.pow(2).sum(2, keepdim=True)                                # |m_k|^2 per pixel
        a_s = 1 - self.sigma_s
        self.zeta_s, self.nu_s = (a_s / self.sigma_s) ** 2, bc(a_s / self.sigma_s ** 2, x_s) * self.x_s  # start terms

    def velocity(self, x, sigma):
        """Transport of p(x0 | x_s) to p(x0 | x) at sigma < sigma_s (GMFlow's closed form, reference §7):
        multiply every component by N(x; a x0, sigma^2) / N(x_s; a_s x0, sigma_s^2) = exp(-zeta |x0|^2 / 2 + nu.x0)."""
        x, sigma = x.to(self.x_s.dtype), sigma.to(self.x_s.dtype).clamp_min(SIGMA_MIN)
        a = 1 - sigma
        zeta = (a / sigma) ** 2 - self.zeta_s                                                 # (B,)
        nu = bc(a / sigma ** 2, x) * x - self.nu_s                                            # (B, C, ...)
        denom = (1 + self.var * zeta).clamp_min(DENOM_MIN)                                    # 1 + v zeta
        # log A'_k = log A_k + (m_k.nu - zeta |m_k|^2 / 2) / (1 + v zeta), the dot over the channels of a pixel
        shift = ((self.means * nu[:, None]).sum(2, keepdim=True) - bc(zeta / 2, self.means) * self.sq_means)
        weights = torch.softmax(self.logweights + shift / bc(denom, self.means), 1)
        # sum_k A'_k m'_k with m'_k = (m_k + v nu) / (1 + v zeta): the shared v lets the v nu term leave the sum
        x0 = ((weights * self.means).sum(1) + bc(self.var, x) * nu) / bc(denom, x)
        return (x - x0) / bc(sigma, x)

    def detach(self):
        p = copy.copy(self)
        p.means, p.logweights, p.var, p.sq_means = (v.detach() for v in (self.means, self.logweights, self.var, self.sq_means))
        p.nu_s, p.zeta_s = self.nu_s.detach(), self.zeta_s.detach()
        return p

    def dropout_(self, p):
        """Drop each (sample, component) with probability p, unless that would drop every component."""
        keep = torch.rand(self.logweights.shape[:2], device=self.means.device) >= p
        keep = keep | ~keep.any(1, keepdim=True)
        keep = keep.view(*keep.shape, *[1] * (self.logweights.ndim - 2))
        self.logweights = torch.log_softmax(self.logweights.masked_fill(~keep, -float("inf")), 1)
        return self

    def temperature_(self, T):
        self.logweights, self.var = torch.log_softmax(self.logweights / T, 1), self.var * T
        return self


class DXPolicy:
    """N x0 predictions (B, N, C, ...) on an even grid of raw time over [tau_dst, tau_s] (index N-1 is
    tau_s); x0_hat(tau) interpolates them linearly, pi = (x - x0_hat) / sigma. Ignores x (static)."""

    def __init__(self, out_u, x_s, sigma_s, tau_s, tau_dst, shift):
        dtype = torch.promote_types(x_s.dtype, torch.float32)
        self.grid = x_s.to(dtype)[:, None] - bc(sigma_s.to(dtype), out_u) * out_u.to(dtype)
        self.tau_s, self.tau_dst, self.shift = tau_s.to(dtype), tau_dst.to(dtype), shift

    def velocity(self, x, sigma):
        x, sigma = x.to(self.grid.dtype), sigma.to(self.grid.dtype)
        tau = sigma / (self.shift + (1 - self.shift) * sigma)  # unwarp
        n = self.grid.shape[1]
        r = ((tau - self.tau_dst) / (self.tau_s - self.tau_dst).clamp_min(1e-12)).clamp(0, 1) * (n - 1)
        lo = r.floor().long().clamp(max=n - 2)
        frac = bc(r - lo, x)
        pick = lambda i: self.grid.gather(1, bc(i, self.grid).expand(-1, 1, *self.grid.shape[2:])).squeeze(1)
        x0 = (1 - frac) * pick(lo) + frac * pick(lo + 1)
        return (x - x0) / bc(sigma.clamp_min(SIGMA_MIN), x)

    def detach(self):
        p = copy.copy(self)
        p.grid = self.grid.detach()
        return p


class Student(nn.Module):
    """G_phi: the teacher's backbone with its output head widened to the policy parameters, plus (GM)
    the log-std MLP on the detached conditioning embedding (official gmdit/gmflux heads)."""

    def __init__(self, teacher_net, policy, k, seed=0, bias_noise=0.05):
        super().__init__()
        self.policy, self.k, self.shape = policy, k, tuple(teacher_net.shape)
        C = self.shape[0]
        out = k * C + (k if policy == "gm" else 0)  # K means (u units) per channel + K logits per pixel
        self.net = build_backbone({**teacher_net._spec, "out_channels": out})
        init_from_teacher(self.net, teacher_net)
        with torch.no_grad():  # the teacher's velocity head replicated K times; logits zero (uniform weights)
            w, b, n = teacher_net.out.weight, teacher_net.out.bias, teacher_net.out.out_features
            self.net.out.weight.zero_()
            self.net.out.bias.zero_()
            self.net.out.weight[:k * n] = w.repeat(k, 1)
            noise = torch.randn(k * n, generator=torch.Generator().manual_seed(seed)) * bias_noise
            self.net.out.bias[:k * n] = b.repeat(k) + (noise if policy == "gm" else 0)
        if policy == "gm":
            hidden = self.net.inp.out_features
            self.logstd_mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 1024), nn.SiLU(), nn.Linear(1024, 1))
            nn.init.zeros_(self.logstd_mlp[-1].weight)
            nn.init.constant_(self.logstd_mlp[-1].bias, LOGSTD_INIT)

    def forward(self, x, sigma, y=None):
        B, C, k = len(x), self.shape[0], self.k
        out = self.net(x, sigma, y).reshape(B, -1, *self.shape[1:])
        means = out[:, :k * C].reshape(B, k, *self.shape)
        if self.policy == "dx":
            return (means,)
        logweights = out[:, k * C:].reshape(B, k, 1, *self.shape[1:])
        logstd = self.logstd_mlp(self.net.cond_embedding(sigma, y).detach()).squeeze(-1)
        return means, logweights, logstd


def make_policy(out, x_s, tau_s, tau_dst, shift):
    sigma_s = warp(tau_s, shift)
    if len(out) == 1:
        return DXPolicy(out[0], x_s, sigma_s, tau_s, tau_dst, shift)
    return GMPolicy(*out, x_s, sigma_s)


# ---------------------------------------------------------------------------------------------------
# Rollout and the pi-ID objective (official PiFlowImitationBase: policy_rollout, policy_average_u, piid_segment)

def substep_counts(tau_from, tau_to, total_substeps):
    """N = max(1, round(delta_tau M)): substeps uniform in raw time, M over the whole trajectory."""
    return torch.round((tau_from - tau_to) * total_substeps).clamp_min(1).long()


def rollout(policy, x, taus, cfg):
    """Euler in sigma, x <- x + pi(x, sigma) (sigma_next - sigma), through the waypoints taus = [tau_0, tau_1, ...]
    (each (B,), decreasing); returns the state at each waypoint after the first. Each stretch gets its own
    substep count and per-sample uniform grid, as if rolled out alone; chaining them in one loop costs the
    largest per-sample total of substeps rather than the sum over stretches of each one's largest. Samples that
    need fewer substeps stop moving (step 0) while the others finish."""
    n = torch.stack([substep_counts(a, b, cfg.total_substeps) for a, b in zip(taus[:-1], taus[1:])])  # (J, B)
    ends = n.cumsum(0)                                                             # last substep of each stretch
    h = torch.stack([(a - b) / k for a, b, k in zip(taus[:-1], taus[1:], n)])     # substep length per stretch
    i = torch.arange(int(ends[-1].max()) + 1, device=x.device)[:, None, None]     # (max total + 1, 1, 1)
    tau = taus[0] - (torch.minimum((i - (ends - n)).clamp_min(0), n) * h).sum(1)  # per-sample grid, held at its end
    sigma = warp(tau, cfg.shift)
    steps = (sigma[1:] - sigma[:-1]).to(x.dtype)                                  # 0 once a sample is done
    states = [x] * (len(n) - 1)  # the last stretch's end is where every sample stops
    for k in range(len(steps)):
        x = x + bc(steps[k], x) * policy.velocity(x, sigma[k]).to(x.dtype)
        states = [torch.where(bc(ends[j] == k + 1, x), x, states[j]) for j in range(len(states))]
    return states + [x]


def average_velocity(policy, x, tau_a, tau_e, cfg):
    """The policy's mean velocity over [tau_e, tau_a] by a differentiable rollout; the local velocity
    when that window is shorter than 2 substeps (official policy_average_u)."""
    sigma_a = warp(tau_a, cfg.shift)
    local = policy.velocity(x, sigma_a)
    short = torch.round((tau_a - tau_e) * cfg.total_substeps) < 2
    if bool(short.all()):
        return local
    sigma_e = warp(tau_e, cfg.shift)
    mean = (x - rollout(policy, x, [tau_a, tau_e], cfg)[0]) / bc((sigma_a - sigma_e).clamp_min(1e-12), x)
    return torch.where(bc(short, x), local, mean)


def piid_segment(model, teacher, x_s, tau_s, tau_dst, y, cfg, mix_ratio=0.0):
    """pi-ID on one segment per sample (paper Alg. 2 inner loop). Returns the loss
    scale * 1/2 * mean (u_policy - u_teacher)^2 over S states, and the last visited state and time."""
    B, S, M = len(x_s), cfg.num_intermediate, cfg.total_substeps
    L = tau_s - tau_dst
    window = torch.minimum(cfg.window_substeps * L / substep_counts(tau_s, tau_dst, M), L)  # ~W substeps
    with autocast(x_s.device):
        out = model(x_s, warp(tau_s, cfg.shift).to(x_s.dtype), y)
    policy = make_policy(out, x_s, tau_s, tau_dst, cfg.shift)  # differentiable
    rollout_policy = policy.detach()
    if isinstance(rollout_policy, GMPolicy) and cfg.gm_dropout > 0:
        rollout_policy.dropout_(cfg.gm_dropout)
    span = (L - window)[:, None]
    d_student = torch.diff(torch.rand(B, S, device=x_s.device, dtype=L.dtype).sort(1)[0] * (1 - mix_ratio) * span,
                           dim=1, prepend=torch.zeros(B, 1, device=x_s.device, dtype=L.dtype))
    cuts = torch.rand(B, S - 1, device=x_s.device, dtype=L.dtype).sort(1)[0]
    d_teacher = torch.diff(F.pad(cuts, (1, 0)), dim=1, append=torch.ones(B, 1, device=x_s.device, dtype=L.dtype))
    d_teacher = d_teacher * mix_ratio * span
    x, tau, losses = x_s, tau_s, []
    if mix_ratio == 0:  # no teacher steps in between: the S on-policy states lie on one rollout of the policy
        waypoints = [tau_s]
        for i in range(S):
            waypoints.append(waypoints[-1] - d_student[:, i])
        with torch.no_grad():
            on_policy = rollout(rollout_policy, x_s, waypoints, cfg)
    for i in range(S):
        tau_a = tau - d_student[:, i]
        with torch.no_grad():  # on-policy state (the detached, dropout-perturbed policy) and the teacher's target
            x_a = on_policy[i] if mix_ratio == 0 else rollout(rollout_policy, x, [tau, tau_a], cfg)[0]
            u_teacher = teacher.velocity(x_a, warp(tau_a, cfg.shift).to(x_a.dtype), y, cfg.guidance,
                                         interval=floats(cfg.guidance_interval))
        tau_b = tau_a - d_teacher[:, i]
        u_policy = average_velocity(policy, x_a, tau_a, tau_b - window, cfg)
        losses.append((u_policy - u_teacher).pow(2).flatten(1).mean(1))
        # scheduled trajectory mixing: one teacher Euler step (a no-op when mix_ratio = 0)
        x = x_a + bc(warp(tau_b, cfg.shift) - warp(tau_a, cfg.shift), x_a).to(x_a.dtype) * u_teacher.to(x_a.dtype)
        tau = tau_b
    loss = cfg.loss_scale * 0.5 * torch.stack(losses, 1)  # (B, S), the official DiffusionMSELoss
    return loss, x, tau, rollout_policy


def pick_segments(n_samples, nfe, cfg, device):
    """tau ~ U(0, 1] mapped to the segment containing it: segments picked in proportion to their length."""
    taus = segment_times(nfe, cfg.final_step_scale).to(device)
    tau = 1 - torch.rand(n_samples, device=device, dtype=torch.float64)
    i = (taus[None, 1:] >= tau[:, None]).sum(1).clamp(max=nfe - 1)  # tau in (taus[i+1], taus[i]]
    return taus[i], taus[i + 1]


def piid_step(model, teacher, x0, y, nfe, cfg, mix_ratio, step=0):
    """One training iteration's backward pass; returns the logged loss. data: one segment per sample,
    starting from noised data (PiFlowImitation). datafree: all segments in turn from noise, each loss
    weighted by its length and backpropagated, the next start rolled out by the policy (Alg. 3)."""
    if cfg.trainer == "data":
        tau_s, tau_dst = pick_segments(len(x0), nfe, cfg, x0.device)
        sigma_s = bc(warp(tau_s, cfg.shift), x0).to(x0.dtype)
        x_s = (1 - sigma_s) * x0 + sigma_s * torch.randn_like(x0)
        loss = piid_segment(model, teacher, x_s, tau_s, tau_dst, y, cfg, mix_ratio)[0].mean()
        check_finite(loss, step)
        loss.backward()
        return loss.item()
    taus = segment_times(nfe, cfg.final_step_scale).to(x0.device)
    x, total = torch.randn_like(x0), 0.0
    for i in range(nfe):
        tau_s, tau_dst = taus[i].expand(len(x0)), taus[i + 1].expand(len(x0))
        loss, x_last, tau_last, rollout_policy = piid_segment(model, teacher, x, tau_s, tau_dst, y, cfg, mix_ratio)
        loss = (taus[i] - taus[i + 1]).float() * loss.mean()
        check_finite(loss, step)
        loss.backward()
        total += loss.item()
        with torch.no_grad():
            x = rollout(rollout_policy, x_last, [tau_last, tau_dst], cfg)[0]
    return total


# ---------------------------------------------------------------------------------------------------
# Sampler: one network call per segment, then the policy's Euler substeps

@torch.no_grad()
def sample(net, z, y, nfe, cfg):
    taus = segment_times(nfe, cfg.final_step_scale).to(z.device)
    x = z
    for i in range(nfe):
        tau_s, tau_dst = taus[i].expand(len(z)), taus[i + 1].expand(len(z))
        with autocast(z.device):
            out = net(x, warp(tau_s, cfg.shift).to(z.dtype), y)
        policy = make_policy(out, x, tau_s, tau_dst, cfg.shift)
        if isinstance(policy, GMPolicy) and i < nfe - 1:
            policy.temperature_(cfg.temperature)
        x = rollout(policy, x, [tau_s, tau_dst], cfg)[0].to(z.dtype)
    return x


# ---------------------------------------------------------------------------------------------------
# Training

def check_config(cfg, world):
    nfes = [int(n) for n in floats(cfg.nfes)]
    if not nfes or min(nfes) < 1 or len(set(nfes)) != len(nfes):
        fail(f"--nfes must list distinct positive integers, got {cfg.nfes!r}")
    if cfg.policy not in ("gm", "dx") or cfg.trainer not in ("data", "datafree"):
        fail("--policy must be gm or dx and --trainer data or datafree")
    if (cfg.bench_batch if cfg.bench else cfg.batch) % world:
        fail(f"--batch / --bench-batch must be divisible by the number of processes {world}")
    if cfg.num_components < 1 or cfg.dx_grid < 2 or cfg.num_intermediate < 1 or cfg.total_substeps < 1:
        fail("--num-components >= 1, --dx-grid >= 2, --num-intermediate >= 1 and --total-substeps >= 1 are required")
    if not 0 < cfg.final_step_scale <= 1 or cfg.shift <= 0 or cfg.temperature <= 0 or not 0 <= cfg.gm_dropout < 1:
        fail("--final-step-scale in (0, 1], --shift > 0, --temperature > 0 and --gm-dropout in [0, 1) are required")
    if cfg.lr <= 0 or cfg.steps < 0 or cfg.mix_decay_iters < 0 or cfg.window_substeps < 0:
        fail("--lr must be positive; --steps, --mix-decay-iters and --window-substeps non-negative")
    if len(floats(cfg.guidance_interval)) != 2:
        fail(f"--guidance-interval takes two numbers 'lo,hi', got {cfg.guidance_interval!r}")
    return nfes


def train(cfg):
    d = setup_dist(cfg.device, cfg.seed)
    nfes = check_config(cfg, d.world)
    prepare_out(cfg)
    data = DataSource(cfg.bench_data if cfg.bench else cfg.data, seed=cfg.seed, train_size=0 if cfg.bench else cfg.train_size)
    batch = (cfg.bench_batch if cfg.bench else cfg.batch) // d.world
    # --bench: an untrained network stands in for the teacher, so the S teacher calls cost a network call each
    teacher, teacher_net = teacher_for(cfg, data, d.device, {"arch": cfg.arch, "hidden": cfg.hidden, "depth": cfg.depth})
    k = cfg.num_components if cfg.policy == "gm" else cfg.dx_grid
    students, emas, opts, state = {}, {}, {}, {}
    for n in nfes:  # each NFE count is its own student (the segment grid is part of what it learns)
        students[n] = broadcast_module(Student(teacher_net, cfg.policy, k, cfg.seed, cfg.bias_noise).to(d.device))
        emas[n] = copy.deepcopy(students[n]).requires_grad_(False)
        opts[n] = torch.optim.AdamW(students[n].parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
        state.update({f"model_{n}": students[n], f"ema_{n}": emas[n], f"opt_{n}": opts[n]})
    ckpt_path, step = os.path.join(cfg.out, "ckpt.pt"), 0
    if cfg.resume:
        step = load_training_state(ckpt_path, cfg, state, data, d.device)
    models = {n: maybe_compile(wrap_ddp(s), cfg.compile) for n, s in students.items()}

    def train_step(n, step):
        x0, y = data.next_batch(batch, d.device)
        mix_ratio = 1 - min(step, cfg.mix_decay_iters) / cfg.mix_decay_iters if cfg.mix_decay_iters else 0.0
        for g in opts[n].param_groups:  # linear warm-up from 1e-3 x lr (reference: warmup ratio 1e-3)
            g["lr"] = cfg.lr * (1e-3 + (1 - 1e-3) * min(1.0, step / cfg.warmup)) if cfg.warmup else cfg.lr
        opts[n].zero_grad(set_to_none=True)
        loss = piid_step(models[n], teacher, x0, y, n, cfg, mix_ratio, step)
        clip = cfg.grad_clip if step >= cfg.warmup else float("inf")
        grad_norm = float(nn.utils.clip_grad_norm_(students[n].parameters(), clip))
        opts[n].step()
        return {f"loss_{n}nfe": loss, f"grad_norm_{n}nfe": grad_norm}

    if cfg.bench:  # one pi-ID step vs one flow-matching step of the same network and batch
        n = nfes[0]
        x0, y = data.next_batch(batch, d.device)

        def start_velocity(out, x, t):  # the policy at its own start point: the mixture mean's velocity
            tau = t / (cfg.shift + (1 - cfg.shift) * t)
            return make_policy(out, x, tau, torch.zeros_like(tau), cfg.shift).velocity(x, t)

        def fm_step():  # plain flow matching on that velocity: one forward and backward of the same network
            loss = flow_matching_loss(lambda x, t, yy: start_velocity(models[n](x, t, yy), x, t), x0, y)
            opts[n].zero_grad(set_to_none=True)
            loss.backward()
            opts[n].step()
        tau = torch.rand(batch, device=d.device)

        @torch.no_grad()
        def teacher_call():  # one teacher query of the batch, CFG included as in training
            teacher.velocity(x0, tau, y, cfg.guidance, interval=floats(cfg.guidance_interval))
        with torch.no_grad():
            policy = make_policy(students[n](x0, tau, y), x0, torch.ones_like(tau), torch.zeros_like(tau), cfg.shift)

        @torch.no_grad()
        def policy_velocity():  # one network-free substep's velocity of a policy for the batch
            policy.velocity(x0, tau)
        # what an iteration cannot do without, per segment: the student's gradient pass (a flow-matching step),
        # S teacher calls, and the policy's velocity at the M / m substeps of the segment's rollout plus at the S
        # states where it is regressed (a window W > 0 adds its substeps, not counted here). The data trainer
        # takes one segment, the data-free one all m.
        names = {m: f"pi-ID {m} NFE ({cfg.policy}, {cfg.trainer})" for m in nfes}
        segments = {m: 1 if cfg.trainer == "data" else m for m in nfes}
        substeps = {m: round(cfg.total_substeps / m) + cfg.num_intermediate for m in nfes}
        print0(f"{cfg.bench_data}: {type(students[n].net).__name__}, batch {batch}, S = {cfg.num_intermediate} teacher calls "
               f"per segment, {sum(p.numel() for p in students[n].parameters())} parameters")
        bench({"flow matching": fm_step, **{names[m]: (lambda m_: lambda: train_step(m_, cfg.warmup))(m) for m in nfes}},
              passes={"teacher call": teacher_call, "policy velocity": policy_velocity},
              floors={names[m]: {"flow matching": segments[m], "teacher call": segments[m] * cfg.num_intermediate,
                                 "policy velocity": segments[m] * substeps[m]} for m in nfes})
        cleanup()
        return None

    logger = Logger(cfg.out, cfg.steps, step, desc="piflow")
    while step < cfg.steps:
        stats = {}
        for n in nfes:
            stats.update(train_step(n, step))
            if step >= cfg.ema_start:  # power EMA (Karras et al. 2024): beta_t = (1 - 1/t)^(gamma + 1)
                ema_update(emas[n], models[n], (1 - 1 / (step - cfg.ema_start + 1)) ** (cfg.ema_gamma + 1))
            else:
                ema_update(emas[n], models[n], 0.0)
        step += 1
        logger.step()
        if step % cfg.log_every == 0 or step == cfg.steps:
            logger.log(step, stats)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_training_state(ckpt_path, cfg, step, state, data, extra={"backbone": students[nfes[0]].net._spec})
    train_seconds = logger.seconds()
    logger.close()

    samplers = [{"sampler": "student", "nfe": n, "ode": True,
                 "fn": (lambda n_: lambda z, y: sample(emas[n_], z, y, n_, cfg))(n)} for n in nfes]
    if data.world is not None:
        if is_main():  # exact metrics of a few thousand samples: rank 0 alone
            rows = evaluate(samplers, data.world, teacher, cfg, cfg.out, "piflow", train_seconds,
                            "gmm" if cfg.teacher == "gmm" else "learned", n=cfg.eval_samples,
                            guidance=cfg.guidance, device=d.device, teacher_net=teacher_net)
            print0(format_table(rows))
    else:
        evaluate_real(samplers, data.shape, data.num_classes, cfg, "piflow", train_seconds, d.device)
    print0(f"wrote {cfg.out}/ckpt.pt, metrics.json, samples.png ({train_seconds:.1f} s of training)")
    barrier()
    cleanup()
    return emas


def main():
    train(parse_config(Config))


if __name__ == "__main__":
    main()
