"""fastdistill.integrations.jvp_sdpa / patch_sdpa: SDPA served by fastdistill for unmodified code.

Oracle: ``torch.func.jvp`` of stock SDPA restricted to its math backend (the only SDPA backend with
forward-mode AD) in float64. Every test that expects fastdistill to serve a call also checks
``sdpa_stats()``, so a silent fallback to stock SDPA cannot make a test pass. CPU tier: the reference
backend serves fp64; one fp32 case runs the Triton kernels through the interpreter.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastdistill
from fastdistill.integrations import jvp_sdpa, patch_sdpa, sdpa_stats, unpatch_sdpa
from fastdistill.integrations import sdpa as _sdpa_mod
from fastdistill.integrations.sdpa import PLAIN

F64 = torch.float64
STOCK = F.scaled_dot_product_attention  # captured at import: nothing may be patched at import time
# PyTorch limitations of torch < 2.13 (2.11 checked, 2.12 not): torch.func.jvp through a non-reentrant
# torch.utils.checkpoint block raises (its _NoopSaveInputs has no jvp), and through an FSDP2 module too (its
# unshard reads the storage of functorch's TensorWrapper), with stock math SDPA as with fastdistill
OLD_TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13)


@pytest.fixture(autouse=True)
def _clean():
    sdpa_stats(reset=True)
    _sdpa_mod._warned.clear()
    yield
    assert F.scaled_dot_product_attention is STOCK, "a test left SDPA patched"


def _math_jvp(f, primals, tangents):
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(f, primals, tangents)


def _close(a, b, tol=1e-10, what=""):
    a, b = a.detach().double(), b.detach().double()
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() if b.numel() else 0.0
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def _qkv(shape_q, shape_k, dv=None, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape_v = (*shape_k[:-1], dv or shape_k[-1])
    return [torch.randn(s, generator=g, dtype=dtype) for s in (shape_q, shape_k, shape_v, shape_q, shape_k, shape_v)]


def test_nothing_patched_at_import():
    import importlib

    importlib.reload(fastdistill.integrations)
    assert F.scaled_dot_product_attention is STOCK
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


CASES = {
    # name: (q shape, k shape, dv, sdpa kwargs)
    "bhsd": ((2, 3, 9, 16), (2, 3, 9, 16), None, {}),
    "causal": ((2, 3, 9, 16), (2, 3, 9, 16), None, {"is_causal": True}),
    "gqa-causal": ((2, 4, 7, 8), (2, 2, 7, 8), None, {"is_causal": True, "enable_gqa": True}),
    "cross-Sq!=Sk": ((1, 2, 5, 8), (1, 2, 11, 8), None, {}),
    "Dv!=Dqk+scale": ((1, 2, 6, 8), (1, 2, 6, 8), 12, {"scale": 0.3}),
    "3d": ((3, 7, 8), (3, 5, 8), None, {}),
    "5d": ((2, 2, 2, 5, 8), (2, 2, 2, 5, 8), None, {"is_causal": True}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_jvp_and_primal_grad_match_math_sdpa(name):
    sq, sk, dv, kw = CASES[name]
    q, k, v, tq, tk, tv = _qkv(sq, sk, dv)
    w = torch.randn(*sq[:-1], dv or sk[-1], dtype=F64)
    f = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw)
    _served_equals_math(name, f, (q, k, v), (tq, tk, tv), w)


def _served_equals_math(name, f, prim, tans, w) -> list:
    """torch.func.jvp of ``f`` under stock math SDPA and under jvp_sdpa() (one fused call, no fastdistill warning),
    each followed by a backward through the primal (the MeanFlow pattern): o, to, dq, dk, dv equal. Returns both
    runs' (o, to, dq, dk, dv), math first."""
    results = []
    for served in (False, True):
        leaves = tuple(x.clone().requires_grad_() for x in prim)
        if not served:
            o, to = _math_jvp(f, leaves, tans)
        else:
            with jvp_sdpa(), warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                o, to = torch.func.jvp(f, leaves, tans)
            assert not [m for m in seen if "fastdistill" in str(m.message)]
        (o * w).sum().backward()
        results.append((o, to, *(x.grad for x in leaves)))
    assert sdpa_stats() == {"jvp": 1}, sdpa_stats()
    for what, a, b in zip(("o", "to", "dq", "dk", "dv"), results[1], results[0]):
        _close(a, b, what=f"{name} {what}")
    return results


def test_dual_tensors_and_partial_tangents():
    """forward_ad dual tensors; the key/value (frozen context) carry no tangent."""
    import torch.autograd.forward_ad as fwAD

    q, k, v, tq, _, _ = _qkv((2, 2, 6, 8), (2, 2, 10, 8))
    with fwAD.dual_level():
        with jvp_sdpa():
            o = F.scaled_dot_product_attention(fwAD.make_dual(q, tq), k, v)
        o, to = fwAD.unpack_dual(o)
    o_ref, to_ref = _math_jvp(lambda q: F.scaled_dot_product_attention(q, k, v), (q,), (tq,))
    assert sdpa_stats() == {"jvp": 1}
    _close(o, o_ref, what="o")
    _close(to, to_ref, what="to")


def test_strided_head_dim_served():
    """Query / key / value whose head dim is not contiguous (a transposed view): served (fastdistill's kernels need
    a contiguous head dim, so these are copied), matching math SDPA; their tangents too."""
    g = torch.Generator().manual_seed(10)
    q, k, v, tq = (torch.randn(1, 2, 8, n, dtype=F64, generator=g).transpose(-1, -2) for n in (5, 6, 6, 5))
    assert q.stride(-1) != 1 and tq.stride(-1) != 1
    f = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    want = _math_jvp(f, (q, k, v), (tq, torch.zeros_like(k), torch.zeros_like(v)))
    with jvp_sdpa():
        got = torch.func.jvp(f, (q, k, v), (tq, torch.zeros_like(k), torch.zeros_like(v)))
    assert sdpa_stats() == {"jvp": 1}, sdpa_stats()
    _close(got[0], want[0], what="o")
    _close(got[1], want[1], what="tangent")


def test_triton_kernels_fp32():
    """The GPU path's kernels (Triton, through the interpreter on the CPU) against the fp64 oracle."""
    if not fastdistill._backend.interpreting():
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1 (the README test command sets it)")
    q, k, v, tq, tk, tv = _qkv((1, 2, 17, 32), (1, 1, 17, 32), dtype=torch.float32)
    f = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with fastdistill.use_backend("triton"), jvp_sdpa():
        o, to = torch.func.jvp(f, (q, k, v), (tq, tk, tv))
    o_ref, to_ref = _math_jvp(f, tuple(x.double() for x in (q, k, v)), tuple(x.double() for x in (tq, tk, tv)))
    assert sdpa_stats() == {"jvp": 1}
    _close(o, o_ref, 1e-5, "o")
    _close(to, to_ref, 1e-5, "to")


