"""
FreeFlow: flow-map distillation without data.
Tong, Ma, Xie, Jaakkola, "Flow Map Distillation Without Data", arXiv 2511.19428 (CVPR 2026).

A one-jump flow map from the prior is distilled from a flow teacher using noise (and labels) only:
no data sample is ever drawn, because the prior is the one place where the teacher's own sampling
marginals and the data's noised marginals are guaranteed to agree. Two objectives:
  prediction (Eq. 7/9): the student integrates the teacher ODE along its own predicted path
      (Lagrangian flow-map distillation with the start pinned at t = 1; JVP in the jump length delta);
  correction (Eq. 10/11): VSD-style distribution matching of the one-step samples, with an online
      velocity network g trained by flow matching on the student's own samples.
Sampling is one network evaluation: x = f(z, 1).

Conventions. The project's rectified flow: x_t = (1 - t) x0 + t eps, t = 1 is noise, u = eps - x0.
The paper uses the "generation direction" velocity u_paper = -u and writes f = z + delta F_paper;
here F = -F_paper is the average of u over [1 - delta, 1], so
    f(z, delta) = z - delta * F(z, delta)          (the jump from t = 1 to t = 1 - delta).
Both sides of the Eq. 7 identity flip sign together, so it reads the same here:
    F + delta dF/d(delta) = u(f(z, delta), 1 - delta).
The Eq. 11 correction gradient F_paper . (v_N,paper - u_paper) equals F . (v_g - u) with every
velocity in the project's convention (two sign flips cancel); a test checks the sign on Gaussians.

    python freeflow.py                                      # 2D checkerboard, analytic teacher, a few minutes on CPU
    python freeflow.py --objective prediction               # ablations: prediction only / correction only
    python freeflow.py --objective correction
    python freeflow.py --power-k 0                          # no power-law residual weighting
    python freeflow.py --data glyphs16                      # class-conditional 16x16 glyphs, the image recipe
    python freeflow.py --teacher runs/teacher/ckpt.pt       # a learned teacher (python common.py teacher)
    python freeflow.py --bench                              # one FreeFlow step vs one flow-matching step
    torchrun --standalone --nproc_per_node=8 freeflow.py --teacher ckpt.pt --data /datasets/cifar10 \\
        --batch 512 --steps 100000 --lr 1e-4 --fid-ref ref.npz --fid-weights pt_inception.pth
With a learned teacher the image path in --data is never read (data-free); it only names the run.
"""
import copy
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from common import (DataSource, Logger, NetTeacher, autocast, barrier, bench, build_backbone, check_finite, cleanup,
                    ema_update, evaluate, evaluate_real, fail, flow_matching_loss, format_table, init_from_teacher,
                    is_main, jvp, load_teacher_net, load_training_state, make_world, maybe_compile, parse_config,
                    prepare_out, print0, reduce_mean, save_training_state, setup_dist, teacher_for, unwrap, wrap_ddp,
                    write_json)


