"""
Un-distilling FLUX.1-schnell: restore many-step sampling and real classifier-free guidance by
flow-matching fine-tuning, as OpenFLUX.1 (ostris) and LibreFLUX (jimmycarter) did.
FLUX.1 [schnell] (Black Forest Labs 2024) samples in 1-4 steps without CFG; its outputs at a given t
are distilled jumps, not the velocity of the data flow, so neither many-step sampling nor CFG nor
ordinary fine-tuning works on it. This file holds:
  - the FLUX.1 transformer (19 double-stream + 38 single-stream blocks), loading Black Forest Labs'
    flux1-schnell.safetensors / flux1-dev.safetensors with strict key matching (no diffusers);
  - attention masking of the T5 padding (--mask bool | none | soft), caption dropout for CFG;
  - LoRA and LoKr adapters (save/load as safetensors, merge), full fine-tuning, DDP and FSDP;
  - the N-step Euler sampler on the shifted schedule with true CFG, and schnell's 4-step sampler.
Objective (the rectified-flow training FLUX was pre-trained with): x_t = (1 - t) x0 + t eps,
MSE(v(x_t, t, c), eps - x0), t logit-normal or Beta(a, b), the prompt c replaced by the empty prompt
with probability p (so the unconditional velocity for CFG is learned again).

The embedded default (CPU) reproduces the situation in miniature and measures it:
  1. a captioned toy world: the class-conditional glyphs16 mixture (common.py) with captions such as
     "the digit 7" / "a seven", a frozen random embedding table standing in for T5 and the mean of the
     real tokens' embeddings standing in for CLIP's pooled vector; a 2x2 space-to-depth "VAE" turns each
     16x16 glyph into a 4x8x8 latent, which FLUX packs 2x2 into 16 tokens of 16 channels;
  2. a tiny FLUX distilled in-file into a schnell-like model: trained, without caption dropout or
     masking, to reproduce the exact CFG teacher's ODE jump over each of the 4 intervals of schnell's
     unshifted grid (1, .75, .5, .25, 0), the last one from the student's own state at .25 (and 3x as
     often). Like schnell it samples best with those 4 steps and no CFG, its outputs are jumps rather
     than velocities, it never saw an empty prompt, and it has guidance baked in; unlike schnell it was
     distilled by trajectory regression, not by adversarial diffusion distillation (whose details BFL
     did not publish). Cached under runs/cache;
  3. its un-distillation with LoRA or LoKr, flow matching on the world's samples, caption dropout, masking;
  4. a table before/after: 4, 8, 32 Euler steps x CFG 1, 2, 4 with mmd (to the data law), cond_acc and
     swd_target (to the exact CFG-guided law), next to the exact teacher on the same grid with the same CFG (CFG
     itself moves samples off the data law, raising mmd) and to a perfect toy schnell (the exact jumps it is
     distilled to).

    python undistill_flux.py                              # the toy default, 10 min from scratch on one CPU core (cached after)
    python undistill_flux.py --adapter lokr               # LoKr instead of LoRA (factor 4)
    python undistill_flux.py --mask soft                  # LibreFLUX's probable 0/1 float mask
    python undistill_flux.py --bench                      # one un-distillation step vs a full fine-tune step
  The real model (data: a directory of shards, see LatentShards):
    torchrun --standalone --nproc_per_node=8 undistill_flux.py --preset schnell --base flux1-schnell.safetensors \\
        --data /data/flux_shards --adapter lokr --rank 100000 --lokr-factor 16 --lr 1e-3 --batch 64 \\
        --steps 20000 --bf16 --grad-ckpt --out runs/libre
    torchrun ... --adapter full --fsdp --lr 1e-5 ...      # full fine-tuning, parameters sharded (FSDP2)
    python undistill_flux.py --preset schnell --base flux1-schnell.safetensors \\
        --adapter-file runs/libre/adapter.safetensors --sample-prompts prompts.safetensors \\
        --sample-steps 28 --cfg-scale 3.5 --no-cfg-steps 2 --height 1024 --width 1024 --bf16
  Sampling writes samples.safetensors with FLUX VAE latents; decode them with your FLUX autoencoder.
"""
import contextlib
import copy
import fnmatch
import glob
import hashlib
import json
import math
import os
import time
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import common
from common import (Logger, autocast, barrier, bench, check_finite, cleanup, euler_sample, evaluate, fail, format_table,
                    is_main, load_training_state, make_world, maybe_compile, parse_config, prepare_out, print0,
                    reference_ode, save_training_state, setup_dist, timestep_embedding, wrap_ddp, write_json, floats)


@dataclass
class Config:
    preset: str = "tiny"           # tiny (the CPU toy) | schnell | dev: the transformer's shape (reference §1.1)
    base: str = ""                 # BFL-layout .safetensors to un-distill; "" = the toy's in-file distilled model
    data: str = "glyphs16"         # glyphs16 (the captioned toy world) or a directory of latent shards
    out: str = "runs/undistill_flux"
    adapter: str = "lora"          # lora | lokr | full (full fine-tuning; add --fsdp for the 12B model)
    targets: str = "*"             # fnmatch patterns of the nn.Linear names that get adapters ('*' = all;
                                   # e.g. '*_mod.lin,*.modulation.lin' = the modulation layers only)
    rank: int = 8                  # LoRA rank / LoKr rank of W2 (W2 is full when rank >= max(W2 dims) / 2)
    alpha: float = 8.0             # scale alpha / rank (LoKr with a full W2: scale 1, as LyCORIS)
    lokr_factor: int = 4           # LoKr factorisation (reference §4.2): -1 = most balanced split
    steps: int = 1600              # toy scale; LibreFLUX trained on the order of 1,500 H100-hours [recalled]
    batch: int = 32                # global batch, split across ranks
    lr: float = 2e-3               # AdamW; toy value (SimpleTuner suggests ~1e-3 for LoKr, 1e-4 for LoRA)
    lr_warmup: int = 20
    grad_clip: float = 1.0
    timesteps: str = "logit_normal"  # logit_normal (SD3, minRF) | beta (LibreFLUX's Beta(a, b) schedule)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    beta_a: float = 2.0            # SimpleTuner's defaults; LibreFLUX's final values are unpublished
    beta_b: float = 2.0
    time_shift: bool = True        # shift training t and the sampler grid by mu(image tokens), reference §1.7
    caption_dropout: float = 0.1   # probability of the empty prompt (T5 sequence, mask and pooled vector)
    mask: str = "bool"             # bool: hide T5 padding keys | none: BFL's unmasked attention |
                                   # soft: the 0/1 float mask added to logits (what LibreFLUX probably used)
    dev_guidance: float = 1.0      # dev only: the value fed to its distilled-guidance input
    grad_ckpt: bool = False        # activation checkpointing of every block
    bf16: bool = False             # bf16 base weights (adapters stay fp32) and bf16 autocast on CUDA
    fsdp: bool = False             # shard parameters with FSDP2 fully_shard (with --adapter full)
    text_len: int = 8              # toy: T5 stand-in length (real captions use 5 + </s>; the rest is padding)
    distill_steps: int = 2400      # toy: training of the schnell-like 4-step model (cached afterwards); fewer
                                   # samples leave a schnell that still answers CFG (README, "The toy")
    distill_batch: int = 64        # the tiny model's step is per-op overhead: batch 64 costs 1.5x batch 32, so
                                   # 2400 x 64 sees the samples of 4800 x 32 in 73 % of the time
    distill_lr: float = 3e-3
    distill_guidance: float = 2.0  # toy: CFG scale baked into the distilled model (schnell's is unknown)
    distill_pool: int = 4096       # toy: teacher ODE trajectories to distil from (fewer: overfitting)
    distill_own_last: bool = True  # toy: train the last jump from the student's own state at t = 0.25 (exposure
                                   # bias; --no-distill-own-last: every jump from the teacher's trajectory)
    distill_last_weight: float = 3.0  # toy: the last interval is drawn this many times as often as each other one
    eval_steps: str = "4,8,32"     # toy table: Euler steps ...
    eval_cfgs: str = "1,2,4"       # ... times CFG scales
    eval_samples: int = 400
    sample_prompts: str = ""       # sampling mode: .safetensors with t5, t5_mask, clip_pooled (+ negative_*)
    adapter_file: str = ""         # sampling mode: adapters to merge into --base first
    sample_steps: int = 28
    cfg_scale: float = 3.5
    no_cfg_steps: int = 0          # LibreFLUX's no_cfg_until_timestep: plain conditional first steps
    height: int = 1024
    width: int = 1024
    save_merged: bool = False      # also write merged.safetensors (base + adapters, BFL layout)
    log_every: int = 50
    ckpt_every: int = 1000
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    compile: bool = False
    bench: bool = False