def test_kernel_backend_limits_fall_back_with_the_reason():
    """With the Triton kernels forced: float64 inputs (no kernel takes them) and torch.func.grad around a plain call
    (the kernels take plain tensors) fall back to stock SDPA with the reason, and give its result (before any kernel
    launch)."""
    q, k, v, tq, _, _ = _qkv((1, 2, 5, 8), (1, 2, 6, 8), seed=11)
    f = lambda q: F.scaled_dot_product_attention(q, k, v)
    want = _math_jvp(f, (q,), (tq,))
    with fastdistill.use_backend("triton"), jvp_sdpa(), pytest.warns(UserWarning, match="no fastdistill backend"):
        got = torch.func.jvp(f, (q,), (tq,))
    stats = sdpa_stats(reset=True)
    assert len(stats) == 1 and next(iter(stats)).startswith("fallback: no fastdistill backend can run"), stats
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    if not fastdistill._backend.interpreting():
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1 (the README test command sets it)")
    q32, k32, v32 = (x.float() for x in (q, k, v))
    g = lambda q: F.scaled_dot_product_attention(q, k32, v32).square().sum()
    want_g = torch.func.grad(g)(q32)  # (stock SDPA as it runs without the patch: no tangent, no backend pinned)
    with fastdistill.use_backend("triton"), jvp_sdpa(plain="fastdistill"), pytest.warns(
            UserWarning, match="torch.func.grad / vjp / jacrev around the triton kernels"):
        got_g = torch.func.grad(g)(q32)
    stats = sdpa_stats()
    assert len(stats) == 1 and next(iter(stats)).startswith("fallback: torch.func.grad"), stats
    assert torch.equal(got_g, want_g)


def test_plain_calls():
    q, k, v, *_ = _qkv((2, 2, 6, 8), (2, 2, 6, 8))
    ref = STOCK(q, k, v, is_causal=True)
    with jvp_sdpa():
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, is_causal=True), ref)
    assert sdpa_stats(reset=True) == {"stock": 1}
    qq = q.clone().requires_grad_()
    with jvp_sdpa(plain="fastdistill"):
        o = F.scaled_dot_product_attention(qq, k, v, is_causal=True)
    o.square().sum().backward()
    q2 = q.clone().requires_grad_()
    STOCK(q2, k, v, is_causal=True).square().sum().backward()
    assert sdpa_stats() == {"plain": 1}
    _close(o, ref, what="o")
    _close(qq.grad, q2.grad, what="dq")


FALLBACKS = {
    "attn_mask": ({"attn_mask": torch.rand(6, 6) > 0.3}, (6, 6)),
    "dropout_p": ({"dropout_p": 0.5}, (6, 6)),
    "is_causal=True with L != S": ({"is_causal": True}, (4, 6)),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_fallbacks_warn_once_and_match_stock(name):
    kw, (sq, sk) = FALLBACKS[name]
    q, k, v, tq, tk, tv = _qkv((1, 2, sq, 8), (1, 2, sk, 8))
    f = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw)
    torch.manual_seed(1)
    o_ref, to_ref = _math_jvp(f, (q, k, v), (tq, tk, tv))
    with jvp_sdpa():
        with pytest.warns(UserWarning, match=name.split()[0]):
            torch.manual_seed(1)
            o, to = torch.func.jvp(f, (q, k, v), (tq, tk, tv))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second call must not warn again
            torch.func.jvp(f, (q, k, v), (tq, tk, tv))
    stats = sdpa_stats()
    assert list(stats.values()) == [2] and next(iter(stats)).startswith("fallback: " + name.split()[0]), stats
    assert torch.equal(o, o_ref) and torch.equal(to, to_ref)


def _pad_keys(B, S, dtype=torch.bool, lens=None, fill=float("-inf")):
    """A [B, S] key-padding mask (True / 0 keeps a key); ``lens``: valid keys per sample (0: every key masked)."""
    lens = torch.tensor(lens if lens is not None else [S - i % 3 for i in range(B)])
    keep = torch.arange(S)[None, :] < lens[:, None]
    return keep if dtype == torch.bool else torch.where(keep, 0.0, fill).to(dtype)


KEY_MASKS = {
    # name: (q shape, k shape, sdpa kwargs, attn_mask): masks the same for every query row, served by the fused path
    "bool-B11S": ((2, 3, 9, 16), (2, 3, 11, 16), {}, lambda: _pad_keys(2, 11)[:, None, None, :]),
    "float-BH1S": ((2, 3, 9, 16), (2, 3, 11, 16), {}, lambda: torch.randn(2, 3, 1, 11, dtype=F64).clamp_max(0.5)
                   + _pad_keys(2, 11, F64)[:, None, None, :]),
    "float-1e4-gqa": ((2, 4, 7, 8), (2, 2, 7, 8), {"enable_gqa": True},
                      lambda: _pad_keys(2, 7, F64, fill=-1e4)[:, None, None, :].expand(2, 4, 1, 7)),
    "bool-S": ((1, 2, 5, 8), (1, 2, 13, 8), {}, lambda: _pad_keys(1, 13, lens=[8])[0]),
    "float-1S": ((1, 2, 5, 8), (1, 2, 13, 8), {"scale": 0.4}, lambda: _pad_keys(1, 13, F64, lens=[8])),
    "bool-expanded-query": ((2, 2, 6, 8), (2, 2, 6, 8), {},  # [B, H, L, S] with stride 0 along the queries
                            lambda: _pad_keys(2, 6)[:, None, None, :].expand(2, 2, 6, 6)),
    "3d": ((3, 7, 8), (3, 5, 8), {}, lambda: _pad_keys(3, 5)[:, None, :]),
    "5d": ((2, 2, 2, 5, 8), (2, 2, 2, 6, 8), {}, lambda: _pad_keys(4, 6).view(2, 2, 1, 1, 6)),
    "fully-masked-sample": ((2, 2, 5, 8), (2, 2, 6, 8), {}, lambda: _pad_keys(2, 6, lens=[6, 0])[:, None, None, :]),
    "fully-masked-float": ((2, 2, 5, 8), (2, 2, 6, 8), {}, lambda: _pad_keys(2, 6, F64, lens=[0, 4])[:, None, None, :]),
}


@pytest.mark.parametrize("name", list(KEY_MASKS))
def test_key_masks_served(name):
    """attn_mask broadcastable to [B, H, 1, S] (bool or float, per head or broadcast, any rank of query): the fused path
    serves it (sdpa_stats) and matches torch.func.jvp / autograd of math SDPA with the same mask in float64; a sample
    whose every key is masked gives 0 (output, tangent, gradient), as math SDPA does in torch 2.13."""
    sq, sk, kw, make = KEY_MASKS[name]
    q, k, v, tq, tk, tv = _qkv(sq, sk, seed=11)
    mask = make()
    w = torch.randn(*sq[:-1], sk[-1], dtype=F64)
    f = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
    results = _served_equals_math(name, f, (q, k, v), (tq, tk, tv), w)
    if name.startswith("fully-masked"):
        dead = 1 if name.endswith("sample") else 0
        for x in (*results[1][:3], *results[0][:3]):
            assert (x[dead] == 0).all()


