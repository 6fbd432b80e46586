"""
FID that matches pytorch-fid, in pure torch: no torchvision, nothing downloaded.

Protocol (pytorch-fid, the standard PyTorch port of TTUR's TF-FID): images as float in [0, 1] (uint8 / 255),
grayscale repeated to RGB, bilinear resize to 299x299 (align_corners=False), then 2x - 1; InceptionV3 with
the 2015-12-05 TF weights as converted by pytorch-fid, 2048-d features after the last average pool; mean and
unbiased covariance in float64; FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). The usual setting is
50,000 generated images against statistics of the training set. Numbers are comparable to pytorch-fid's;
statistics made with another Inception port (EDM's pickle detector, clean-fid) are close but not identical.

The weights are read from a local file (--weights or $FID_WEIGHTS), published at
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

SAMPLES and REF are each an image folder (recursive; png/jpg/jpeg/bmp/webp), an image .npz (arr_0, NHWC
uint8, as DiT/ADM sampling scripts write) or a statistics .npz (mu, sigma, as pytorch-fid and EDM write).

    python eval_fid.py samples/ --ref ref_stats.npz --weights pt_inception-2015-12-05-6726825d.pth
    python eval_fid.py /datasets/cifar10-train --save-stats cifar10_train.npz --weights pt_inception.pth
    FID_WEIGHTS=pt_inception.pth python eval_fid.py samples.npz --ref cifar10_train.npz --batch 250
    torchrun --standalone --nproc_per_node=8 eval_fid.py samples/ --ref ref_stats.npz --weights pt_inception.pth
    python eval_fid.py samples/ --ref ref/ --random-weights     # tests the pipeline only: the number is meaningless

From a method file: fid = eval_fid.fid_of_samples(samples_in_minus1_1, "ref_stats.npz", "pt_inception.pth")
"""
import argparse
import os
import sys
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def fail(message):
    """Stop with a one-line error (non-zero exit, no traceback): the message says what to do."""
    raise SystemExit(f"error: {message}")


# ---------------------------------------------------------------------------------------------------
# InceptionV3 as pytorch-fid uses it. Module names and shapes follow torchvision's Inception3 so that
# pytorch-fid's state dict loads unchanged; the pooling differences are the TF graph's (see FID blocks).

class BasicConv2d(nn.Module):
    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    # TF's average pool ignores the zero padding at the borders; torch's default would count it
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b, 5c, 5d (35x35)
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e (17x17), factorized 7x7 convolutions
    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = conv(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (avg pool branch), Mixed_7c (max pool branch: a quirk of the TF graph)
    def __init__(self, c_in, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
                          self.branch_pool(pooled)], 1)


def preprocess(x):
    """NCHW uint8 in [0, 255] or float in [0, 1], any size, 1 or 3 channels -> pytorch-fid's network input."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1


class InceptionV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # 1008 TF classes; logits only for the Inception Score

    def forward(self, x, return_logits=False):
        """Images (see preprocess) -> 2048-d pool features (N, 2048), plus the (N, 1008) logits if asked."""
        x = preprocess(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        features = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return (features, self.fc(features)) if return_logits else features


def load_inception_weights(model, state_dict):
    """Strict load, except that num_batches_tracked (unused in eval mode) may be absent from the file."""
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        fail(f"weights do not fit pytorch-fid's InceptionV3: {' '.join(str(e).split())[:300]}")
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        fail(f"weights are not pytorch-fid's InceptionV3: missing {missing[:3]}, unexpected {unexpected[:3]} "
             f"({len(missing)} and {len(unexpected)} keys); get {WEIGHTS_URL}")


def inception_model(weights_path=None, device="cpu", random_weights=False):
    """pytorch-fid's InceptionV3 in eval mode. weights_path falls back to $FID_WEIGHTS.
    random_weights=True skips the file: for tests of the pipeline only, the resulting FID means nothing."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched (exact resume)
        torch.manual_seed(0)  # random_weights: the same network in every process, so ranks agree
        model = InceptionV3()
        if random_weights:  # He init keeps activations O(1) through 94 layers (the default shrinks them to ~1e-8)
            for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    if not random_weights:
        path = weights_path or os.environ.get("FID_WEIGHTS", "")
        if not os.path.isfile(path):
            fail(f"Inception weights not found ({path or 'no --weights and FID_WEIGHTS unset'}): download "
                 f"{WEIGHTS_URL} and pass its path with --weights or FID_WEIGHTS")
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            fail(f"cannot read {path} ({type(e).__name__}); expected the 95,628,359-byte file {WEIGHTS_URL}")
        load_inception_weights(model, state_dict)
    return model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# Images in, statistics out. Sums are accumulated in float64 and all-reduced, so under torchrun every
# rank handles items[rank::world] and all ranks end with the statistics of the whole set.