# ---------------------------------------------------------------------------------------------------
# The FLUX.1 transformer (BFL layout, reference §1.1-1.5). Every module name below is a checkpoint key.

PRESETS = {
    "schnell": dict(in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24,
                    depth=19, depth_single_blocks=38, axes_dim=(16, 56, 56), theta=10_000, qkv_bias=True, guidance_embed=False),
    # the toy: 16 image tokens of 16 channels (a 4-channel 8x8 latent packed 2x2), 32-dim text, hidden 64
    "tiny": dict(in_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64, mlp_ratio=4.0, num_heads=2,
                 depth=2, depth_single_blocks=2, axes_dim=(8, 12, 12), theta=10_000, qkv_bias=True, guidance_embed=False),
}
PRESETS["dev"] = {**PRESETS["schnell"], "guidance_embed": True}  # dev adds guidance_in (10.23M parameters)


def rope(ids, axes_dim, theta):
    """Rotation angles of EmbedND: axis i of the (B, L, 3) ids rotates d_i/2 pairs at frequencies
    theta^(-2j/d_i). Returns cos, sin of shape (B, 1, L, head_dim/2), computed in float64 -> fp32."""
    angles = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
        angles.append(ids[..., i].double()[..., None] * omega)
    a = torch.cat(angles, -1)[:, None]
    return a.cos().float(), a.sin().float()


def apply_rope(x, pe):
    """Rotate ADJACENT pairs (x[2j], x[2j+1]) of q or k (BFL's layout, not the half-split one)."""
    cos, sin = pe
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], -1).flatten(-2).type_as(x)


def attention(q, k, v, pe, mask):
    """Joint attention over [text; image] tokens; q, k, v are (B, heads, L, head_dim). A bool mask hides
    keys; a float mask is ADDED to the logits (the 'soft' LibreFLUX behaviour, reference §2.3)."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


def joint_attention_mask(txt_mask, n_img, mode):
    """Key mask [text mask ; ones for the image tokens] (text first), shape (B, 1, 1, L): only padded
    text KEYS are hidden; padded text queries are computed but feed nothing that reaches the output."""
    if mode == "none" or txt_mask is None:
        return None
    keys = torch.cat([txt_mask.bool(), txt_mask.new_ones(len(txt_mask), n_img, dtype=torch.bool)], 1)[:, None, None]
    return keys if mode == "bool" else keys.float()  # soft: +1 on real tokens, +0 on padding


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))  # the key is 'scale', not 'weight'

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, head_dim):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(head_dim), RMSNorm(head_dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim, heads, qkv_bias):
        super().__init__()
        self.heads = heads
        self.qkv, self.norm, self.proj = nn.Linear(dim, 3 * dim, bias=qkv_bias), QKNorm(dim // heads), nn.Linear(dim, dim)

    def qkv_heads(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # packed [q; k; v]
        q, k = self.norm(q, k, v)  # QK RMSNorm before RoPE
        return q, k, v


class Modulation(nn.Module):
    """lin(SiLU(vec)) chunked as (shift, scale, gate), twice for double blocks."""

    def __init__(self, dim, double):
        super().__init__()
        self.chunks = 6 if double else 3
        self.lin = nn.Linear(dim, self.chunks * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None].chunk(self.chunks, -1)


def modulate(x, shift, scale):
    return (1 + scale) * x + shift


def feed_forward(dim, hidden):
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))  # keys .0 / .2


class DoubleStreamBlock(nn.Module):
    """Separate weights for the image and text streams, one joint attention over [txt; img]."""

    def __init__(self, dim, heads, mlp_ratio, qkv_bias):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.img_mod, self.txt_mod = Modulation(dim, True), Modulation(dim, True)
        self.img_attn, self.txt_attn = SelfAttention(dim, heads, qkv_bias), SelfAttention(dim, heads, qkv_bias)
        self.img_mlp, self.txt_mlp = feed_forward(dim, hidden), feed_forward(dim, hidden)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # parameter-free, shared

    def forward(self, img, txt, vec, pe, mask):
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        iq, ik, iv = self.img_attn.qkv_heads(modulate(self.norm(img), i_shift1, i_scale1))
        tq, tk, tv = self.txt_attn.qkv_heads(modulate(self.norm(txt), t_shift1, t_scale1))
        out = attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), pe, mask)
        txt_out, img_out = out[:, :txt.shape[1]], out[:, txt.shape[1]:]
        img = img + i_gate1 * self.img_attn.proj(img_out)
        img = img + i_gate2 * self.img_mlp(modulate(self.norm(img), i_shift2, i_scale2))
        txt = txt + t_gate1 * self.txt_attn.proj(txt_out)
        txt = txt + t_gate2 * self.txt_mlp(modulate(self.norm(txt), t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP: linear1 -> [q; k; v; mlp_in], linear2(cat(attention, GELU(mlp_in)))."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.dim, self.heads, self.mlp_hidden = dim, heads, int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(dim // heads)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(dim, False)

    def forward(self, x, vec, pe, mask):
        shift, scale, gate = self.modulation(vec)
        qkv, h = self.linear1(modulate(self.pre_norm(x), shift, scale)).split([3 * self.dim, self.mlp_hidden], -1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        return x + gate * self.linear2(torch.cat([attention(q, k, v, pe, mask), F.gelu(h, approximate="tanh")], -1))


class LastLayer(nn.Module):
    def __init__(self, dim, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))  # stored as [shift; scale]

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, -1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class Flux(nn.Module):
    def __init__(self, in_channels, vec_in_dim, context_in_dim, hidden_size, mlp_ratio, num_heads, depth,
                 depth_single_blocks, axes_dim, theta, qkv_bias, guidance_embed):
        super().__init__()
        if sum(axes_dim) != hidden_size // num_heads:
            raise ValueError(f"RoPE axes {axes_dim} must sum to the head dim {hidden_size // num_heads}")
        self.axes_dim, self.theta, self.grad_ckpt = tuple(axes_dim), theta, False
        self.img_in = nn.Linear(in_channels, hidden_size)
        self.time_in = MLPEmbedder(256, hidden_size)
        self.vector_in = MLPEmbedder(vec_in_dim, hidden_size)
        self.guidance_in = MLPEmbedder(256, hidden_size) if guidance_embed else None
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth_single_blocks))
        self.final_layer = LastLayer(hidden_size, in_channels)

    def forward(self, img, img_ids, txt, txt_ids, t, y, txt_mask=None, guidance=None, mask="bool"):
        """img (B, L_img, in_channels) packed latents, txt (B, L_txt, context) T5 states, t in [0, 1]
        (x 1000 inside the embedding, cos first), y (B, vec_in_dim) CLIP pooled. Returns the velocity."""
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(t, 256).to(img.dtype)) + self.vector_in(y)
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        txt = self.txt_in(txt)
        pe = rope(torch.cat([txt_ids, img_ids], 1), self.axes_dim, self.theta)  # text first
        attn_mask = joint_attention_mask(txt_mask, img.shape[1], mask)
        run = (lambda f, *a: checkpoint(f, *a, use_reentrant=False)) if self.grad_ckpt and torch.is_grad_enabled() \
            else (lambda f, *a: f(*a))
        for block in self.double_blocks:
            img, txt = run(block, img, txt, vec, pe, attn_mask)
        x = torch.cat([txt, img], 1)
        for block in self.single_blocks:
            x = run(block, x, vec, pe, attn_mask)
        return self.final_layer(x[:, txt.shape[1]:], vec)


# ---------------------------------------------------------------------------------------------------
# Latents, position ids, schedule (reference §1.6-1.7)

def pack(x):
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): 'b c (h ph) (w pw) -> b (h w) (c ph pw)', channel-major."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, C * 4)


def unpack(x, H, W):
    B, _, D = x.shape
    return x.reshape(B, H // 2, W // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, H, W)


def position_ids(batch, H, W, text_len, device):
    """Image token (h, w) of the packed grid gets (0, h, w); text tokens get (0, 0, 0) (no rotation)."""
    h, w = torch.meshgrid(torch.arange(H // 2), torch.arange(W // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(h), h, w], -1).reshape(1, -1, 3).float()
    return img_ids.expand(batch, -1, -1).to(device), torch.zeros(batch, text_len, 3, device=device)


def schedule_mu(image_seq_len):
    """BFL's mu: the line through (256 tokens, 0.5) and (4096 tokens, 1.15)."""
    return 0.5 + (1.15 - 0.5) / (4096 - 256) * (image_seq_len - 256)


