"""Pure-PyTorch JVP attention: the CPU backend (and any device), chunked over query rows.

Layout: ``[B, H, S, D]`` views (any strides). GQA: ``q`` has ``Hq = G·Hkv`` heads, query head
``h`` reads key/value head ``h // G`` (broadcast, never copied). Math per query row i (DESIGN.md §1):

    S = s·q kᵀ, P = softmax(S), O = P v, lse = logsumexp(S)
    Ṡ = s·(q̇ kᵀ + q k̇ᵀ), μ = Σ_j P_ij Ṡ_ij (= d lse), Ȯ = (P⊙Ṡ) v + P v̇ − μ O

Causal masks are bottom-right aligned (flash-attn): query i sees key j iff j ≤ i + Sk − Sq. A key mask
(``key_bias``, ``[B, Hq, Sk]``, any strides) adds its bias to S after the scale (SDPA's attn_mask: a float
mask's values, 0 / −inf for a boolean one). A query row that sees no key gets O = Ȯ = 0, μ = 0 and
lse = −inf. Memory: one ``[B, Hq, chunk, Sk]`` score block at a time (``chunk`` from a fixed element budget),
never S×S.
Arithmetic in float32 (float64 when an input is float64; on the CPU the logits, the backward's dP and Δ and its
gradients come from float64 sums rounded once to float32, ``_wide``), autocast off (under ``torch.autocast`` the matmuls
would otherwise run in the autocast dtype: fp32 inputs computed in bf16 / fp16).
"""

from __future__ import annotations

import functools

import torch

from fastdistill.ops._common import autocast_off


def _no_autocast(fn):
    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        with autocast_off(x.device.type):
            return fn(x, *args, **kwargs)

    return wrapper

CHUNK_ELEMS = 1 << 24  # score elements per query chunk (64 MB of fp32)