@dataclass
class Config:
    data: str = "checkerboard"     # world preset / mixture .npz (scored exactly), or a dataset path (never read)
    teacher: str = "gmm"           # 'gmm': the analytic world; or a `python common.py teacher` checkpoint
    out: str = "runs/freeflow"
    steps: int = 1200              # toy scale: a first run of about 4 minutes, 1-NFE mmd 0.044 on the checkerboard;
                                   # 3000 steps reached 0.0074 (README, FreeFlow). Paper: ~100K-1.5M iterations at
                                   # batch ~256
    batch: int = 256               # global batch, split across ranks, then 75/25 between the two objectives
    lr: float = 3e-4               # student Adam lr (paper: not published; toy value)
    fake_lr: float = 3e-4          # lr of the online velocity network g (not published)
    lr_warmup: int = 50
    ema_decay: float = 0.99        # EMA of the student, used for evaluation (paper: not published; toy value)
    grad_clip: float = 1.0
    objective: str = "both"        # both | prediction | correction (the paper's Fig. 7 ablation)
    pred_frac: float = 0.75        # share of each batch for prediction, the rest for correction (§ Combination)
    power_k: float = 1.0           # residual weight 1 / (|Delta_G|^2 / d + eps)^k; k = 1 best with correction
    weight_eps: float = 1e-2       # eps of that weight (paper: not published; toy value, see README)
    delta_scale: float = 1.0       # sinusoidal scale of the delta input: delta in [0, 1] as is, as SiT embeds t;
                                   # at the teacher's 1000 the JVP in delta explodes (dF/d(delta) ~ 1000)
    delta_power: float = 2.0       # delta = U^power, U ~ U(0, 1): > 1 favours short jumps (not published; toy value)
    alpha: float = 1.0             # lambda = alpha E|Delta_G| / (E|Delta_N| + eps); robust for alpha in [0.3, 3]
    lambda_weighted: bool = False  # measure E|Delta_G| after the power-law weight (unknown in the paper)
    r_logit_mean: float = 0.8      # correction noise level r = sigmoid(N(mean, std)): biased to noise, reaches 1
    r_logit_std: float = 1.0
    corr_guidance_max: float = 0.7  # teacher CFG only for t <= this in the correction branch (paper: [0, 0.7])
    fake_updates: int = 1          # flow-matching steps of g per student step (not published; DMD2 uses 5)
    gamma_min: float = 1.0         # CFG scales seen in training (class-conditional data), fed to the student
    gamma_max: float = 3.0
    guidance: float = 1.0          # CFG scale of the evaluation (teacher and student)
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
    # (paper: 100k-1.5M iterations at batch ~256).
    # The fitted network is a wide MLP on flat pixels: on glyphs16 the DiT fit followed the label in 56 % of
    # its own 32-step samples. 2200 steps (about 19 minutes beside another job) against 1600: mmd 0.262 -> 0.248,
    # swd 0.088 -> 0.086, mode_tv 0.357 -> 0.349, nll 6.86 -> 6.21.
    # alpha 3, the top of the paper's robust range [0.3, 3]: on glyphs16 the correction is what keeps the glyphs'
    # proportions, and more of it kept them better (alpha 0 / 0.3 / 1 / 3: mmd 0.43 / 0.39 / 0.25 / 0.19,
    # mode_tv 0.41 / 0.40 / 0.35 / 0.33, nll 6.1 / 6.1 / 6.2 / 6.8; README, "Images")
    IMAGE_RECIPE = {"arch": "mlp", "hidden": 512, "depth": 3,
                    "steps": 2200, "batch": 128, "ema_decay": 0.995, "guidance": 1.0, "alpha": 3.0}


# ---------------------------------------------------------------------------------------------------
# The student flow map f(z, delta) = z - delta F(z, delta): the teacher's backbone with delta as the
# second time input s and the CFG scale gamma as input g, all embeddings summed into the adaLN vector
# (official models.py: t, dt, gw). The first time input is pinned at t = 1: the map always starts at
# the prior (paper §3).

def average_velocity(net, z, delta, y, gamma):
    return net(z, torch.ones_like(delta), y, s=delta, g=gamma)


def jump(net, z, delta, y, gamma):
    """f(z, delta): where the teacher ODE started at z (t = 1) arrives at t = 1 - delta."""
    return z - bcast(delta, z) * average_velocity(net, z, delta, y, gamma)


def bcast(v, like):
    return v.view(-1, *[1] * (like.ndim - 1))


def sq_norm(v):
    return v.flatten(1).pow(2).sum(1)


# ---------------------------------------------------------------------------------------------------
# Objective

@torch.no_grad()
def velocity_and_delta_derivative(net, z, delta, y, gamma):
    """F(z, delta) and its partial derivative in delta (z does not depend on delta, so no spatial term):
    forward-mode JVP with tangent 1 on delta and none on z, on the plain module (never the DDP wrapper)."""
    return jvp(lambda d: average_velocity(net, z, d, y, gamma), (delta,), (torch.ones_like(delta),))


def prediction_residual(net, teacher, z, delta, y, gamma):
    """Delta_G = F + delta dF/d(delta) - u(f(z, delta), 1 - delta), without a graph (paper Eq. 7/9):
    zero for the exact flow map. The teacher is queried at the student's own output f(z, delta), with
    CFG gamma at every t, as the teacher's own sampler (the one the evaluation compares against)."""
    F, dF = velocity_and_delta_derivative(net, z, delta, y, gamma)
    with torch.no_grad():
        f = z - bcast(delta, z) * F
        u = teacher.velocity(f, 1 - delta, y, gamma)
        return F + bcast(delta, z) * dF - u