def shift_time(t, mu):
    """t' = e^mu / (e^mu + 1/t - 1), written as s t / (1 + (s - 1) t) with s = e^mu (safe at t = 0)."""
    s = math.exp(mu)
    return s * t / (1 + (s - 1) * t)


def time_grid(steps, shift, image_seq_len):
    """linspace(1, 0, steps + 1), shifted by mu(image tokens) for dev-style sampling (schnell: unshifted)."""
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return shift_time(ts, schedule_mu(image_seq_len)) if shift else ts


def predict(model, x, t, cond, mask, guidance=None):
    """Velocity for unpacked latents x (B, C, H, W): pack, build ids, run the transformer, unpack."""
    B, _, H, W = x.shape
    img_ids, txt_ids = position_ids(B, H, W, cond["t5"].shape[1], x.device)
    out = model(pack(x), img_ids, cond["t5"], txt_ids, t, cond["clip_pooled"], cond["t5_mask"], guidance, mask)
    return unpack(out, H, W)


# ---------------------------------------------------------------------------------------------------
# Checkpoints: BFL's single-file layout through safetensors, built on the meta device (no second copy)

DIFFUSERS_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.", "time_text_embed.")


@contextlib.contextmanager
def safetensors_errors(path):
    """A truncated, corrupt or non-safetensors file stops with a one-line error that names it."""
    try:
        yield
    except (SafetensorError, OSError, ValueError) as e:
        fail(f"cannot read {path} as safetensors ({type(e).__name__}: {' '.join(str(e).split())[:80]}); "
             f"re-download or re-write the file")


def read_safetensors(path):
    with safetensors_errors(path):
        return load_file(path)


def load_flux(path, preset, device="cpu", dtype=torch.bfloat16):
    """A strict load: every key and shape of the preset, nothing else. Keys may carry ComfyUI's
    'model.diffusion_model.' prefix. Tensors are read one at a time and assigned to the meta-built model."""
    if not os.path.isfile(path):
        fail(f"checkpoint {path} not found; pass BFL's flux1-schnell.safetensors (or flux1-dev) with --base")
    with torch.device("meta"):
        model = Flux(**PRESETS[preset])
    expected = model.state_dict()
    state = {}
    with safetensors_errors(path), safe_open(path, framework="pt", device=str(device)) as f:
        names = {key.removeprefix("model.diffusion_model."): key for key in f.keys()}
        if any(n.startswith(DIFFUSERS_PREFIXES) for n in names):
            fail(f"{path} is in diffusers layout (transformer_blocks.N.attn.to_q/to_k/to_v, single_transformer_blocks.N, "
                 "x_embedder); this file reads BFL's original layout (double_blocks.N.img_attn.qkv, single_blocks.N.linear1): "
                 "use flux1-schnell.safetensors from the repository root, not the transformer/ folder")
        missing, unexpected = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
        if missing or unexpected:
            hint = " (guidance_in.* present: a dev checkpoint, use --preset dev)" if any(n.startswith("guidance_in") for n in unexpected) else \
                " (no guidance_in.*: a schnell checkpoint, use --preset schnell)" if any(n.startswith("guidance_in") for n in missing) else ""
            fail(f"{path} does not match the {preset} preset{hint}: missing {missing[:3]} ({len(missing)}), "
                 f"unexpected {unexpected[:3]} ({len(unexpected)})")
        for name, key in names.items():
            shape = tuple(f.get_slice(key).get_shape())
            if shape != tuple(expected[name].shape):
                fail(f"{path}: {name} has shape {shape}, the {preset} preset expects {tuple(expected[name].shape)}")
            state[name] = f.get_tensor(key).to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def save_safetensors(tensors, path, metadata=None):
    """Atomic write (temp file + rename) of a flat dict of tensors."""
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# Low-rank adapters on nn.Linear: LoRA and LoKr (reference §4). Delta W = 0 at initialisation.

