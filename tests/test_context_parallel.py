"""fastdistill.distributed.context_parallel_jvp_attention on 2 and 4 CPU processes (gloo).

One spawn per world size runs every case on every rank (the 4-process world also runs a few cases on
two groups of 2 ranks, where group ranks differ from global ranks); each rank writes its shard of
every result (o, to, lse, dlse, and dq, dk, dv of the loss ``Σ o·go + Σ lse·gl`` with random go, gl)
and its caught errors to a file. The parent puts the shards back together and compares them with

- an independent float64 oracle: math attention written here (GQA by repeat_interleave, causal mask
  bottom-right aligned, rows that see no key defined as o = 0, lse = −inf), its ``torch.func.jvp``
  for to and dlse, its autograd for dq, dk, dv;
- the single-device ``fastdistill.jvp_attention`` on the full sequence, same dtype and backend.

float64 cases (reference backend) must match both to 1e-10. fp32/bf16 cases (reference, and Triton
through its interpreter when TRITON_INTERPRET=1) must stay within 2 × the single-device op's own error
against the fp64 oracle.

Regression checks for calls that differ on one rank only (a changed signature after an agreed call, an
argument error only one rank's local checks see, a loss using lse on rank 0 only) run on groups with a
short timeout (SHORT_TIMEOUT_S), so that a rank left waiting in a collective fails the test instead of
hanging it (a gloo size mismatch aborts the worker: the world's fixture then errors).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdistill as fd

F64 = torch.float64
TOL = 1e-10


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    mode: str = "ring"
    causal: bool = False
    seq_layout: str = "contiguous"
    layout: str = "bshd"
    sq: int = 4  # per rank
    sk: int | None = None  # per rank (None: sq)
    Hq: int = 2
    Hkv: int = 2
    tangents: str = "qkv"  # which of tq, tk, tv are given
    call: str = "explicit"  # explicit | dual (forward_ad dual tensors) | func (torch.func.jvp)
    loss: str = "o+lse"  # what the backward differentiates: o+lse | lse | none | o+lse@0 (lse on rank 0 only)
    dtype: str = "float64"
    tangent_dtype: str | None = None
    backend: str = "reference"  # triton: through Triton's interpreter (TRITON_INTERPRET=1), else skipped
    worlds: tuple = (2, 4)  # the world sizes that run it
    short_timeout: bool = False  # run on a group of the whole world with a short timeout (a mismatch fails fast)
    logits: float = 1.0  # softmax scale multiplier (30: nearly one-hot rows)
    rel_single: float = 2.0  # lower precision: error at most rel_single × the single-device op's (+ floor)
    floor: float = 1e-6
    strided: bool = False  # each rank's shards (and tangents) as non-contiguous views: the other layout's memory order
    # and a padded head dim
    mask: str = ""  # key_mask (each rank passes its keys' shard): "bool-b1k" [B, 1, Sk] padding (batch 1: every key
    # masked), "bool-k" [Sk], "float-bhk" [B, Hq, Sk] float32 bias (finite, -1e4 and -inf entries), "float-4d"
    # [B, 1, 1, Sk] float32 bias, "float-min" [B, 1, Sk] with batch 1 all at finfo(float32).min (transformers' padding
    # of a fully padded row: uniform weights, lse near -3.4e38, where only lse's low word keeps P = exp(S - lse))

    @property
    def scale(self) -> float:
        return self.logits * D ** -0.5


B, D, DV = 2, 8, 6
CASES = [
    Case("ring-noncausal"),
    Case("ring-causal-contiguous", causal=True),
    Case("ring-causal-zigzag-bhsd", causal=True, seq_layout="zigzag", layout="bhsd"),
    Case("ring-gqa-causal", causal=True, Hq=4, Hkv=2),
    Case("ring-gqa-causal-zigzag", causal=True, seq_layout="zigzag", Hq=4, Hkv=2),
    Case("ring-tk-tv-none", causal=True, seq_layout="zigzag", tangents="q"),
    Case("ring-tv-only", tangents="v"),
    Case("ring-no-tangent", causal=True, tangents=""),
    Case("ring-cross", sq=3, sk=5, Hq=4, Hkv=1),
    Case("ring-zigzag-noncausal", seq_layout="zigzag", sq=4, sk=6),
    Case("ring-lse-only-loss", causal=True, seq_layout="zigzag", loss="lse"),
    Case("ring-sk0", sq=3, sk=0),
    Case("ring-strided-causal-zigzag-gqa", causal=True, seq_layout="zigzag", Hq=4, Hkv=1, strided=True),
    Case("ulysses-strided-bhsd-dual", mode="ulysses", causal=True, layout="bhsd", Hq=4, Hkv=4, call="dual",
         strided=True),
    # only rank 0's loss uses lse: the other ranks get dlse = None in the backward (Ulysses used to skip an all-to-all)
    Case("ring-lse-on-rank0-only", causal=True, loss="o+lse@0", short_timeout=True),
    Case("ulysses-lse-on-rank0-only", mode="ulysses", causal=True, Hq=4, Hkv=4, loss="o+lse@0", short_timeout=True),
    Case("ulysses-noncausal-gqa", mode="ulysses", Hq=8, Hkv=4),
    Case("ulysses-causal-contiguous-bhsd", mode="ulysses", causal=True, layout="bhsd", Hq=4, Hkv=4),
    Case("ulysses-causal-zigzag", mode="ulysses", causal=True, seq_layout="zigzag", Hq=4, Hkv=4),
    Case("ulysses-cross-tk-tv-none", mode="ulysses", sq=3, sk=5, Hq=4, Hkv=4, tangents="q"),
    Case("ring-forward-ad-dual", causal=True, seq_layout="zigzag", call="dual"),
    Case("ulysses-forward-ad-dual", mode="ulysses", causal=True, Hq=4, Hkv=4, call="dual"),
    Case("ring-torch-func-jvp", causal=True, call="func", loss="none"),
    Case("ulysses-torch-func-jvp", mode="ulysses", causal=True, seq_layout="zigzag", Hq=4, Hkv=4, call="func",
         loss="none"),
    Case("ring-fp32-causal-zigzag", causal=True, seq_layout="zigzag", Hq=4, Hkv=2, dtype="float32"),
    Case("ring-bf16-causal-fp32-tangent", causal=True, dtype="bfloat16", tangent_dtype="float32"),
    Case("ulysses-bf16-causal-zigzag", mode="ulysses", causal=True, seq_layout="zigzag", Hq=4, Hkv=4,
         dtype="bfloat16"),
    Case("ring-triton-fp32-causal-zigzag-gqa", causal=True, seq_layout="zigzag", Hq=4, Hkv=2, dtype="float32",
         backend="triton", worlds=(2,)),
    Case("ring-triton-bf16-fp32-tangent", causal=True, dtype="bfloat16", tangent_dtype="float32", tangents="qk",
         backend="triton", worlds=(2,)),
    # fp32 at logit scale × 30: the ring merges the blocks' lse in fp64 and hands the block backward the merged
    # lse's low word (docs/jvp_attention.md), so it is held to the single-device op's accuracy, not 2× it
    Case("ring-triton-fp32-logits-x30", causal=True, seq_layout="zigzag", sq=8, dtype="float32", logits=30.0,
         rel_single=1.25, backend="triton", worlds=(2,)),
    # at logit scale × 30 the merge weights exp(lse_c − lse) and μ are formed in fp64 for every dtype, O and T too
    # for fp32 inputs and an fp32 tangent output, and the reference backend computes fp32 blocks in fp64 (before:
    # `to` 19x, dlse 14x the single-device error; found by a review)
    Case("ring-fp32-logits-x30", sq=6, dtype="float32", logits=30.0, worlds=(4,), floor=0.0),
    Case("ring-fp32-logits-x30-causal-zigzag", causal=True, seq_layout="zigzag", sq=6, dtype="float32", logits=30.0,
         worlds=(4,), floor=0.0),
    Case("ring-bf16-logits-x30-fp32-tangent", causal=True, sq=6, dtype="bfloat16", tangent_dtype="float32",
         logits=30.0, worlds=(4,), floor=0.0),
    Case("ring-triton-bf16-logits-x30-zigzag", causal=True, seq_layout="zigzag", sq=6, dtype="bfloat16",
         logits=30.0, backend="triton", worlds=(4,), floor=0.0),
    # key masks: the shard of each rank's keys travels with them (ring) or is all-gathered (ulysses)
    Case("ring-mask-bool-padding", mask="bool-b1k"),
    Case("ring-causal-zigzag-mask-float-gqa", causal=True, seq_layout="zigzag", Hq=4, Hkv=2, mask="float-bhk"),
    Case("ring-cross-mask-1d-tk-tv-none", sq=3, sk=5, tangents="q", mask="bool-k"),
    Case("ring-mask-torch-func-jvp", causal=True, call="func", loss="none", mask="float-4d"),
    Case("ring-mask-dual-lse-only", causal=True, seq_layout="zigzag", call="dual", loss="lse", mask="bool-b1k"),
    Case("ulysses-causal-zigzag-mask-float", mode="ulysses", causal=True, seq_layout="zigzag", Hq=4, Hkv=4,
         mask="float-bhk"),
    Case("ulysses-mask-bool-dual-gqa", mode="ulysses", Hq=8, Hkv=4, call="dual", mask="bool-b1k"),
    Case("ring-bf16-causal-mask-float-fp32-tangent", causal=True, dtype="bfloat16", tangent_dtype="float32",
         mask="float-bhk"),
    Case("ulysses-fp32-mask-float", mode="ulysses", Hq=4, Hkv=4, dtype="float32", mask="float-bhk"),
    Case("ring-triton-fp32-causal-zigzag-mask-float", causal=True, seq_layout="zigzag", dtype="float32",
         mask="float-bhk", backend="triton", worlds=(2,)),
    Case("ring-triton-bf16-mask-bool", dtype="bfloat16", mask="bool-b1k", backend="triton", worlds=(2,)),
    Case("ring-bf16-causal-zigzag-mask-finfo-min", causal=True, seq_layout="zigzag", dtype="bfloat16",
         mask="float-min"),
    Case("ring-triton-bf16-mask-finfo-min", dtype="bfloat16", mask="float-min", backend="triton", worlds=(2,)),
    # float64 with finfo.min rows: the ring's blocks and the single-device op (Ulysses) keep lse's low word there too
    Case("ring-fp64-causal-zigzag-mask-finfo-min", causal=True, seq_layout="zigzag", mask="float-min"),
    Case("ulysses-fp64-mask-finfo-min", mode="ulysses", Hq=4, Hkv=4, mask="float-min"),
]
SHORT_TIMEOUT_S = 20
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# also run in the 4-process world on two groups of 2 ranks (group ranks != global ranks)
SUB_CASES = [c for c in CASES if c.name in ("ring-gqa-causal-zigzag", "ring-cross", "ulysses-causal-zigzag",
                                            "ring-causal-zigzag-mask-float-gqa")]


def _seq_dim(case: Case) -> int:
    return 1 if case.layout == "bshd" else 2


def _shape(case: Case, W: int, s: int, h: int, d: int) -> tuple[int, ...]:
    return (B, W * s, h, d) if case.layout == "bshd" else (B, h, W * s, d)


def make_inputs(case: Case, W: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sk = case.sq if case.sk is None else case.sk
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=F64)
    x = {"q": r(*_shape(case, W, case.sq, case.Hq, D)), "k": r(*_shape(case, W, sk, case.Hkv, D)),
         "v": r(*_shape(case, W, sk, case.Hkv, DV))}
    for n in "qkv":
        x["t" + n] = r(*x[n].shape) if n in case.tangents else None
    x["go"] = r(*_shape(case, W, case.sq, case.Hq, DV))
    x["gl"] = r(B, case.Hq, W * case.sq)
    if case.loss == "o+lse@0":  # contiguous shards: rank 0 holds the first sq rows; the others' lse is not in the loss
        assert case.seq_layout == "contiguous"
        x["gl"][:, :, case.sq:] = 0
    dt = getattr(torch, case.dtype)
    out = {n: None if t is None else t.to(dt) for n, t in x.items()}
    out["mask"] = make_mask(case, W * sk, g)
    return out


def make_mask(case: Case, Sk: int, g: torch.Generator) -> torch.Tensor | None:
    """The full key mask of ``case.mask`` (the key dim last), as a user passes it to jvp_attention."""
    if not case.mask:
        return None
    if case.mask.startswith("bool"):
        keep = torch.rand(B, 1, Sk, generator=g) > 0.3
        keep[0, 0, 0] = True  # batch 0 keeps a key; batch 1 keeps none (rows that see no key: o = 0, lse = −inf)
        keep[1] = False
        return keep if case.mask == "bool-b1k" else keep[0, 0]
    shape = {"float-bhk": (B, case.Hq, Sk), "float-4d": (B, 1, 1, Sk), "float-min": (B, 1, Sk)}[case.mask]
    bias = torch.randn(*shape, generator=g) * 2
    u = torch.rand(*shape, generator=g)
    bias = torch.where(u < 0.2, float("-inf"), torch.where(u < 0.3, -1e4, bias))  # −1e4: finfo.min-style padding
    bias[..., 0] = 0.5  # every row keeps a key
    if case.mask == "float-min":
        bias[1] = torch.finfo(torch.float32).min
    return bias.float()


def _bias64(case: Case, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The key mask as a float64 [B | 1, Hq | 1, Sk] additive bias (−inf: masked)."""
    if mask is None:
        return None
    m = mask.view(1, 1, -1) if mask.dim() == 1 else mask.squeeze(2) if mask.dim() == 4 else mask
    return torch.where(m, 0.0, float("-inf")).double() if m.dtype == torch.bool else m.double()