def correction_residual(x_hat, y, gamma, teacher, fake_velocity, cfg):
    """Delta_N = v_g - u at x_r = (1 - r) x_hat + r n (paper Eq. 11, project signs): v_g is the
    velocity of the student's own noised samples (the online network g), u the teacher's, whose CFG is
    kept to t <= corr_guidance_max in this branch only. r is logit-normal biased toward noise and
    reaches 1: the gap between the two distributions accumulates from the prior on."""
    with torch.no_grad():
        r = torch.sigmoid(cfg.r_logit_mean + cfg.r_logit_std * torch.randn(len(x_hat), device=x_hat.device))
        x_r = (1 - bcast(r, x_hat)) * x_hat + bcast(r, x_hat) * torch.randn_like(x_hat)
        u = teacher.velocity(x_r, r, y, gamma, interval=(0.0, cfg.corr_guidance_max))
        return fake_velocity(x_r, r, y, gamma) - u


def freeflow_loss(model, teacher, fake_velocity, z, y, gamma, cfg):
    """A surrogate loss whose gradient is the paper's combined update (§ Combination):
        grad = sum_pred w <dF, Delta_G> + lambda sum_corr <dF(z, 1), Delta_N>,  both over the whole batch,
    w = (|Delta_G|^2 / d + eps)^-k (power-law weight), lambda = alpha E|Delta_G| / (E|Delta_N| + eps) (a constant).
    The prediction term is the gradient of (w/2) |F - sg(u(f, 1 - delta) - delta dF/d(delta))|^2 (Eq. 9), the
    correction term that of the integral KL (Eq. 10/11). One gradient-carrying forward through the DDP
    wrapper covers both branches; the JVP and all targets carry no graph."""
    B, d = len(z), z[0].numel()
    n_pred = {"prediction": B, "correction": 0}.get(cfg.objective, round(B * cfg.pred_frac))
    delta = torch.rand(B, device=z.device).pow(cfg.delta_power)
    delta[n_pred:] = 1.0  # only the one-step endpoint is corrected (paper: correcting the whole path did not help)
    with autocast(z.device):
        F = model(z, torch.ones_like(delta), y, s=delta, g=gamma).float()
    loss, stats = F.new_zeros(()), {}
    norm_G = F.new_zeros(())
    if n_pred:
        p = slice(0, n_pred)
        delta_G = prediction_residual(unwrap(model), teacher, z[p], delta[p], None if y is None else y[p], gamma[p])
        w = (sq_norm(delta_G) / d + cfg.weight_eps).pow(-cfg.power_k)
        loss = loss + (w * (F[p] * delta_G).flatten(1).sum(1)).sum() / (B * d)
        norm_G = (w if cfg.lambda_weighted else 1.0) * sq_norm(delta_G).sqrt()
        norm_G = norm_G.mean()
        stats["residual"] = float(sq_norm(delta_G).mean() / d)
    if n_pred < B:
        c = slice(n_pred, B)
        x_hat = (z[c] - F[c]).detach()  # f(z, 1), the one-step samples
        delta_N = correction_residual(x_hat, None if y is None else y[c], gamma[c], teacher, fake_velocity, cfg)
        norms = reduce_mean({"G": norm_G, "N": sq_norm(delta_N).sqrt().mean()})  # one lambda on every rank
        lam = cfg.alpha * norms["G"] / (norms["N"] + 1e-8) if n_pred else cfg.alpha
        loss = loss + lam * (F[c] * delta_N).flatten(1).sum(1).sum() / (B * d)
        stats.update(corr_norm=norms["N"], lam=lam)
    return loss, stats


# ---------------------------------------------------------------------------------------------------
# Sampler: one jump over the whole interval (the paper and the official sampler use one step only;
# the map always starts at the prior, so there is no intermediate state to jump from)

@torch.no_grad()
def one_step_sample(net, z, y, gamma):
    """x0 = f(z, 1) = z - F(z, 1)."""
    return jump(net, z, torch.ones(len(z), device=z.device), y, gamma)