def test_key_mask_plain_calls_and_autocast():
    """Without a tangent, plain="fastdistill" serves a key mask too. Under torch.autocast a float mask is cast as stock
    SDPA casts it, to the autocast dtype (257 becomes 256 in bf16: a factor e between two keys' weights). Oracle there:
    stock SDPA's plain call under autocast (scores in fp32 from bf16 inputs plus the bf16 mask) and the fp32 math JVP
    of the same bf16-rounded values; stock's math JVP under autocast forms the scores in bf16 (|S| ~ 256: ulp 2) and
    misses both by ~0.8. The fp32 call: against stock SDPA in float64, within twice stock fp32's own error (the
    tolerance rule; the two fp32 results differ by 5e-6 on one CPU, both 6.7e-6 from float64, the mask's 256 in the
    scores costing digits: a fixed 1e-6 between them held on another CPU only)."""
    q, k, v, tq, *_ = _qkv((2, 2, 6, 16), (2, 2, 9, 16), dtype=torch.float32, seed=12)
    mask = _pad_keys(2, 9, torch.float32)[:, None, None, :] + 256.0 + (torch.arange(9) % 2)
    att = lambda q: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = STOCK(q, k, v, attn_mask=mask)
    exact = STOCK(q.double(), k.double(), v.double(), attn_mask=mask.double())
    with jvp_sdpa(plain="fastdistill"):
        got = att(q)
    assert sdpa_stats(reset=True) == {"plain": 1}
    stock_err = ((ref.double() - exact).abs().max() / exact.abs().max()).item()
    _close(got, exact, 2 * stock_err + 1e-7, "plain")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_o = att(q)
        with jvp_sdpa():
            o, to = torch.func.jvp(att, (q,), (tq,))
    assert sdpa_stats() == {"jvp": 1} and o.dtype == ref_o.dtype == torch.bfloat16
    rb = lambda x: x.bfloat16().float()
    ref_t = _math_jvp(lambda q: STOCK(q, rb(k), rb(v), attn_mask=rb(mask)), (rb(q),), (rb(tq),))[1]
    _close(o, ref_o, 1e-2, "autocast o")
    _close(to, ref_t, 2e-2, "autocast to")


@pytest.mark.parametrize("mdt", [torch.float16, torch.float32])
def test_key_mask_autocast_casts_the_mask_too(mdt):
    """Under torch.autocast stock SDPA casts a float mask with q, k, v (an fp16 mask of fp32 inputs becomes bf16 under
    bf16 autocast, a valid mask there): served as such, not handed to stock SDPA by the mask-dtype rule (before)."""
    q, k, v, tq, *_ = _qkv((2, 2, 6, 16), (2, 2, 9, 16), dtype=torch.float32, seed=13)
    mask = _pad_keys(2, 9, mdt, fill=-1e4)[:, None, None, :]
    att = lambda q: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_o = att(q)
        with jvp_sdpa():
            sdpa_stats(reset=True)
            o, to = torch.func.jvp(att, (q,), (tq,))
    assert sdpa_stats() == {"jvp": 1}
    rb = lambda x: x.bfloat16().float()
    ref_t = _math_jvp(lambda q: STOCK(q, rb(k), rb(v), attn_mask=rb(mask)), (rb(q),), (rb(tq),))[1]
    _close(o, ref_o, 1e-2, "o")
    _close(to, ref_t, 2e-2, "to")


def test_key_mask_torch_compile_fullgraph():
    """A served key mask traces into one graph too (plain="fastdistill", and torch.func.jvp inside the compiled
    function: math attention in the graph), equal to math SDPA."""
    torch._dynamo.reset()
    q, k, v, tq, *_ = _qkv((2, 2, 6, 8), (2, 2, 9, 8), seed=14)
    for mask in (_pad_keys(2, 9)[:, None, None, :], _pad_keys(2, 9, F64, fill=-1e4)[:, None, None, :]):
        f = lambda q, m=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m) * 2
        g = lambda q, f=f: torch.func.jvp(f, (q,), (tq,))
        with jvp_sdpa(plain="fastdistill"), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            o = torch.compile(f, backend="aot_eager", fullgraph=True)(q)
            o2, t2 = torch.compile(g, backend="aot_eager", fullgraph=True)(q)
        assert not [w for w in seen if "fastdistill" in str(w.message)]
        o_ref, t_ref = _math_jvp(f, (q,), (tq,))
        _close(o, o_ref, what="compiled plain")
        _close(o2, o_ref, what="compiled jvp o")
        _close(t2, t_ref, what="compiled jvp tangent")
    torch._dynamo.reset()


def test_masks_not_served():
    """Masks fastdistill cannot serve exactly: the varying ones fall back with a warning naming the reason (its advice
    names transformers' and diffusers' arguments), and give math SDPA's result; masks stock SDPA refuses raise stock
    SDPA's error, and one it broadcasts the output by gives its result, as without the patch."""
    q, k, v, tq, tk, tv = _qkv((2, 2, 5, 8), (2, 2, 5, 8), seed=13)
    causal_pad = torch.ones(5, 5, dtype=torch.bool).tril() & _pad_keys(2, 5)[:, None, None, :]
    bias = torch.zeros(2, 1, 1, 5, dtype=F64, requires_grad=True)
    cases = {
        "attn_mask varies along the query dimension": (lambda q: F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_pad), (q,), (tq,)),
        "attn_mask requires grad": (lambda q: F.scaled_dot_product_attention(q, k, v, attn_mask=bias), (q,), (tq,)),
        "attn_mask carries a forward-AD tangent": (lambda q, b: F.scaled_dot_product_attention(
            q, k, v, attn_mask=b), (q, torch.zeros(2, 1, 1, 5, dtype=F64)), (tq, torch.randn(2, 1, 1, 5, dtype=F64))),
    }
    for reason, (f, prim, tans) in cases.items():
        want = _math_jvp(f, prim, tans)
        sdpa_stats(reset=True)
        with jvp_sdpa(), pytest.warns(UserWarning, match=reason) as seen:
            got = torch.func.jvp(f, prim, tans)
        assert list(sdpa_stats()) == [next(iter(sdpa_stats()))] and next(iter(sdpa_stats())).startswith(
            "fallback: " + reason), sdpa_stats()
        for a, b in zip(got, want):
            assert torch.equal(a, b), reason
        assert str(seen[0].message).startswith("fastdistill.jvp_sdpa"), reason
    _sdpa_mod._warned.clear()
    with jvp_sdpa(), pytest.warns(UserWarning) as seen:
        torch.func.jvp(cases["attn_mask varies along the query dimension"][0], (q,), (tq,))
    advice = str(seen[0].message)
    assert "attention_mask=None in transformers" in advice and "encoder_attention_mask=None in diffusers" in advice
    sdpa_stats(reset=True)
    for kw in ({"attn_mask": _pad_keys(2, 5)[:, None, None, :], "is_causal": True},  # math SDPA refuses both
               {"attn_mask": _pad_keys(2, 5, torch.float16)[:, None, None, :]},  # fp16 mask, fp64 query
               {"attn_mask": _pad_keys(2, 5)[:, None, None, :].to("meta")}):  # a mask on another device
        f = lambda q, kw=kw: F.scaled_dot_product_attention(q, k, v, **kw)
        with pytest.raises(RuntimeError) as stock_err:
            _math_jvp(f, (q,), (tq,))
        with jvp_sdpa(), pytest.raises(RuntimeError) as err:
            torch.func.jvp(f, (q,), (tq,))
        assert str(err.value) == str(stock_err.value)
    # a mask with more batch entries than the query: stock SDPA broadcasts the output ([3, 2, 5, 8]): its result
    f = lambda q: F.scaled_dot_product_attention(q[:1], k[:1], v[:1], attn_mask=torch.ones(3, 1, 1, 5, dtype=bool))
    want = _math_jvp(f, (q,), (tq,))
    with jvp_sdpa():
        got = torch.func.jvp(f, (q,), (tq,))
    assert got[0].shape == (3, 2, 5, 8) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert sdpa_stats() == {}, sdpa_stats()


