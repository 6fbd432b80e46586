"""
DMD2: Yin, Gharbi, Park, Zhang, Shechtman, Durand, Freeman, "Improved Distribution Matching Distillation
for Fast Image Synthesis", NeurIPS 2024, arXiv 2405.14867 (on top of DMD, Yin et al., CVPR 2024,
arXiv 2311.18828). Behaviour follows the official code (github.com/tianweiy/DMD2).

Three copies of the teacher network:
  real score  the frozen teacher, with classifier-free guidance (DMD §3.4: CFG on the real score only);
  fake score  trained by denoising on the generator's samples; it also carries a small GAN classifier
              head on its bottleneck features (fake score + head = "the critic");
  generator G one step (or a fixed few steps) from noise to data.
Generator loss: distribution matching (DMD Eq. 7-8, as implemented) + non-saturating GAN (DMD2 Eq. 4).
Critic loss: denoising on detached generator samples + GAN classification of real data vs generated.
TTUR (DMD2 §4.2): the critic is updated every iteration, G every --ttur iterations. A multi-step G is
trained on inputs produced by running itself from noise ("backward simulation", DMD2 §4.4).

    python dmd2.py                              # one-step DMD2, 2D checkerboard, analytic teacher, a few minutes on CPU
    python dmd2.py --gan-g 0 --gan-d 0          # ablations (paper Tab. 3 / Tab. 4): no GAN
    python dmd2.py --ttur 1                     #   no two time-scale update rule
    python dmd2.py --steps-gen 4                #   4-step generator at t = 1, .75, .5, .25 with backward simulation
    python dmd2.py --steps-gen 4 --no-backward-sim   # ... trained on forward-noised real data instead
    python dmd2.py --data glyphs16              # class-conditional 16x16 glyphs with the image recipe (Config)
    python dmd2.py --data /datasets/cifar10 --teacher runs/teacher/ckpt.pt --batch 256
    python dmd2.py --bench                      # one G update + its critic updates vs one flow-matching step
    torchrun --standalone --nproc_per_node=8 dmd2.py --data /datasets/cifar10 --teacher ckpt.pt \\
        --batch 280 --steps 200000 --lr 2e-6 --lr-warmup 500 --fid-ref ref.npz --fid-weights pt_inception.pth

Conventions. The official ImageNet code uses EDM: x = x0 + sigma eps and the denoiser D(x; sigma) predicts
x0. The project's rectified flow x_t = (1 - t) x0 + t eps is the same path divided by (1 - t):
    sigma = t / (1 - t),   t = sigma / (1 + sigma),   x_edm = x_t / (1 - t),   D(x_edm; sigma) = x_t - t u(x_t, t).
Every loss below lives in x0 space as in the official code, so only the time axis changes.
"""
import copy
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (DataSource, Logger, autocast, barrier, bench, broadcast_int, broadcast_module, build_backbone,
                    check_finite, cleanup, ema_update, evaluate, evaluate_real, fail, flow_matching_loss, format_table,
                    init_from_teacher, is_main, load_training_state, maybe_compile, parse_config, prepare_out, print0,
                    save_training_state, setup_dist, teacher_for, unwrap, wrap_ddp)


