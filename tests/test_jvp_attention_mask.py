"""fastdistill.jvp_attention's ``key_mask`` (a key-padding mask: bool, or an additive float bias per key) against the
float64 oracle of test_jvp_attention.py (its math attention adds the bias after the scale) and against
``torch.func.jvp`` / autograd of stock math SDPA with the same ``attn_mask`` in float64.

Each case runs on every CPU backend (reference; Triton through its interpreter when TRITON_INTERPRET=1) under the
tolerance rule of test_jvp_attention.py (twice the error of plain PyTorch in the input dtype). Masks: bool and
float, broadcast over batch / heads (stride 0, never copied) and per head, GQA / MQA, causal together with a key
mask, Sq != Sk, odd lengths (1, 17, 130: masked tails), rows whose every key is masked, −inf and large finite
biases (−1e4 as diffusers builds them, finfo(dtype).min as transformers does), fp32 / fp16 / bf16.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from test_jvp_attention import (
    BF16,
    F16,
    F32,
    F64,
    NEG_INF,
    Case,
    check,
    make_inputs,
    oracle,
    rel_err,
    run_case,
    upstream,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastdistill as fd

SHAPES = {  # the mask's shape, as the caller passes it (1: broadcast)
    "b11k": lambda B, H, Sq, Sk: (B, 1, 1, Sk),  # a key-padding mask, as diffusers / HunyuanVideo build it
    "bhk": lambda B, H, Sq, Sk: (B, H, Sk),  # per head
    "1h1k": lambda B, H, Sq, Sk: (1, H, 1, Sk),
    "k": lambda B, H, Sq, Sk: (Sk,),
    "expanded": lambda B, H, Sq, Sk: (B, 1, 1, Sk),  # then .expand(B, H, Sq, Sk): stride 0 along heads and queries
}


@dataclasses.dataclass(frozen=True)
class MaskCase:
    case: Case
    kind: str = "bool"  # bool | float (random bias, −inf masked) | finfo (0 / finfo(dtype).min) | big (0 / −1e4)
    shape: str = "b11k"
    empty: bool = False  # the last batch element (or the first mask row) has every key masked

    @property
    def id(self) -> str:
        return f"{self.case.id}-{self.kind}-{self.shape}" + ("-empty" if self.empty else "")


def make_mask(mc: MaskCase, seed: int = 0):
    """(key_mask as passed, its [B, Hq, Sk] float64 bias for the oracle). Kept keys: a random prefix of each mask
    row (a padded tail), at least one key unless ``empty``; float kinds in q's dtype (SDPA's attn_mask rule)."""
    c = mc.case
    shape = SHAPES[mc.shape](c.B, c.Hq, c.Sq, c.sk)
    g = torch.Generator().manual_seed(500 + seed)
    rows = torch.Size(shape[:-1]).numel()
    lens = torch.randint(1, c.sk + 1, (rows,), generator=g)
    if mc.empty:
        lens[-1] = 0
    keep = (torch.arange(c.sk)[None, :] < lens[:, None]).reshape(shape)
    if mc.kind == "bool":
        mask = keep
        bias = torch.where(keep, 0.0, NEG_INF).double()
    else:
        dt = c.dtype
        if mc.kind == "float":
            val = (torch.rand(shape, generator=g, dtype=F64) * 4 - 3).to(dt)
            mask = torch.where(keep, val, torch.tensor(NEG_INF, dtype=dt))
        else:
            fill = torch.finfo(dt).min if mc.kind == "finfo" else -1e4
            mask = torch.where(keep, 0.0, torch.tensor(fill, dtype=dt))  # (finfo(float64).min overflows float32)
        bias = mask.double()
    if mc.shape == "expanded":
        mask = mask.expand(c.B, c.Hq, c.Sq, c.sk)
    if bias.dim() == 4:
        bias = bias.squeeze(2)
    return mask, bias.expand(c.B, c.Hq, c.sk)


FWD = [
    MaskCase(Case(17, 19, B=2, D=32), "bool", "b11k", empty=True),
    MaskCase(Case(1, 17, B=2, D=32), "float", "bhk"),  # one query row
    MaskCase(Case(130, D=64, causal=True), "bool", "b11k"),  # causal and a key mask; 130: masked tails
    MaskCase(Case(17, 130, Hq=4, Hkv=2, D=32, dtype=F16), "float", "1h1k"),  # GQA
    MaskCase(Case(130, 17, Hq=4, Hkv=1, D=64, dtype=BF16, causal=True), "bool", "bhk", empty=True),  # MQA
    MaskCase(Case(17, B=2, D=32, layout="bhsd"), "finfo", "expanded", empty=True),
    MaskCase(Case(17, 40, B=2, D=32, dtype=BF16), "finfo", "b11k", empty=True),  # a row of finfo.min only
    MaskCase(Case(17, 40, B=2, D=64, dtype=F16), "big", "k"),
    MaskCase(Case(17, 40, B=2, D=32, dtype=F16), "big", "b11k", empty=True),
    MaskCase(Case(17, 40, D=32, tangents="q", causal=True), "float", "b11k"),
    MaskCase(Case(40, 17, D=32, tangents="v", dtype=F16), "bool", "bhk", empty=True),
    MaskCase(Case(40, 17, D=32, tangents="none"), "float", "b11k", empty=True),
    MaskCase(Case(17, 40, D=32, Dv=16, logits=30.0, dtype=F16), "float", "bhk"),
    MaskCase(Case(40, D=32, strides="packed", tangent_dtype=F32, dtype=BF16), "bool", "b11k"),
]

BWD = [
    MaskCase(Case(17, 19, B=2, D=32, bwd=True), "bool", "b11k", empty=True),
    MaskCase(Case(130, D=32, causal=True, bwd=True), "float", "bhk"),
    MaskCase(Case(17, 130, Hq=4, Hkv=2, D=32, dtype=F16, bwd=True), "bool", "1h1k"),
    MaskCase(Case(130, 17, Hq=2, Hkv=1, D=64, dtype=BF16, causal=True, bwd=True), "float", "bhk", empty=True),
    MaskCase(Case(17, 40, B=2, D=32, bwd=True), "finfo", "b11k", empty=True),  # P = 1/n from lse + its low word
    MaskCase(Case(17, 40, B=2, D=32, dtype=BF16, bwd=True), "finfo", "expanded", empty=True),
    MaskCase(Case(17, 40, B=2, D=32, dtype=F16, bwd=True), "big", "b11k", empty=True),
]


def run_mask_case(mc: MaskCase) -> dict:
    mask, bias = make_mask(mc)
    return run_case(mc.case, key_mask=mask, bias=bias)


@pytest.mark.parametrize("mc", FWD, ids=lambda m: m.id)
def test_forward_tangent(use, mc):
    run_mask_case(mc)


@pytest.mark.parametrize("mc", BWD, ids=lambda m: m.id)
def test_backward(use, mc):
    run_mask_case(mc)


@pytest.mark.parametrize("mc", [FWD[4], BWD[3], BWD[5]], ids=lambda m: m.id)
def test_two_pass_schedule(backend, monkeypatch, mc):
    """fp16 / bf16 take the fused pass by default: the key mask through the two_pass schedule (its arg-max shift
    kernel reads the bias of each row's arg-max key) too."""
    if backend != "triton":
        pytest.skip("FASTDISTILL_ATTN_JVP selects a Triton schedule")
    monkeypatch.setenv("FASTDISTILL_ATTN_JVP", "two_pass")
    with fd.use_backend("triton"):
        run_mask_case(mc)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows(use, kind):
    """A row whose every key is masked (False / −inf) sees no key: o = 0, to = 0, lse = −inf, dlse = 0 and a zero
    gradient of its query, exactly, and nothing non-finite anywhere (stock math SDPA gives 0 there too in torch 2.13:
    test_matches_stock_math_sdpa)."""
    for mc in (MaskCase(Case(17, 19, B=2, Hq=4, Hkv=2, D=32, bwd=True), kind, "bhk", empty=True),
               MaskCase(Case(9, 19, B=2, D=32, dtype=F16, causal=True, bwd=True), kind, "b11k", empty=True)):
        out = run_mask_case(mc)
        c = mc.case
        dead = torch.isneginf(make_mask(mc)[1]).all(-1)  # [B, Hq]
        assert dead.any()
        for name in ("o", "to", "dq"):
            x = out[name].transpose(1, 2)  # [B, H, S, D]
            assert (x[dead] == 0).all(), name
            assert torch.isfinite(out[name]).all(), name
        assert torch.isneginf(out["lse"][dead]).all() and (out["dlse"][dead] == 0).all()
        assert torch.isfinite(out["lse"][~dead]).all()
        for name in ("dk", "dv", "dlse"):
            assert torch.isfinite(out[name]).all(), name
        assert c.B * c.Hq > dead.sum()


# ----------------------------------------------------------------------------- stock SDPA as the oracle
def _sdpa_fn(mask, causal, scale, G):
    """Stock math SDPA on [B, H, S, D] with ``mask`` ([B, Hq, 1, Sk]-broadcastable), bottom-right causal folded into
    the mask (SDPA's own is_causal is top-left and refuses an attn_mask)."""
    def f(q, k, v):
        m = mask
        if causal:
            Sq, Sk = q.shape[2], k.shape[2]
            ok = torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + (Sk - Sq)
            m = (m & ok) if m.dtype == torch.bool else m.to(q.dtype) + torch.where(ok, 0.0, NEG_INF).to(q.dtype)
        elif m.dtype != torch.bool:
            m = m.to(q.dtype)
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=G > 1)
    return f