def _compute_dtype(*xs: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def _grouped(x: torch.Tensor, hkv: int, dt: torch.dtype) -> torch.Tensor:
    """[B, Hq, S, D] -> [B, Hkv, G, S, D] (a view, then cast)."""
    B, H, S, D = x.shape
    return x.reshape(B, hkv, H // hkv, S, D).to(dt)


def _kv(x: torch.Tensor | None, dt: torch.dtype) -> torch.Tensor | None:
    """[B, Hkv, S, D] -> [B, Hkv, 1, S, D], broadcast against the query groups."""
    return None if x is None else x.unsqueeze(2).to(dt)


def _chunks(B: int, Hq: int, Sq: int, Sk: int):
    step = max(1, CHUNK_ELEMS // max(1, B * Hq * Sk))
    for i0 in range(0, Sq, step):
        yield i0, min(Sq, i0 + step)


def _bias(kb: torch.Tensor | None, hkv: int, dt: torch.dtype) -> torch.Tensor | None:
    """A key bias [B, Hq, Sk] (bool: True keeps the key) as [B, Hkv, G, 1, Sk] in ``dt`` (a view, then cast)."""
    if kb is None:
        return None
    B, H, Sk = kb.shape
    x = kb.reshape(B, hkv, H // hkv, 1, Sk)
    if x.dtype == torch.bool:
        return torch.where(x, 0.0, float("-inf")).to(dt)
    return x.to(dt)


def _wide(x: torch.Tensor, dt: torch.dtype) -> bool:
    """Whether the logits and the backward's dP, Δ come from float64 sums rounded once (float32 compute on the
    CPU), as the Triton kernels form them for fp32 inputs: a logit's error moves Ȯ by |Ṡ_j − μ|·|v_j − O| times it,
    and one float32 matmul left Ȯ past its rule (docs/jvp_attention.md, Numerics); the gradients then sum the
    fp32 dS and P in float64 too (a float32 sum over 17 keys left dq 1.03x past its rule). On a GPU this backend serves
    fp32 where FP64 is slow (no FP64 tensor cores: up to 1/64 of the fp32 rate) and keeps float32 sums."""
    return dt == torch.float32 and x.device.type == "cpu"


def _scores(qc: torch.Tensor, k: torch.Tensor, scale: float, i0: int, Sq: int, causal: bool,
            kb: torch.Tensor | None = None, k64: torch.Tensor | None = None) -> torch.Tensor:
    """s·q kᵀ (+ the key bias ``kb``, [B, Hkv, G, 1, Sk]) for query rows [i0, i0 + rows) with masked entries at
    −inf; [B, Hkv, G, rows, Sk]. ``k64``: k in float64 (``_wide``), then s·q kᵀ is a float64 sum, scaled and
    rounded once."""
    if k64 is not None:
        s = (torch.matmul(qc.double(), k64.transpose(-1, -2)) * scale).to(qc.dtype)
    else:
        s = torch.matmul(qc, k.transpose(-1, -2)) * scale
    if kb is not None:
        s = s + kb
    if causal:
        Sk = k.shape[-2]
        rows = torch.arange(i0, i0 + qc.shape[-2], device=s.device).unsqueeze(1)
        s = s.masked_fill(torch.arange(Sk, device=s.device) > rows + (Sk - Sq), float("-inf"))
    return s


def _ungroup(x: torch.Tensor) -> torch.Tensor:
    B, Hkv, G, S, D = x.shape
    return x.reshape(B, Hkv * G, S, D)


@_no_autocast
def attn_fwd(q, k, v, tq, tk, tv, o, to, lse, mu, *, causal: bool, scale: float,
             lse_lo: torch.Tensor | None = None, key_bias: torch.Tensor | None = None) -> None:
    """Write O (``o``), Ȯ (``to``, may be None: no tangent wanted), lse and μ (``mu``, may be
    None) for ``[B, H, S, D]`` inputs into the given ``[B, H, S, ·]`` / ``[B, H, S]`` outputs.
    ``key_bias``: a key mask (module docstring). ``lse_lo`` (given for float32 inputs and with a key mask, as
    the Triton kernels' low word of lse): the rounding error of lse (lse + lse_lo = m + ln l), which the backward
    subtracts after S − lse. A large bias (finfo.min) on every key of a row puts lse where ln l is below its ulp,
    and P = exp(S − lse) alone would be 1 for every key there; with large fp32 logits (|lse| ~ 100) the rounding
    of lse alone moves every P by up to 4e-6 (relative), twice plain fp32's error in dv."""
    lo_word = lse_lo is not None
    if lo_word:
        lse_lo.zero_()  # (rows that see no key, Sk = 0)
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if B * Hq * Sq == 0:
        return
    if Sk == 0:  # no key at all: every row is a row that sees no key
        for x in (o, to, mu):
            if x is not None:
                x.zero_()
        lse.fill_(float("-inf"))
        return
    dt = _compute_dtype(q, k, v, tq, tk, tv)
    kk, vv, tkk, tvv = _kv(k, dt), _kv(v, dt), _kv(tk, dt), _kv(tv, dt)
    kb = _bias(key_bias, Hkv, dt)
    want_t = to is not None or mu is not None
    wide = _wide(q, dt)
    k64 = kk.double() if wide else None
    # the tangent logits' operands: float64 when wide (Ṡ then a float64 sum, scaled and rounded once, as S)
    wk, wtk = (k64, None if tkk is None else tkk.double()) if wide else (kk, tkk)
    w = torch.float64 if wide else dt
    for i0, i1 in _chunks(B, Hq, Sq, Sk):
        qc = _grouped(q[:, :, i0:i1], Hkv, dt)
        s = _scores(qc, kk, scale, i0, Sq, causal, kb, k64)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows that see no key
        e = torch.exp(s - m)  # masked entries: exp(−inf) = 0
        l_ = e.sum(-1, keepdim=True)
        p = e / torch.where(l_ > 0, l_, torch.ones_like(l_))
        oc = torch.matmul(p, vv)
        o[:, :, i0:i1] = _ungroup(oc).to(o.dtype)
        if lo_word:  # lse rounded to its dtype, and what it lost: (m − hi) is exact, ln l far below m's ulp is kept
            m64, ll64 = m.double(), torch.log(l_.double())
            hi = (m64 + ll64).to(lse.dtype)
            lse[:, :, i0:i1] = _ungroup(torch.where(l_ > 0, hi, float("-inf"))).squeeze(-1)
            lo = (m64 - hi.double()) + ll64
            lse_lo[:, :, i0:i1] = _ungroup(torch.where(l_ > 0, lo, 0.0)).squeeze(-1).to(lse_lo.dtype)
        else:
            lse[:, :, i0:i1] = _ungroup(torch.where(l_ > 0, m + torch.log(l_), float("-inf"))).squeeze(-1).to(
                lse.dtype)
        if not want_t:
            continue
        ts = None  # Ṡ/s
        if tq is not None:
            ts = torch.matmul(_grouped(tq[:, :, i0:i1], Hkv, w), wk.transpose(-1, -2))
        if tk is not None:
            t2 = torch.matmul(qc.to(w), wtk.transpose(-1, -2))
            ts = t2 if ts is None else ts + t2
        if ts is None:
            muc = torch.zeros_like(l_)
            toc = torch.zeros_like(oc)
        else:
            # shifted by c = P·Ṡ of each row's arg-max key (as the Triton kernels): where one key dominates,
            # Ȯ = Σ P(Ṡ − c)v − (μ − c)·O does not cancel |Ṡ||v|-sized terms
            ts = (ts * scale).to(dt)
            arg = s.argmax(-1, keepdim=True)
            c = p.gather(-1, arg) * ts.gather(-1, arg)
            pts = p * (ts - c)
            toc = torch.matmul(pts, vv) - pts.sum(-1, keepdim=True) * oc
            muc = (p * ts).sum(-1, keepdim=True)  # unshifted: c + Σ P(Ṡ − c) carries ulp(c) where μ is small
        if tvv is not None:
            toc = toc + torch.matmul(p, tvv)
        if to is not None:
            to[:, :, i0:i1] = _ungroup(toc).to(to.dtype)
        if mu is not None:
            mu[:, :, i0:i1] = _ungroup(muc).squeeze(-1).to(mu.dtype)


@_no_autocast
def attn_bwd(do, q, k, v, o, lse, dlse, dq, dk, dv, *, causal: bool, scale: float, lse_lo=None,
             key_bias: torch.Tensor | None = None) -> None:
    """Gradients of ``o`` (upstream ``do``) and of ``lse`` (upstream ``dlse``, may be None)
    with respect to q, k, v, from the saved lse: P = exp(S − lse), dP = dO vᵀ,
    dS = P ⊙ (dP − rowsum(dO ⊙ O) + dlse) (dP, Δ from float64 sums on the CPU), dq = s·dS k, dk = s·dSᵀ q,
    dv = Pᵀ dO. ``key_bias``: a key mask (no gradient). ``lse_lo``: the forward's low word of lse (float32
    inputs, key masks), then P = exp((S − lse) − lse_lo)."""
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dt = _compute_dtype(q, k, v, do)
    kk, vv = _kv(k, dt), _kv(v, dt)
    kb = _bias(key_bias, Hkv, dt)
    wide = _wide(q, dt)
    k64, v64 = (kk.double(), vv.double()) if wide else (None, vv)
    w = torch.float64 if wide else dt
    # the gradients' sums in float64 too when wide (each rounded once at the end), over the keys (dq) and over
    # the query rows and the GQA group (dk, dv), of the fp32 dS and P
    dk_acc = torch.zeros(B, Hkv, Sk, k.shape[-1], dtype=w, device=q.device)
    dv_acc = torch.zeros(B, Hkv, Sk, v.shape[-1], dtype=w, device=q.device)
    for i0, i1 in _chunks(B, Hq, Sq, Sk) if B * Hq * Sq else ():
        qc = _grouped(q[:, :, i0:i1], Hkv, dt)
        doc = _grouped(do[:, :, i0:i1], Hkv, dt)
        lc = _grouped(lse[:, :, i0:i1].unsqueeze(-1), Hkv, dt)
        s = _scores(qc, kk, scale, i0, Sq, causal, kb, k64)
        arg = s - torch.where(torch.isfinite(lc), lc, 0.0)
        if lse_lo is not None:  # S − lse first (exact near the row max), then the low word
            arg = arg - _grouped(lse_lo[:, :, i0:i1].unsqueeze(-1), Hkv, dt)
        p = torch.where(torch.isfinite(lc), torch.exp(arg), 0.0)
        # dP and Δ as float64 sums, each rounded once (_wide): where one key holds the row's weight, dP_j and
        # Δ = rowsum(dO⊙O) agree far below an ulp, and two float32 sums of the same products in different orders
        # differ by ulps (dq 465x its rule at P = (1e-10, 1)); rounded from float64 they round alike and cancel
        # exactly (their float64 difference would keep the float64 sums' own order noise: dq 1.3e-14 where it is
        # 6e-27). The Triton backward does the same
        dow = doc.to(w)
        delta = (dow * _grouped(o[:, :, i0:i1], Hkv, w)).sum(-1, keepdim=True)
        if dlse is not None:
            delta = delta - _grouped(dlse[:, :, i0:i1].unsqueeze(-1), Hkv, w)
        ds = p * (torch.matmul(dow, v64.transpose(-1, -2)).to(dt) - delta.to(dt))
        ds, pw = ds.to(w), p.to(w)
        dq[:, :, i0:i1] = _ungroup(torch.matmul(ds, k64 if wide else kk) * scale).to(dq.dtype)
        dk_acc += torch.matmul(ds.transpose(-1, -2), qc.to(w)).sum(2) * scale
        dv_acc += torch.matmul(pw.transpose(-1, -2), dow).sum(2)
    dk.copy_(dk_acc)
    dv.copy_(dv_acc)