class LoRALinear(nn.Module):
    """y = W0 x + b + (alpha / r) B A x  (Hu et al. 2021); A kaiming-uniform, B = 0."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))
        self.register_buffer("alpha", torch.tensor(float(alpha), device=dev))
        self.scale = alpha / rank

    def delta_weight(self):
        return self.scale * self.lora_B @ self.lora_A

    def forward(self, x):
        delta = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return self.base(x) + (self.scale * delta).to(x.dtype)


def factorization(dim, factor=-1):
    """LyCORIS's split dim = m * n, m <= n: (factor, dim / factor) when factor divides dim, else the most
    balanced split with m <= factor (factor = -1: no limit). 3072 -> (16, 192) at 16, (48, 64) at -1."""
    if factor > 0 and dim % factor == 0:
        return tuple(sorted((factor, dim // factor)))
    limit = dim if factor < 0 else factor
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0 and d <= limit)
    return m, dim // m


class LoKrLinear(nn.Module):
    """Delta W = s (W1 kron W2) (LyCORIS LoKr): out = a b, in = c d, W1 (a, c) kaiming, W2 (b, d) = 0, or
    W2 = W2a W2b with W2b = 0 when rank < max(b, d) / 2. s = alpha / rank, or 1 when W2 is full."""

    def __init__(self, base, w1_shape, rank, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        dev, (a, c) = base.weight.device, w1_shape
        b, d = base.out_features // a, base.in_features // c
        self.lokr_w1 = nn.Parameter(torch.empty(a, c, device=dev))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        self.full = rank >= max(b, d) / 2
        if self.full:
            self.lokr_w2 = nn.Parameter(torch.zeros(b, d, device=dev))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, rank, device=dev))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, d, device=dev))
        self.register_buffer("alpha", torch.tensor(float(alpha), device=dev))
        self.scale = 1.0 if self.full else alpha / rank

    def w2(self):
        return self.lokr_w2 if self.full else self.lokr_w2_a @ self.lokr_w2_b

    def delta_weight(self):
        return self.scale * torch.kron(self.lokr_w1, self.w2())

    def forward(self, x):
        # (W1 kron W2) x without forming the product: with x viewed as X (c, d) it is W1 X W2^T, flattened
        X = x.to(self.lokr_w1.dtype).unflatten(-1, (self.lokr_w1.shape[1], -1))
        delta = torch.einsum("ac,...cd,bd->...ab", self.lokr_w1, X, self.w2()).flatten(-2)
        return self.base(x) + (self.scale * delta).to(x.dtype)


ADAPTERS = (LoRALinear, LoKrLinear)


def add_adapters(model, kind, patterns, rank, alpha, factor=-1):
    """Freeze the model and wrap every nn.Linear whose name matches one of the fnmatch patterns."""
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear
             and any(fnmatch.fnmatchcase(n, p.strip()) for p in patterns.split(","))]
    if not names:
        fail(f"--targets {patterns!r} matches no linear layer (names look like double_blocks.0.img_attn.qkv)")
    for name in names:
        base = model.get_submodule(name)
        w1 = (factorization(base.out_features, factor)[0], factorization(base.in_features, factor)[0])
        _replace(model, name, LoRALinear(base, rank, alpha) if kind == "lora" else LoKrLinear(base, w1, rank, alpha))
    return names


def _replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def adapter_state(model):
    """Only the adapter tensors, keyed '<layer name>.lora_A' etc. (the frozen base is not included)."""
    return {f"{n}.{k}": v for n, m in model.named_modules() if isinstance(m, ADAPTERS)
            for k, v in m.state_dict().items() if not k.startswith("base.")}


def load_adapters(model, path):
    """Recreate the adapters a file describes (kind, rank and factors read from the tensors) and load them."""
    if not os.path.isfile(path):
        fail(f"adapter file {path} not found")
    tensors = read_safetensors(path)
    layers = sorted({k.rsplit(".", 1)[0] for k in tensors})
    for name in layers:
        try:
            base = model.get_submodule(name)
        except AttributeError:
            base = None
        if type(base) is not nn.Linear:
            fail(f"{path} has adapters for {name}, which is not a linear layer of this model (wrong --preset?)")
        t = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        if "lora_A" in t:
            module = LoRALinear(base, t["lora_A"].shape[0], float(t["alpha"]))
        else:
            rank = t["lokr_w2_a"].shape[1] if "lokr_w2_a" in t else max(base.out_features, base.in_features)
            module = LoKrLinear(base, tuple(t["lokr_w1"].shape), rank, float(t["alpha"]))
        module.load_state_dict({**t, **{f"base.{k}": v for k, v in base.state_dict().items()}})
        _replace(model, name, module)
    return layers


@torch.no_grad()
def merge_adapters(model):
    """W0 += Delta W in place and put the plain nn.Linear back: the model has the original keys again."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, ADAPTERS)]:
        m.base.weight += m.delta_weight().to(m.base.weight.dtype)
        _replace(model, name, m.base)
    return model


class TrainableState:
    """state_dict / load_state_dict of the trainable tensors only (adapters, or all for full fine-tuning),
    so that checkpoints of an adapter run do not carry the 12B frozen base."""

    def __init__(self, model):
        self.model = model

    def state_dict(self):
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_state_dict(self, state):
        own = self.state_dict()
        if set(own) != set(state):
            fail("checkpoint holds other trainable tensors than this run (another --adapter/--targets?)")
        with torch.no_grad():
            for n, v in state.items():
                own[n].copy_(v)


# ---------------------------------------------------------------------------------------------------
# Text conditioning and data: the toy's captioned glyphs, and latent shards for the real model

DIGIT_WORDS = "zero one two three four five six seven eight nine".split()
TEMPLATES = ("a {w}", "the digit {d}", "a handwritten {w}", "the number {w}", "{d}", "a picture of a {w}")


class ToyText:
    """Stand-ins for FLUX's text encoders. Captions are tokenised, '</s>' appended and '<pad>' filled up
    to text_len, as T5's tokenizer does; a frozen random table gives the 'T5' token states (padding keeps
    the pad row, so unmasked attention sees it), the mean over real tokens the 'CLIP pooled' vector."""

    def __init__(self, text_len, dim, seed=0):
        words = sorted({w for d in range(10) for tpl in TEMPLATES for w in tpl.format(w=DIGIT_WORDS[d], d=d).split()})
        self.vocab = {"<pad>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
        self.text_len = text_len
        self.table = torch.randn(len(self.vocab), dim, generator=torch.Generator().manual_seed(seed))
        if max(len(t.split()) for t in TEMPLATES) + 1 > text_len:
            fail(f"--text-len {text_len} is shorter than the longest caption plus </s>")

    def captions(self, labels, generator):
        picks = torch.randint(0, len(TEMPLATES), (len(labels),), generator=generator).tolist()
        return [TEMPLATES[p].format(w=DIGIT_WORDS[int(d)], d=int(d)) for p, d in zip(picks, labels.tolist())]

    def encode(self, captions, device="cpu"):
        ids = torch.zeros(len(captions), self.text_len, dtype=torch.long)
        for i, c in enumerate(captions):
            tokens = [self.vocab[w] for w in c.split()] + [self.vocab["</s>"]]
            ids[i, :len(tokens)] = torch.tensor(tokens)
        mask = ids != 0
        states = self.table[ids]
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return {"t5": states.to(device), "t5_mask": mask.to(device), "clip_pooled": pooled.to(device)}


def to_latent(x):
    """The toy 'VAE': 2x2 space-to-depth, (B, 1, 16, 16) -> (B, 4, 8, 8); invertible and noise-preserving."""
    return F.pixel_unshuffle(x, 2)


def from_latent(z):
    return F.pixel_shuffle(z, 2)


class ToyData:
    """Fresh captioned samples of the glyphs16 world, as latents (the un-distillation's 'real images')."""

    def __init__(self, world, text, seed):
        self.world, self.text = world, text
        self.gen = torch.Generator().manual_seed(seed * 1000 + common.DIST.rank)
        self.empty = text.encode([""])

    def next_batch(self, batch, device):
        y = torch.randint(0, self.world.num_classes, (batch,), generator=self.gen)
        x0, _ = self.world.sample(batch, y, generator=self.gen)
        return {"latents": to_latent(x0).to(device), **self.text.encode(self.text.captions(y, self.gen), device)}

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, s):
        self.gen.set_state(s["gen"])


SHARD_KEYS = {"latents": 4, "t5": 3, "t5_mask": 2, "clip_pooled": 2}