@pytest.mark.parametrize("mc", [
    MaskCase(Case(17, 19, B=2, Hq=4, Hkv=2, D=32), "bool", "bhk", empty=True),
    MaskCase(Case(17, 40, B=2, D=32, causal=True), "float", "b11k", empty=True),
    MaskCase(Case(9, 40, B=2, D=16), "finfo", "b11k", empty=True),  # a finfo.min row: uniform, as stock
], ids=lambda m: m.id)
def test_matches_stock_math_sdpa(use, mc):
    """o, its tangent, dq, dk, dv against torch.func.jvp / autograd of stock math SDPA with the same attn_mask in
    float64; the error of the fp32 call at most twice that of stock SDPA in fp32 plus 1e-6. Rows whose every key is
    masked: 0 in both (stock math SDPA's convention in torch 2.13, for bool and −inf masks alike)."""
    c = mc.case
    mask, _ = make_mask(mc)
    (q, k, v, tq, tk, tv), exact_in = make_inputs(c)  # bshd, fp32
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o, to = fd.jvp_attention(q, k, v, tq, tk, tv, causal=c.causal, key_mask=mask)
    go, _ = upstream(c, o.dtype)
    grads = torch.autograd.grad(o, [q, k, v], go.transpose(1, 2))
    m4 = mask if mask.dim() == 4 else mask.unsqueeze(-2)
    f = _sdpa_fn(m4, c.causal, 1 / math.sqrt(c.D), c.Hq // c.hkv)
    ref = {}
    for dt in (F64, F32):
        prim = [x.detach().to(dt).requires_grad_() for x in exact_in[:3]]
        ro, rto = torch.func.jvp(f, tuple(prim), tuple(x.to(dt) for x in exact_in[3:]))
        ref[dt] = dict(o=ro, to=rto, **dict(zip(("dq", "dk", "dv"), torch.autograd.grad(f(*prim), prim, go.to(dt)))))
    got = dict(o=o, to=to, dq=grads[0], dk=grads[1], dv=grads[2])
    for name, x in got.items():
        check(name, x.transpose(1, 2), ref[F64][name], ref[F32][name])
    bias = make_mask(mc)[1]
    dead = (bias == bias.min()).all(-1)  # [B, Hq]: every key masked (−inf or finfo.min)
    assert dead.any()
    if mc.kind != "finfo":
        assert (ref[F64]["o"][dead] == 0).all() and (o.transpose(1, 2)[dead] == 0).all()
    else:  # finfo.min on every key of a row: every score rounds to it, uniform weights (stock's result too)
        mean = exact_in[2].double().mean(2, keepdim=True).expand_as(ref[F64]["o"])
        assert torch.allclose(ref[F64]["o"][dead], mean[dead]) and torch.allclose(o.transpose(1, 2)[dead].double(),
                                                                                   mean[dead], atol=1e-6)


def test_reference_fp64_equals_stock_sdpa():
    """The reference backend in float64 with a key mask equals stock math SDPA in float64 to rounding (o, tangent,
    gradients), bool and float masks, GQA, causal; finfo: a row whose every key is at finfo(float64).min (uniform
    weights; before, float64 had no low word of lse: P = exp(S − lse) = 1 in the backward, gradients n times too
    large)."""
    c = Case(17, 23, B=2, Hq=4, Hkv=2, D=16, dtype=F64, causal=True)
    for kind in ("bool", "float", "finfo"):
        mask, _ = make_mask(MaskCase(c, kind, "bhk", empty=True))
        (q, k, v, tq, tk, tv), exact_in = make_inputs(c)
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        with fd.use_backend("reference"):
            o, to = fd.jvp_attention(q, k, v, tq, tk, tv, causal=True, key_mask=mask)
        go = torch.randn(o.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
        grads = torch.autograd.grad(o, [q, k, v], go)
        f = _sdpa_fn(mask.unsqueeze(-2), True, 1 / math.sqrt(c.D), 2)
        prim = [x.detach().requires_grad_() for x in exact_in[:3]]
        ro, rto = torch.func.jvp(f, tuple(prim), tuple(exact_in[3:]))
        rg = torch.autograd.grad(f(*prim), prim, go.transpose(1, 2))
        for name, a, b in zip(("o", "to", "dq", "dk", "dv"), (o, to, *grads), (ro, rto, *rg)):
            assert rel_err(a.transpose(1, 2), b) < 1e-12, (kind, name)


# ----------------------------------------------------------------------------- merging key shards, API
def test_merge_key_shards(use):
    """DESIGN.md's merge identity with the key mask sliced with the keys (one shard fully masked for some rows: its
    lse is −inf there and its weight 0)."""
    from test_jvp_attention import merge

    g = torch.Generator().manual_seed(7)
    split = (20, 30, 50)
    Sk = sum(split)
    q, tq = (torch.randn(2, 29, 4, 32, generator=g) for _ in range(2))
    k, v, tk, tv = (torch.randn(2, Sk, 2, 32, generator=g) for _ in range(4))
    mask = torch.rand(2, 4, Sk, generator=g) > 0.5
    mask[0, :, :20] = False  # the first shard hides every key of batch 0
    mask[:, :, 60] = True  # every row sees a key
    full = fd.jvp_attention(q, k, v, tq, tk, tv, return_lse=True, key_mask=mask)
    parts, i0 = [], 0
    for n in split:
        sl = slice(i0, i0 + n)
        parts.append(fd.jvp_attention(q, k[:, sl], v[:, sl], tq, tk[:, sl], tv[:, sl], return_lse=True,
                                      key_mask=mask[:, :, sl]))
        i0 += n
    assert torch.isneginf(parts[0][2][0]).all()
    for name, a, b in zip(("o", "to", "lse", "dlse"), merge(parts), full):
        err = rel_err(a, b)
        assert err <= 2e-6, f"{name}: merged vs full relative error {err:.2e}"


def test_forward_ad_and_explicit_pairs_agree(use):
    """torch.func.jvp and dual tensors with a key mask give the explicit-pairs results bitwise (one fused pass)."""
    (q, k, v, tq, tk, tv), _ = make_inputs(Case(17, 23, Hq=4, Hkv=2, D=32))
    mask = torch.rand(1, 1, 1, 23, generator=torch.Generator().manual_seed(1)) > 0.3
    o, to = fd.jvp_attention(q, k, v, tq, tk, tv, key_mask=mask)
    o2, to2 = torch.func.jvp(lambda q, k, v: fd.jvp_attention(q, k, v, key_mask=mask)[0], (q, k, v), (tq, tk, tv))
    with fwAD.dual_level():
        o3 = fd.jvp_attention(*(fwAD.make_dual(x, t) for x, t in ((q, tq), (k, tk), (v, tv))), key_mask=mask)[0]
        o3, to3 = fwAD.unpack_dual(o3)
    for a, b in ((o2, o), (to2, to), (o3, o), (to3, to)):
        assert torch.equal(a, b)
    assert not torch.equal(o, fd.jvp_attention(q, k, v)[0])  # the mask matters


def test_broadcast_mask_is_not_copied(backend, monkeypatch):
    """A broadcast key mask reaches the backend as a stride-0 view of the caller's storage (bool and float alike):
    never materialised per head or query."""
    from fastdistill.ops import jvp_attention as op

    seen = []
    real = op._impl(backend).attn_fwd

    def spy(*a, **kw):
        seen.append(kw.get("key_bias"))
        return real(*a, **kw)

    monkeypatch.setattr(op._impl(backend), "attn_fwd", spy)
    (q, k, v, tq, *_), _ = make_inputs(Case(9, 11, B=2, Hq=4, Hkv=2, D=16))
    base = torch.rand(2, 1, 1, 11, generator=torch.Generator().manual_seed(2))
    for mask in (base > 0.3, torch.where(base > 0.3, 0.0, NEG_INF), (base > 0.3).expand(2, 4, 9, 11)):
        with fd.use_backend(backend):
            fd.jvp_attention(q, k, v, tq, key_mask=mask)
        kb = seen[-1]
        assert kb.shape == (2, 4, 11) and kb.stride(1) == 0
        assert kb.untyped_storage().data_ptr() == mask.untyped_storage().data_ptr()


def test_key_mask_errors():
    q, k, v = (torch.randn(2, 5, 4, 8) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]  # GQA 4 / 2, Sk = 5
    cases = [
        ("a list", [True] * 5, TypeError, "key_mask: expected a torch.Tensor"),
        ("int", torch.ones(2, 1, 1, 5, dtype=torch.int64), TypeError, "key_mask: expected bool .* or a float dtype"),
        ("wrong keys", torch.ones(2, 1, 1, 6, dtype=torch.bool), ValueError, r"key_mask: shape \(2, 1, 1, 6\)"),
        ("wrong batch", torch.ones(3, 1, 5, dtype=torch.bool), ValueError, r"key_mask: shape \(3, 1, 5\)"),
        ("kv heads", torch.ones(1, 2, 5, dtype=torch.bool), ValueError, r"key_mask: shape \(1, 2, 5\)"),
        ("2-D", torch.ones(2, 5, dtype=torch.bool), ValueError, "2-D is ambiguous"),
        ("query dim", torch.ones(2, 1, 5, 5, dtype=torch.bool), ValueError, "varies along the query dimension"),
        ("expanded to another query count", torch.ones(2, 1, 1, 5, dtype=torch.bool).expand(2, 1, 6, 5), ValueError,
         r"key_mask: shape \(2, 1, 6, 5\)"),
        ("requires grad", torch.zeros(2, 1, 1, 5, requires_grad=True), ValueError, "requires grad"),
        ("device", torch.zeros(2, 1, 1, 5, device="meta"), ValueError, "key_mask: device meta"),
        # SDPA's rule (bool, float32 or q's dtype): a float64 bias on float32 inputs was rounded to float32 by both
        # backends, −1e300 to −inf: a row of such keys saw no key (o = 0) where SDPA's semantics average its values
        ("float64 on float32", torch.full((2, 1, 1, 5), -1e300, dtype=torch.float64), TypeError,
         "key_mask: a float mask must be float32 or q's dtype"),
        ("float16 on bfloat16", torch.zeros(2, 1, 1, 5, dtype=torch.float16), TypeError, "must be float32 or"),
    ]
    for what, m, exc, msg in cases:
        a = (x.bfloat16() for x in (q, k, v)) if what == "float16 on bfloat16" else (q, k, v)
        with pytest.raises(exc, match=msg):
            fd.jvp_attention(*a, key_mask=m)
    with pytest.raises(ValueError, match="key_mask: carries a forward-AD tangent"):
        torch.func.jvp(lambda b: fd.jvp_attention(q, k, v, key_mask=b)[0], (torch.zeros(2, 1, 1, 5),),
                       (torch.ones(2, 1, 1, 5),))
    # accepted: a size-1 query dim, a stride-0 query dim of size Sq, [Sk], a float mask that needs no gradient
    for m in (torch.ones(1, 1, 1, 5, dtype=torch.bool), torch.zeros(2, 4, 1, 5).expand(2, 4, 5, 5),
              torch.zeros(5), torch.zeros(2, 1, 1, 5, requires_grad=True).detach()):
        assert torch.isfinite(fd.jvp_attention(q, k, v, key_mask=m)[0]).all()
    # a float32 mask on fp16 inputs (SDPA's rule), a float64 one on float64 inputs, and under autocast a float16
    # mask of float32 inputs (cast with them, as stock SDPA's)
    assert torch.isfinite(fd.jvp_attention(q.half(), k.half(), v.half(), key_mask=torch.zeros(5))[0]).all()
    assert torch.isfinite(fd.jvp_attention(q.double(), k.double(), v.double(),
                                           key_mask=torch.zeros(5, dtype=torch.float64))[0]).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fd.jvp_attention(q, k, v, key_mask=torch.zeros(5, dtype=torch.float16))[0].dtype == torch.bfloat16


@pytest.mark.parametrize("variant", ["bool-bshd", "float-bhsd-tangents"])
def test_opcheck(use, variant):
    """The custom ops with a key mask (their schema's ``key_bias``: a [B, Hq, Sk] view, stride 0 where broadcast)."""
    from fastdistill.ops import jvp_attention as op

    (q, k, v, tq, tk, tv), _ = make_inputs(Case(5, 7, Hq=2, Hkv=1, D=8, Dv=4))
    lay, want_t = 0, True
    mask = torch.tensor([True, False, True, True, False, True, False]).view(1, 1, 1, 7)
    if variant.startswith("float"):
        q, k, v, tq, tk, tv = (x.transpose(1, 2) for x in (q, k, v, tq, tk, tv))
        lay, mask = 1, torch.where(mask, torch.rand(1, 1, 1, 7) - 0.5, NEG_INF)
    tans = (tq, tk, tv)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    kb = op._key_bias(mask, q, k, lay)
    args = (True, 0.3, lay, want_t, 0, use, kb)
    torch.library.opcheck(torch.ops.fastdistill.jvp_attn_fwd.default, (q, k, v, *tans, *args))
    with torch.no_grad():
        o, _, lse, _, lo = torch.ops.fastdistill.jvp_attn_fwd(q, k, v, *tans, *args)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(21))
    torch.library.opcheck(torch.ops.fastdistill.jvp_attn_bwd.default,
                          (do, q.detach(), k.detach(), v.detach(), o, lse, lo, None, True, 0.3, lay, use, kb))


def test_compile(use):
    """torch.compile(fullgraph=True): plain attention and explicit pairs with a key mask trace into one graph (the
    custom op), and torch.func.jvp inside the compiled function (math attention in the graph) takes the mask too;
    all equal to eager."""
    torch._dynamo.reset()
    (q, k, v, tq, tk, tv), _ = make_inputs(Case(9, 13, Hq=4, Hkv=2, D=16))
    mask = torch.rand(1, 4, 1, 13, generator=torch.Generator().manual_seed(4)) > 0.4
    fmask = torch.where(mask, 0.5, NEG_INF)

    def f(q, k, v, tq, tk, tv, m):
        o, to = fd.jvp_attention(q, k, v, tq, tk, tv, key_mask=m)
        return o * 2, to

    def g(q, m):
        return torch.func.jvp(lambda q: fd.jvp_attention(q, k, v, key_mask=m)[0], (q,), (tq,))

    for m in (mask, fmask):
        want = f(q, k, v, tq, tk, tv, m)
        got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, tq, tk, tv, m)
        got2 = torch.compile(g, backend="aot_eager", fullgraph=True)(q, m)
        want2 = g(q, m)
        for a, b in zip((*got, *got2), (*want, *want2)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["fused", "two_pass"])
