"""GPTQ (Frantar et al. 2022, "Accurate Post-Training Quantization for Generative Pre-trained
Transformers") for one linear layer, into qlite's int4 format (quant/formats.py).

GPTQ minimises the layer's output error ||X W^T - X Q^T||^2 over the calibration inputs X rather
than the weight error ||W - Q||^2. With H = 2 X^T X / n (the Hessian of that error in one row
of W), it quantizes the input columns k = 0..K-1 in order and, after each, spreads the column's
rounding error over the columns not yet quantized in proportion to the inverse Hessian:

    err = (W[:, k] - Q[:, k]) / Hinv[k, k]
    W[:, k+1:] -= err (x) Hinv[k, k+1:]

where Hinv is the upper Cholesky factor of H^-1 (each step then needs only its own row). The
updates are applied lazily: within a block of 128 columns one column at a time, to the rest of
the matrix once per block (one matmul). H is damped by 5% of its mean diagonal (PERCDAMP); an
input column that never saw a non-zero value gets H[k, k] = 1 (its weights are still quantized,
and neither give nor take error feedback).

Two refinements, both on by default (measured on the demo model, bench/results/quality.md):
  activation order (`act_order`, GPTQ's desc_act): the columns are quantized by decreasing
      H[k, k], so the inputs that matter most are rounded first, while the most columns are
      left to absorb their error. With STATIC GROUPS: every group's scale and zero point are
      computed once, before the loop, from its own columns k // G of the original weights.
      The result is therefore in the plain layout (no permutation stored; as a GPTQ
      checkpoint g_idx = k // G and desc_act false, which is what vLLM's Marlin kernels and
      `qlite export --format gptq` need). Without act_order the group parameters are instead
      computed when the loop reaches a group's first column, from the weights as the earlier
      feedback left them (GPTQ's original scheme).
  clipping search (`shrinks`, GPTQModel's `mse` option): each group's range is the one of
      max|w| (or min..max) x 1.00, 0.99 .. 0.75 whose rounding error sum_k H[k, k] (w - q)^2
      is smallest (H[k, k] weighs each column by its input's energy).

Scales are rounded to float16 before use so the codes and the feedback use exactly the stored
values:
  symmetric   scale = 2 max|w| / 15, zero point 8 (codes - 8 in [-8, 7]), GPTQ's convention
  asymmetric  scale = (max - min) / 15 over the group's range widened to include 0, zero point
              -min / scale in float16, as qlite's RTN stores it (`integer_zero`: rounded, as
              GPTQ checkpoints store it; no exporter needs that: export takes symmetric only)

After the loop (`refit`, default on) the codes stay and each row's group scales (and zero
points) are refitted by least squares to the row's output error (w - dq)^T H (w - dq): the
loop chose them before any feedback. Measured on the demo (bench/bench_gptq_layers.py, 16384
tokens, 16 matrices): float zero points and the refit lower the output error by 1-5% of
GPTQ's (e.g. 1.mlp.gate_proj 0.600 -> 0.572 of RTN's, 23.mlp.down_proj 0.78 -> 0.75).

    h = Hessian(k); h.add(x) for each batch of inputs [..., K]
    qt = gptq_quantize(weight [N, K], h.matrix(), group_size=128, symmetric=True)
"""
from __future__ import annotations

import torch

from qlite.errors import QliteError

from .formats import GROUP_SIZES, QuantizedTensor, pack_int4

BLOCK = 128  # columns per lazy update; a multiple of every group size
PERCDAMP = 0.05  # of the mean diagonal (GPTQModel's default; 0.01 is the paper's)
# names the defaults below and calibrate's text (bench/bench_quality.py keys its cache on it)
VERSION = "6-actorder-clip-trueseq-damp05-spread-floatzero-refit"
CLIP_SHRINKS = tuple(1 - i / 100 for i in range(26))  # each group's range x 1.00, 0.99 .. 0.75
_MIN_SCALE = 1e-6
REFIT_ROWS = 8192


class Hessian:
    """Running H = 2 X^T X / n of a linear layer's inputs, summed in float32 on `device`."""

    def __init__(self, in_features: int, device="cpu"):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor):
        x = x.detach().reshape(-1, self.sum.shape[0])
        if x.shape[0] == 0:
            return
        x = x.to(self.sum.device, torch.float32)
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def matrix(self) -> torch.Tensor:
        """float32 [K, K]; all zeros before any input."""
        return self.sum * (2 / max(self.tokens, 1))