# ---------------------------------------------------------------------------------------------------
# On an exact world: the teacher's error at the points the correction queries, against the correction

CHECK_NOISE_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)


@torch.no_grad()
def correction_check(student, fake_velocity, teacher, world, cfg, n, device, batch=1000):
    """Per noise level r: RMS per dimension of the teacher's velocity error u - u* (u* the world's exact velocity,
    under the correction branch's CFG) at the student's noised one-step samples and at noised data; where g is
    trained, the correction Delta_N = v_g - u, the one the exact velocity would give (v_g - u*), and the mean cosine
    of the two. A teacher error as large as Delta_N means the correction is steering by the teacher's own error."""
    gen = torch.Generator().manual_seed(4321)
    y = torch.arange(n) % world.num_classes if world.num_classes else None
    z = torch.randn(n, *world.shape, generator=gen)
    data, _ = world.sample(n, y, generator=gen)
    rms = lambda v: float(v.pow(2).mean().sqrt())
    rows = []
    for r in CHECK_NOISE_LEVELS:
        diffs = {"teacher_err_student": [], "teacher_err_data": [], "correction": [], "exact_correction": []}
        cosines = []
        for i in range(0, n, batch):
            yy = None if y is None else y[i:i + batch].to(device)
            gamma = torch.full((len(z[i:i + batch]),), cfg.guidance if y is not None else 1.0, device=device)
            x_hat = one_step_sample(student, z[i:i + batch].to(device), yy, gamma)
            for name, x0 in (("student", x_hat), ("data", data[i:i + batch].to(device))):
                x_r = (1 - r) * x0 + r * torch.randn(x0.shape, generator=gen).to(device)
                u = teacher.velocity(x_r, r, yy, gamma, interval=(0.0, cfg.corr_guidance_max))
                u_exact = world.velocity(x_r.double(), r, yy, gamma.double(), interval=(0.0, cfg.corr_guidance_max))
                u_exact = u_exact.to(u.dtype)
                diffs[f"teacher_err_{name}"].append(u - u_exact)
                if name == "student" and cfg.objective != "prediction":  # g is trained only with the correction
                    v_g = fake_velocity(x_r, torch.full_like(gamma, r), yy, gamma)
                    diffs["correction"].append(v_g - u)
                    diffs["exact_correction"].append(v_g - u_exact)
                    cosines.append(nn.functional.cosine_similarity((v_g - u).flatten(1), (v_g - u_exact).flatten(1)))
        row = {"r": r, **{k: rms(torch.cat(v)) for k, v in diffs.items() if v}}
        if cosines:
            row["cosine"] = float(torch.cat(cosines).mean())
        rows.append(row)
    return rows


def format_check(rows):
    keys = [k for k in rows[0] if k != "r"]
    return "\n".join(["correction check (RMS per dimension)  r  " + "  ".join(keys)]
                     + [f"  {row['r']:.1f}  " + "  ".join(f"{row[k]:.4f}" for k in keys) for row in rows])


# ---------------------------------------------------------------------------------------------------
# Training: noise and labels in, nothing else

def sample_conditions(batch, num_classes, cfg, device):
    """Labels (uniform) and CFG scales: with the prior noise, everything the training loop feeds in."""
    if not num_classes:
        return None, torch.ones(batch, device=device)  # unconditional: CFG does not apply
    y = torch.randint(0, num_classes, (batch,), device=device)
    return y, cfg.gamma_min + (cfg.gamma_max - cfg.gamma_min) * torch.rand(batch, device=device)


def load_teacher(cfg, device):
    """(teacher, its network, the world or None). The world is the analytic teacher and the exact scorer
    of the evaluation; training never samples it. A dataset path is never read."""
    arch = {"arch": cfg.arch, "hidden": cfg.hidden, "depth": cfg.depth}
    if cfg.bench:  # timing only: an untrained network for --bench-data's shape stands in for the teacher
        return (*teacher_for(cfg, DataSource(cfg.bench_data), device, arch), None)
    world = make_world(cfg.data)
    if world is None and not os.path.exists(cfg.data):
        fail(f"--data {cfg.data!r} is neither a world preset, a mixture .npz, nor an existing dataset path")
    if cfg.teacher == "gmm":
        return (*teacher_for(cfg, DataSource(cfg.data), device, arch), world)
    net = load_teacher_net(cfg.teacher, device)
    if world is not None and (tuple(net.shape), net.num_classes) != (tuple(world.shape), world.num_classes):
        fail(f"teacher {cfg.teacher} (shape {tuple(net.shape)}, {net.num_classes} classes) does not match --data "
             f"{cfg.data} (shape {tuple(world.shape)}, {world.num_classes} classes)")
    return NetTeacher(net), net, world