def test_gqa_without_enable_gqa_is_stock_behaviour():
    q, k, v, tq, tk, tv = _qkv((1, 4, 5, 8), (1, 2, 5, 8))
    with jvp_sdpa(), pytest.raises(RuntimeError):
        torch.func.jvp(lambda q: F.scaled_dot_product_attention(q, k, v), (q,), (tq,))


def test_nesting_patch_unpatch_and_errors():
    with pytest.raises(ValueError, match="plain"):
        with jvp_sdpa(plain="flash"):
            pass
    with pytest.raises(ValueError, match="plain"):
        patch_sdpa(plain="flash")
    with pytest.raises(RuntimeError, match="unpatch_sdpa"):
        unpatch_sdpa()
    q, k, v, tq, *_ = _qkv((1, 2, 5, 8), (1, 2, 5, 8))
    f = lambda q: F.scaled_dot_product_attention(q, k, v)
    patch_sdpa()
    try:
        with jvp_sdpa(plain="fastdistill"):
            with jvp_sdpa():
                F.scaled_dot_product_attention(q, k, v)  # innermost plain="sdpa"
            F.scaled_dot_product_attention(q, k, v)  # plain="fastdistill"
        torch.func.jvp(f, (q,), (tq,))  # still patched globally
        assert F.scaled_dot_product_attention is not STOCK
    finally:
        unpatch_sdpa()
    assert F.scaled_dot_product_attention is STOCK
    assert sdpa_stats() == {"stock": 1, "plain": 1, "jvp": 1}
    sdpa_stats(reset=True)
    patch_sdpa()
    patch_sdpa(plain="fastdistill")  # nested patches: the innermost plain choice wins, in every thread
    try:
        F.scaled_dot_product_attention(q, k, v)
    finally:
        unpatch_sdpa()
        F.scaled_dot_product_attention(q, k, v)
        unpatch_sdpa()
    assert sdpa_stats() == {"plain": 1, "stock": 1}, sdpa_stats()
    with pytest.raises(KeyError), jvp_sdpa():  # an exception inside the block still restores SDPA
        raise KeyError("boom")


def test_other_threads_unaffected():
    """A jvp_sdpa() block is per thread: a thread outside it gets stock SDPA even while installed."""
    q, k, v, tq, *_ = _qkv((1, 2, 5, 8), (1, 2, 5, 8))
    inside, outside = threading.Barrier(2), threading.Barrier(2)
    seen = {}

    def other():
        inside.wait()  # main thread is inside its block now
        seen["fn_patched"] = F.scaled_dot_product_attention is not STOCK
        try:
            torch.func.jvp(lambda q: F.scaled_dot_product_attention(q, k, v), (q,), (tq,))
            seen["error"] = None
        except Exception as exc:  # stock fused SDPA has no forward AD: proves the call went to stock
            seen["error"] = exc
        outside.wait()

    t = threading.Thread(target=other)
    t.start()
    with jvp_sdpa():
        inside.wait()
        outside.wait()
    t.join()
    assert seen["fn_patched"], "the other thread should see the installed wrapper"
    assert sdpa_stats() == {}, "the other thread's call must not be served by fastdistill"
    if seen["error"] is not None:
        assert "forward AD" in str(seen["error"]) or "not implemented" in str(seen["error"]).lower()


# ----------------------------------------------------------------------------- unmodified models
def _meanflow(f, x, tx, params):
    """One JVP pass plus a gradient pass through its primal (plus the detached tangent)."""
    out, tout = torch.func.jvp(f, (x,), (tx,))
    loss = (out * torch.cos(out.detach())).sum() + (out * tout.detach()).sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True)  # (a Llama's token embedding is unused)
    return out, tout, grads


def _compare_model(f, x, tx, model, n_layers, what):
    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):
        ref = _meanflow(f, x, tx, params)
    with jvp_sdpa():
        got = _meanflow(f, x, tx, params)
    assert sdpa_stats() == {"jvp": n_layers}, f"{what}: {sdpa_stats()}"
    _close(got[0], ref[0], what=f"{what} output")
    _close(got[1], ref[1], what=f"{what} tangent")
    assert [g is None for g in got[2]] == [g is None for g in ref[2]]
    assert sum(g is not None for g in ref[2]) > len(ref[2]) // 2
    for i, (a, b) in enumerate(zip(got[2], ref[2])):
        if b is not None:
            _close(a, b, 1e-9, what=f"{what} grad of parameter {i}")


def test_transformers_llama_decoder():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="sdpa")
    model = transformers.LlamaModel(cfg).to(F64)
    x = torch.randn(2, 9, 32, dtype=F64)
    tx = torch.randn_like(x)
    _compare_model(lambda e: model(inputs_embeds=e).last_hidden_state, x, tx, model, 2, "Llama")


def test_diffusers_dit():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                            sample_size=8, patch_size=2, num_embeds_ada_norm=10).to(F64)
    model.eval()  # (training mode drops class labels at random)
    x = torch.randn(2, 4, 8, 8, dtype=F64)
    t = torch.tensor([3.0, 7.5], dtype=F64)
    labels = torch.tensor([1, 2])
    # the sCM pattern: the tangent is d/dt of (x_t, t) -> JVP through the time embedding as well
    dx, dt = torch.randn_like(x), torch.ones_like(t)

    def f(xt):
        x_, t_ = xt[:, :-1].reshape(x.shape), xt[:, -1]
        return model(x_, timestep=t_, class_labels=labels).sample

    xt = torch.cat([x.flatten(1), t[:, None]], 1)
    dxt = torch.cat([dx.flatten(1), dt[:, None]], 1)
    _compare_model(f, xt, dxt, model, 2, "DiT")


def test_torch_compile_fullgraph_and_guards(monkeypatch):
    """The patched SDPA traces into one graph (plain, and under torch.func.jvp: jvp_attention's forward-AD
    contract under compile, math attention in the graph), and a graph compiled inside a jvp_sdpa() block is not
    reused outside it (dynamo guards on the activation state)."""
    q, k, v, tq, *_ = _qkv((1, 2, 8, 16), (1, 2, 8, 16))
    served = []
    real = _sdpa_mod.jvp_attention
    monkeypatch.setattr(_sdpa_mod, "jvp_attention", lambda *a, **kw: served.append(1) or real(*a, **kw))
    f = lambda q: F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2
    g = lambda q: torch.func.jvp(f, (q,), (tq,))
    with jvp_sdpa(plain="fastdistill"):
        o = torch.compile(f, backend="aot_eager", fullgraph=True)(q)
        o2, t2 = torch.compile(g, backend="aot_eager", fullgraph=True)(q)
    o_ref, t_ref = _math_jvp(f, (q,), (tq,))
    _close(o, o_ref, what="compiled plain")
    _close(o2, o_ref, what="compiled jvp o")
    _close(t2, t_ref, what="compiled jvp tangent")
    cf = torch.compile(f, backend="eager")
    with jvp_sdpa(plain="fastdistill"):
        cf(q)
    n = len(served)
    assert n >= 3
    cf(q)  # outside the block: stock SDPA again
    assert len(served) == n