def read_images(path):
    """An image folder -> sorted list of files; an image .npz -> its arr_0 (NHWC or NHW uint8)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            fail(f"no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images under {path}")
        return files
    if not os.path.isfile(path):
        fail(f"{path} does not exist")
    if not path.endswith(".npz"):
        fail(f"{path}: expected an image folder, an image .npz (arr_0) or a statistics .npz (mu, sigma)")
    with open_npz(path) as npz:
        if "arr_0" not in npz.files:
            fail(f"{path} has neither arr_0 (images) nor mu/sigma (statistics), only {npz.files}")
        images = npz["arr_0"]
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        fail(f"{path}: arr_0 must be uint8 images NHWC (C = 1 or 3), got {images.dtype} {images.shape}")
    return images


def image_batch(items):
    """A slice of a tensor (NCHW) / a uint8 array (NHWC or NHW) / a list of files -> an NCHW tensor."""
    if torch.is_tensor(items):
        return items
    if isinstance(items, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(items))
        return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    arrays = []
    for f in items:
        try:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for truncated or corrupt files
            fail(f"cannot read image {f} ({type(e).__name__}: {str(e)[:80]}); re-encode or remove it")
    if len({a.shape for a in arrays}) > 1:
        fail(f"images of different sizes near {items[0]}: resize the folder to one size first, as FID protocols do")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@torch.no_grad()
def feature_sums(images, model, batch=50, device="cpu", desc=None):
    """(count, sum of features, sum of their outer products), float64: the sufficient statistics of the
    Inception features of `images`, which add up over shards. desc: show a progress bar."""
    count = torch.zeros((), dtype=torch.float64, device=device)
    sum_f = torch.zeros(2048, dtype=torch.float64, device=device)
    sum_ff = torch.zeros(2048, 2048, dtype=torch.float64, device=device)
    for i in tqdm(range(0, len(images), batch), desc=desc, disable=desc is None):
        f = model(image_batch(images[i:i + batch]).to(device)).double()
        count += len(f)
        sum_f += f.sum(0)
        sum_ff += f.T @ f
    return count, sum_f, sum_ff


def stats_from_sums(count, sum_f, sum_ff, desc="images"):
    """(mu, sigma) as numpy float64 from feature_sums (added over every shard)."""
    n = int(count.item())
    if n < 2:
        fail(f"{desc}: {n} image(s); a covariance needs at least 2 (the standard protocol uses 50,000)")
    mu = sum_f / n
    sigma = (sum_ff - n * torch.outer(mu, mu)) / (n - 1)  # one-pass covariance: safe in float64
    return mu.cpu().numpy(), sigma.cpu().numpy()


def feature_stats(images, model, batch=50, device="cpu", distributed=None, desc="images"):
    """(mu, sigma) in float64 of the Inception features of `images`: an NCHW tensor (uint8, or float in
    [0, 1]), an NHWC uint8 array, or a list of image files. distributed=None: shard over ranks when
    torch.distributed is initialized (then every rank must call this with the same images)."""
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    sums = feature_sums(images[rank::world], model, batch, device, f"{desc}: {len(images)} images" if rank == 0 else None)
    if distributed:
        for t in sums:
            dist.all_reduce(t)
    return stats_from_sums(*sums, desc=desc)


def open_npz(path):
    """np.load of an .npz of arrays (no pickled objects), or a one-line error naming the file."""
    if not zipfile.is_zipfile(path):
        fail(f"{path} is not an .npz file (not a zip archive of arrays)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        fail(f"cannot read {path} ({type(e).__name__}: {str(e)[:80]})")


def is_stats_file(path):
    if not (path.endswith(".npz") and os.path.isfile(path)):
        return False
    with open_npz(path) as npz:  # opening an .npz reads only its index, not the arrays
        return {"mu", "sigma"} <= set(npz.files)


def load_stats(path):
    """(mu, sigma) from a statistics .npz (pytorch-fid's and EDM's format: arrays mu and sigma)."""
    if not is_stats_file(path):
        fail(f"{path} is not a statistics .npz with arrays mu and sigma")
    with open_npz(path) as npz:
        try:
            mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
        except (OSError, ValueError, EOFError) as e:  # a truncated member
            fail(f"cannot read mu/sigma of {path} ({type(e).__name__})")
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        fail(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit (expected (d,) and (d, d))")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        fail(f"{path}: mu or sigma holds NaN or inf; recompute the statistics")
    return mu, sigma


def check_writable(path):
    """Fail now, not after every feature is computed, when path cannot be written."""
    try:
        with open(f"{path}.tmp{os.getpid()}", "wb"):
            pass
        os.remove(f"{path}.tmp{os.getpid()}")
    except OSError as e:
        fail(f"cannot write {path} ({e.strerror or e}); pick a writable --save-stats path")


def save_stats(path, mu, sigma):
    """Write mu/sigma atomically: a temp file in the same folder, then a rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:  # a file object, so np.savez does not append ".npz" to the temp name
        np.savez(f, mu=mu, sigma=sigma)
    os.replace(tmp, path)