@pytest.mark.parametrize("dtype, tangents, sink", [(F16, "qk", 18.0), (F16, "qkv", 22.0), (F32, "qk", 18.0)],
                         ids=["fp16-qk", "fp16-qkv", "fp32-qk"])
def test_key_dominated_by_its_bias(backend, monkeypatch, dtype, tangents, sink, mode):
    """One key carries almost all of each row's weight through its bias (``sink``: 1 − P down to ~1e-6 in the last key
    block; an attention sink made by the mask): the tangent's shift c = P·Ṡ of the row's arg-max key must see the bias
    (two_pass forms it in a kernel of its own from the key's logit plus its bias), or Ȯ keeps the rounding of the
    |Ṡ|·|v| terms that cancel (docs/jvp_attention.md, "One key, or one dominant key, per row"). With the bias left
    out of that kernel: fp16 Ȯ 18x / 5e-4 against tolerances of 1.9 / 2e-6, fp32 6.5e-3 (held to 1e-5 here: plain
    fp32 torch.func.jvp loses those digits too, 8e-3, so the rule alone would pass it); with it 7.8e-3, 5e-7, 4e-7."""
    if mode == "two_pass" and backend != "triton":
        pytest.skip("FASTDISTILL_ATTN_JVP selects a Triton schedule")
    monkeypatch.setenv("FASTDISTILL_ATTN_JVP", mode)
    c = Case(5, 130, D=32, dtype=dtype, tangents=tangents)
    (q, k, v, tq, tk, tv), exact_in = make_inputs(c)
    bias = torch.zeros(1, 2, 130, dtype=dtype)
    bias[..., -1] = sink
    with fd.use_backend(backend):
        o, to, lse, dlse = fd.jvp_attention(q, k, v, tq, tk, tv, return_lse=True, key_mask=bias)
    b64 = bias.double()
    exact, plain = oracle(*exact_in, bias=b64), oracle(*exact_in, dtype=dtype, bias=b64)
    scores = exact_in[0].double() @ exact_in[1].double().transpose(-1, -2) / math.sqrt(32) + b64[..., None, :]
    assert torch.softmax(scores, -1)[..., -1].min() > 0.999, "the construction must make one key dominate"
    for name, x in (("o", o), ("to", to), ("lse", lse), ("dlse", dlse)):
        check(name, x if x.dim() == 3 else x.transpose(1, 2), exact[name], plain[name])
    if dtype == F32:
        assert rel_err(to.transpose(1, 2), exact["to"]) < 1e-5