def test_torch_compile_fullgraph_stock_paths():
    """fullgraph=True also for the calls fastdistill does not serve: plain calls with the default plain="sdpa",
    masked calls (a fallback) with plain="fastdistill", and fallbacks under torch.func.jvp (a mask, is_causal with
    L != S). Before, each raised dynamo's "Unsupported context manager" (the lock and thread-local writes of the
    stock path); without fullgraph, silent graph breaks."""
    torch._dynamo.reset()
    q, k, v, tq, *_ = _qkv((1, 2, 6, 8), (1, 2, 6, 8), seed=4)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    fp = lambda q: F.scaled_dot_product_attention(q, k, v) * 2
    fm = lambda q: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    fl = lambda q: F.scaled_dot_product_attention(q, k[:, :, :4], v[:, :, :4], is_causal=True)
    jvp = lambda f: (lambda q: torch.func.jvp(f, (q,), (tq,)))
    for name, fn, plain in (("plain, plain='sdpa'", fp, "sdpa"), ("mask, plain='sdpa'", fm, "sdpa"),
                            ("mask, plain='fastdistill'", fm, "fastdistill"), ("jvp served", jvp(fp), "sdpa"),
                            ("jvp mask", jvp(fm), "sdpa"), ("jvp causal L != S", jvp(fl), "fastdistill")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with jvp_sdpa(plain=plain):
                got = torch.compile(fn, backend="aot_eager", fullgraph=True)(q)
        with sdpa_kernel(SDPBackend.MATH):
            want = fn(q)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            _close(a, b, what=name)
    torch._dynamo.reset()


def test_heads_stock_sdpa_decides():
    """One key/value head without enable_gqa: stock SDPA broadcasts it to every query head, so it is multi-query
    attention, served by the fused path and counted (before: stock math SDPA, silently, with no count); a GQA ratio
    that is not an integer raises stock SDPA's RuntimeError (before: fastdistill's own ValueError); the fallback
    warning points at the line that calls SDPA."""
    q, k, v, tq, tk, tv = _qkv((2, 4, 5, 8), (2, 1, 7, 8), seed=6)
    f = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    want = _math_jvp(f, (q, k, v), (tq, tk, tv))
    sdpa_stats(reset=True)
    with jvp_sdpa():
        got = torch.func.jvp(f, (q, k, v), (tq, tk, tv))
    assert sdpa_stats() == {"jvp": 1}, sdpa_stats()
    _close(got[0], want[0], what="MQA o")
    _close(got[1], want[1], what="MQA tangent")
    # one query head over several key/value heads (stock SDPA broadcasts q): a counted, warned fallback (before:
    # stock SDPA, uncounted and silent)
    q1, tq1 = q[:, :1], tq[:, :1]
    kk, vv = torch.randn(2, 4, 7, 8, dtype=F64), torch.randn(2, 4, 7, 8, dtype=F64)
    g1 = lambda q: F.scaled_dot_product_attention(q, kk, vv)
    want1 = _math_jvp(g1, (q1,), (tq1,))
    sdpa_stats(reset=True)
    with jvp_sdpa(), warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        got1 = torch.func.jvp(g1, (q1,), (tq1,))
    assert list(sdpa_stats()) == ["fallback: a single query head broadcast over several key/value heads (stock "
                                  "SDPA's batch broadcasting)"], sdpa_stats()
    _close(got1[1], want1[1], what="q-broadcast tangent")
    k3, v3 = torch.randn(2, 3, 7, 8, dtype=F64), torch.randn(2, 3, 7, 8, dtype=F64)
    with jvp_sdpa(), pytest.raises(RuntimeError):
        torch.func.jvp(lambda q: F.scaled_dot_product_attention(q, k3, v3, enable_gqa=True), (q,), (tq,))
    _sdpa_mod._warned.clear()
    with jvp_sdpa(plain="fastdistill"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool), enable_gqa=True)
    mine = [w for w in seen if "fastdistill.jvp_sdpa" in str(w.message)]
    assert mine and mine[0].filename == __file__, [(w.filename, w.lineno) for w in mine]


BAD_ARGS = {  # stock SDPA's argument parser refuses each: under the patch its TypeError, never a served call
    "is_causal-str": {"is_causal": "no"},  # (before: bool("no"), a causal attention)
    "is_causal-None": {"is_causal": None},
    "is_causal-int": {"is_causal": 2},
    "enable_gqa-str": {"enable_gqa": "no"},
    "dropout_p-str": {"dropout_p": "0"},  # (before: "'>' not supported between str and int", naming nothing)
    "dropout_p-None": {"dropout_p": None},
    "scale-str": {"scale": "0.5"},  # (before: float("0.5"))
    "scale-complex": {"scale": 1 + 0j},
}