def train(cfg):
    d = setup_dist(cfg.device, cfg.seed)
    if cfg.objective not in ("both", "prediction", "correction"):
        fail(f"--objective must be both, prediction or correction, got {cfg.objective!r}")
    if (cfg.bench_batch if cfg.bench else cfg.batch) % d.world:
        fail(f"--batch / --bench-batch must be divisible by the number of processes {d.world}")
    if not 0 < cfg.pred_frac < 1 or cfg.delta_power <= 0 or cfg.fake_updates < 1:
        fail("--pred-frac must be in (0, 1), --delta-power positive and --fake-updates at least 1")
    prepare_out(cfg)
    batch = (cfg.bench_batch if cfg.bench else cfg.batch) // d.world
    teacher, teacher_net, world = load_teacher(cfg, d.device)
    shape, num_classes = tuple(teacher_net.shape), teacher_net.num_classes
    if num_classes and not cfg.gamma_min <= cfg.guidance <= cfg.gamma_max:
        fail(f"--guidance {cfg.guidance} lies outside the trained CFG range [{cfg.gamma_min}, {cfg.gamma_max}]")

    # Student and online velocity network g both start as copies of the teacher network. The new
    # delta / gamma embeddings are zero-initialised, so F(z, delta) starts at the teacher velocity u(z, 1),
    # the exact value at delta = 0. g also takes gamma: the student's distribution depends on it [I].
    student = build_backbone({**teacher_net._spec, "use_s": True, "use_g": True, "s_scale": cfg.delta_scale})
    fake = build_backbone({**teacher_net._spec, "use_g": True})
    student, fake = student.to(d.device), fake.to(d.device)
    init_from_teacher(student, teacher_net)
    init_from_teacher(fake, teacher_net)
    ema = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, betas=(0.9, 0.99), fused=True)
    fake_opt = torch.optim.Adam(fake.parameters(), lr=cfg.fake_lr, betas=(0.9, 0.99), fused=True)
    state = {"model": student, "ema": ema, "opt": opt, "fake": fake, "fake_opt": fake_opt}
    ckpt_path, step = os.path.join(cfg.out, "ckpt.pt"), 0
    if cfg.resume:
        step = load_training_state(ckpt_path, cfg, state, None, d.device)
    model, fake_model = maybe_compile(wrap_ddp(student), cfg.compile), maybe_compile(wrap_ddp(fake), cfg.compile)
    use_correction = cfg.objective != "prediction"

    def fake_velocity(x, t, y, gamma):
        return unwrap(fake_model)(x, t, y, g=gamma)

    def train_step(lr_scale=1.0):
        stats = {}
        for _ in range(cfg.fake_updates if use_correction else 0):
            # g tracks the velocity of the student's current one-step distribution by plain flow matching
            # on detached samples, at noise levels drawn as the correction's r (where it is queried)
            z = torch.randn(batch, *shape, device=d.device)
            y, gamma = sample_conditions(batch, num_classes, cfg, d.device)
            x_hat = one_step_sample(unwrap(model), z, y, gamma)
            with autocast(d.device):
                fake_loss = flow_matching_loss(lambda x, t, yy: fake_model(x, t, yy, g=gamma), x_hat, y,
                                               logit_mean=cfg.r_logit_mean, logit_std=cfg.r_logit_std)
            check_finite(fake_loss, step, "online velocity network loss")
            for group in fake_opt.param_groups:
                group["lr"] = cfg.fake_lr * lr_scale
            fake_opt.zero_grad(set_to_none=True)
            fake_loss.backward()
            nn.utils.clip_grad_norm_(fake.parameters(), cfg.grad_clip)
            fake_opt.step()
            stats["fake_loss"] = fake_loss.item()
        z = torch.randn(batch, *shape, device=d.device)
        y, gamma = sample_conditions(batch, num_classes, cfg, d.device)
        loss, student_stats = freeflow_loss(model, teacher, fake_velocity, z, y, gamma, cfg)
        check_finite(loss, step)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        stats["grad_norm"] = float(nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip))
        opt.step()
        return {**student_stats, **stats}

    if cfg.bench:  # one FreeFlow iteration against one flow-matching step of the same network and batch
        x0 = torch.randn(batch, *shape, device=d.device)  # stands in for a data batch (timing only)
        y, gamma = sample_conditions(batch, num_classes, cfg, d.device)

        def fm_step():
            loss = flow_matching_loss(lambda x, t, yy: model(x, t, yy, s=torch.ones_like(t), g=gamma), x0, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        delta = torch.rand(batch, device=d.device)

        @torch.no_grad()
        def forward():
            unwrap(model)(x0, torch.ones_like(delta), y, s=delta, g=gamma)

        def delta_jvp():
            velocity_and_delta_derivative(unwrap(model), x0, delta, y, gamma)
        # the passes an iteration cannot do without, on the same network and batch (a pass over the share f of
        # the batch counts f): per update of g, the one-step samples (a forward) and g's flow-matching step; the
        # student's gradient pass (a flow-matching step); on the prediction share f the JVP and the teacher (two
        # passes under CFG); on the rest the teacher (one pass at least: no CFG past corr_guidance_max) and g
        f = {"prediction": 1.0, "correction": 0.0}.get(cfg.objective, cfg.pred_frac)
        fakes = cfg.fake_updates if use_correction else 0
        floor = {"flow matching": fakes + 1, "forward": fakes + f * (2 if num_classes else 1) + (1 - f) * 2, "jvp": f}
        step_name = f"freeflow ({cfg.objective})"
        print0(f"{cfg.bench_data}: {type(student).__name__}, batch {batch}, "
               f"{sum(p.numel() for p in student.parameters())} parameters")
        bench({"flow matching": fm_step, step_name: train_step}, passes={"forward": forward, "jvp": delta_jvp},
              floors={step_name: floor})
        cleanup()
        return None

    logger = Logger(cfg.out, cfg.steps, step, desc="freeflow")
    while step < cfg.steps:
        stats = train_step(min(1.0, (step + 1) / max(cfg.lr_warmup, 1)))
        ema_update(ema, model, cfg.ema_decay)
        step += 1
        logger.step()
        if step % cfg.log_every == 0 or step == cfg.steps:
            logger.log(step, stats)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_training_state(ckpt_path, cfg, step, state, None, extra={"backbone": student._spec})
    train_seconds = logger.seconds()
    logger.close()

    g = cfg.guidance if num_classes else 1.0
    sampler = lambda z, y: one_step_sample(ema, z, y, torch.full((len(z),), g, device=z.device))
    if world is not None:
        if is_main():  # exact metrics of a few thousand samples: rank 0 alone
            rows = evaluate([{"sampler": "student", "nfe": 1, "fn": sampler, "ode": True}], world, teacher, cfg, cfg.out,
                            "freeflow", train_seconds, "gmm" if cfg.teacher == "gmm" else "learned",
                            n=cfg.eval_samples, guidance=cfg.guidance, device=d.device, teacher_net=teacher_net)
            print0(format_table(rows))
            check = correction_check(ema, fake_velocity, teacher, world, cfg, cfg.eval_samples, d.device)
            metrics_path = os.path.join(cfg.out, "metrics.json")
            write_json(metrics_path, {**json.load(open(metrics_path)), "correction_check": check})
            print0(format_check(check))
    else:
        evaluate_real([{"sampler": "student", "nfe": 1, "fn": sampler}], shape, num_classes, cfg, "freeflow",
                      train_seconds, d.device)
    print0(f"wrote {cfg.out}/ckpt.pt, metrics.json, samples.png ({train_seconds:.1f} s of training)")
    barrier()
    cleanup()
    return ema


def main():
    train(parse_config(Config))


if __name__ == "__main__":
    main()