def _minmax_params(w: torch.Tensor, symmetric: bool, shrink: float = 1.0,
                   integer_zero: bool = False):
    """Scale and zero point [..., 1] of the groups w [..., G] over their range (times
    `shrink`), float16-exact values in float32."""
    if symmetric:
        s = (w.abs().amax(-1, keepdim=True) * (2 * shrink / 15)).clamp(min=_MIN_SCALE)
        return s.half().float(), torch.full_like(s, 8.0)
    lo = w.amin(-1, keepdim=True).clamp(max=0) * shrink
    hi = w.amax(-1, keepdim=True).clamp(min=0) * shrink
    s = ((hi - lo) / 15).clamp(min=_MIN_SCALE).half().float()
    z = -lo / s
    return s, (z.round().clamp(0, 15) if integer_zero else z.half().float())


def _group_params(w: torch.Tensor, symmetric: bool, importance: torch.Tensor | None = None,
                  shrinks=(1.0,), norm: float = 2.0, integer_zero: bool = False):
    """Scale and zero point [..., 1] of the groups w [..., G]: for each group the range shrink
    in `shrinks` whose rounding error sum_j importance_j |w_j - dq_j|^norm is smallest
    (importance [G], default ones)."""
    best = None
    for f in shrinks:
        s, z = _minmax_params(w, symmetric, f, integer_zero)
        if len(shrinks) == 1:
            return s, z
        err = (((w / s + z).round().clamp(0, 15) - z) * s - w).abs().pow(norm)
        err = (err if importance is None else err * importance).sum(-1, keepdim=True)
        if best is None:
            best = err, s, z
        else:
            better = err < best[0]
            best = (torch.where(better, err, best[0]), torch.where(better, s, best[1]),
                    torch.where(better, z, best[2]))
    return best[1], best[2]