class LatentShards:
    """A directory of *.safetensors shards, each with N rows of
         latents      (N, C, H/8, W/8)  FLUX VAE latents, already normalised: 0.3611 * (z - 0.1159), C * 4 = in_channels
         t5           (N, S, 4096)      T5-XXL last_hidden_state, padded to S (256 schnell / 512 dev; same S everywhere)
         t5_mask      (N, S)            1 for real tokens (incl. </s>), 0 for padding
         clip_pooled  (N, 768)          CLIP-L pooler_output
    plus empty_prompt.safetensors with t5 (1, S, 4096), t5_mask (1, S), clip_pooled (1, 768) of the prompt ""
    (caption dropout and the CFG negative). Rank r reads the shards r, r + world, ...; rows are reshuffled
    every epoch, one shard in memory at a time."""

    def __init__(self, path, params, seed):
        if not os.path.isdir(path):
            fail(f"--data {path!r} is neither glyphs16 nor a directory of latent shards")
        empty_path = os.path.join(path, "empty_prompt.safetensors")
        files = sorted(f for f in glob.glob(os.path.join(path, "*.safetensors")) if f != empty_path)
        if not files or not os.path.isfile(empty_path):
            fail(f"{path} needs *.safetensors shards and empty_prompt.safetensors (format: see LatentShards)")
        text_len = {self.check(f, params) for f in files + [empty_path]}
        if len(text_len) != 1:
            fail(f"shards in {path} have different T5 lengths {sorted(text_len)}; pad every prompt to one length")
        self.files = files[common.DIST.rank::common.DIST.world]
        if not self.files:
            fail(f"{len(files)} shards cannot feed {common.DIST.world} processes; write at least one shard per process")
        self.empty = {k: v.float() if k != "t5_mask" else v.bool() for k, v in read_safetensors(empty_path).items() if k in SHARD_KEYS}
        self.gen = torch.Generator().manual_seed(seed * 1000 + common.DIST.rank)
        self.epoch, self.file_pos, self.row_pos = 0, 0, 0
        self.file_order = torch.randperm(len(self.files), generator=self.gen)
        self._open()

    @staticmethod
    def check(path, params):
        with safetensors_errors(path), safe_open(path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        need = {"t5", "t5_mask", "clip_pooled"} | (set() if path.endswith("empty_prompt.safetensors") else {"latents"})
        if need - set(shapes):
            fail(f"{path} lacks {sorted(need - set(shapes))}; a shard holds latents, t5, t5_mask, clip_pooled")
        bad = [k for k in need if len(shapes[k]) != SHARD_KEYS[k]] + [k for k in need if shapes[k][0] != shapes["t5"][0]]
        if bad:
            fail(f"{path}: {bad[0]} has shape {shapes[bad[0]]}; see LatentShards for the expected shapes and row counts")
        if shapes["t5"][2] != params["context_in_dim"] or shapes["clip_pooled"][1] != params["vec_in_dim"] \
                or shapes["t5_mask"][1] != shapes["t5"][1]:
            fail(f"{path}: t5 {shapes['t5']}, t5_mask {shapes['t5_mask']}, clip_pooled {shapes['clip_pooled']} do not fit "
                 f"the model (T5 width {params['context_in_dim']}, pooled width {params['vec_in_dim']})")
        if "latents" in need:
            _, C, H, W = shapes["latents"]
            if C * 4 != params["in_channels"] or H % 2 or W % 2:
                fail(f"{path}: latents {shapes['latents']} need {params['in_channels'] // 4} channels and even H, W")
        return shapes["t5"][1]

    def _open(self):
        self.shard = read_safetensors(self.files[int(self.file_order[self.file_pos])])
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.gen)))
        self.row_order = torch.randperm(len(self.shard["latents"]), generator=g)

    def next_batch(self, batch, device):
        rows = []
        while len(rows) < batch:  # a batch never mixes shards (their resolutions may differ)
            if self.row_pos == len(self.row_order):
                self.file_pos, self.row_pos = self.file_pos + 1, 0
                if self.file_pos == len(self.files):
                    self.epoch, self.file_pos = self.epoch + 1, 0
                    self.file_order = torch.randperm(len(self.files), generator=self.gen)
                self._open()
                rows = []
            take = self.row_order[self.row_pos:self.row_pos + batch - len(rows)]
            rows, self.row_pos = rows + take.tolist(), self.row_pos + len(take)
        idx = torch.tensor(rows)
        out = {k: self.shard[k][idx].to(device) for k in SHARD_KEYS}
        out["t5_mask"] = out["t5_mask"].bool()
        return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}

    def state_dict(self):
        return {"gen": self.gen.get_state(), "epoch": self.epoch, "file_pos": self.file_pos, "row_pos": self.row_pos,
                "file_order": self.file_order, "row_order": self.row_order}

    def load_state_dict(self, s):
        self.gen.set_state(s["gen"])
        self.epoch, self.file_pos, self.file_order = s["epoch"], s["file_pos"], s["file_order"]
        self.shard = read_safetensors(self.files[int(self.file_order[self.file_pos])])
        self.row_order, self.row_pos = s["row_order"], s["row_pos"]


# ---------------------------------------------------------------------------------------------------
# Objective: rectified-flow matching on data with caption dropout (reference §1.8, §3.5-3.6)

def sample_t(n, cfg, mu, device):
    """Training times: logit-normal sigmoid(N(m, s)) or Beta(a, b), then the optional resolution shift."""
    if cfg.timesteps == "beta":
        t = torch.distributions.Beta(cfg.beta_a, cfg.beta_b).sample((n,)).to(device)
    else:
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, device=device))
    return shift_time(t, mu) if cfg.time_shift else t


def drop_captions(cond, empty, p):
    """With probability p a row's prompt becomes the empty prompt: T5 states, mask AND pooled vector."""
    drop = torch.rand(len(cond["t5"]), device=cond["t5"].device) < p
    return {k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), empty[k].to(v.device, v.dtype).expand_as(v), v)
            for k, v in cond.items()}