@dataclass
class Config:
    data: str = "checkerboard"     # world preset / mixture .npz (scored exactly), or an image dataset path
    teacher: str = "gmm"           # 'gmm': the analytic world; or a `python common.py teacher` checkpoint
    out: str = "runs/dmd2"
    steps: int = 1000              # iterations = critic updates; G is updated every --ttur of them (paper
                                   # ImageNet-64: 200k iterations = 40k G updates). Toy: 200 G updates, a first run
                                   # of about 4 minutes, 1-NFE mmd 0.089 on the checkerboard; 2000 reach 0.023
    batch: int = 512               # global batch of G, critic and real data, split across ranks (paper: 280;
                                   # on the checkerboard 256 left G a blurred square, the DM estimate too noisy:
                                   # 2000 steps at 256, the same compute, 1-NFE swd 0.167 against 0.089)
    lr: float = 3e-4               # AdamW lr of G and critic, equal as in every official script. Paper: 2e-6 on
                                   # ImageNet over 40k G updates; a few hundred need more (1e-4: still a square blob,
                                   # 1e-3: G outruns the fake score and folds into filaments)
    lr_warmup: int = 50            # linear warmup, then constant (official: constant_with_warmup, 500 steps)
    weight_decay: float = 0.01     # AdamW, betas (0.9, 0.999) (official)
    grad_clip: float = 10.0        # both networks (official)
    ttur: int = 5                  # critic updates per G update (paper: 5 ImageNet/SDXL, 10 SD1.5)
    dm_t_dist: str = "uniform"     # DM noise level: uniform t ~ U[dm_t_min, dm_t_max] (paper's wording) | karras
                                   # (official code: index uniform in [20, 980] of the 1000-point Karras grid)
    dm_t_min: float = 0.02         # bounds of the uniform draw in rectified-flow time
    dm_t_max: float = 0.98
    gan_g: float = 3e-3            # weight of the generator's GAN loss (paper ImageNet: 3e-3). On the 2D world its
                                   # gradient on x is ~0.5x the DM loss's per unit weight, so this keeps the GAN
                                   # a small term; 1.0 (gradient-norm matching, official issue #73) gave filaments
    gan_d: float = 1e-2            # weight of the critic's GAN classification loss (paper: 1e-2)
    steps_gen: int = 1             # generator steps N on the fixed grid t_i = 1 - i / N (paper SDXL: 4)
    backward_sim: bool = True      # multi-step G: train on inputs made by G itself (off: forward-noised real data)
    guidance: float = 1.0          # CFG scale of the real score (paper SD1.5: 1.75, SDXL: 8); also the evaluated
                                   # teacher's scale
    ema_decay: float = 0.0         # 0: no EMA, as in the paper; > 0 evaluates an EMA of G
    image_size: int = 32           # image folders are resized to this (must match the teacher)
    hflip: bool = False            # random horizontal flips of the real data (GAN and --no-backward-sim)
    train_size: int = 0            # a fixed real set: the first N examples, or N samples drawn once from a world
                                   # (the set `common.py teacher --train-size N` trains on). 0: all / fresh samples
    arch: str = "auto"             # with --teacher gmm: trunk of the network fitted to the world: auto (MLP for
                                   # vectors, DiT for images) | mlp | dit
    hidden: int = 128              # ... its width and depth
    depth: int = 4
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
    # (paper ImageNet-64: 200k iterations at batch 280, lr 2e-6).
    # The fitted network is a wide MLP on flat pixels: on glyphs16 the DiT fit followed the label in 56 % of
    # its own 32-step samples.
    # 2000 steps (400 G updates) drew worse proportions on the earlier lr-1e-3 fit: mmd 0.238, mode_tv 0.449
    # against 1500's 0.159, 0.417.
    # Two departures from the paper for a run of 300 G updates (README, "Images", measured on glyphs16): an EMA
    # of G (the paper has none) averages out the noisy DM gradient's speckle (1-NFE mmd 0.226 -> 0.201); a GAN
    # weight of 0.1 (paper: 3e-3) draws closer proportions (mmd 0.201 -> 0.098, mode_tv 0.325 -> 0.254) at a cost
    # in sharpness and label-following (nll 7.98 -> 10.56, cond_acc 0.964 -> 0.951; a second seed agrees).
    # CFG 1.5 on the real score (the paper's SD1.5 recipe: 1.75) wins the label back: cond_acc 0.951 / 0.946 ->
    # 0.964 / 0.963 on two seeds, mmd 0.098 / 0.128 -> 0.093 / 0.093 (the teacher rows are then at CFG 1.5 too).
    IMAGE_RECIPE = {"arch": "mlp", "hidden": 512, "depth": 3, "steps": 1500, "batch": 128, "lr": 3e-4,
                    "ema_decay": 0.99, "gan_g": 0.1, "guidance": 1.5}


def bc(v, like):
    """(B,) -> (B, 1, ...) to broadcast against like."""
    return v.view(-1, *[1] * (like.ndim - 1))


def noised(x0, t, eps):
    """Forward diffusion to time t: x_t = (1 - t) x0 + t eps (at t = 1 exactly eps)."""
    return (1 - bc(t, x0)) * x0 + bc(t, x0) * eps