def stats_of(path, model, batch=50, device="cpu", distributed=None):
    """(mu, sigma) of a statistics .npz, an image .npz or an image folder."""
    if is_stats_file(path):
        return load_stats(path)
    return feature_stats(read_images(path), model, batch, device, distributed, desc=os.path.basename(path.rstrip("/")))


# ---------------------------------------------------------------------------------------------------
# Frechet distance between N(mu1, S1) and N(mu2, S2)

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).
    With S1 = L L^T (L = V sqrt(W) from eigh), S1 S2 = L (L^T S2) has the eigenvalues of the symmetric PSD
    matrix L^T S2 L (AB and BA share them), so the trace is a sum of square roots of eigvalsh: no complex
    round-off, no iteration to fail, and rank-deficient covariances (fewer images than 2048) are fine."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        fail(f"statistics of different sizes: {mu1.shape} vs {mu2.shape} (features from another layer?)")

    def psd_eigenvalues(w):
        # below the numerical-rank tolerance (as np.linalg.matrix_rank) an eigenvalue is round-off: its square
        # root would add ~1e-6 per null direction, and a rank-deficient covariance has hundreds of them
        return np.where(w > w.max() * len(w) * np.finfo(np.float64).eps, w, 0.0)

    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    keep = psd_eigenvalues(w) > 0  # S1's null directions add nothing: L keeps only the rest (n - 1 for n images)
    factor1 = v[:, keep] * np.sqrt(w[keep])
    tr_covmean = np.sqrt(psd_eigenvalues(np.linalg.eigvalsh(factor1.T @ sigma2 @ factor1))).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def quantize(samples):
    """Samples in [-1, 1] to uint8 as saving PNGs does (EDM/DiT: x * 127.5 + 128, clipped), so an FID of
    samples in memory equals the CLI's on their PNG files."""
    return (samples * 127.5 + 128).clamp(0, 255).to(torch.uint8).cpu()


def fid_of_samples(samples, ref_path, weights_path=None, batch=50, device=None):
    """FID of generated samples (NCHW float in [-1, 1]) against ref_path (statistics .npz, image .npz or
    folder). Runs in this process alone (no collectives), so a method file can call it from rank 0."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = inception_model(weights_path, device)
    mu, sigma = feature_stats(quantize(samples), model, batch, device, distributed=False, desc="samples")
    mu_ref, sigma_ref = stats_of(ref_path, model, batch, device, distributed=False)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


# ---------------------------------------------------------------------------------------------------
# CLI

def main():
    parser = argparse.ArgumentParser(description="FID with pytorch-fid's InceptionV3 weights and preprocessing.")
    parser.add_argument("samples", help="image folder, image .npz (arr_0) or statistics .npz (mu, sigma)")
    parser.add_argument("--ref", help="reference: image folder, image .npz or statistics .npz")
    parser.add_argument("--weights", help=f"pt_inception-2015-12-05-6726825d.pth (default: $FID_WEIGHTS); {WEIGHTS_URL}")
    parser.add_argument("--batch", type=int, default=50, help="images per forward pass (per rank)")
    parser.add_argument("--save-stats", help="write the statistics of SAMPLES to this .npz (e.g. reference stats)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--random-weights", action="store_true",
                        help="testing only: an untrained Inception, so the FID it prints is meaningless")
    args = parser.parse_args()
    if not (args.ref or args.save_stats):
        fail("nothing to do: give --ref (to print FID) and/or --save-stats (to write statistics)")
    for path in (args.samples, args.ref):
        if path and not os.path.exists(path):
            fail(f"{path} does not exist")
    if args.save_stats:
        check_writable(args.save_stats)

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device if args.device != "auto" else
                          f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():  # launched by torchrun: shard the images
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    is_main = not dist.is_initialized() or dist.get_rank() == 0

    inputs = [p for p in (args.samples, args.ref) if p]
    model = None if all(map(is_stats_file, inputs)) else inception_model(args.weights, device, args.random_weights)
    if args.random_weights and is_main:
        print("WARNING: --random-weights: untrained Inception, for testing the pipeline only. "
              "The FID below is MEANINGLESS.", file=sys.stderr)
    mu, sigma = stats_of(args.samples, model, args.batch, device)
    if args.save_stats and is_main:
        save_stats(args.save_stats, mu, sigma)
        print(f"wrote {args.save_stats} (mu {mu.shape}, sigma {sigma.shape})")
    if args.ref:
        mu_ref, sigma_ref = stats_of(args.ref, model, args.batch, device)
        if is_main:  # every rank holds the full statistics; one is enough for the distance
            label = "RANDOM WEIGHTS, MEANINGLESS" if args.random_weights else "pytorch-fid InceptionV3 weights and preprocessing"
            print(f"FID ({label}): {frechet_distance(mu, sigma, mu_ref, sigma_ref):.4f}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