def test_tensor_scale_falls_back_with_the_reason():
    """A 0-d tensor scale, which stock SDPA accepts: stock SDPA's result, with a warning naming the reason (a silent
    stock call would hide an O(S^2) math JVP)."""
    q, k, v, tq, _, _ = _qkv((1, 2, 4, 8), (1, 2, 5, 8), seed=5)
    f = lambda q: F.scaled_dot_product_attention(q, k, v, scale=torch.tensor(0.3, dtype=F64))
    want = _math_jvp(lambda q: STOCK(q, k, v, scale=0.3), (q,), (tq,))
    _sdpa_mod._warned.clear()
    with jvp_sdpa():
        sdpa_stats(reset=True)
        with pytest.warns(UserWarning, match="scale is a tensor"):
            got = torch.func.jvp(f, (q,), (tq,))
    assert list(sdpa_stats()) == ["fallback: scale is a tensor (fastdistill's scale is a number; pass float(scale))"]
    _close(got[0], want[0], 1e-12, "o")
    _close(got[1], want[1], 1e-12, "to")


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e-40), (F64, 1e-310)])
def test_subnormal_scale_falls_back_with_the_reason(dtype, scale):
    """A scale subnormal in the compute dtype, which jvp_attention refuses (scale-subnormal in
    test_jvp_attention_api): stock SDPA's result (its math backend multiplies q and k by √scale), with the reason."""
    q, k, v, tq, _, _ = _qkv((1, 2, 4, 8), (1, 2, 5, 8), dtype=dtype, seed=5)
    f = lambda q: F.scaled_dot_product_attention(q, k, v, scale=scale)
    want = _math_jvp(lambda q: STOCK(q, k, v, scale=scale), (q,), (tq,))
    _sdpa_mod._warned.clear()
    with jvp_sdpa():
        sdpa_stats(reset=True)
        with pytest.warns(UserWarning, match=f"scale {scale} is subnormal in {str(dtype)[6:]}"):
            got = torch.func.jvp(f, (q,), (tq,))
    assert [k.split(" is ")[0] for k in sdpa_stats()] == [f"fallback: scale {scale}"], sdpa_stats()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_tensor_scale_plain_call_is_a_silent_stock_call():
    """Under the default plain="sdpa" a call without a tangent is stock SDPA's, whatever its options: a 0-d tensor
    scale there is no fallback (no warning, no "fallback" count; before, it warned that a call runs stock SDPA which
    plain="sdpa" runs there anyway). With plain="fastdistill" it falls back with the reason."""
    q, k, v, _, _, _ = _qkv((1, 2, 4, 8), (1, 2, 5, 8), seed=6)
    want = STOCK(q, k, v, scale=0.3)
    _sdpa_mod._warned.clear()
    with jvp_sdpa():
        sdpa_stats(reset=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = F.scaled_dot_product_attention(q, k, v, scale=torch.tensor(0.3, dtype=F64))
        assert sdpa_stats() == {"stock": 1}, sdpa_stats()
    _close(got, want, 1e-12, "o")
    with jvp_sdpa(plain="fastdistill"):
        sdpa_stats(reset=True)
        with pytest.warns(UserWarning, match="scale is a tensor"):
            F.scaled_dot_product_attention(q, k, v, scale=torch.tensor(0.3, dtype=F64))
        assert [k.split(" (")[0] for k in sdpa_stats()] == ["fallback: scale is a tensor"], sdpa_stats()


@pytest.mark.parametrize("name", list(BAD_ARGS))
def test_bad_argument_types_raise_as_stock(name):
    kw = BAD_ARGS[name]
    arg = next(iter(kw))
    q, k, v, tq, _, _ = _qkv((1, 2, 4, 8), (1, 2, 4, 8), seed=4)
    with pytest.raises(TypeError, match=f"argument '{arg}'"):
        STOCK(q, k, v, **kw)
    for plain in PLAIN:
        with jvp_sdpa(plain=plain):
            with pytest.raises(TypeError, match=f"argument '{arg}'"):
                torch.func.jvp(lambda q: F.scaled_dot_product_attention(q, k, v, **kw), (q,), (tq,))
            with pytest.raises(TypeError, match=f"argument '{arg}'"):
                F.scaled_dot_product_attention(q, k, v, **kw)
    assert not any(key in sdpa_stats() for key in ("jvp", "plain")), sdpa_stats()
    # numbers of other types are still served (numpy's scale, an int dropout_p)
    f = lambda q: F.scaled_dot_product_attention(q, k, v, scale=np.float32(0.5), dropout_p=0)
    with jvp_sdpa():
        sdpa_stats(reset=True)  # (the plain calls above count as stock calls under plain="sdpa", which raised)
        got = torch.func.jvp(f, (q,), (tq,))
    assert sdpa_stats() == {"jvp": 1}, sdpa_stats()
    want = _math_jvp(f, (q,), (tq,))
    _close(got[1], want[1], what="tangent")


@pytest.mark.parametrize("kw", [{"scale": True}, {"dropout_p": False}, {"dropout_p": True}],
                         ids=["scale-True", "dropout_p-False", "dropout_p-True"])
def test_bool_numbers_go_to_stock_as_they_are(kw):
    """A bool scale or dropout_p, which stock SDPA's parser takes as 1.0 / 0.0: stock SDPA's call as it is (its
    result, no warning, not served: fastdistill refuses a bool scale, and would read dropout_p=False as 0)."""
    q, k, v, tq, _, _ = _qkv((1, 2, 4, 8), (1, 2, 4, 8), seed=4)
    f = lambda q: F.scaled_dot_product_attention(q, k, v, **kw)
    want = _math_jvp(f, (q,), (tq,))
    for plain in PLAIN:
        with jvp_sdpa(plain=plain), warnings.catch_warnings():
            warnings.simplefilter("error")
            got = torch.func.jvp(f, (q,), (tq,))
        assert all(torch.equal(a, b) for a, b in zip(got, want)), plain
    assert sdpa_stats() == {}, sdpa_stats()


# ----------------------------------------------------------------------------- transforms, autocast, wrappers
def test_nested_transforms_fall_back_to_math_sdpa():
    """jvp of jvp, jacfwd, vmap with jvp: beyond the fused path's one tangent level, so stock math SDPA serves them
    (before: the outer jvp got the inner tangent, a silently zero second derivative; vmap with jvp raised)."""
    q, k, v, tq, tk, _ = _qkv((1, 2, 4, 8), (1, 2, 5, 8), seed=3)
    qs, ts = torch.randn(3, 1, 2, 4, 8, dtype=F64), torch.randn(3, 1, 2, 4, 8, dtype=F64)
    att = lambda q: F.scaled_dot_product_attention(q, k, v)
    cases = {
        "jvp(jvp)": (lambda: torch.func.jvp(lambda q: torch.func.jvp(att, (q,), (tq,))[1], (q,), (tk[:, :, :4],)),
                     "nested forward-mode"),
        "jacfwd(jvp)": (lambda: torch.func.jacfwd(lambda q: torch.func.jvp(att, (q,), (tq,))[1])(q),
                        "nested forward-mode"),
        "vmap(jvp)": (lambda: torch.func.vmap(lambda q, t: torch.func.jvp(att, (q,), (t,)))(qs, ts), "vmap together"),
        "jvp(vmap)": (lambda: torch.func.jvp(torch.func.vmap(att), (qs,), (ts,)), "vmap together"),
    }
    for name, (fn, words) in cases.items():
        with sdpa_kernel(SDPBackend.MATH):
            ref = fn()
        sdpa_stats(reset=True)
        with jvp_sdpa(), warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            got = fn()
        stats = sdpa_stats()
        assert list(stats) and all(key.startswith("fallback: ") and words in key for key in stats), (name, stats)
        for a, b in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
            _close(a, b, 1e-12, what=name)
        assert max(x.abs().max() for x in (ref if isinstance(ref, tuple) else (ref,))) > 0.01, name


def test_loss_through_the_tangent_raises():
    """A loss that reaches the JVP tangent (not detached) raises under torch.func.jvp, as the contract says
    (before: the tangent came back as a constant and the term's gradient was silently dropped)."""
    q0, k, v, tq, *_ = _qkv((1, 2, 5, 8), (1, 2, 5, 8), seed=4)
    q = q0.clone().requires_grad_()
    with jvp_sdpa():
        o, to = torch.func.jvp(lambda q: F.scaled_dot_product_attention(q, k, v), (q,), (tq,))
    assert sdpa_stats() == {"jvp": 1} and to.requires_grad
    with pytest.raises(RuntimeError, match="stop-gradient"):
        (o.sum() + to.square().sum()).backward()


def test_double_backward_raises():
    """create_graph=True and a second backward through fastdistill's attention raise on every backend (before: the
    reference backward gave a graph with its saved statistics constant, the kernels none: a penalty on the gradient
    was silently dropped)."""
    q0, k, v, tq, *_ = _qkv((1, 2, 5, 8), (1, 2, 5, 8), seed=5)
    for plain, tangent in (("fastdistill", False), ("sdpa", True)):
        q = q0.clone().requires_grad_()
        with jvp_sdpa(plain=plain):
            f = lambda q: F.scaled_dot_product_attention(q, k, v)
            o = torch.func.jvp(f, (q,), (tq,))[0] if tangent else f(q)
        g, = torch.autograd.grad(o.square().sum(), q, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            (o.sum() + 10 * g.square().sum()).backward()
    assert sdpa_stats() == {"plain": 1, "jvp": 1}


class _CheckpointedBlocks(torch.nn.Module):
    """Two self-attention blocks, each under non-reentrant activation checkpointing."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(d, 3 * d) for _ in range(2))
        self.proj = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(2))
        self.heads = heads

    def _block(self, x, i):
        b, s, d = x.shape
        q, k, v = self.qkv[i](x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return x + self.proj[i](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d))

    def forward(self, x, checkpointed=True):
        from torch.utils.checkpoint import checkpoint
        for i in range(2):
            x = checkpoint(self._block, x, i, use_reentrant=False) if checkpointed else self._block(x, i)
        return x


@pytest.mark.skipif(OLD_TORCH, reason="torch < 2.13: torch.func.jvp through torch.utils.checkpoint raises in PyTorch")
def test_activation_checkpointing():
    """Checkpointed models: the JVP under no_grad, then a separate checkpointed gradient forward (rCM / Sana-Sprint)
    matches the one-forward JVP + gradient pass of math SDPA without checkpointing, under patch_sdpa() (every call
    served, the recomputation in backward included) and under jvp_sdpa(), whose checkpointed plain calls run stock
    SDPA with a warning: the recomputation runs outside the block (before: fastdistill in the forward, stock SDPA in
    the recomputation, and PyTorch's CheckpointError). The one-forward pattern through checkpointed blocks raises
    PyTorch's CheckpointError with stock SDPA as under jvp_sdpa() (the recomputation runs without tangents and
    saves fewer tensors; docs/jvp_attention.md)."""
    torch.manual_seed(0)
    model = _CheckpointedBlocks().to(F64)
    params = list(model.parameters())
    x = torch.randn(2, 7, 16, dtype=F64)
    tx = torch.randn_like(x)

    def loss_fn(out, tout):
        return (out * torch.cos(out.detach())).sum() + (out * tout).sum()

    with sdpa_kernel(SDPBackend.MATH):
        out, tout = torch.func.jvp(lambda e: model(e, checkpointed=False), (x,), (tx,))
        ref = (out, tout, torch.autograd.grad(loss_fn(out, tout.detach()), params))

    def two_pass():
        with torch.no_grad():
            _, tout = torch.func.jvp(model, (x,), (tx,))
        return model(x), tout

    reason = "fallback: " + _sdpa_mod._CHECKPOINT_REASON
    for mode in ("patch_sdpa", "jvp_sdpa", "jvp_sdpa, backward inside"):
        sdpa_stats(reset=True)
        if mode == "patch_sdpa":
            patch_sdpa(plain="fastdistill")
            try:
                out, tout = two_pass()
                grads = torch.autograd.grad(loss_fn(out, tout), params)  # the blocks recompute here
            finally:
                unpatch_sdpa()
            expect = {"jvp": 2, "plain": 4}  # 2 gradient forwards + 2 recomputations
        else:
            with jvp_sdpa(plain="fastdistill"), pytest.warns(UserWarning, match="activation checkpointing"):
                out, tout = two_pass()
                if mode.endswith("inside"):
                    grads = torch.autograd.grad(loss_fn(out, tout), params)
            if not mode.endswith("inside"):
                grads = torch.autograd.grad(loss_fn(out, tout), params)
            expect = {"jvp": 2, reason: 4 if mode.endswith("inside") else 2}
            _sdpa_mod._warned.clear()
        assert sdpa_stats() == expect, (mode, sdpa_stats())
        _close(out, ref[0], what=f"{mode}: output")
        _close(tout, ref[1], what=f"{mode}: tangent")
        for i, (a, b) in enumerate(zip(grads, ref[2])):
            _close(a, b, 1e-9, what=f"{mode}: grad of parameter {i}")

    from torch.utils.checkpoint import CheckpointError
    for ctx in (lambda: sdpa_kernel(SDPBackend.MATH), jvp_sdpa):
        with ctx():
            out, tout = torch.func.jvp(model, (x,), (tx,))
            with pytest.raises(CheckpointError, match="different number of tensors"):
                torch.autograd.grad(loss_fn(out, tout.detach()), params)


def test_checkpoint_detection_is_precise():
    """Only a call that saves tensors inside a non-reentrant checkpoint region falls back: other saved-tensor hooks
    (save_on_cpu), a checkpointed call whose q / k / v need no gradient, and one under no_grad inside the region are
    served; with patch_sdpa(plain="fastdistill") innermost, checkpointed calls are served too (the recomputation
    is), with patch_sdpa() (plain="sdpa") innermost over it they fall back."""
    from torch.utils.checkpoint import checkpoint

    q, k, v, *_ = _qkv((1, 2, 5, 8), (1, 2, 6, 8), seed=9)
    qg = q.clone().requires_grad_()
    want = STOCK(q, k, v)
    sdpa_ = lambda x: F.scaled_dot_product_attention(x, k, v)

    def in_region(fn):
        out = {}

        def body(x):
            out["o"] = fn(x)
            return x * 2
        checkpoint(body, qg, use_reentrant=False)
        return out["o"]

    cases = {
        "save_on_cpu": lambda: _with(torch.autograd.graph.save_on_cpu(), lambda: sdpa_(qg)),
        "constants in a checkpoint region": lambda: in_region(lambda x: sdpa_(q)),
        "no_grad in a checkpoint region": lambda: in_region(lambda x: _with(torch.no_grad(), lambda: sdpa_(x))),
    }
    for name, run in cases.items():
        sdpa_stats(reset=True)
        with jvp_sdpa(plain="fastdistill"), warnings.catch_warnings():
            warnings.simplefilter("error")
            o = run()
        assert sdpa_stats() == {"plain": 1}, (name, sdpa_stats())
        _close(o, want, what=name)
    for order, expect in ((("sdpa", "fastdistill"), {"plain": 1}),
                          (("fastdistill", "sdpa"), {"fallback: " + _sdpa_mod._CHECKPOINT_REASON: 1})):
        sdpa_stats(reset=True)
        for plain in order:
            patch_sdpa(plain=plain)
        try:
            with jvp_sdpa(plain="fastdistill"), warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                o = in_region(sdpa_)
        finally:
            unpatch_sdpa()
            unpatch_sdpa()
        assert sdpa_stats() == expect, (order, sdpa_stats())
        _close(o, want, what=str(order))


def _with(ctx, fn):
    with ctx:
        return fn()


def _fsdp2_worker(rank: int, world: int, rendezvous: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = _CheckpointedBlocks().to(F64)
        ref_model = _CheckpointedBlocks().to(F64)
        ref_model.load_state_dict(model.state_dict())
        x = torch.randn(2, 7, 16, dtype=F64)
        tx = torch.randn_like(x)
        for i in range(2):  # per block (as README / docs/context_parallel.md prescribe), then the root
            fully_shard([model.qkv[i], model.proj[i]])
        fully_shard(model)

        def step(m, ctx):
            with ctx():
                out, tout = torch.func.jvp(lambda e: m(e, checkpointed=False), (x,), (tx,))
            ((out - (0.5 * tout).detach()) ** 2).mean().backward()
            return out.detach(), tout.detach()

        ref = step(ref_model, lambda: sdpa_kernel(SDPBackend.MATH))
        got = step(model, jvp_sdpa)
        assert sdpa_stats() == {"jvp": 2}, sdpa_stats()
        _close(got[0], ref[0], what="output")
        _close(got[1], ref[1], what="tangent")
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            _close(p.grad.full_tensor(), q.grad, 1e-9, what=f"grad {name}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(OLD_TORCH, reason="torch < 2.13: torch.func.jvp through an FSDP2 module raises in PyTorch")
def test_fsdp2_one_forward(tmp_path):
    """FSDP2 per block: torch.func.jvp of the sharded model under jvp_sdpa() and a backward through the primal, as
    with math SDPA. FSDP2's pre-backward hook re-applies an autograd.Function to every tangent, whose backward hands
    the tangent output all-zero gradients (before: the guard raised the stop-gradient error on every step)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    pytest.importorskip("torch.distributed.fsdp").fully_shard  # noqa: B018
    torch.multiprocessing.spawn(_fsdp2_worker, args=(1, str(tmp_path / "rendezvous")), nprocs=1, join=True)


@pytest.mark.parametrize("plain", ["sdpa", "fastdistill"])
def test_autocast_runs_in_the_autocast_dtype(plain):
    """Under torch.autocast stock SDPA computes in the autocast dtype; so does the patched call (before: fp32)."""
    q, k, v, tq, *_ = _qkv((1, 2, 6, 16), (1, 2, 6, 16), dtype=torch.float32, seed=6)
    att = lambda q: F.scaled_dot_product_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_o, ref_t = _math_jvp(att, (q,), (tq,))
        ref_plain = att(q)
        with jvp_sdpa(plain=plain):
            o, to = torch.func.jvp(att, (q,), (tq,))
            p = att(q)
    assert (o.dtype, to.dtype, p.dtype) == (ref_o.dtype, ref_t.dtype, ref_plain.dtype) == (torch.bfloat16,) * 3
    assert sdpa_stats() == ({"jvp": 1, "plain": 1} if plain == "fastdistill" else {"jvp": 1, "stock": 1})
    # the same bf16 inputs: within bf16 rounding of the math result
    _close(o, ref_o, 1e-2, what="o")
    _close(to, ref_t, 2e-2, what="to")


def test_zero_heads_and_empty_head_dims_fall_back():
    for sq, sk, dv in (((1, 0, 5, 8), (1, 0, 5, 8), 8), ((1, 2, 5, 8), (1, 2, 5, 8), 0)):
        q, k, v, tq, *_ = _qkv(sq, sk, dv or None, seed=7)
        if dv == 0:
            v = torch.randn(*sk[:-1], 0, dtype=F64)
        f = lambda q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)
        ref = _math_jvp(f, (q,), (tq,))
        with jvp_sdpa(), warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            got = torch.func.jvp(f, (q,), (tq,))
        assert [x.shape for x in got] == [x.shape for x in ref]
    assert sdpa_stats() == {"fallback: zero heads or an empty head dim": 2}


def _nested(*lens, heads=2, dim=8):
    return torch.nested.nested_tensor([torch.randn(n, heads, dim, dtype=F64) for n in lens],
                                      layout=torch.jagged).transpose(1, 2)


UNSERVED_INPUTS = {
    # reason (the start of the fallback's): a (q, k, v, sdpa kwargs) factory; each call gives stock math SDPA's result
    # or its error
    "ranks 2/2/2": lambda: (*_qkv((5, 8), (6, 8), seed=8)[:3], {}),  # stock SDPA takes [L, E] too
    "dtypes torch.float64/torch.float64/torch.float32": lambda: (*_qkv((1, 2, 5, 8), (1, 2, 6, 8))[:2],
                                                                 torch.randn(1, 2, 6, 8), {}),
    "batch dims broadcast (keys)": lambda: (*_qkv((1, 2, 5, 8), (1, 2, 6, 8))[:2], torch.randn(1, 2, 7, 8, dtype=F64),
                                            {}),
    "batch dims broadcast (heads)": lambda: (*_qkv((1, 2, 5, 8), (1, 2, 6, 8))[:2],  # stock broadcasts v's one head
                                             torch.randn(1, 1, 6, 8, dtype=F64), {}),
    "nested tensors": lambda: (_nested(3, 4), _nested(3, 4), _nested(3, 4), {}),
    "attn_mask is a nested tensor": lambda: (*_qkv((2, 2, 5, 8), (2, 2, 5, 8))[:3], {
        "attn_mask": torch.nested.as_nested_tensor([torch.ones(2, 5, 5, dtype=torch.bool)] * 2)}),
}


@pytest.mark.parametrize("name", list(UNSERVED_INPUTS))
def test_unserved_inputs_fall_back_to_stock(name):
    """Query / key / value / mask that fastdistill does not serve (another rank, mixed dtypes, key and value shapes
    that differ, nested tensors, a nested mask): a counted fallback naming the reason, with stock math SDPA's result
    or its exact error (never fastdistill's own error for a call stock SDPA runs, nor a served call). With a tangent
    where forward-AD takes the inputs; nested query / key / value as a plain call under plain="fastdistill"."""
    torch.manual_seed(0)
    q, k, v, kw = UNSERVED_INPUTS[name]()
    reason = name.split(" (")[0]
    f, prim, tans = (lambda q: F.scaled_dot_product_attention(q, k, v, **kw)), (q,), None if q.is_nested else (
        torch.randn_like(q),)
    call = (lambda: f(*prim)) if tans is None else (lambda: torch.func.jvp(f, prim, tans))
    try:
        with sdpa_kernel(SDPBackend.MATH):
            want, want_err = call(), None
    except RuntimeError as e:
        want, want_err = None, e
    with jvp_sdpa(plain="fastdistill"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if want_err is None:
            got = call()
        else:
            with pytest.raises(type(want_err)) as err:
                call()
            assert str(err.value) == str(want_err)
    stats = sdpa_stats()
    assert len(stats) == 1 and next(iter(stats)).startswith("fallback: " + reason), stats
    assert any(reason in str(w.message) for w in seen)
    if want_err is None:
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            a, b = (a.values(), b.values()) if a.is_nested else (a, b)
            assert torch.equal(a, b), name


def test_wrapper_installed_over_the_patch_does_not_recurse():
    """Other code wraps SDPA inside a block (its wrapper calling ours); after the block its wrapper stays (warned)
    and reaches stock SDPA (before: ours delegated back to that wrapper, a RecursionError)."""
    q, k, v, *_ = _qkv((1, 1, 4, 8), (1, 1, 4, 8), seed=8)
    try:
        with pytest.warns(UserWarning, match="replaced by other code"):
            with jvp_sdpa():
                inner = F.scaled_dot_product_attention
                F.scaled_dot_product_attention = lambda *a, **kw: inner(*a, **kw)
        out = F.scaled_dot_product_attention(q, k, v)
        _close(out, STOCK(q, k, v), 0.0, what="after the block")
        with jvp_sdpa():  # installed again over that wrapper: stock-served calls reach the builtin once
            out = F.scaled_dot_product_attention(q, k, v)
        _close(out, STOCK(q, k, v), 0.0, what="nested install")
    finally:
        F.scaled_dot_product_attention = STOCK