def karras_times(n, device, lo=0, hi=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0, grid=1000):
    """The official noise levels of the fake score and the diffusion-GAN: an index uniform over the
    1000-point EDM Karras grid (rho = 7, index 0 = sigma_min), as rectified-flow time t = sigma / (1 + sigma):
    t in [0.002, 0.988], median 0.72, 28 % of the draws below t = 0.2 (where a 2D world's fine structure is).
    The DM loss of the official code draws the index from [lo, hi) = [20, 980) only."""
    i = torch.randint(lo, hi, (n,), device=device).double() / (grid - 1)
    sigma = (sigma_max ** (1 / rho) + (1 - i) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return (sigma / (1 + sigma)).float()


def generator_times(n):
    """The fixed schedule shared by training and sampling: 1, 1 - 1/N, ... (official SDXL 4-step:
    999, 749, 499, 249 of 1000 DDPM steps, i.e. t = 1, .75, .5, .25)."""
    return [1 - i / n for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# The critic: fake score + GAN classifier head on its bottleneck (DMD2 §4.3, App. F.1)

class GANHead(nn.Module):
    """The official head is conv4x4/s2 -> GN -> SiLU -> conv4x4/s4 -> GN -> SiLU -> conv1x1 on the lowest-
    resolution feature map. The backbones here return those features already pooled to (B, hidden), so
    the convolutions become linear layers and GroupNorm becomes LayerNorm (no spatial extent to group)."""

    def __init__(self, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features):
        return self.net(features.float()).squeeze(-1)  # fp32 logits (official casts the features to fp32)


class Critic(nn.Module):
    """The fake score (a copy of the teacher network, velocity output) and the GAN head on its features.
    One module, so that one optimizer and one DDP wrapper cover both (official: the guidance optimizer
    holds fake_unet and cls_pred_branch)."""

    def __init__(self, fake_score, gan):
        super().__init__()
        self.score = fake_score
        self.head = GANHead(fake_score.inp.out_features) if gan else None

    def forward(self, x, t, y=None, classify=False):
        if not classify:
            return self.score(x, t, y)
        _, features = self.score(x, t, y, return_features=True)
        return self.head(features)


# ---------------------------------------------------------------------------------------------------
# Objective

def distribution_matching_loss(x, y, teacher, fake_score, cfg):
    """DMD Eq. 7-8 as implemented (edm_guidance.py: compute_distribution_matching_loss). With
    s(x_t) = -(x_t - alpha mu(x_t)) / sigma^2 and the Eq. 8 weight w = sigma^2 / alpha * CS / |mu_real - x|_1,
    the weighted score difference reduces to the x0-space form
        g = (x0_fake - x0_real) / mean|x - x0_real|    (per sample, one x_t shared by both scores),
    and the surrogate 0.5 ||x - sg(x - g)||^2 (mean) has gradient g / numel with respect to x.
    Noise level: the official code draws an index uniformly from [20, 980] of a 1000-point Karras grid
    (sigma 0.0032..72, i.e. t 0.003..0.986 with median 0.72); the paper writes t ~ U[0.02T, 0.98T].
    Here t ~ U[dm_t_min, dm_t_max] in rectified-flow time, or the official grid (--dm-t-dist karras).
    fake_score(x_t, t, y) returns a velocity. Both scores run in fp32: g is a small difference of two
    predictions, which bf16 would swamp (the official SD code disables autocast here for the same reason)."""
    with torch.no_grad():
        if cfg.dm_t_dist == "karras":
            t = karras_times(len(x), x.device, lo=20, hi=980)
        else:
            t = cfg.dm_t_min + (cfg.dm_t_max - cfg.dm_t_min) * torch.rand(len(x), device=x.device)
        x_t = noised(x, t, torch.randn_like(x))
        x0_real = x_t - bc(t, x) * teacher.velocity(x_t, t, y, cfg.guidance).float()
        x0_fake = x_t - bc(t, x) * fake_score(x_t, t, y).float()
        normaliser = (x - x0_real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        grad = torch.nan_to_num((x0_fake - x0_real) / normaliser)
    return 0.5 * F.mse_loss(x, (x - grad).detach())


def gan_logits(critic, x, y):
    """Diffusion-GAN (DMD2 §4.3): classify x after noising it with fresh noise to a level drawn like the
    official --diffusion_gan (uniform over the whole Karras grid)."""
    t = karras_times(len(x), x.device)
    with autocast(x.device):
        return critic(noised(x, t, torch.randn_like(x)), t, y, classify=True).float()


def generator_loss(x, y, teacher, critic, cfg):
    """DMD2 generator objective: L_DM + gan_g * softplus(-D(G(z))) (non-saturating, official softplus
    form of -log sigmoid). critic is the plain module with requires_grad off: gradients reach x only."""
    loss_dm = distribution_matching_loss(x, y, teacher, critic.score, cfg)
    stats = {"dm_loss": loss_dm.item()}
    if cfg.gan_g <= 0:
        return loss_dm, stats
    loss_gan = F.softplus(-gan_logits(critic, x, y)).mean()
    stats["g_gan_loss"] = loss_gan.item()
    return loss_dm + cfg.gan_g * loss_gan, stats


def critic_loss(critic, x_fake, y_fake, x_real, y_real, cfg):
    """Denoising loss of the fake score on the detached generator samples + gan_d * classification loss
    softplus(D(fake)) + softplus(-D(real)) (DMD2 Eq. 4, softplus form).
    Denoising loss: the shared flow-matching loss (velocity MSE) at the official noise levels (uniform
    over the Karras grid, the full t range). Official EDM: x0-MSE weighted by 1/sigma^2 + 1/sigma_d^2
    (sigma_d = 0.5). Since x0_hat - x0 = -t (u_hat - u), the velocity MSE is x0-MSE / t^2, while the EDM
    weight in rectified-flow time is ((1 - t)^2 + 4 t^2) / t^2: the two differ only by the bounded factor
    (1 - t)^2 + 4 t^2 in [0.8, 4] (1 at t = 0, 4 at t = 1), i.e. flow matching puts up to 4x less weight
    on the noisiest levels relative to the cleanest."""
    with autocast(x_fake.device):
        loss_fake = flow_matching_loss(critic, x_fake, y_fake, karras_times(len(x_fake), x_fake.device))
    stats = {"fake_loss": loss_fake.item()}
    if unwrap(critic).head is None:
        return loss_fake, stats
    logits_fake, logits_real = gan_logits(critic, x_fake, y_fake), gan_logits(critic, x_real, y_real)
    loss_cls = F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()
    stats.update(d_gan_loss=loss_cls.item(), d_real_acc=float((logits_real > 0).float().mean()),
                 d_fake_acc=float((logits_fake < 0).float().mean()))
    return loss_fake + cfg.gan_d * loss_cls, stats


# ---------------------------------------------------------------------------------------------------
# Sampler and the generator's training inputs (DMD2 §4.4)

@torch.no_grad()
def multistep_sample(G, z, y, times):
    """x0_hat = G(x_{t_i}, t_i), then re-noise to t_{i+1} with fresh noise (consistency-model style);
    the output is the last x0_hat. times = [1] is the one-step generator."""
    x = z
    for i, t in enumerate(times):
        tt = torch.full((len(x),), t, device=x.device)
        with autocast(x.device):
            u = G(x, tt, y).float()
        x0 = x - t * u
        if i + 1 < len(times):
            x = noised(x0, torch.full_like(tt, times[i + 1]), torch.randn_like(x0))
    return x0


@torch.no_grad()
def training_inputs(G, z, y, times, k, real=None):
    """(x, t) that the gradient-carrying generator step sees: step k of the schedule.
    Backward simulation (real None): run the current G for k steps from fresh noise (independent of z:
    correlated noise gave artifacts, official issue #9), then noise its x0_hat to t_k with the batch
    noise z; for k = 0 this is z itself. Only the step that follows carries gradient.
    Ablation (real = (x0, k per sample)): forward-noise real data to per-sample t_k instead."""
    if real is not None:
        x0, k_each = real
        t = torch.tensor(times, device=z.device)[k_each]
        return noised(x0, t, z), t
    t = torch.full((len(z),), times[k], device=z.device)
    if k == 0:
        return z, t
    x0 = multistep_sample(G, torch.randn_like(z), y, times[:k])
    return noised(x0, t, z), t


def generate(G, x_in, t, y):
    """One generator step to x0: x0_hat = x_t - t u (with gradient when enabled)."""
    with autocast(x_in.device):
        u = G(x_in, t, y)
    return x_in - bc(t, x_in) * u.float()


def generator_turn(model, critic, opt, x_in, t, y, teacher, cfg, step):
    """One G update (the critic frozen: no gradient reaches its parameters). Returns detached samples."""
    critic.requires_grad_(False)
    x = generate(model, x_in, t, y)
    loss, stats = generator_loss(x, y, teacher, critic, cfg)
    check_finite(loss, step, "generator loss")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    stats["g_grad_norm"] = float(nn.utils.clip_grad_norm_(unwrap(model).parameters(), cfg.grad_clip))
    opt.step()
    critic.requires_grad_(True)
    return x.detach(), stats


def critic_turn(critic_model, opt, x_fake, y_fake, x_real, y_real, cfg, step):
    loss, stats = critic_loss(critic_model, x_fake, y_fake, x_real, y_real, cfg)
    check_finite(loss, step, "critic loss")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    stats["d_grad_norm"] = float(nn.utils.clip_grad_norm_(unwrap(critic_model).parameters(), cfg.grad_clip))
    opt.step()
    return stats


# ---------------------------------------------------------------------------------------------------
# Training

def check_config(cfg, world_size):
    if cfg.batch % world_size or cfg.bench_batch % world_size:
        fail(f"--batch and --bench-batch must be divisible by the number of processes {world_size}")
    if cfg.steps_gen < 1 or cfg.ttur < 1:
        fail("--steps-gen and --ttur must be at least 1")
    if not 0 < cfg.dm_t_min < cfg.dm_t_max < 1:
        fail(f"need 0 < --dm-t-min < --dm-t-max < 1, got {cfg.dm_t_min}, {cfg.dm_t_max}")
    if cfg.gan_g < 0 or cfg.gan_d < 0 or cfg.guidance <= 0 or not 0 <= cfg.ema_decay < 1:
        fail("--gan-g and --gan-d must be >= 0, --guidance > 0 and --ema-decay in [0, 1)")
    if (cfg.gan_g > 0) != (cfg.gan_d > 0):
        fail("--gan-g and --gan-d must both be > 0 (GAN on) or both 0 (off): a head trained with weight 0 "
             "would hand G the gradient of a random classifier")
    if cfg.dm_t_dist not in ("uniform", "karras"):
        fail(f"--dm-t-dist must be uniform or karras, got {cfg.dm_t_dist!r}")


def train(cfg):
    d = setup_dist(cfg.device, cfg.seed)
    check_config(cfg, d.world)
    data = DataSource(cfg.bench_data if cfg.bench else cfg.data, cfg.image_size, cfg.hflip, cfg.seed,
                      train_size=0 if cfg.bench else cfg.train_size)
    if cfg.guidance != 1 and not data.num_classes:
        fail("--guidance (CFG on the real score) needs class-conditional data")
    prepare_out(cfg)
    batch = (cfg.bench_batch if cfg.bench else cfg.batch) // d.world
    arch = {"arch": cfg.arch, "hidden": cfg.hidden, "depth": cfg.depth}
    teacher, teacher_net = teacher_for(cfg, data, d.device, arch_kwargs=arch)  # --bench: an untrained stand-in
    if data.num_classes != teacher_net.num_classes:
        fail(f"--data has {data.num_classes} classes but the teacher network knows {teacher_net.num_classes}")
    shape, times = tuple(data.shape), generator_times(cfg.steps_gen)

    # G and the fake score start as the teacher (official: fake = copy(teacher), G = copy(fake));
    # the GAN head starts at PyTorch's default initialisation, identical on every rank.
    generator = build_backbone(teacher_net._spec).to(d.device)
    init_from_teacher(generator, teacher_net)
    fake_score = build_backbone(teacher_net._spec)
    init_from_teacher(fake_score, teacher_net)
    critic = broadcast_module(Critic(fake_score, gan=cfg.gan_g > 0 or cfg.gan_d > 0).to(d.device))
    adamw = dict(lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, fused=True)
    opt, critic_opt = torch.optim.AdamW(generator.parameters(), **adamw), torch.optim.AdamW(critic.parameters(), **adamw)
    state = {"model": generator, "fake": critic, "opt": opt, "fake_opt": critic_opt}
    ema = None
    if cfg.ema_decay > 0:
        ema = state["ema"] = copy.deepcopy(generator).requires_grad_(False)
    ckpt_path, step = os.path.join(cfg.out, "ckpt.pt"), 0
    if cfg.resume:
        step = load_training_state(ckpt_path, cfg, state, data, d.device)
    model, critic_model = maybe_compile(wrap_ddp(generator), cfg.compile), maybe_compile(wrap_ddp(critic), cfg.compile)
    g_stats = {}

    def iteration(it):
        """One critic update; before it, a G update when it % ttur == 0 (official train_one_step order:
        the critic then trains on the samples made in the generator turn)."""
        nonlocal g_stats
        for o in (opt, critic_opt):
            for group in o.param_groups:
                group["lr"] = cfg.lr * min(1.0, (it + 1) / max(cfg.lr_warmup, 1))
        z = torch.randn(batch, *shape, device=d.device)
        if cfg.backward_sim or cfg.steps_gen == 1:
            y = torch.randint(0, data.num_classes, (batch,), device=d.device) if data.num_classes else None
            k = broadcast_int(torch.randint(0, len(times), ()).item())  # one k for all samples and ranks
            x_in, t = training_inputs(unwrap(model), z, y, times, k)
        else:  # ablation: real data and its labels, forward-noised to a random schedule step per sample
            x0, y = data.next_batch(batch, d.device)
            x_in, t = training_inputs(None, z, y, times, None, real=(x0, torch.randint(0, len(times), (batch,))))
        if it % cfg.ttur == 0:
            x_fake, g_stats = generator_turn(model, critic, opt, x_in, t, y, teacher, cfg, it)
            if ema is not None:
                ema_update(ema, model, cfg.ema_decay)
        else:
            with torch.no_grad():
                x_fake = generate(unwrap(model), x_in, t, y)
        x_real, y_real = data.next_batch(batch, d.device) if critic.head is not None else (None, None)
        return {**g_stats, **critic_turn(critic_model, critic_opt, x_fake, y, x_real, y_real, cfg, it)}

    if cfg.bench:  # one G update and its ttur critic updates vs one flow-matching step of the same network
        x0, y = data.next_batch(batch, d.device)

        def fm_step():
            loss = flow_matching_loss(model, x0, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        t = torch.rand(len(x0), device=d.device)

        @torch.no_grad()
        def forward():
            generator(x0, t, y)

        def classifier_pass():  # a GAN logit's forward and backward: the head sits on the fake score's middle
            critic_opt.zero_grad(set_to_none=True)  # features, so the backward stops halfway down the network
            critic(x0, t, y, classify=True).sum().backward()

        def classifier_pass_to_input():  # G's GAN term: through the frozen critic to its input only
            critic.requires_grad_(False)
            critic(x0.clone().requires_grad_(True), t, y, classify=True).sum().backward()
            critic.requires_grad_(True)
        # the passes a cycle of ttur iterations cannot do without. G's turn: its own forward+backward+update (a
        # flow-matching step), the real and the fake score's forwards, and (GAN) the critic's pass to G's samples.
        # Each critic turn: the denoising loss's forward+backward+update, (GAN) the fake and the real batch's
        # classifier passes, and, in the turns without a G update, G's forward that makes the samples.
        gan = critic.head is not None
        name = f"dmd2 (1 G + {cfg.ttur} critic updates)"
        floor = {"flow matching": 1 + cfg.ttur, "forward": 2 + cfg.ttur - 1,
                 "classifier pass": 2 * cfg.ttur * gan, "classifier pass to the input": int(gan)}
        print0(f"{cfg.bench_data}: {type(generator).__name__}, batch {batch}, "
               f"{sum(p.numel() for p in generator.parameters())} parameters per network")
        bench({"flow matching": fm_step, name: lambda: [iteration(i) for i in range(cfg.ttur)]},
              passes={"forward": forward, "classifier pass": classifier_pass,
                      "classifier pass to the input": classifier_pass_to_input}, floors={name: floor})
        cleanup()
        return None

    logger = Logger(cfg.out, cfg.steps, step, desc="dmd2")
    while step < cfg.steps:
        stats = iteration(step)
        step += 1
        logger.step()
        if step % cfg.log_every == 0 or step == cfg.steps:
            logger.log(step, stats)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_training_state(ckpt_path, cfg, step, state, data, extra={"backbone": generator._spec})
    train_seconds = logger.seconds()
    logger.close()

    net = ema if ema is not None else generator
    samplers = [{"sampler": "student", "nfe": 1, "fn": lambda z, y: multistep_sample(net, z, y, times[:1])}]
    if len(times) > 1:
        samplers.append({"sampler": "student", "nfe": len(times), "fn": lambda z, y: multistep_sample(net, z, y, times)})
    if data.world is not None:  # DMD2 matches distributions, not the teacher's ODE map: no ode_err
        if is_main():  # exact metrics of a few thousand samples: rank 0 alone
            rows = evaluate(samplers, data.world, teacher, cfg, cfg.out, "dmd2", train_seconds,
                            "gmm" if cfg.teacher == "gmm" else "learned", n=cfg.eval_samples, guidance=cfg.guidance,
                            device=d.device, teacher_net=teacher_net)
            print0(format_table(rows))
    else:
        evaluate_real(samplers, data.shape, data.num_classes, cfg, "dmd2", train_seconds, d.device)
    print0(f"wrote {cfg.out}/ckpt.pt, metrics.json, samples.png ({train_seconds:.1f} s of training)")
    barrier()
    cleanup()
    return generator if ema is None else ema


def main():
    train(parse_config(Config))


if __name__ == "__main__":
    main()