# ----------------------------------------------------------------------------- oracle
def _bhsd(x, case):
    return x if x is None or case.layout == "bhsd" else x.transpose(1, 2)


def oracle(case: Case, x: dict) -> dict:
    """Math attention in float64 on the full sequence: o, to, lse, dlse and the loss gradients."""
    bias = _bias64(case, x["mask"])
    x = {n: None if t is None else t.to(F64) for n, t in x.items()}
    q, k, v = (_bhsd(x[n], case).clone().requires_grad_() for n in "qkv")
    tq, tk, tv = (torch.zeros_like(p) if x["t" + n] is None else _bhsd(x["t" + n], case)
                  for n, p in zip("qkv", (q, k, v)))
    scale = case.scale

    def attn(q, k, v):
        G = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        Sq, Sk = q.shape[2], k.shape[2]
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        seen = torch.ones(Sq, Sk, dtype=torch.bool)
        if case.causal:
            seen = torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + (Sk - Sq)
        if bias is not None:  # the key mask: added to the scaled scores, −inf keys unseen
            s = s + bias[:, :, None, :]
            seen = seen & torch.isfinite(bias)[:, :, None, :]
        row = seen.any(-1, keepdim=True)
        s = torch.where(row, torch.where(seen, s, float("-inf")), 0.0)
        p = torch.where(row, torch.softmax(s, -1), 0.0)
        # lse = m + ln Σ exp(s − m) with m held constant: its derivative is P also where lse rounds to the bias (a
        # row of finfo.min keys; torch.logsumexp's backward takes exp(s − lse) = 1 there: dq, dk n times too large)
        m = s.amax(-1, keepdim=True).detach() if Sk else s.new_zeros((*s.shape[:-1], 1))
        lse = torch.where(row, m + torch.log(torch.exp(s - m).sum(-1, keepdim=True)), float("-inf")).squeeze(-1)
        return torch.matmul(p, v), lse

    (o, lse), (to, dlse) = torch.func.jvp(attn, (q, k, v), (tq, tk, tv))
    o2, lse2 = attn(q, k, v)
    loss = (o2 * _bhsd(x["go"], case)).sum() + torch.where(torch.isfinite(lse2), lse2 * x["gl"], 0.0).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v), allow_unused=True, materialize_grads=True) \
        if q.shape[2] * k.shape[2] else (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    back = (lambda t: t.detach() if case.layout == "bhsd" else t.detach().transpose(1, 2))
    out = {"o": back(o), "to": back(to), "lse": lse.detach(), "dlse": dlse.detach(),
           "dq": back(dq), "dk": back(dk), "dv": back(dv)}
    if case.loss == "lse":
        out["dq"], out["dk"], out["dv"] = _lse_grads(case, x, attn, q, k, v, back)
    return out


def _lse_grads(case, x, attn, q, k, v, back):
    _, lse = attn(q, k, v)
    grads = torch.autograd.grad((lse * x["gl"]).sum(), (q, k, v), allow_unused=True, materialize_grads=True)
    return tuple(back(g) for g in grads)


# ----------------------------------------------------------------------------- the ranks
def _shard(x, dim, W, r, zigzag, group):
    if x is None:
        return None
    from fastdistill.distributed import zigzag_shard

    return zigzag_shard(x, dim, group).contiguous() if zigzag else x.chunk(W, dim)[r].contiguous()


def _strided(x):
    """The values of [B, A, C, D] ``x`` in memory ordered [B, C, A, D + 3] (viewed back: not contiguous)."""
    if x is None:
        return None
    B, A, C, Dx = x.shape
    y = x.new_zeros(B, C, A, Dx + 3)[..., :Dx].transpose(1, 2)
    return y.copy_(x)


def _run_case(case: Case, x: dict, W: int, r: int, group=None) -> dict:
    from fastdistill.distributed import context_parallel_jvp_attention as cp

    zz = case.seq_layout == "zigzag"
    sd = _seq_dim(case)
    loc = {n: _shard(x[n], sd, W, r, zz, group) for n in ("q", "k", "v", "tq", "tk", "tv", "go")}
    loc["gl"] = _shard(x["gl"], 2, W, r, zz, group)
    mask = _shard(x["mask"], x["mask"].dim() - 1, W, r, zz, group) if case.mask else None
    if case.strided:
        loc.update({n: _strided(loc[n]) for n in ("q", "k", "v", "tq", "tk", "tv")})
    q, k, v = ((loc[n] if case.strided else loc[n].clone()).requires_grad_() for n in "qkv")  # (clone: contiguous)
    assert not case.strided or not any(x.is_contiguous() for x in (q, k, v)), "strided shards expected"
    kw = dict(mode=case.mode, causal=case.causal, seq_layout=case.seq_layout, layout=case.layout, return_lse=True,
              group=group, scale=case.scale, key_mask=mask,
              tangent_dtype=None if case.tangent_dtype is None else getattr(torch, case.tangent_dtype))
    if case.call == "func":
        def f(q, k, v):
            o, _, lse, _ = cp(q, k, v, **kw)
            return o, lse

        tq, tk, tv = (torch.zeros_like(p) if loc["t" + n] is None else loc["t" + n] for n, p in zip("qkv", (q, k, v)))
        (o, lse), (to, dlse) = torch.func.jvp(f, (q.detach(), k.detach(), v.detach()), (tq, tk, tv))
        return {"o": o, "to": to, "lse": lse, "dlse": dlse}
    if case.call == "dual":
        with fwAD.dual_level():
            duals = [p if loc["t" + n] is None else fwAD.make_dual(p, loc["t" + n]) for n, p in zip("qkv", (q, k, v))]
            o, to, lse, dlse = cp(*duals, **kw)
            o_t, lse_t = fwAD.unpack_dual(o).tangent, fwAD.unpack_dual(lse).tangent
            assert torch.equal(o_t, to) and torch.equal(lse_t, dlse), "dual tangents differ from the returned ones"
            o, lse = fwAD.unpack_dual(o).primal, fwAD.unpack_dual(lse).primal
    else:
        o, to, lse, dlse = cp(q, k, v, *(loc["t" + n] for n in "qkv"), **kw)
    res = {"o": o.detach(), "to": to, "lse": lse.detach(), "dlse": dlse}
    if case.loss != "none":
        terms = []
        if case.loss in ("lse", "o+lse") or (case.loss == "o+lse@0" and r == 0):
            terms.append((lse * loc["gl"]).sum())
        if case.loss in ("o+lse", "o+lse@0"):
            terms.append((o * loc["go"]).sum())
        sum(terms).backward()
        res.update(dq=q.grad, dk=k.grad, dv=v.grad)
    return {n: None if t is None else t.detach() for n, t in res.items()}


def _expect_error(fn) -> str:
    """The error ``fn`` raised, as "Type: message" (any type: the test checks it), or "no error"."""
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _extras(x: dict, W: int, r: int) -> dict:
    """Round trip of the zigzag helpers, errors, the stop-gradient tangent, a group of size 1."""
    from fastdistill.distributed import context_parallel_jvp_attention as cp
    from fastdistill.distributed import zigzag_shard, zigzag_unshard

    out = {}
    full = torch.arange(2 * 3 * 4 * W * 2, dtype=F64).reshape(2, 4 * W, 3, 2)
    sh = zigzag_shard(full, 1)
    c = full.chunk(2 * W, 1)
    out["zigzag_shard_ok"] = torch.equal(sh, torch.cat([c[r], c[2 * W - 1 - r]], 1))
    out["zigzag_roundtrip_ok"] = torch.equal(zigzag_unshard(sh, 1), full) and torch.equal(
        zigzag_unshard(zigzag_shard(full, -3), -3), full)
    # zigzag_unshard is differentiable: the shard's gradient sums every rank's output gradient at its chunks
    xs = sh.clone().requires_grad_()
    wr = torch.arange(full.numel(), dtype=F64).reshape(full.shape) * (r + 1)
    (zigzag_unshard(xs, 1) * wr).sum().backward()
    wsum = torch.arange(full.numel(), dtype=F64).reshape(full.shape) * sum(range(1, W + 1))
    out["zigzag_grad_ok"] = torch.equal(xs.grad, zigzag_shard(wsum, 1))
    out["err_zigzag_size"] = _expect_error(lambda: zigzag_shard(full[:, :3], 1))
    out["err_zigzag_size_w"] = _expect_error(lambda: zigzag_shard(full[:, :W], 1))  # a multiple of W, not of 2W
    out["err_zigzag_dim"] = _expect_error(lambda: zigzag_shard(full, -5))  # below -4, the lowest dim of a 4-D tensor
    q = torch.randn(1, 4, W + 1, D, dtype=F64)
    out["err_ulysses_heads"] = _expect_error(lambda: cp(q, q, q, mode="ulysses"))
    qw, k1 = torch.randn(1, 4, W, D, dtype=F64), torch.randn(1, 4, 1, D, dtype=F64)  # MQA: one key/value head
    out["err_ulysses_kv_heads"] = _expect_error(lambda: cp(qw, k1, k1, mode="ulysses"))
    k = torch.randn(1, 6, W + 1, D, dtype=F64)
    out["err_causal_lengths"] = _expect_error(lambda: cp(q, k, k, causal=True))
    out["err_zigzag_odd"] = _expect_error(lambda: cp(q[:, :3], q[:, :3], q[:, :3], causal=True,
                                                     seq_layout="zigzag"))
    out["err_mode"] = _expect_error(lambda: cp(q, q, q, mode="ringg"))
    out["err_group"] = _expect_error(lambda: cp(q, q, q, group=3))
    # options checked as jvp_attention checks them (before: float("0.5") parsed, a truthy "no" gave lse / the check)
    out["err_scale_str"] = _expect_error(lambda: cp(q, q, q, scale="0.5"))
    out["err_return_lse_str"] = _expect_error(lambda: cp(q, q, q, return_lse="no"))
    out["err_check_str"] = _expect_error(lambda: cp(q, q, q, check="no"))
    # the single-device op's own argument errors, raised before any collective (the agreement carries them)
    out["err_layout"] = _expect_error(lambda: cp(q, q, q, layout="sbhd"))
    kh = torch.randn(1, 4, 2, D, dtype=F64)  # W + 1 query heads over 2 key/value heads: not a multiple
    out["err_gqa_ratio"] = _expect_error(lambda: cp(q, kh, kh))
    out["err_tq_shape"] = _expect_error(lambda: cp(q, q, q, q[:, :3]))
    out["err_key_mask_len"] = _expect_error(lambda: cp(q, q, q, key_mask=torch.ones(5, dtype=torch.bool)))
    out["err_key_mask_grad"] = _expect_error(lambda: cp(q, q, q, key_mask=torch.zeros(4, dtype=F64,
                                                                                      requires_grad=True)))
    # the same [1, Hq, 4] mask on every rank, a broadcast view (head stride 0) on rank 0 only: the wire form follows
    # the mask's shape, not its strides (before: "key_mask: head dim (1: broadcast) differs" on every rank, and with
    # check=False a size mismatch in the ring)
    mv = torch.tensor([True, False, True, True]).view(1, 1, 4).expand(1, W + 1, 4)
    try:
        want = cp(q, q, q, key_mask=mv.clone())[0]
        out["mask_view_one_rank_equal"] = all(torch.equal(cp(q, q, q, key_mask=mv if r == 0 else mv.clone(),
                                                             check=c)[0], want) for c in (True, False))
    except Exception as e:
        out["mask_view_one_rank_equal"] = f"{type(e).__name__}: {e}"
    # check=False: the same result without the agreement all-gather; a local error still raises
    q2 = q[:, :, :2]
    out["check_off_equal"] = torch.equal(cp(q2, q2, q2, check=False)[0], cp(q2, q2, q2)[0])
    out["err_mode_check_off"] = _expect_error(lambda: cp(q, q, q, mode="ringg", check=False))
    # as jvp_attention: under autocast q, k, v, tangents in the autocast dtype (an fp32 q with bf16 k / v too);
    # tangent_dtype other than q's under forward-AD raises (before: fp32 o, a TypeError, an fp32 tangent)
    qa, ka, va, ta = (torch.randn(1, 4, 2, D, generator=torch.Generator().manual_seed(9 + i)) for i in range(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        oa, toa = cp(qa, ka, va, ta)
        om, _ = cp(qa, ka.bfloat16(), va.bfloat16())
    ob, tob = cp(*(x.bfloat16() for x in (qa, ka, va, ta)))
    out["autocast_as_jvp_attention"] = (oa.dtype == toa.dtype == om.dtype == torch.bfloat16 and torch.equal(oa, ob)
                                        and torch.equal(toa, tob) and torch.equal(om, ob))
    with fwAD.dual_level():
        qd = fwAD.make_dual(qa.bfloat16(), ta.bfloat16())
        out["err_dual_tangent_dtype"] = _expect_error(lambda: cp(qd, ka.bfloat16(), va.bfloat16(),
                                                                 tangent_dtype=torch.float32))
        out["err_dual_and_tangents"] = _expect_error(lambda: cp(qd, ka.bfloat16(), va.bfloat16(), ta.bfloat16()))
    # shards of different lengths on different ranks: caught by the agreement check on every rank
    qq = torch.randn(1, 4 + r, 2, D, dtype=F64)
    out["err_ranks_differ"] = _expect_error(lambda: cp(qq, qq, qq))
    # the tangent output is stop-gradient
    qg = q[:, :, :2].clone().requires_grad_()
    _, to = cp(qg, qg, qg, torch.ones_like(qg))
    out["err_stop_gradient"] = _expect_error(lambda: to.sum().backward())
    # ... also under torch.func.jvp (functorch's second context sees no requires-grad input) and with dual
    # tensors, while a loss on the primal (and the detached tangent) runs
    o, to = torch.func.jvp(lambda x: cp(x, x, x)[0], (qg,), (torch.ones_like(qg),))
    out["err_stop_gradient_func"] = _expect_error(lambda: (o.sum() + to.sum()).backward())
    o, to = torch.func.jvp(lambda x: cp(x, x, x)[0], (qg,), (torch.ones_like(qg),))
    out["func_primal_backward"] = _expect_error(lambda: (o.sum() + to.detach().sum()).backward())
    with fwAD.dual_level():
        o, to = fwAD.unpack_dual(cp(fwAD.make_dual(qg, torch.ones_like(qg)), qg, qg)[0])
        out["err_stop_gradient_dual"] = _expect_error(lambda: (o.sum() + to.sum()).backward())
    # ... also the returned to / dlse with dual tensors (before: constants, the term silently lost), and with only a
    # tangent requiring grad (a forward-AD tangent depends on the weights; before: silently no gradient from to)
    with fwAD.dual_level():
        o, to, lse, dlse = cp(fwAD.make_dual(qg, torch.ones_like(qg)), qg, qg, return_lse=True)
        out["err_stop_gradient_dual_returned"] = _expect_error(lambda: (fwAD.unpack_dual(o).primal.sum()
                                                                        + to.sum()).backward())
    tg = torch.ones_like(qg).requires_grad_()
    _, to = cp(qg.detach(), qg.detach(), qg.detach(), tg)
    out["err_stop_gradient_tangent_grad"] = _expect_error(lambda: (to.sum() + tg.sum()).backward())
    # a double backward through the op raises (its backward has no derivative) instead of a silent constant
    g, = torch.autograd.grad(cp(qg, qg, qg)[0].square().sum(), qg, create_graph=True)
    out["err_double_backward"] = _expect_error(lambda: (g.square().sum() + qg.sum()).backward())
    # a context-parallel group of one rank equals the single-device op
    if W == 2:
        groups = [dist.new_group([0]), dist.new_group([1])]
        xs = [t.clone() for t in (q[:, :, :2], k[:, :, :2], k[:, :, :2])]
        a = cp(*xs, *xs, group=groups[r], causal=False, return_lse=True)
        b = fd.jvp_attention(*xs, *xs, return_lse=True)
        m = torch.tensor([True, False, True, True, False, True])
        am = cp(*xs, *xs, group=groups[r], causal=False, return_lse=True, key_mask=m)
        bm = fd.jvp_attention(*xs, *xs, return_lse=True, key_mask=m)
        out["group1_equal"] = all(torch.equal(u, w) for u, w in zip(a + am, b + bm)) and not torch.equal(a[0], am[0])
        # a group this process is not in: dist.new_group gives it a sentinel (before: "expected a ProcessGroup,
        # got int")
        mine_not = dist.new_group([0])
        out["err_not_member"] = ("skipped" if r == 0 else
                                 _expect_error(lambda: cp(*xs, *xs, group=mine_not)))
    return out


def _one_rank_differs(W: int, r: int, agree_group, local_group) -> dict:
    """The last rank alone makes a different call; every rank must raise the same error, at once, and the group
    must stay usable (no collective left pending). Each group has a short timeout: a rank left waiting in a
    collective shows as a timeout error here instead of a hang."""
    from fastdistill.distributed import context_parallel_jvp_attention as cp

    odd = r == W - 1
    out = {}
    g = torch.Generator().manual_seed(r)
    x = torch.randn(1, 4, 2, D, generator=g, dtype=F64)

    def usable(group):  # an agreed call after the errors still runs (and matches on every rank)
        try:
            o, _ = cp(x, x, x, group=group, causal=True, seq_layout="zigzag")
            return tuple(o.shape) == tuple(x.shape)
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    # 1. a signature that changed on one rank after an agreed call (was: a per-rank cache of agreed signatures)
    cp(x, x, x, group=agree_group)
    y = torch.randn(1, 6 if odd else 4, 2, D, dtype=F64)
    out["err_after_agreed_call"] = _expect_error(lambda: cp(y, y, y, group=agree_group))
    # ... or a scale that differs on one rank (ulysses would mix the scales across heads silently)
    out["err_scale_one_rank"] = _expect_error(lambda: cp(x, x, x, group=agree_group, scale=0.3 if odd else 0.25))
    # ... or another mode / dtype: the message names the values, not internal codes (before: "[0, 1]")
    xh = torch.randn(1, 4, W, D, generator=g, dtype=F64)  # heads divisible by W: ulysses is valid alone
    out["err_mode_one_rank"] = _expect_error(lambda: cp(xh, xh, xh, group=agree_group,
                                                        mode="ulysses" if odd else "ring"))
    xd = x.float() if odd else x
    out["err_dtype_one_rank"] = _expect_error(lambda: cp(xd, xd, xd, group=agree_group))
    # ... or q requiring grad on one rank only: its backward would wait for the others in the ring backward
    xg = x.detach().requires_grad_(odd)
    out["err_requires_grad_one_rank"] = _expect_error(lambda: cp(xg, x, x, group=agree_group))
    # ... or only a tangent requiring grad, on one rank: its o requires grad, its backward would wait for the others
    t1 = torch.ones_like(x).requires_grad_(odd)
    out["err_tangent_requires_grad_one_rank"] = _expect_error(lambda: cp(x, x, x, t1, group=agree_group))
    # ... or a key mask of another dtype, or a key mask on some ranks only
    mb, mf = torch.ones(4, dtype=torch.bool), torch.zeros(4)  # (W ranks: the last one differs, named last)
    out["err_mask_dtype_one_rank"] = _expect_error(lambda: cp(x, x, x, group=agree_group, key_mask=mf if odd else mb))
    out["err_mask_one_rank_only"] = _expect_error(lambda: cp(x, x, x, group=agree_group,
                                                             key_mask=None if odd else mb))
    out["usable_after_mismatch"] = usable(agree_group)
    # 2. an argument error that only the last rank's local checks see
    z = x[:, :3] if odd else x
    out["err_zigzag_odd_one_rank"] = _expect_error(lambda: cp(z, z, z, group=local_group, causal=True,
                                                              seq_layout="zigzag"))
    h = torch.randn(1, 4, W + 1 if odd else W, D, dtype=F64)
    out["err_ulysses_heads_one_rank"] = _expect_error(lambda: cp(h, h, h, group=local_group, mode="ulysses"))
    out["err_causal_lengths_one_rank"] = _expect_error(lambda: cp(x, z, z, group=local_group, causal=True))
    t = x.float() if odd else x
    out["err_tangent_dtype_one_rank"] = _expect_error(lambda: cp(x, x, x, t, group=local_group))
    out["err_check_str_one_rank"] = _expect_error(lambda: cp(x, x, x, group=local_group, check="no" if odd else True))
    mo = torch.ones(5 if odd else 4, dtype=torch.bool)
    out["err_mask_len_one_rank"] = _expect_error(lambda: cp(x, x, x, group=local_group, key_mask=mo))
    # two ranks fail, each with its own error (rank 0: an odd zigzag length; the last: heads for ulysses)
    if r == 0:
        two = lambda: cp(x[:, :3], x[:, :3], x[:, :3], group=local_group, causal=True, seq_layout="zigzag")
    elif odd:
        two = lambda: cp(h, h, h, group=local_group, mode="ulysses")
    else:
        two = lambda: cp(x, x, x, group=local_group)
    out["err_two_ranks"] = _expect_error(two)
    out["usable_after_local_errors"] = usable(local_group)
    # 3. zigzag_unshard: a shard of odd length (a local error), of another length or dtype on the last rank only
    from fastdistill.distributed import zigzag_unshard

    u = torch.zeros(2, 5 if odd else 4, 3, dtype=F64)
    out["err_unshard_odd_one_rank"] = _expect_error(lambda: zigzag_unshard(u, 1, group=local_group))
    u = torch.zeros(2, 6 if odd else 4, 3, dtype=F64)
    out["err_unshard_len_one_rank"] = _expect_error(lambda: zigzag_unshard(u, 1, group=local_group))
    u = torch.zeros(2, 4, 3, dtype=torch.float32 if odd else F64)
    out["err_unshard_dtype_one_rank"] = _expect_error(lambda: zigzag_unshard(u, 1, group=local_group))
    u = torch.zeros(2, 4, 6, dtype=F64)
    out["err_unshard_dim_one_rank"] = _expect_error(lambda: zigzag_unshard(u, 2 if odd else 1, group=local_group))
    out["unshard_usable"] = tuple(zigzag_unshard(u, 1, group=local_group).shape) == (2, 4 * W, 6)
    out["unshard_check_off_equal"] = torch.equal(zigzag_unshard(x, 1, group=local_group, check=False),
                                                 zigzag_unshard(x, 1, group=local_group))
    return out


def _guarded(fn, case, x, W, *args, **kwargs):
    if (case.backend == "triton" and not INTERPRET) or W not in case.worlds:
        return "skip"
    try:
        with fd.use_backend(case.backend):
            return fn(case, x, W, *args, **kwargs)
    except Exception as e:  # reported in the parent with the case name
        return f"{type(e).__name__}: {e}"


def _worker(r: int, W: int, tmp: str) -> None:
    import conftest  # noqa: F401  (its Triton-interpreter patches for bf16, which pytest applied in the parent)

    os.environ["FASTDISTILL_BACKEND"] = "reference"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=r, world_size=W,
                            timeout=datetime.timedelta(seconds=60))
    inputs = torch.load(os.path.join(tmp, "inputs.pt"))
    # groups of the whole world with a short timeout, for the cases where a rank used to wait in a collective
    # that the others never entered (the same order on every rank)
    short = [dist.new_group(list(range(W)), timeout=datetime.timedelta(seconds=SHORT_TIMEOUT_S)) for _ in range(3)]
    res = {c.name: _guarded(_run_case, c, x, W, r, group=short[0] if c.short_timeout else None)
           for c, x in zip(CASES, inputs["cases"])}
    if W == 4:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        for c, x in zip(SUB_CASES, inputs["sub"]):
            res["sub:" + c.name] = _guarded(_run_case, c, x, 2, r % 2, group=pairs[r // 2])
    res["extras"] = _extras(inputs, W, r)
    res["extras"].update(_one_rank_differs(W, r, short[1], short[2]))
    torch.save(res, os.path.join(tmp, f"rank{r}.pt"))
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip the interpreter teardown of torch (seconds per process on a loaded machine)


# ----------------------------------------------------------------------------- the parent
def _unshard(parts: list[torch.Tensor], dim: int, zigzag: bool) -> torch.Tensor:
    if not zigzag:
        return torch.cat(parts, dim)
    halves = [p.chunk(2, dim) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got)) and torch.equal(got[~fin], want[~fin]), "non-finite entries differ"
    if not fin.any():
        return 0.0
    return ((got - want)[fin].abs().max() / want[fin].abs().max().clamp_min(1.0)).item()


@pytest.fixture(scope="module", params=[2, 4], ids=["W2", "W4"])
def world(request, tmp_path_factory):
    W = request.param
    tmp = str(tmp_path_factory.mktemp(f"cp{W}"))
    inputs = {"cases": [make_inputs(c, W, seed=1000 * W + i) for i, c in enumerate(CASES)],
              "sub": [make_inputs(c, 2, seed=7000 + i) for i, c in enumerate(SUB_CASES)]}
    torch.save(inputs, os.path.join(tmp, "inputs.pt"))
    mp.spawn(_worker, args=(W, tmp), nprocs=W, join=True)
    ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(W)]
    return W, inputs, ranks


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_full_sequence(world, case):
    W, inputs, ranks = world
    _compare(case, inputs["cases"][CASES.index(case)], [rk[case.name] for rk in ranks], W)


@pytest.mark.parametrize("case", SUB_CASES, ids=[c.name for c in SUB_CASES])
def test_groups_of_two_in_a_world_of_four(world, case):
    W, inputs, ranks = world
    if W != 4:
        pytest.skip("checked in the 4-process world")
    x = inputs["sub"][SUB_CASES.index(case)]
    for pair in ((0, 1), (2, 3)):
        _compare(case, x, [ranks[r]["sub:" + case.name] for r in pair], 2, f"group of ranks {pair}")


def single_device(case: Case, x: dict) -> dict:
    """The single-device op on the full sequence, the same loss, the same dtype and backend."""
    q, k, v = (x[n].clone().requires_grad_() for n in "qkv")
    td = None if case.tangent_dtype is None else getattr(torch, case.tangent_dtype)
    with fd.use_backend(case.backend):
        o, to, lse, dlse = fd.jvp_attention(q, k, v, x["tq"], x["tk"], x["tv"], causal=case.causal, scale=case.scale,
                                            layout=case.layout, return_lse=True, tangent_dtype=td,
                                            key_mask=x["mask"])
        loss = (lse * x["gl"]).sum() + ((o * x["go"]).sum() if case.loss in ("o+lse", "o+lse@0") else 0.0)
        loss.backward()
    out = {"o": o, "to": to, "lse": lse, "dlse": dlse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    return {n: None if t is None else t.detach() for n, t in out.items()}


def _compare(case: Case, x: dict, got: list, W: int, where: str = "") -> None:
    """float64: within TOL of the oracle and of the single-device op. Lower precision: the error against
    the fp64 oracle at most 2 × that of the single-device op in the same dtype (+ 1e-6)."""
    where = f"{case.name} W={W} {where}".strip()
    if case.backend == "triton" and not INTERPRET:
        pytest.skip("the Triton backend runs on the CPU only under TRITON_INTERPRET=1")
    if W not in case.worlds:
        pytest.skip(f"run in the worlds of {case.worlds} processes only (the interpreter is slow)")
    for r, g in enumerate(got):
        assert not isinstance(g, str), f"{where}: rank {r} raised {g}"
    zz = case.seq_layout == "zigzag"
    want, single = oracle(case, x), single_device(case, x)
    for name in ("o", "to", "lse", "dlse", "dq", "dk", "dv"):
        if name not in got[0]:
            continue
        if name in ("to", "dlse") and case.tangents == "":
            assert all(g[name] is None for g in got), f"{where}: {name} should be None without tangents"
            continue
        assert all(g[name] is not None for g in got), f"{where}: {name} is None"
        dim = 2 if name in ("lse", "dlse") else _seq_dim(case)
        full = _unshard([g[name] for g in got], dim, zz)
        assert full.shape == want[name].shape, f"{where}: {name} shape {tuple(full.shape)}"
        assert full.dtype == single[name].dtype, f"{where}: {name} dtype {full.dtype} != {single[name].dtype}"
        e = _err(full.to(F64), want[name])
        if case.dtype == "float64":
            assert e <= TOL, f"{where}: {name} differs from the fp64 oracle by {e:.3g} (> {TOL})"
            e1 = _err(full, single[name])
            assert e1 <= TOL, f"{where}: {name} differs from single-device jvp_attention by {e1:.3g}"
        else:
            tol = case.rel_single * _err(single[name].to(F64), want[name]) + case.floor
            assert e <= tol, f"{where}: {name} error {e:.3g} vs the fp64 oracle exceeds {case.rel_single} × " \
                             f"single-device ({tol:.3g})"


def test_no_tangent_gives_none(world):
    _, _, ranks = world
    assert all(rk["ring-no-tangent"]["to"] is None and rk["ring-no-tangent"]["dlse"] is None for rk in ranks)


def test_mask_view_on_one_rank(world):
    """Ranks whose masks have the same shape and values agree, whatever their strides."""
    W, _, ranks = world
    for r, rk in enumerate(ranks):
        got = rk["extras"]["mask_view_one_rank_equal"]
        assert got is True, f"W={W} rank {r}: {got}"


def test_zigzag_helpers(world):
    W, _, ranks = world
    for r, rk in enumerate(ranks):
        assert rk["extras"]["zigzag_shard_ok"], f"W={W} rank {r}: zigzag_shard picked the wrong chunks"
        assert rk["extras"]["zigzag_roundtrip_ok"], f"W={W} rank {r}: zigzag_unshard(zigzag_shard(x)) != x"
        assert rk["extras"]["check_off_equal"], f"W={W} rank {r}: check=False changed the result"
        assert rk["extras"]["zigzag_grad_ok"], f"W={W} rank {r}: gradient of zigzag_unshard"
        assert rk["extras"]["unshard_usable"] is True, f"W={W} rank {r}: zigzag_unshard after the errors"
        assert rk["extras"]["unshard_check_off_equal"], f"W={W} rank {r}: zigzag_unshard check=False"


@pytest.mark.parametrize("key, exc, words", [
    ("err_ulysses_heads", "ValueError", "q: mode='ulysses'"),
    ("err_causal_lengths", "ValueError", "q, k: causal"),
    ("err_zigzag_odd", "ValueError", "even"),
    ("err_zigzag_size", "ValueError", "x: size 3"),
    ("err_zigzag_size_w", "ValueError", "is not a multiple of 2 × world size"),
    ("err_zigzag_dim", "ValueError", "dim: -5 is out of range for a 4-D tensor"),
    ("err_ulysses_kv_heads", "ValueError", "k: mode='ulysses' spreads the heads over the group: 1 heads"),
    ("err_dual_and_tangents", "ValueError", "tq, tk, tv: q/k/v already carry forward-AD tangents"),
    ("err_mode", "ValueError", "mode:"),
    ("err_group", "TypeError", "group:"),
    ("err_scale_str", "TypeError", "scale: expected a float, got str"),
    ("err_return_lse_str", "TypeError", "return_lse: expected a bool"),
    ("err_check_str", "TypeError", "check: expected a bool"),
    ("err_layout", "ValueError", "layout: expected one of"),
    ("err_gqa_ratio", "ValueError", "k: the number of query heads"),
    ("err_tq_shape", "ValueError", "tq: shape"),
    ("err_key_mask_len", "ValueError", "key_mask: shape (5,)"),
    ("err_key_mask_grad", "ValueError", "key_mask: a float mask that requires grad"),
    ("err_mask_dtype_one_rank", "ValueError", "'torch.bool', 'torch.float32'] on ranks 0.."),
    ("err_mask_one_rank_only", "ValueError", "'torch.bool', 'None'] on ranks 0.."),
    ("err_mask_len_one_rank", "ValueError", "key_mask: shape (5,)"),
    ("err_check_str_one_rank", "TypeError", "check: expected a bool"),
    ("err_not_member", "ValueError", "group: this process (global rank 1) is not a member"),
    ("err_ranks_differ", "ValueError", "q: local sequence length differs between the ranks"),
    ("err_stop_gradient", "RuntimeError", "stop-gradient"),
    ("err_stop_gradient_func", "RuntimeError", "stop-gradient"),
    ("err_stop_gradient_dual", "RuntimeError", "stop-gradient"),
    ("func_primal_backward", "no error", ""),
    ("err_double_backward", "RuntimeError", "double backward is not supported"),
    ("err_after_agreed_call", "ValueError", "q: local sequence length differs between the ranks"),
    ("err_scale_one_rank", "ValueError", "scale differs between the ranks"),
    ("err_scale_one_rank", "ValueError", "0.3] on ranks 0.."),  # the values, not the float64's bits
    ("err_mode_one_rank", "ValueError", "'ring', 'ulysses'] on ranks 0.."),
    ("err_dtype_one_rank", "ValueError", "'torch.float64', 'torch.float32']"),
    ("err_requires_grad_one_rank", "ValueError", "requires_grad (grad mode on and q, k, v or a tangent requiring "
                                                  "grad) differs"),
    ("err_tangent_requires_grad_one_rank", "ValueError", "requires_grad (grad mode on and q, k, v or a tangent"),
    ("err_stop_gradient_dual_returned", "RuntimeError", "stop-gradient"),
    ("err_stop_gradient_tangent_grad", "RuntimeError", "stop-gradient"),
    ("err_zigzag_odd_one_rank", "ValueError", "q, k: zigzag shards hold two equal chunks"),
    ("err_mode_check_off", "ValueError", "mode"),
    ("err_dual_tangent_dtype", "ValueError", "tangent_dtype: under torch.func.jvp"),
    ("err_ulysses_heads_one_rank", "ValueError", "q: mode='ulysses'"),
    ("err_causal_lengths_one_rank", "ValueError", "q, k: causal"),
    ("err_tangent_dtype_one_rank", "TypeError", "tq: dtype"),
    ("err_unshard_odd_one_rank", "ValueError", "x_shard: size 5 of dim 1 must be even"),
    ("err_unshard_len_one_rank", "ValueError", "x_shard.shape[1] differs between the ranks"),
    ("err_unshard_dtype_one_rank", "ValueError", "x_shard.dtype differs between the ranks"),
    ("err_unshard_dim_one_rank", "ValueError", "dim differs between the ranks"),
])
def test_errors(world, key, exc, words):
    W, _, ranks = world
    for r, rk in enumerate(ranks):
        msg = rk["extras"].get(key) if key == "err_not_member" else rk["extras"][key]  # (W = 2 only)
        if msg in ("skipped", None):
            continue
        assert msg.startswith(exc) and words in msg, f"W={W} rank {r}: {key}: expected {exc} with {words!r}, got {msg}"


def test_autocast_as_jvp_attention(world):
    W, _, ranks = world
    assert all(rk["extras"]["autocast_as_jvp_attention"] for rk in ranks)


def test_group_of_one_is_the_single_device_op(world):
    W, _, ranks = world
    if W != 2:
        pytest.skip("checked in the 2-process world")
    assert all(rk["extras"]["group1_equal"] for rk in ranks)


@pytest.mark.parametrize("key", ["err_zigzag_odd_one_rank", "err_ulysses_heads_one_rank",
                                 "err_causal_lengths_one_rank", "err_tangent_dtype_one_rank",
                                 "err_unshard_odd_one_rank", "err_check_str_one_rank", "err_mask_len_one_rank"])
def test_local_error_of_one_rank_raised_on_every_rank(world, key):
    """Only the last rank's arguments are bad: it raises its own error, the others its message naming it."""
    W, _, ranks = world
    own = ranks[W - 1]["extras"][key]
    assert "context-parallel group" not in own, f"W={W}: the failing rank's own error was rewritten: {own}"
    for r in range(W - 1):
        msg = ranks[r]["extras"][key]
        assert msg.startswith(own) and f"rank {W - 1} of the context-parallel group" in msg, \
            f"W={W} rank {r}: {key}: expected the message of rank {W - 1}, got {msg}"


def test_local_errors_of_two_ranks(world):
    """Ranks 0 and W − 1 fail their local checks with different errors: each raises its own, and every other rank the
    first failing rank's (rank 0's) message, naming both."""
    W, _, ranks = world
    zig, uly = ranks[0]["extras"]["err_two_ranks"], ranks[W - 1]["extras"]["err_two_ranks"]
    assert zig.startswith("ValueError: q, k: zigzag shards") and "context-parallel group" not in zig, zig
    assert uly.startswith("ValueError: q: mode='ulysses'") and "context-parallel group" not in uly, uly
    for r in range(1, W - 1):
        msg = ranks[r]["extras"]["err_two_ranks"]
        assert msg.startswith(zig) and f"ranks [0, {W - 1}] of the context-parallel group" in msg, (r, msg)


@pytest.mark.parametrize("key", ["usable_after_mismatch", "usable_after_local_errors"])
def test_group_usable_after_the_errors(world, key):
    """After errors raised on every rank, no collective is left pending: the next agreed call runs."""
    W, _, ranks = world
    for r, rk in enumerate(ranks):
        assert rk["extras"][key] is True, f"W={W} rank {r}: {key}: {rk['extras'][key]}"