def _inverse_cholesky(h: torch.Tensor, where: str, percdamp: float = PERCDAMP) -> torch.Tensor:
    """The upper Cholesky factor U of H^-1 (U^T U = H^-1, H damped), growing the damping if H
    is not positive definite numerically. With J the order reversal and J H J = L L^T,
    U = J L^-1 J: one factorisation and one triangular inverse (2/3 K^3 flops, not 5/3 K^3
    for cholesky, cholesky_inverse, cholesky)."""
    damp = percdamp * h.diagonal().mean().item()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(6):
        low, info = torch.linalg.cholesky_ex((h + damp * eye).flip(0, 1))
        if info.item() == 0:
            return torch.linalg.solve_triangular(low, eye, upper=False).flip(0, 1)
        damp *= 10
    raise QliteError(f"{where}: the calibration Hessian is not positive definite even damped")


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 128,
                  symmetric: bool = True, name: str = "weight", *, act_order: bool = True,
                  static_groups: bool | None = None, shrinks=CLIP_SHRINKS, clip_importance: bool = True,
                  clip_norm: float = 2.0, percdamp: float = PERCDAMP,
                  integer_zero: bool = False, refit: bool = True) -> QuantizedTensor:
    """GPTQ of weight [N, K] with its inputs' Hessian [K, K] -> int4 QuantizedTensor (qlite's
    layout). Runs on the weight's device in float32."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise QliteError(f"{name}: expected a 2-D float weight, got {tuple(weight.shape)}")
    n, k = weight.shape
    if group_size not in GROUP_SIZES:
        raise QliteError(f"group_size must be one of {GROUP_SIZES}, got {group_size} ({name})")
    if k % group_size:
        raise QliteError(f"group_size {group_size} does not divide in_features {k} of {name}")
    if tuple(hessian.shape) != (k, k):
        raise QliteError(f"{name}: Hessian {tuple(hessian.shape)} does not match {k} inputs")
    static = act_order if static_groups is None else static_groups
    if act_order and not static:
        raise QliteError(f"{name}: act_order needs static groups (qlite stores no g_idx)")
    dev = weight.device
    w = weight.float().clone()
    h = hessian.to(dev, torch.float32).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    diag = h.diagonal().clone()
    ngroups = k // group_size

    def params(wg, cols):  # wg [..., G] at the input columns cols [G]
        imp = diag[cols] if clip_importance else None
        return _group_params(wg, symmetric, imp, shrinks, clip_norm, integer_zero)

    scales = torch.empty(ngroups, n, dtype=torch.float32, device=dev)
    zeros = torch.empty_like(scales)
    if static:  # every group's parameters from the weights before any feedback
        cols = torch.arange(k, device=dev).view(ngroups, group_size)
        for gi in range(ngroups):
            s, z = params(w[:, cols[gi]], cols[gi])
            scales[gi], zeros[gi] = s[:, 0], z[:, 0]
    perm = torch.argsort(diag, descending=True) if act_order else torch.arange(k, device=dev)
    if refit:
        h_damped = h + percdamp * diag.mean() * torch.eye(k, device=dev)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, name, percdamp)
    del h

    codes = torch.empty(n, k, dtype=torch.uint8, device=dev)
    order = perm.tolist()
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        w1 = w[:, b0:b1].clone()
        err = torch.empty_like(w1)
        h1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = order[b0 + i]  # the input column, in the weight's own order
            gi = col // group_size
            if not static and col % group_size == 0:  # a group starts: from the current weights
                s, z = params(w1[:, i:i + group_size], perm[b0 + i:b0 + i + group_size])
                scales[gi], zeros[gi] = s[:, 0], z[:, 0]
            s, z = scales[gi], zeros[gi]
            q = (w1[:, i] / s + z).round().clamp(0, 15)
            codes[:, col] = q.to(torch.uint8)
            e = (w1[:, i] - (q - z) * s) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    if refit:  # rows are independent: a few thousand at a time bounds the memory
        for r in range(0, n, REFIT_ROWS):
            rows = slice(r, r + REFIT_ROWS)
            scales[:, rows], zeros[:, rows] = _refit_groups(
                weight[rows].float(), codes[rows], scales[:, rows], zeros[:, rows], h_damped,
                group_size, symmetric)
    return QuantizedTensor(pack_int4(codes), scales.half(), None if symmetric else zeros.half(),
                           4, group_size)


def _refit_groups(w, codes, scales, zeros, h, g, symmetric):
    """With GPTQ's codes fixed, every row's group scales (and zero points) that minimise the
    row's output error (w - dq)^T H (w - dq), dq = s_g (q - z_g) on group g's columns: a least
    squares problem in ngroups (symmetric: s_g) or 2 ngroups (s_g and b_g = -s_g z_g)
    unknowns per row. The values are rounded to the stored float16; a row keeps its old ones
    unless the rounded new ones lower its error."""
    n, k = w.shape
    ng = k // g
    q = codes.float() - (8.0 if symmetric else 0.0)  # dq = s q (+ b)
    qg = q.view(n, ng, g)
    # SS[r, a, c] = q_ra^T H_ac q_rc, one block column c at a time (n k^2 flops in all)
    ss = torch.empty(n, ng, ng, device=w.device)
    for c in range(ng):
        v = q[:, c * g:(c + 1) * g] @ h[c * g:(c + 1) * g]  # [n, k]: sum over c's columns
        ss[:, :, c] = (qg * v.view(n, ng, g)).sum(-1)
    hw = (w @ h).view(n, ng, g)
    rhs = (qg * hw).sum(-1)
    if symmetric:
        a = ss
    else:
        hsum = h.view(k, ng, g).sum(-1).view(ng, g, ng)  # [a, col in a, c]: sum over c's columns
        sb = torch.einsum("nag,agc->nac", qg, hsum)  # q_ra^T H_ac 1
        bb = hsum.sum(1)  # 1^T H_ac 1
        a = torch.cat([torch.cat([ss, sb], 2),
                       torch.cat([sb.transpose(1, 2), bb.expand(n, ng, ng)], 2)], 1)
        rhs = torch.cat([rhs, hw.sum(-1)], 1)
    # Jacobi-scaled, ridged, in float64, by Cholesky: a row whose system is still singular (a
    # group whose codes are all equal has collinear s and b) fails alone (info) and keeps its
    # old values; LU's solve would stop the whole batch.
    a, rhs = a.double(), rhs.double()
    d = a.diagonal(dim1=1, dim2=2).clamp(min=1e-30).rsqrt()
    a = a * d[:, :, None] * d[:, None, :] + 1e-9 * torch.eye(a.shape[1], dtype=a.dtype,
                                                             device=a.device)
    low, info = torch.linalg.cholesky_ex(a)
    ok = info == 0
    low[~ok] = torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    sol = (torch.cholesky_solve((rhs * d)[..., None], low)[..., 0] * d).float()
    s_new = sol[:, :ng].clamp(min=_MIN_SCALE).half().float()
    z_new = zeros.T if symmetric else (-sol[:, ng:] / s_new).half().float()

    def error(s, z):  # [n]: (w - dq)^T H (w - dq) per row
        e = w - ((codes.float().view(n, ng, g) - z[..., None]) * s[..., None]).view(n, k)
        return ((e @ h) * e).sum(-1)
    old_s, old_z = scales.T, zeros.T
    ok = ok & torch.isfinite(s_new).all(1) & torch.isfinite(z_new).all(1)
    better = ok & (error(s_new, z_new) < error(old_s, old_z))
    s = torch.where(better[:, None], s_new, old_s)
    z = torch.where(better[:, None], z_new, old_z)
    return s.T.contiguous(), z.T.contiguous()


__all__ = ["Hessian", "gptq_quantize", "BLOCK", "PERCDAMP"]