def undistill_loss(model, batch, empty, cfg, guidance=None):
    """|| v(x_t, t, c) - (eps - x0) ||^2 with x_t = (1 - t) x0 + t eps: FLUX's own pre-training objective."""
    x0 = batch["latents"]
    cond = drop_captions({k: batch[k] for k in ("t5", "t5_mask", "clip_pooled")}, empty, cfg.caption_dropout)
    t = sample_t(len(x0), cfg, schedule_mu(x0.shape[2] * x0.shape[3] // 4), x0.device)
    eps = torch.randn_like(x0)
    tb = t.view(-1, 1, 1, 1)
    v = predict(model, ((1 - tb) * x0 + tb * eps).to(x0.dtype), t, cond, cfg.mask, guidance)
    return F.mse_loss(v.float(), (eps - x0).float())


# ---------------------------------------------------------------------------------------------------
# Sampler: Euler on the (shifted) grid with true CFG; schnell's own is 4 unshifted steps without CFG

@torch.no_grad()
def sample(model, noise, cond, uncond=None, steps=28, cfg_scale=1.0, shift=True, no_cfg_steps=0, mask="bool",
           guidance=None):
    """Integrate dx/dt = v from t = 1 to 0 on linspace(1, 0, steps + 1) (shifted by mu(seq len) when shift),
    v = v_u + w (v_c - v_u) with the negative/empty prompt as u, except during the first no_cfg_steps.
    steps=4, shift=False, cfg_scale=1 is FLUX.1-schnell's own sampler (BFL cli: no shift for schnell)."""
    ts = time_grid(steps, shift, noise.shape[2] * noise.shape[3] // 4)
    x, B = noise, len(noise)
    both = None if uncond is None else {k: torch.cat([cond[k], uncond[k].expand_as(cond[k])]) for k in cond}
    for i, (t0, t1) in enumerate(zip(ts[:-1].tolist(), ts[1:].tolist())):
        t = torch.full((B,), t0, device=x.device)  # fp32 even for bf16 latents (t x 1000 inside)
        if cfg_scale == 1 or uncond is None or i < no_cfg_steps:
            v = predict(model, x, t, cond, mask, guidance)
        else:
            g2 = None if guidance is None else guidance.repeat(2)
            v_c, v_u = predict(model, torch.cat([x, x]), t.repeat(2), both, mask, g2).chunk(2)
            v = v_u + cfg_scale * (v_c - v_u)
        x = x + (t1 - t0) * v
    return x


# ---------------------------------------------------------------------------------------------------
# The toy's schnell: a tiny FLUX distilled into a 4-step, CFG-free model (cached under runs/cache)

SCHNELL_GRID = (1.0, 0.75, 0.5, 0.25, 0.0)
CACHE_DIR = os.path.join("runs", "cache")


def zero_init_modulation(model):
    """adaLN-Zero (DiT): every modulation and the output layer start at 0, so each block starts as the
    identity. Only for the toy's from-scratch training (BFL did not publish FLUX's initialisation)."""
    for m in [m.lin for m in model.modules() if isinstance(m, Modulation)] + \
             [model.final_layer.adaLN_modulation[1], model.final_layer.linear]:
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)


def own_last_jump(model, world, noise, x_k, x_next, k, cond, y, guidance):
    """Sampling starts the last jump from the student's own state at t = 0.25, never from the teacher's, and a
    jump trained on teacher states alone blurs from there: from the student's 3-step state the exact teacher
    still finds the captioned digit every time (cond_acc 1.00), the student's own last jump did in 0.67 of
    cases. So the rows drawn for the last interval (k = 3) take the student's state (3 steps from the row's
    noise, no gradient) and the exact teacher's jump from it; the other rows keep the teacher's states."""
    last = (k == 3).nonzero().flatten()
    if not len(last):
        return x_k, x_next
    grid = torch.tensor(SCHNELL_GRID, device=noise.device)
    x, c_last = noise[last], {key: v[last] for key, v in cond.items()}
    with torch.no_grad():
        for j in range(3):
            x = x + (grid[j + 1] - grid[j]) * predict(model, x, grid[j].expand(len(x)), c_last, "none")
        # 4 RK4 steps: 4e-4 RMS from a 64-step solve on glyphs16 at CFG 2 (8 steps: 2e-5), far below the student's error
        x_end, _ = reference_ode(world.velocity, from_latent(x), y[last], guidance, steps=4, t_from=SCHNELL_GRID[3],
                                 t_to=0.0, estimate_error=False)
    x_k, x_next = x_k.clone(), x_next.clone()
    x_k[last], x_next[last] = x, to_latent(x_end)
    return x_k, x_next


def distilled_toy_schnell(cfg, world, text, device):
    """Regress, for each interval [t_k, t_k+1] of schnell's grid, the jump of the exact CFG-guided
    teacher ODE: v(x_tk, t_k, c) = (x_tk+1 - x_tk) / (t_k+1 - t_k), from the teacher's trajectories (the
    last interval from the student's own state, see own_last_jump, and drawn distill_last_weight times as
    often as each other one). Returns the BFL-layout file."""
    spec = [world.spec(), PRESETS["tiny"], cfg.text_len, cfg.distill_steps, cfg.distill_batch, cfg.distill_lr,
            cfg.distill_guidance, cfg.distill_pool, cfg.seed]
    spec += ([cfg.distill_last_weight] if cfg.distill_last_weight != 1 else []) + (["own last jump, RK4 x 4"] if cfg.distill_own_last else [])
    path = os.path.join(CACHE_DIR, f"undistill_flux-schnell-{hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:12]}.safetensors")
    if is_main() and not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        gen = torch.Generator().manual_seed(cfg.seed)
        y = torch.randint(0, world.num_classes, (cfg.distill_pool,), generator=gen)
        cond = text.encode(text.captions(y, gen), device)
        xs, y = [torch.randn(cfg.distill_pool, *world.shape, generator=gen).to(device)], y.to(device)
        for t0, t1 in zip(SCHNELL_GRID[:-1], SCHNELL_GRID[1:]):  # the teacher's ODE, accurately, interval by interval
            x, err = reference_ode(world.velocity, xs[-1], y, cfg.distill_guidance, steps=16, t_from=t0, t_to=t1)
            xs.append(x)
            print0(f"teacher ODE {t0:.2f} -> {t1:.2f}: RMS error estimate {err:.1e}")
        xs = torch.stack([to_latent(x) for x in xs])
        torch.manual_seed(cfg.seed)
        model = Flux(**PRESETS["tiny"]).to(device)
        zero_init_modulation(model)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.distill_lr, weight_decay=0.0, fused=True)
        bar = tqdm(range(cfg.distill_steps), desc="distilling the toy schnell", mininterval=10)  # rank 0 alone:
        log = open(path.replace(".safetensors", ".log.jsonl"), "w")  # no collectives; the log stays with the cache
        grid = torch.tensor(SCHNELL_GRID, device=device)
        interval_weights = torch.tensor([1.0, 1.0, 1.0, cfg.distill_last_weight])
        for step in bar:
            idx = torch.randint(0, cfg.distill_pool, (cfg.distill_batch,), generator=gen).to(device)
            k = (torch.randint(0, 4, (cfg.distill_batch,), generator=gen) if cfg.distill_last_weight == 1 else  # as before
                 torch.multinomial(interval_weights, cfg.distill_batch, replacement=True, generator=gen)).to(device)
            c = {key: v[idx] for key, v in cond.items()}
            x_k, x_next = xs[k, idx], xs[k + 1, idx]
            if cfg.distill_own_last:
                x_k, x_next = own_last_jump(model, world, xs[0, idx], x_k, x_next, k, c, y[idx], cfg.distill_guidance)
            target = (x_next - x_k) / (grid[k + 1] - grid[k]).view(-1, 1, 1, 1)
            for group in opt.param_groups:  # warm-up, then linear decay to 0
                group["lr"] = cfg.distill_lr * min(1.0, (step + 1) / 20, 2 * (1 - step / cfg.distill_steps))
            loss = F.mse_loss(predict(model, x_k, grid[k], c, "none"), target)  # BFL trains without a mask
            check_finite(loss, step, "distillation loss")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if (step + 1) % cfg.log_every == 0:
                log.write(json.dumps({"distill_step": step + 1, "distill_loss": round(loss.item(), 6)}) + "\n")
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        log.close()
        save_safetensors(model.state_dict(), path)
    barrier()
    return path


# ---------------------------------------------------------------------------------------------------
# Un-distillation

def check_config(cfg, toy):
    if cfg.adapter not in ("lora", "lokr", "full") or cfg.mask not in ("bool", "none", "soft"):
        fail("--adapter must be lora, lokr or full, and --mask bool, none or soft")
    if cfg.timesteps not in ("logit_normal", "beta") or not 0 <= cfg.caption_dropout < 1:
        fail("--timesteps must be logit_normal or beta, and --caption-dropout in [0, 1)")
    if cfg.preset not in PRESETS:
        fail(f"--preset must be one of {', '.join(PRESETS)}")
    if cfg.fsdp and cfg.adapter != "full":
        fail("--fsdp shards a full fine-tune; adapters train with DDP (drop --fsdp or use --adapter full)")
    if cfg.distill_last_weight <= 0:
        fail("--distill-last-weight must be positive (1 draws the four intervals equally often)")
    if toy and cfg.preset != "tiny":
        fail("the glyphs16 toy runs the tiny preset; the schnell/dev presets need --base and --data <shard directory>")
    if not toy and not cfg.base:
        fail("--base (BFL flux1-schnell.safetensors) is required with a shard directory as --data")
    if cfg.batch % common.DIST.world:
        fail(f"--batch {cfg.batch} is not divisible by the number of processes {common.DIST.world}")


def shard_fsdp(model, bf16):
    """FSDP2: every block, then the root, sharded over all ranks; bf16 compute with fp32 master weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(common.DIST.device.type, (common.DIST.world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in [*model.double_blocks, *model.single_blocks]:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def fsdp_state(model, opt, load=None):
    """Full (unsharded) model and optimizer state: gathered to rank 0's CPU, or loaded on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    if load is None:
        return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    set_state_dict(model, opt, model_state_dict=load[0], optim_state_dict=load[1], options=StateDictOptions(full_state_dict=True))


def save_run(cfg, step, net, model, opt, data):
    """Training state (exact resume) plus the artefact: adapter.safetensors, or transformer.safetensors."""
    path = os.path.join(cfg.out, "ckpt.pt")
    if cfg.fsdp:
        model_sd, opt_sd = fsdp_state(net, opt)  # collective: every rank takes part
        holders = {"model": types.SimpleNamespace(state_dict=lambda: model_sd), "opt": types.SimpleNamespace(state_dict=lambda: opt_sd)}
        save_training_state(path, cfg, step, holders, data)
        if is_main():
            save_safetensors(model_sd, os.path.join(cfg.out, "transformer.safetensors"))
        return
    save_training_state(path, cfg, step, {"model": TrainableState(model), "opt": opt}, data)
    if is_main():
        if cfg.adapter == "full":
            save_safetensors(model.state_dict(), os.path.join(cfg.out, "transformer.safetensors"))
        else:
            save_safetensors(adapter_state(model), os.path.join(cfg.out, "adapter.safetensors"),
                             {"adapter": cfg.adapter, "preset": cfg.preset, "targets": cfg.targets})


def resume_run(cfg, net, model, opt, data):
    path = os.path.join(cfg.out, "ckpt.pt")
    if not cfg.fsdp:
        return load_training_state(path, cfg, {"model": TrainableState(model), "opt": opt}, data, common.DIST.device)
    loaded = {}
    holders = {k: types.SimpleNamespace(load_state_dict=lambda s, k=k: loaded.__setitem__(k, s)) for k in ("model", "opt")}
    step = load_training_state(path, cfg, holders, data, "cpu")
    fsdp_state(net, opt, load=(loaded["model"], loaded["opt"]))
    return step


def train(cfg):
    d = setup_dist(cfg.device, cfg.seed)
    toy = cfg.data == "glyphs16"
    check_config(cfg, toy)
    prepare_out(cfg)
    params = PRESETS[cfg.preset]
    if toy:
        world = make_world("glyphs16")
        text = ToyText(cfg.text_len, params["context_in_dim"])
        data = ToyData(world, text, cfg.seed)
    else:
        data = LatentShards(cfg.data, params, cfg.seed)
    base_dtype = torch.bfloat16 if cfg.bf16 and cfg.adapter != "full" else torch.float32
    if cfg.bench:  # timing only: random weights, no distillation needed
        torch.manual_seed(cfg.seed)
        model = Flux(**params).to(d.device)
    else:
        model = load_flux(cfg.base or distilled_toy_schnell(cfg, world, text, d.device), cfg.preset, d.device, base_dtype)
    before = copy.deepcopy(model).requires_grad_(False) if toy or cfg.bench else None  # the distilled model
    if cfg.adapter == "full":
        model.requires_grad_(True)
    else:
        torch.manual_seed(cfg.seed)  # identical adapter initialisation on every rank
        add_adapters(model, cfg.adapter, cfg.targets, cfg.rank, cfg.alpha, cfg.lokr_factor)
    model.grad_ckpt = cfg.grad_ckpt
    trainable = [p for p in model.parameters() if p.requires_grad]
    print0(f"{cfg.adapter}: {sum(p.numel() for p in trainable):,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters")
    net = shard_fsdp(model, cfg.bf16) if cfg.fsdp else maybe_compile(wrap_ddp(model), cfg.compile)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0, fused=True)
    step = resume_run(cfg, net, model, opt, data) if cfg.resume else 0
    batch = cfg.batch // d.world
    guidance = (lambda n: torch.full((n,), cfg.dev_guidance, device=d.device)) if params["guidance_embed"] else (lambda n: None)

    def train_step(lr_scale):
        b = {k: v.to(base_dtype) if v.is_floating_point() else v for k, v in data.next_batch(batch, d.device).items()}
        with autocast(d.device):
            loss = undistill_loss(net, b, data.empty, cfg, guidance(batch))
        check_finite(loss, step)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(trainable if not cfg.fsdp else net.parameters(), cfg.grad_clip)
        opt.step()
        return {"loss": loss.item(), "grad_norm": float(grad_norm)}

    if cfg.bench:  # the same step with every parameter trainable (plain flow-matching fine-tuning) as baseline
        full = copy.deepcopy(before).requires_grad_(True)
        full_opt = torch.optim.AdamW(full.parameters(), lr=cfg.lr, fused=True)
        b = data.next_batch(batch, d.device)

        def full_step():
            loss = undistill_loss(full, b, data.empty, cfg, guidance(batch))
            full_opt.zero_grad(set_to_none=True)
            loss.backward()
            full_opt.step()

        def forward_backward():  # the adapted network's forward and backward to the adapters, no update
            opt.zero_grad(set_to_none=True)
            undistill_loss(net, {k: v.to(base_dtype) if v.is_floating_point() else v for k, v in b.items()},
                           data.empty, cfg, guidance(batch)).backward()
        # an adapter step cannot do without one forward and one backward of the adapted network; the rest of the
        # step is drawing the batch, the clip and the optimizer's update
        name = f"undistill ({cfg.adapter})"
        bench({"flow matching (full fine-tune)": full_step, name: lambda: train_step(1.0)},
              passes={"forward+backward": forward_backward}, floors={name: {"forward+backward": 1}})
        cleanup()
        return None

    logger = Logger(cfg.out, cfg.steps, step, desc=f"undistill ({cfg.adapter})")
    while step < cfg.steps:
        stats = train_step(min(1.0, (step + 1) / cfg.lr_warmup))
        step += 1
        logger.step()
        if step % cfg.log_every == 0 or step == cfg.steps:
            logger.log(step, stats)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_run(cfg, step, net, model, opt, data)
    train_seconds = logger.seconds()
    logger.close()
    if is_main() and cfg.save_merged and not cfg.fsdp:
        save_safetensors(merge_adapters(copy.deepcopy(model)).state_dict(), os.path.join(cfg.out, "merged.safetensors"))
    if toy and cfg.fsdp:  # FSDP modules cannot be deep-copied: the table samples an unsharded copy
        full_state, _ = fsdp_state(net, opt)  # collective; the full state lands on rank 0
        if is_main():
            model = Flux(**params).to(d.device)
            model.load_state_dict(full_state)
    if is_main() and toy:
        evaluate_toy(cfg, world, text, before, model, train_seconds, d.device)
    elif is_main():
        write_json(os.path.join(cfg.out, "metrics.json"), {"method": "undistill_flux", "data": cfg.data, "steps": cfg.steps,
                                                           "train_seconds": round(train_seconds, 2), "results": []})
    print0(f"wrote {cfg.out} ({train_seconds:.1f} s of training)")
    barrier()
    cleanup()
    return model


def perfect_schnell(world, guidance):
    """The velocity of a toy schnell distilled without error: at time t, the exact jump of the CFG-guidance
    teacher's ODE from t to the next point of schnell's grid. The empty prompt (CFG's negative) gets the
    unguided teacher's jump, as guidance leaves the unconditional flow unchanged."""
    def velocity(x, t, y, w=1.0):
        t0 = float(t[0])
        t1 = max(s for s in SCHNELL_GRID if s < t0 - 1e-6)

        def jump(label, g):
            return (reference_ode(world.velocity, x, label, g, 8, t0, t1, estimate_error=False)[0] - x) / (t1 - t0)
        v_c = jump(y, guidance)
        if w == 1:
            return v_c
        v_u = jump(torch.full_like(y, world.num_classes), 1.0)
        return v_u + w * (v_c - v_u)
    return velocity


@torch.no_grad()
def evaluate_toy(cfg, world, text, before, after, train_seconds, device):
    """The before/after table: every (steps, CFG) pair for the distilled and the un-distilled model with the
    same sampler (Euler on the shifted grid, true CFG against the empty prompt), on the same noise and
    captions, next to the exact teacher and a perfect toy schnell under the same sampler (common.evaluate);
    plus schnell's own sampler (4 unshifted steps, no CFG) on the distilled model. Each model attends as it
    was trained: the distilled one unmasked (BFL), the un-distilled one with --mask."""
    empty = text.encode([""], device)
    merged = merge_adapters(copy.deepcopy(after)).eval()  # same speed as the base when sampling

    def sampler(model, steps, w, mask, shift):
        def fn(z, y):
            cond = text.encode(text.captions(y.cpu(), torch.Generator().manual_seed(0)), device)  # same for all
            return from_latent(sample(model, to_latent(z), cond, empty, steps, w, shift, mask=mask))
        return fn

    grid, cfgs = [int(s) for s in floats(cfg.eval_steps)], floats(cfg.eval_cfgs)
    # the law CFG w should sample: the analytic teacher's guided ODE, solved accurately from other noise
    # (swd_target: does CFG on this model move its samples toward the guided law, or only off the data?)
    n = cfg.eval_samples
    z_target = torch.randn(n, *world.shape, generator=torch.Generator().manual_seed(777)).to(device)
    labels = (torch.arange(n) % world.num_classes).to(device)
    guided = {w: reference_ode(world.velocity, z_target, labels, w, estimate_error=False)[0].cpu()
              for w in {*cfgs, cfg.distill_guidance}}
    samplers = [{"sampler": "distilled schnell-sampler", "nfe": 4, "fn": sampler(before.eval(), 4, 1.0, "none", False),
                 "target": guided[cfg.distill_guidance]}]  # it was distilled from the CFG-distill_guidance teacher
    samplers += [{"sampler": f"{name} cfg={w:g}", "nfe": steps, "fn": sampler(model, steps, w, mask, cfg.time_shift),
                  "target": guided[w]}
                 for name, model, mask in (("distilled", before, "none"), ("undistilled", merged, cfg.mask))
                 for w in cfgs for steps in grid]

    def euler(velocity, steps, w):  # an exact velocity field under the models' sampler: same grid, same CFG
        return lambda z, y: euler_sample(velocity, z, steps, y, w, time_grid(steps, cfg.time_shift, z[0].numel() // 16).float())
    # the analytic teacher (what guidance itself costs in mmd), and a distillation without error (what CFG and
    # many steps do to a schnell that follows its captions as well as its teacher)
    exact = {"exact": world.velocity, "exact schnell": perfect_schnell(world, cfg.distill_guidance)}
    samplers += [{"sampler": f"{name} cfg={w:g}", "nfe": steps, "fn": euler(velocity, steps, w), "target": guided[w]}
                 for name, velocity in exact.items() for w in cfgs for steps in grid]
    rows = evaluate(samplers, world, world, cfg, cfg.out, "undistill_flux", train_seconds, n=n, batch=n, device=device)
    print0(format_table(rows))
    print0(headline_table(rows, grid))


def headline_table(rows, steps):
    """mmd / cond_acc / swd_target per (model, CFG) row and Euler-step column; schnell's own sampler and the
    data below (the data row has no guided target)."""
    cells = {(r["sampler"], r["nfe"]): r for r in rows}
    names = dict.fromkeys(r["sampler"] for r in rows if "cfg=" in r["sampler"])
    fmt = lambda r: f"{r['mmd']:.4f} / {r['cond_acc']:.3f}" + (f" / {r['swd_target']:.4f}" if "swd_target" in r else "")
    lines = ["| model, CFG | " + " | ".join(f"{s} steps: mmd / cond_acc / swd_target" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    lines += [f"| {name} | " + " | ".join(fmt(cells[(name, s)]) for s in steps) + " |" for name in names]
    lines.append(f"| distilled, schnell's sampler (4 unshifted steps, no CFG) | {fmt(cells[('distilled schnell-sampler', 4)])} |")
    lines.append(f"| data (fresh samples) | {fmt(cells[('data', 0)])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Sampling mode (the real model): prompts in, FLUX VAE latents out

def sample_from_prompts(cfg):
    d = setup_dist(cfg.device, cfg.seed)
    if cfg.preset not in PRESETS or cfg.height % 16 or cfg.width % 16:
        fail(f"--preset must be one of {', '.join(PRESETS)} and --height/--width multiples of 16")
    if not os.path.isfile(cfg.sample_prompts):
        fail(f"prompt file {cfg.sample_prompts} not found (t5, t5_mask, clip_pooled and optionally negative_*)")
    model = load_flux(cfg.base, cfg.preset, d.device, torch.bfloat16 if cfg.bf16 else torch.float32)
    if cfg.adapter_file:
        load_adapters(model, cfg.adapter_file)
        merge_adapters(model)
    p = {k: v.to(d.device) for k, v in read_safetensors(cfg.sample_prompts).items()}
    dtype = next(model.parameters()).dtype
    cast = lambda c: {"t5": c["t5"].to(dtype), "t5_mask": c["t5_mask"].bool(), "clip_pooled": c["clip_pooled"].to(dtype)}
    cond = cast(p)
    uncond = cast({k: p[f"negative_{k}"] for k in ("t5", "t5_mask", "clip_pooled")}) if "negative_t5" in p else None
    if cfg.cfg_scale != 1 and uncond is None:
        fail("CFG needs negative_t5, negative_t5_mask, negative_clip_pooled in the prompt file (the empty prompt's)")
    n = len(cond["t5"])
    noise = torch.randn(n, PRESETS[cfg.preset]["in_channels"] // 4, cfg.height // 8, cfg.width // 8,
                        generator=torch.Generator().manual_seed(cfg.seed)).to(d.device, dtype)
    g = torch.full((n,), cfg.dev_guidance, device=d.device) if PRESETS[cfg.preset]["guidance_embed"] else None
    with autocast(d.device):
        latents = sample(model, noise, cond, uncond, cfg.sample_steps, cfg.cfg_scale, cfg.time_shift, cfg.no_cfg_steps, cfg.mask, g)
    os.makedirs(cfg.out, exist_ok=True)
    save_safetensors({"latents": latents.float()}, os.path.join(cfg.out, "samples.safetensors"))
    print0(f"wrote {cfg.out}/samples.safetensors: latents {tuple(latents.shape)}; decode with the FLUX VAE")


def main():
    cfg = parse_config(Config)
    return sample_from_prompts(cfg) if cfg.sample_prompts else train(cfg)


if __name__ == "__main__":
    main()
