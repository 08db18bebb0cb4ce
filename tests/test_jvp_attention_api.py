"""fastdistill.jvp_attention's API: the three ways of calling it (explicit pairs, torch.func.jvp /
forward-AD dual tensors, plain autograd), the MeanFlow/DMF pattern (jvp then backward, one fused
forward), the stop-gradient contract of the tangent outputs, argument errors, torch.compile /
opcheck, determinism. Numerics are held to the tolerance rule of test_jvp_attention.py against the
same fp64 math-attention oracle (written there, independent of the library).

Most tests run on the reference backend; those taking the ``use`` fixture also run on Triton (its
interpreter when TRITON_INTERPRET=1) on one small case.
"""

from __future__ import annotations

import importlib
import math
import re

import pytest
import torch
import torch._dynamo.testing
import torch.autograd.forward_ad as fwAD
from test_jvp_attention import F64, check, math_attention, oracle

import fastdistill as fd

F32 = torch.float32


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def qkv(B=2, Sq=9, Sk=13, Hq=4, Hkv=2, D=16, Dv=8, dtype=F32, seed=0, layout="bshd"):
    """(q, k, v, tq, tk, tv), layout ``layout``; GQA and Dqk ≠ Dv by default."""
    g = gen(seed)
    shapes = [(B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, Dv)]
    if layout == "bhsd":
        shapes = [(s[0], s[2], s[1], s[3]) for s in shapes]
    prim = [torch.randn(*s, generator=g).to(dtype) for s in shapes]
    return (*prim, *(torch.randn(*s, generator=g).to(dtype) for s in shapes))


def bhsd(*xs):
    return [None if x is None else x.transpose(1, 2) for x in xs]


def exact_and_plain(q, k, v, tq=None, tk=None, tv=None, **kw):
    """The fp64 oracle and plain PyTorch in q's dtype for bshd inputs (results in [B, H, S, D])."""
    args = bhsd(q, k, v, tq, tk, tv)
    return oracle(*args, **kw), oracle(*args, dtype=q.dtype, **kw)


# ----------------------------------------------------------------------------- the three ways of calling
def test_explicit_func_jvp_and_dual_tensors_agree(use):
    """The same tangents given as explicit pairs, through torch.func.jvp and as forward-AD dual tensors: the same
    fused computation, bitwise-equal results; and all meet the tolerance rule against the oracle."""
    q, k, v, tq, tk, tv = qkv(seed=1)
    o, to, lse, dlse = fd.jvp_attention(q, k, v, tq, tk, tv, causal=True, return_lse=True)
    exact, plain = exact_and_plain(q, k, v, tq, tk, tv, causal=True)
    for name, x in (("o", o), ("to", to), ("lse", lse), ("dlse", dlse)):
        check(name, x if x.dim() == 3 else x.transpose(1, 2), exact[name], plain[name])

    f = lambda q, k, v: fd.jvp_attention(q, k, v, causal=True, return_lse=True)
    (o2, to2, lse2, dlse2), (t_o, t_to, t_lse, t_dlse) = torch.func.jvp(f, (q, k, v), (tq, tk, tv))
    # the call inside the transform has a tangent, so it also returns Ȯ and μ as values; being non-differentiable
    # (stop-gradient) their own tangents are zeros
    for a, b in ((o2, o), (t_o, to), (lse2, lse), (t_lse, dlse), (to2, to), (dlse2, dlse)):
        assert torch.equal(a, b)
    assert (t_to == 0).all() and (t_dlse == 0).all()

    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, t) for x, t in ((q, tq), (k, tk), (v, tv))]
        o3, to3, lse3, dlse3 = fd.jvp_attention(*duals, causal=True, return_lse=True)
        assert torch.equal(to3, to) and torch.equal(dlse3, dlse)  # returned as plain values too, without tangent
        assert fwAD.unpack_dual(to3).tangent is None and fwAD.unpack_dual(dlse3).tangent is None
        p_o, t_o3 = fwAD.unpack_dual(o3)
        p_lse, t_lse3 = fwAD.unpack_dual(lse3)
        for a, b in ((p_o, o), (t_o3, to), (p_lse, lse), (t_lse3, dlse)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("which", ["q", "kv", "v"])
def test_partial_tangents(which):
    """torch.func.jvp over a subset of the inputs (the others closed over) == explicit call with None tangents."""
    q, k, v, tq, tk, tv = qkv(seed=2)
    prim, tans = dict(q=q, k=k, v=v), dict(q=tq, k=tk, v=tv)
    names = list(which) if which != "kv" else ["k", "v"]

    def f(*xs):
        a = dict(prim, **dict(zip(names, xs)))
        return fd.jvp_attention(a["q"], a["k"], a["v"], causal=True)[0]

    o, t = torch.func.jvp(f, tuple(prim[n] for n in names), tuple(tans[n] for n in names))
    ref = fd.jvp_attention(q, k, v, *(tans[n] if n in names else None for n in "qkv"), causal=True)
    assert torch.equal(o, ref[0]) and torch.equal(t, ref[1])


def test_plain_autograd(use):
    """No tangent: a normal attention; ``to`` and ``dlse`` are None; gradients meet the rule."""
    q, k, v, *_ = qkv(seed=3)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = fd.jvp_attention(q, k, v)
    assert len(out) == 2 and out[1] is None
    o, to, lse, dlse = fd.jvp_attention(q, k, v, return_lse=True)
    assert to is None and dlse is None and torch.equal(o, out[0])
    go = torch.randn(o.shape, generator=gen(4))
    glse = torch.randn(lse.shape, generator=gen(5))
    grads = torch.autograd.grad([o, lse], [q, k, v], [go, glse])
    exact, plain = exact_and_plain(q, k, v, go=go.transpose(1, 2), glse=glse)
    check("o", o.transpose(1, 2), exact["o"], plain["o"])
    for name, x in zip(("dq", "dk", "dv"), grads):
        check(name, x.transpose(1, 2), exact[name], plain[name])


# ----------------------------------------------------------------------------- a tiny model
class Tiny(torch.nn.Module):
    """Linear -> attention (q, k, v strided slices of one packed projection) -> Linear."""

    def __init__(self, attn, Dm=24, H=2, D=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.qkv, self.out = torch.nn.Linear(Dm, 3 * H * D), torch.nn.Linear(H * D, Dm)
        self.attn, self.H, self.D = attn, H, D

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.H, self.D).unbind(2)
        return self.out(self.attn(q, k, v).reshape(B, S, self.H * self.D))


def lib_attn(q, k, v):
    return fd.jvp_attention(q, k, v, causal=True)[0]


def math_attn(q, k, v):
    o, _ = math_attention(*bhsd(q, k, v), causal=True, scale=1 / math.sqrt(q.shape[-1]))
    return o.transpose(1, 2)


def models(seed=0):
    """(library model fp32, math model fp32, math model fp64) with the same parameters."""
    lib = Tiny(lib_attn, seed=seed)
    plain = Tiny(math_attn, seed=seed)
    plain.load_state_dict(lib.state_dict())
    exact = Tiny(math_attn, seed=seed).double()
    exact.load_state_dict({k: v.double() for k, v in lib.state_dict().items()})
    return lib, plain, exact


def model_inputs(seed=6, B=2, S=11, Dm=24):
    g = gen(seed)
    return torch.randn(B, S, Dm, generator=g), torch.randn(B, S, Dm, generator=g), torch.randn(B, S, Dm, generator=g)


def test_model_func_jvp_and_forward_ad(use):
    lib, plain, exact = models()
    x, tx, _ = model_inputs()
    out, t = torch.func.jvp(lib, (x,), (tx,))
    out_p, t_p = torch.func.jvp(plain, (x,), (tx,))
    out_e, t_e = torch.func.jvp(exact, (x.double(),), (tx.double(),))
    check("out", out, out_e, out_p)
    check("tangent", t, t_e, t_p)
    with fwAD.dual_level():
        y = lib(fwAD.make_dual(x, tx))
        out2, t2 = fwAD.unpack_dual(y)
        assert torch.equal(out2, out) and torch.equal(t2, t)


def count_calls(monkeypatch, backend: str) -> dict:
    """Count the backend's attn_fwd / attn_bwd calls (the op looks them up at call time)."""
    mod = importlib.import_module("fastdistill.kernels.jvp_attention" if backend == "triton"
                                  else "fastdistill.reference.jvp_attention")
    calls = {"attn_fwd": 0, "attn_bwd": 0}
    for name in calls:
        orig = getattr(mod, name)

        def counted(*a, _orig=orig, _name=name, **kw):
            calls[_name] += 1
            return _orig(*a, **kw)

        monkeypatch.setattr(mod, name, counted)
    return calls


def test_meanflow_pattern(use, monkeypatch):
    """``out, dudt = torch.func.jvp(model, ...)``; the loss uses ``dudt`` detached in its target and backpropagates
    through ``out``: parameter gradients meet the rule against the math model; ONE fused forward, one backward."""
    lib, plain, exact = models(seed=1)
    x, tx, target = model_inputs(seed=7)
    calls = count_calls(monkeypatch, use)

    def step(model, x, tx, target):
        out, dudt = torch.func.jvp(model, (x,), (tx,))
        loss = ((out - (target - 0.3 * dudt).detach()) ** 2).mean()
        loss.backward()
        return out, dudt, loss

    out, dudt, loss = step(lib, x, tx, target)
    assert calls == {"attn_fwd": 1, "attn_bwd": 1}, calls
    out_p, dudt_p, loss_p = step(plain, x, tx, target)
    out_e, dudt_e, loss_e = step(exact, x.double(), tx.double(), target.double())
    check("out", out, out_e, out_p)
    check("dudt", dudt, dudt_e, dudt_p)
    check("loss", loss, loss_e, loss_p)
    for (name, p), pp, pe in zip(lib.named_parameters(), plain.parameters(), exact.parameters()):
        check(f"grad {name}", p.grad, pe.grad, pp.grad)


class _ZerosForNone(torch.autograd.Function):
    """Identity whose backward materialises zeros for an unused output (autograd.Function's default)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def test_chained_layers_one_forward(use):
    """Two attention layers in one forward (the MeanFlow pattern) with dual tensors and with explicit pairs: layer
    2's tangents come from layer 1's guarded Ȯ, and a loss on the primal only backpropagates as with torch.func.jvp
    (before: layer 2 gave its tangent inputs no gradient, autograd handed the guard zeros, and the guard raised the
    stop-gradient error on every such step). A loss that reaches a tangent still raises."""
    lib = torch.nn.Sequential(Tiny(lib_attn, seed=2), Tiny(lib_attn, seed=3))
    exact = torch.nn.Sequential(Tiny(math_attn, seed=2), Tiny(math_attn, seed=3)).double()
    plain = torch.nn.Sequential(Tiny(math_attn, seed=2), Tiny(math_attn, seed=3))
    x, tx, target = model_inputs(seed=8)

    def loss_of(out):
        return ((out - target.to(out.dtype)) ** 2).mean()

    def grads(model):
        return [p.grad.clone() for p in model.parameters()]

    for m, dt in ((exact, F64), (plain, torch.float32)):
        out, _ = torch.func.jvp(m, (x.to(dt),), (tx.to(dt),))
        loss_of(out).backward()
    ref_e, ref_p = grads(exact), grads(plain)

    def dual_step(model):
        with fwAD.dual_level():
            out, t = fwAD.unpack_dual(model(fwAD.make_dual(x, tx)))
        return out, t

    def pairs_step(model):  # rCM-style: (x, t_x) carried through each layer by hand
        h, th = x, tx
        for blk in model:
            B, S, _ = h.shape
            q, k, v = blk.qkv(h).view(B, S, 3, blk.H, blk.D).unbind(2)
            tq, tk, tv = (th @ blk.qkv.weight.T).view(B, S, 3, blk.H, blk.D).unbind(2)
            o, to = fd.jvp_attention(q, k, v, tq, tk, tv, causal=True)
            h, th = blk.out(o.reshape(B, S, -1)), _ZerosForNone.apply(to.reshape(B, S, -1)) @ blk.out.weight.T
        return h, th

    for name, step in (("dual tensors", lambda: dual_step(lib)), ("explicit pairs", lambda: pairs_step(lib))):
        lib.zero_grad()
        out, t = step()
        loss_of(out).backward()
        for (pname, p), pe, pp in zip(lib.named_parameters(), ref_e, ref_p):
            check(f"{name}: grad {pname}", p.grad, pe, pp)
        out, t = step()
        with pytest.raises(RuntimeError, match="stop-gradient"):
            (loss_of(out) + t.square().mean()).backward()


def test_one_forward_per_call(use, monkeypatch):
    """Explicit pairs, torch.func.jvp and dual tensors each run the backend's forward once (no second primal
    pass); plain autograd runs forward and backward once each."""
    q, k, v, tq, tk, tv = qkv(seed=8)
    calls = count_calls(monkeypatch, use)
    fd.jvp_attention(q, k, v, tq, tk, tv)
    assert calls["attn_fwd"] == 1
    torch.func.jvp(lambda q, k: fd.jvp_attention(q, k, v)[0], (q, k), (tq, tk))
    assert calls["attn_fwd"] == 2
    with fwAD.dual_level():
        fd.jvp_attention(fwAD.make_dual(q, tq), k, fwAD.make_dual(v, tv))
    assert calls["attn_fwd"] == 3
    qg = q.clone().requires_grad_()
    fd.jvp_attention(qg, k, v)[0].sum().backward()
    assert calls == {"attn_fwd": 4, "attn_bwd": 1}, calls


# ----------------------------------------------------------------------------- stop-gradient contract
def test_stop_gradient_explicit(use):
    q, k, v, tq, tk, tv = qkv(seed=9)
    q.requires_grad_()
    o, to, lse, dlse = fd.jvp_attention(q, k, v, tq, tk, tv, return_lse=True)
    assert to.requires_grad  # guarded: a backward reaching it raises instead of silently giving 0
    with pytest.raises(RuntimeError, match="stop-gradient"):
        (o.sum() + to.sum()).backward()
    o, to, lse, dlse = fd.jvp_attention(q, k, v, tq, tk, tv, return_lse=True)
    with pytest.raises(RuntimeError, match="stop-gradient"):
        (lse.sum() + dlse.sum()).backward()
    o, to = fd.jvp_attention(q, k, v, tq, tk, tv)
    (o.sum() + to.detach().sum()).backward()  # detached: fine
    assert q.grad is not None and torch.isfinite(q.grad).all()
    # nothing requires grad: plain tensors, no guard
    _, to = fd.jvp_attention(q.detach(), k, v, tq, tk, tv)
    assert not to.requires_grad


def test_stop_gradient_dual_tensors(use):
    q, k, v, tq, *_ = qkv(seed=10)
    q.requires_grad_()
    with fwAD.dual_level():
        o = fd.jvp_attention(fwAD.make_dual(q, tq), k, v)[0]
        p, t = fwAD.unpack_dual(o)
        assert t.requires_grad
        with pytest.raises(RuntimeError, match="stop-gradient"):
            (p.sum() + t.sum()).backward()


def test_stop_gradient_returned_tangents_every_way(use):
    """The returned ``to`` / ``dlse`` raise when a backward reaches them in every way of calling, also where only a
    tangent requires grad (forward-AD tangents of a model's activations depend on its weights). Before: with dual
    tensors the returned ``to`` was a constant (the term silently lost; o's tangent was guarded), and with only a
    tangent requiring grad, explicit pairs and dual tensors silently gave it no gradient from ``to``."""
    q, k, v, tq, tk, tv = qkv(seed=14)
    stop = lambda: pytest.raises(RuntimeError, match="stop-gradient")
    # explicit pairs, q, k, v constants, tq requires grad (the other term keeps the loss differentiable)
    tg = tq.clone().requires_grad_()
    _, to, _, dlse = fd.jvp_attention(q, k, v, tg, tk, tv, return_lse=True)
    with stop():
        (to.sum() + tg.sum()).backward()
    with stop():
        (dlse.sum() + tg.sum()).backward()
    qg = q.clone().requires_grad_()
    with fwAD.dual_level():
        # dual tensors, q requires grad: the returned to / dlse, as o's tangent
        o, to, lse, dlse = fd.jvp_attention(fwAD.make_dual(qg, tq), k, v, return_lse=True)
        with stop():
            (fwAD.unpack_dual(o).primal.sum() + to.sum()).backward()
        with stop():
            (fwAD.unpack_dual(lse).primal.sum() + dlse.sum()).backward()
        # dual tensors, only the tangent requires grad: o's tangent and the returned to
        o, to = fd.jvp_attention(fwAD.make_dual(q, tg), k, v)
        for t in (fwAD.unpack_dual(o).tangent, to):
            with stop():
                (t.sum() + tg.sum()).backward()
    # a loss through o (and the detached tangent) still runs
    qg, tg = q.clone().requires_grad_(), tq.clone().requires_grad_()
    with fwAD.dual_level():
        o, to = fd.jvp_attention(fwAD.make_dual(qg, tg), k, v)
        (fwAD.unpack_dual(o).primal.sum() + to.detach().sum()).backward()
    assert qg.grad is not None and tg.grad is None


def test_stop_gradient_func_jvp(use):
    """Under torch.func.jvp the tangent output is guarded as with dual tensors: it requires grad when q does,
    and a backward that reaches it raises, for the attention alone, through a model's later layers, and
    under torch.func.grad (before: functorch's second context saw no requires-grad input, the tangent came
    back as a constant and such a loss silently lost the term). Through the primal, gradients equal plain
    autograd's (the MeanFlow pattern)."""
    q, k, v, tq, *_ = qkv(seed=11)
    q.requires_grad_()
    o, to = torch.func.jvp(lambda q: fd.jvp_attention(q, k, v)[0], (q,), (tq,))
    assert o.requires_grad and to.requires_grad
    with pytest.raises(RuntimeError, match="stop-gradient"):
        (o.sum() + to.square().sum()).backward()
    o, to = torch.func.jvp(lambda q: fd.jvp_attention(q, k, v)[0], (q,), (tq,))
    (o.sum() + to.detach().sum()).backward()
    q2 = q.detach().clone().requires_grad_()
    fd.jvp_attention(q2, k, v)[0].sum().backward()
    assert torch.allclose(q.grad, q2.grad, rtol=1e-6, atol=1e-6)

    lib, _, _ = models(seed=2)
    x, tx, _ = model_inputs(seed=12)
    out, t = torch.func.jvp(lib, (x,), (tx,))
    assert out.requires_grad and t.requires_grad
    with pytest.raises(RuntimeError, match="stop-gradient"):
        t.sum().backward()

    # torch.func.grad: the reference backend composes; the kernels (plain tensors only) refuse it by name
    for which, expect in ((1, "stop-gradient"), (0, None)):
        fn = torch.func.grad(lambda q, i=which: torch.func.jvp(lambda q: fd.jvp_attention(q, k, v)[0], (q,), (tq,))[i]
                             .sum())
        if use != "reference":
            with pytest.raises(NotImplementedError, match="torch.func.grad / vjp / jacrev around the triton"):
                fn(q.detach())
        elif expect:
            with pytest.raises(RuntimeError, match=expect):
                fn(q.detach())
        else:
            assert torch.allclose(fn(q.detach()), q2.grad, rtol=1e-6, atol=1e-6)


def test_nested_transforms_refused(use):
    """One forward-mode level only: jvp of jvp (the fused jvp rule would hand the inner tangent to the outer
    level: a silently zero second derivative before) and vmap with jvp raise NotImplementedError naming the
    limit; vmap without a tangent and grad of jvp work (above)."""
    q, k, v, tq, *_ = qkv(seed=24)
    att = lambda q: fd.jvp_attention(q, k, v)[0]
    with pytest.raises(NotImplementedError, match="nested forward-mode"):
        torch.func.jvp(lambda q: torch.func.jvp(att, (q,), (tq,))[1], (q,), (tq,))
    with pytest.raises(NotImplementedError, match="nested forward-mode"):
        torch.func.jacfwd(lambda q: torch.func.jvp(att, (q,), (tq,))[1])(q)
    with pytest.raises(NotImplementedError, match="vmap together with"):
        torch.func.vmap(lambda q, t: torch.func.jvp(att, (q,), (t,)))(q[None], tq[None])
    got = torch.func.vmap(att)(q[None])
    assert torch.allclose(got[0], att(q), rtol=1e-6, atol=1e-6)
    # torch.func.grad around a call without forward-AD tangents (plain, explicit pairs): a custom op without
    # functorch rules, refused by name (was PyTorch's "must override the setup_context staticmethod")
    for f in (lambda q: att(q).sum(), lambda q: fd.jvp_attention(q, k, v, tq)[0].sum()):
        with pytest.raises(NotImplementedError, match="torch.func.grad / vjp / jacrev around"):
            torch.func.grad(f)(q)


def test_double_backward_raises(use):
    """A gradient taken with create_graph=True and differentiated again raises on every backend and every way in
    (before: the kernels' gradient had no graph, the reference's one with its saved lse constant: a gradient
    penalty silently vanished or came out wrong); create_graph=True alone, not differentiated again, works."""
    q0, k, v, tq, *_ = qkv(seed=25)
    calls = {
        "plain": lambda q: fd.jvp_attention(q, k, v)[0],
        "explicit": lambda q: fd.jvp_attention(q, k, v, tq)[0],
        "func.jvp": lambda q: torch.func.jvp(lambda q: fd.jvp_attention(q, k, v)[0], (q,), (tq,))[0],
    }
    for name, f in calls.items():
        q = q0.clone().requires_grad_()
        o = f(q)
        g, = torch.autograd.grad(o.square().sum(), q, create_graph=True)
        q2 = q0.clone().requires_grad_()
        g2, = torch.autograd.grad(f(q2).square().sum(), q2)
        assert torch.equal(g.detach(), g2), name
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            (o.sum() + g.square().sum()).backward()
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            torch.autograd.grad(g.square().sum(), q)


def test_no_reference_cycle(use):
    """A step's tensors are freed when the step's references go, without the garbage collector, under
    torch.func.jvp and with dual tensors (the stop-gradient guard once kept the tangents on a context whose node
    they point to: a cycle that leaked q, k, v, o and the tangents every call, even through gc.collect())."""
    import gc
    import weakref

    import torch.autograd.forward_ad as fwAD

    def step(how):
        q, k, v, tq, *_ = (x.requires_grad_(i < 3) for i, x in enumerate(qkv(seed=26)))
        if how == "func":
            o, to = torch.func.jvp(lambda q: fd.jvp_attention(q, k, v)[0], (q,), (tq,))
        else:
            with fwAD.dual_level():
                o, to = fwAD.unpack_dual(fd.jvp_attention(fwAD.make_dual(q, tq), k, v)[0])
        (o.sum() + to.detach().sum()).backward()
        return weakref.ref(k), weakref.ref(to)

    gc.disable()
    try:
        for how in ("func", "dual"):
            wk, wt = step(how)
            assert wk() is None and wt() is None, how
    finally:
        gc.enable()


def test_dual_and_explicit_tangents_together():
    q, k, v, tq, tk, tv = qkv(seed=13)
    with fwAD.dual_level():
        with pytest.raises(ValueError, match=r"tq, tk, tv"):
            fd.jvp_attention(fwAD.make_dual(q, tq), k, v, None, tk, None)
    with pytest.raises(ValueError, match=r"tq, tk, tv"):
        torch.func.jvp(lambda q: fd.jvp_attention(q, k, v, tq)[0], (q,), (tq,))


# ----------------------------------------------------------------------------- bad inputs
def _bad_cases():
    q, k, v, tq, tk, tv = qkv(B=1, Sq=4, Sk=5, Hq=4, Hkv=2, D=8, Dv=8)
    return {
        "k-head-dim": (dict(k=k[..., :4]), ValueError, r"^k: head dim 4"),
        "k-batch": (dict(k=torch.cat([k, k])), ValueError, r"k, v: batch"),
        "v-batch": (dict(v=torch.cat([v, v])), ValueError, r"k, v: batch sizes 1, 2"),
        "v-keys": (dict(v=v[:, :3]), ValueError, r"^v: \(heads, keys\)"),
        "v-heads": (dict(v=v[:, :, :1]), ValueError, r"^v: \(heads, keys\)"),
        "tq-shape": (dict(tq=tq[:, :3]), ValueError, r"^tq: shape"),
        "tq-head-dim": (dict(tq=torch.randn(1, 4, 4, 9)), ValueError, r"^tq: shape \(1, 4, 4, 9\) differs"),
        "tk-dtype": (dict(tk=tk.double()), TypeError, r"^tk: dtype float64"),
        "tv-device": (dict(tv=tv.to("meta")), ValueError, r"^tv: device meta"),
        "tq-not-a-tensor": (dict(tq=[1.0]), TypeError, r"^tq: expected a torch.Tensor or None"),
        "k-dtype": (dict(k=k.half()), TypeError, r"^k: dtype float16 differs from q's float32"),
        "v-device": (dict(v=v.to("meta")), ValueError, r"^v: device meta"),
        "q-int": (dict(q=q.long(), k=k.long(), v=v.long()), TypeError, r"^q: expected float16"),
        "q-3d": (dict(q=q[0]), ValueError, r"^q: expected a 4-D tensor"),
        "q-not-a-tensor": (dict(q=q.numpy()), TypeError, r"^q: expected a torch.Tensor"),
        "q-head-dim-strided": (dict(q=q.transpose(1, 3)), ValueError, r"^q: the head dim must be contiguous"),
        "tv-head-dim-strided": (dict(tv=torch.randn(1, 5, 8, 2).transpose(2, 3)), ValueError, r"^tv: the head dim"),
        "gqa-ratio": (dict(q=torch.randn(1, 4, 3, 8)), ValueError, r"^k: the number of query heads \(3\)"),
        "head-dim-0": (dict(q=q[..., :0], k=k[..., :0]), ValueError, r"head dims must be >= 1"),
        "dv-0": (dict(v=v[..., :0]), ValueError, r"head dims must be >= 1"),
        "layout": (dict(layout="sbhd"), ValueError, r"^layout: expected one of"),
        "scale-nan": (dict(scale=float("nan")), ValueError, r"^scale: expected a finite float"),
        "scale-inf": (dict(scale=float("inf")), ValueError, r"^scale: expected a finite float"),
        # a subnormal float32 scale kept a bit or none: μ and Ȯ came out 0 (an explore run, scale 1.4e-45)
        "scale-subnormal": (dict(scale=1e-40), ValueError, r"^scale: 1e-40 is subnormal in float32"),
        "scale-subnormal-negative": (dict(scale=-1.4e-45), ValueError, r"^scale: -1.4e-45 is subnormal in float32"),
        "scale-subnormal-f64": (dict(q=q.double(), k=k.double(), v=v.double(), tq=tq.double(), tk=tk.double(),
                                     tv=tv.double(), scale=1e-310), ValueError,
                                r"^scale: 1e-310 is subnormal in float64"),
        # float(scale) parsed a string; a tensor that requires grad (a learnable temperature) silently got no gradient
        "scale-str": (dict(scale="0.5"), TypeError, r"^scale: expected a float, got str"),
        "scale-bool": (dict(scale=True), TypeError, r"^scale: expected a float, got bool"),
        "scale-requires-grad": (dict(scale=torch.tensor(0.5, requires_grad=True)), ValueError, r"^scale: requires"),
        "tangent_dtype": (dict(tangent_dtype=torch.float16), ValueError, r"^tangent_dtype"),
        "tangent_dtype-int": (dict(tangent_dtype=torch.int32), ValueError, r"^tangent_dtype"),
        "causal-str": (dict(causal="no"), TypeError, r"^causal: expected a bool"),  # was truthy: ran causal
        "return-lse-str": (dict(return_lse="yes"), TypeError, r"^return_lse: expected a bool"),
        "causal-int-2": (dict(causal=2), TypeError, r"^causal: expected a bool"),  # (0 / 1 pass, as numpy bools)
    }


BAD = _bad_cases()


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs(use, name):
    q, k, v, tq, tk, tv = qkv(B=1, Sq=4, Sk=5, Hq=4, Hkv=2, D=8, Dv=8)
    kw, exc, msg = BAD[name]
    a = dict(q=q, k=k, v=v, tq=tq, tk=tk, tv=tv)
    a.update({n: kw[n] for n in list(a) if n in kw})
    opts = {n: x for n, x in kw.items() if n not in a}
    with pytest.raises(exc, match=re.compile(msg)):
        fd.jvp_attention(a["q"], a["k"], a["v"], a["tq"], a["tk"], a["tv"], **opts)


def test_scale_zero_is_uniform_attention(use):
    """scale=0 (accepted, unlike a subnormal scale): every key weighs the same, o is the mean of v over the keys a
    query sees (bottom-right causal: query i of Sq sees Sk − Sq + i + 1 keys), its tangent the mean of tv (Ṡ = 0),
    dlse 0 and lse = ln(keys seen)."""
    q, k, v, tq, tk, tv = qkv(B=1, Sq=3, Sk=5, Hq=2, Hkv=1, D=8, Dv=8, seed=19)
    for causal in (False, True):
        o, to, lse, dlse = fd.jvp_attention(q, k, v, tq, tk, tv, scale=0, causal=causal, return_lse=True)
        seen = torch.tensor([5, 5, 5] if not causal else [3, 4, 5])
        keep = (torch.arange(5)[None, :] < seen[:, None]).double()  # [Sq, Sk]
        want_o = torch.einsum("ij,bjd->bid", keep, v[:, :, 0].double()) / seen[None, :, None]
        want_t = torch.einsum("ij,bjd->bid", keep, tv[:, :, 0].double()) / seen[None, :, None]
        for h in range(2):
            assert torch.allclose(o[:, :, h].double(), want_o, atol=1e-6), causal
            assert torch.allclose(to[:, :, h].double(), want_t, atol=1e-6), causal
        assert torch.allclose(lse.double(), seen.double().log().expand(1, 2, 3), atol=1e-6)
        assert torch.equal(dlse, torch.zeros_like(dlse))


def test_head_dim_512():
    """Triton refuses head dims > 256 (the error lists every backend's reasons); the reference runs them."""
    q, k, v, tq, tk, tv = qkv(B=1, Sq=3, Sk=4, Hq=1, Hkv=1, D=512, Dv=512, seed=14)
    with fd.use_backend("triton"), pytest.raises(fd.BackendUnavailableError) as info:
        fd.jvp_attention(q, k, v, tq, tk, tv)
    msg = str(info.value)
    assert "head dim 512 > 256" in msg and "triton:" in msg and "reference: ok" in msg, msg
    assert any("head dim 512" in r for r in fd.available_backends("jvp_attention", q, head_dims=(512, 512))["triton"])
    # a value head dim past 256 with a small query / key one: refused for the value's
    q2, k2, v2, *_ = qkv(B=1, Sq=3, Sk=4, Hq=1, Hkv=1, D=64, Dv=512, seed=14)
    with fd.use_backend("triton"), pytest.raises(fd.BackendUnavailableError, match="head dim 512 > 256"):
        fd.jvp_attention(q2, k2, v2)
    assert any("head dim 512" in r for r in fd.available_backends("jvp_attention", q2, head_dims=(64, 512))["triton"])
    with fd.use_backend("reference"):
        o, to = fd.jvp_attention(q, k, v, tq, tk, tv)
    exact, plain = exact_and_plain(q, k, v, tq, tk, tv)
    check("o", o.transpose(1, 2), exact["o"], plain["o"])
    check("to", to.transpose(1, 2), exact["to"], plain["to"])


def test_available_backends_reads_the_head_dim_of_q():
    """``available_backends("jvp_attention", q)`` reports the reasons for tensors like ``q``: its head dim counts
    without ``head_dims=`` (before, a 4-D q of head dim 512 was reported runnable on Triton, and forcing Triton then
    raised for exactly that reason)."""
    q = torch.empty(1, 3, 1, 512)
    why = fd.available_backends("jvp_attention", q)["triton"]
    assert any("head dim 512" in r for r in why), why
    assert not any("head dim" in r for r in fd.available_backends("jvp_attention", q[..., :256])["triton"])
    assert fd.available_backends("jvp_attention", q)["reference"] == []


def test_batch_beyond_the_launch_grid_dispatches_to_reference():
    """B (or H) > 65535 exceeds the Triton kernels' launch grid: dispatch skips Triton with the reason (the
    reference runs it) instead of picking Triton and raising inside its launcher; under jvp_sdpa() the call is
    served, not failed. (Windowed attention folds windows into the batch.)"""
    g = torch.Generator().manual_seed(17)
    q, k, v = (torch.randn(65536, 2, 1, 4, generator=g) for _ in range(3))  # BSHD: B 65536, S 2, H 1, D 4
    why = fd.available_backends("jvp_attention", q, head_dims=(4, 4), batch_heads=(65536, 1))["triton"]
    assert any("launch grid" in r for r in why), why
    o, to = fd.jvp_attention(q, k, v, None, None, q)
    ref = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2).double() for x in (q, k, v)))
    assert (o.transpose(1, 2).double() - ref).abs().max() < 1e-5
    from fastdistill.integrations import jvp_sdpa

    with jvp_sdpa():
        out = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
    assert (out.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_autocast_as_stock_sdpa(backend):
    """Under torch.autocast the op computes in autocast's dtype, as stock SDPA (on autocast's lower-precision list):
    fp32 q/k/v and tangents are cast, the result is bitwise the call on the cast inputs outside autocast (the
    reference backend turns autocast off inside: no bf16 matmul of its own), the gradients come back in the
    inputs' fp32, and an fp32 q (after an fp32 RoPE) with bf16 k/v runs. Before, the direct op ignored autocast:
    fp32 attention (the slow correctness path on a GPU) and a TypeError for the mixed case."""
    if backend == "triton" and not fd._backend.interpreting():
        pytest.skip("the Triton backend runs on the CPU only under TRITON_INTERPRET=1")
    q, k, v, tq, tk, tv = qkv(B=1, Sq=16, Sk=16, Hq=2, Hkv=2, D=32, Dv=32, seed=18)
    BF = torch.bfloat16
    with fd.use_backend(backend):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype=BF):
            o, to = fd.jvp_attention(*x, tq, tk, tv)
        assert o.dtype == to.dtype == BF
        o.float().square().sum().backward()
        y = [t.clone().to(BF).requires_grad_() for t in (q, k, v)]
        o2, to2 = fd.jvp_attention(*y, *(t.to(BF) for t in (tq, tk, tv)))
        o2.float().square().sum().backward()
        assert torch.equal(o, o2) and torch.equal(to, to2)
        for a, b in zip(x, y):
            assert a.grad.dtype == F32 and torch.equal(a.grad, b.grad.float())
        with torch.autocast("cpu", dtype=BF):
            o3, to3 = fd.jvp_attention(q, k.to(BF), v.to(BF), tq, tk.to(BF), tv.to(BF))
            o4, to4 = torch.func.jvp(lambda a, b, c: fd.jvp_attention(a, b, c)[0], (q, k, v), (tq, tk, tv))
        assert torch.equal(o3, o2) and torch.equal(to3, to2)
        assert o4.dtype == to4.dtype == BF and torch.equal(o4, o2) and torch.equal(to4, to2)


def test_tangent_dtype_refused_under_forward_ad():
    """Under torch.func.jvp the tangent of o must have o's dtype: an fp32 tangent for a bf16 output made the next
    layer fail with an unrelated dtype error (F.linear: 'expected m1 and m2 to have the same dtype'). It raises
    naming tangent_dtype; explicit pairs keep the option."""
    q, k, v, tq, tk, tv = (t.to(torch.bfloat16) for t in qkv(B=1, Sq=8, Sk=8, Hq=2, Hkv=2, D=16, Dv=16, seed=3))
    with fd.use_backend("reference"):
        with pytest.raises(ValueError, match="tangent_dtype: under torch.func.jvp"):
            torch.func.jvp(lambda a: fd.jvp_attention(a, k, v, tangent_dtype=F32)[0], (q,), (tq,))
        o, to = torch.func.jvp(lambda a: fd.jvp_attention(a, k, v, tangent_dtype=torch.bfloat16)[0], (q,), (tq,))
        assert to.dtype == torch.bfloat16
        assert fd.jvp_attention(q, k, v, tq, tk, tv, tangent_dtype=F32)[1].dtype == F32


def test_fp32_without_fp64_tensor_cores(monkeypatch):
    """On sm_86 / sm_89 / sm_120 (no FP64 tensor cores: Triton makes the fp32 kernels' float64 logit dots FMA loops
    whose operands need more than the 99 KiB of shared memory a block gets there from head dim 80, a launch
    failure) fp32 dispatches to the reference backend with its reason listed; fp16 stays on Triton; forcing
    Triton raises naming it, and the kernels themselves refuse. The device's capability is faked (no GPU)."""
    if not fd._backend.interpreting():
        pytest.skip("the Triton backend runs on the CPU only under TRITON_INTERPRET=1")
    from fastdistill.kernels import jvp_attention as kern

    archs = (75, 80, 86, 87, 89, 90, 100, 103, 120)
    assert [a for a in archs if kern.fp32_supported(a)] == [80, 90]
    q, k, v, tq, tk, tv = qkv(B=1, Sq=5, Sk=6, Hq=2, Hkv=1, D=16, Dv=16, seed=16)
    assert fd.available_backends("jvp_attention", q, head_dims=(16, 16))["triton"] == []
    monkeypatch.setattr(kern, "device_arch", lambda x: 89)
    why = fd.available_backends("jvp_attention", q, head_dims=(16, 16))["triton"]
    assert why and "float32 on sm_89" in why[0], why
    assert fd.available_backends("jvp_attention", q.half(), head_dims=(16, 16))["triton"] == []
    o, to = fd.jvp_attention(q, k, v, tq, tk, tv, causal=True)
    with fd.use_backend("reference"):
        o_ref, to_ref = fd.jvp_attention(q, k, v, tq, tk, tv, causal=True)
    assert torch.equal(o, o_ref) and torch.equal(to, to_ref)
    with fd.use_backend("triton"), pytest.raises(fd.BackendUnavailableError, match="float32 on sm_89"):
        fd.jvp_attention(q, k, v, tq, tk, tv)
    x = q.transpose(1, 2).contiguous()  # BHSD, as the kernels take it
    lse = torch.empty(x.shape[:3])
    with pytest.raises(ValueError, match="q: float32 inputs need FP64 tensor cores"):
        kern.attn_fwd(x, x, x, None, None, None, torch.empty_like(x), None, lse, None, causal=False, scale=0.25)
    with pytest.raises(ValueError, match="q: float32 inputs need FP64 tensor cores"):
        kern.attn_bwd(x, x, x, x, x, lse, None, *(torch.empty_like(x) for _ in range(3)), causal=False, scale=0.25)


def test_tangent_dtype_same_as_q_and_fp64():
    """tangent_dtype=q.dtype is accepted (the default); fp64 inputs run on the reference backend in fp64."""
    q, k, v, tq, tk, tv = qkv(seed=15, dtype=F64)
    with fd.use_backend("reference"):
        o, to, lse, dlse = fd.jvp_attention(q, k, v, tq, tk, tv, tangent_dtype=F64, return_lse=True, causal=True)
    assert o.dtype == to.dtype == lse.dtype == dlse.dtype == F64
    exact = oracle(*bhsd(q, k, v, tq, tk, tv), causal=True)
    for name, x in (("o", o.transpose(1, 2)), ("to", to.transpose(1, 2)), ("lse", lse), ("dlse", dlse)):
        fin = torch.isfinite(exact[name])
        assert torch.allclose(x[fin], exact[name][fin], rtol=1e-12, atol=1e-12), name
    with fd.use_backend("triton"), pytest.raises(fd.BackendUnavailableError, match="dtype float64"):
        fd.jvp_attention(q, k, v, tq, tk, tv)


# ----------------------------------------------------------------------------- torch.compile, opcheck
def _compiled(fn):
    torch._dynamo.reset()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, fullgraph=True, backend=cnt), cnt


def test_compile_explicit_tangents(use):
    """fullgraph compile of an explicit call with tangents and a backward through o and lse: equal to eager;
    the tangent outputs come back detached (documented: stop-gradient without the runtime guard)."""
    q, k, v, tq, tk, tv = qkv(seed=16)

    def f(q, k, v, tq, tk, tv):
        o, to, lse, dlse = fd.jvp_attention(q, k, v, tq, tk, tv, causal=True, return_lse=True)
        return o * 2.0, to, lse, dlse

    go = torch.randn(2, 9, 4, 8, generator=gen(17))
    glse = torch.randn(2, 4, 9, generator=gen(18))
    results = []
    for fn in (f, _compiled(f)[0]):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o, to, lse, dlse = fn(*leaves, tq, tk, tv)
        grads = torch.autograd.grad([o, lse], leaves, [go, glse])
        results.append((o, to, lse, dlse, *grads))
        if fn is not f:
            assert not to.requires_grad and not dlse.requires_grad
    for name, a, b in zip(("o", "to", "lse", "dlse", "dq", "dk", "dv"), *results):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), name


def test_compile_plain_attention_backward(use):
    q, k, v, *_ = qkv(seed=19, layout="bhsd")

    def f(q, k, v):
        return fd.jvp_attention(q, k, v, layout="bhsd", scale=0.3)[0].square().sum()

    compiled, cnt = _compiled(f)
    out = []
    for fn in (f, compiled):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        loss = fn(*leaves)
        out.append((loss, *torch.autograd.grad(loss, leaves)))
    assert cnt.frame_count == 1
    for name, a, b in zip(("loss", "dq", "dk", "dv"), *out):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), name


def test_compile_scale_and_sequence_length_that_change(use):
    """A softmax scale that changes between calls (symbolic from its second value) and a sequence dim marked
    dynamic, under fullgraph compile: equal to eager (before: math.isfinite on the symbolic scale raised
    "Unsupported"). Head dims must stay static: torch.compile(dynamic=True) is not supported."""
    def f(q, k, v, scale):
        return fd.jvp_attention(q, k, v, scale=scale, causal=True)[0].square().sum()

    compiled, cnt = _compiled(f)
    for i, (S, scale) in enumerate(((9, 0.3), (11, 0.3), (6, 0.45))):
        q, k, v, *_ = qkv(Sq=S, Sk=S, seed=40 + i)
        out = []
        for fn in (f, compiled):
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            for x in leaves:
                torch._dynamo.mark_dynamic(x, 1)
            loss = fn(*leaves, scale)
            out.append((loss, *torch.autograd.grad(loss, leaves)))
        for name, a, b in zip(("loss", "dq", "dk", "dv"), *out):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (S, name)
        if i == 1:
            assert cnt.frame_count == 1, cnt.frame_count  # a new sequence length reuses the graph


def test_compile_batch_that_changes(use):
    """A batch size that changes between calls under fullgraph compile (automatic dynamic from its second value):
    the launch-grid check must reach the backend choice as a guard, not a symbol (before: "Unsupported")."""
    def f(q, k, v):
        return fd.jvp_attention(q, k, v)[0].square().sum()

    compiled, _ = _compiled(f)
    for B in (1, 2, 3):
        q, k, v, *_ = qkv(B=B, Sq=5, Sk=5, seed=50 + B)
        assert torch.allclose(compiled(q, k, v), f(q, k, v), rtol=1e-6, atol=1e-6), B


@pytest.mark.parametrize("variant", ["tangents-bshd", "no-tangent-bhsd", "tv-only-fp32-tangent"])
def test_opcheck(use, variant):
    q, k, v, tq, tk, tv = qkv(B=1, Sq=5, Sk=7, Hq=2, Hkv=1, D=8, Dv=4, seed=20)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    lay, tans, want_t, t_dtype = 0, (tq, tk, tv), True, 0
    if variant == "no-tangent-bhsd":
        q, k, v = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
        lay, tans, want_t = 1, (None, None, None), False
    elif variant == "tv-only-fp32-tangent":
        q, k, v = (x.detach().half().requires_grad_() for x in (q, k, v))
        tans, t_dtype = (None, None, tv.half()), 1
    args = (True, 0.3, lay, want_t, t_dtype, use)
    torch.library.opcheck(torch.ops.fastdistill.jvp_attn_fwd.default, (q, k, v, *tans, *args))
    with torch.no_grad():
        o, _, lse, _, lo = torch.ops.fastdistill.jvp_attn_fwd(q, k, v, *tans, *args)
    assert lo.shape == (lse.shape if q.dtype == torch.float32 else (0,))  # the low word of lse: fp32 only
    do = torch.randn(o.shape, generator=gen(21)).to(o.dtype)
    for dlse in (None, torch.randn(lse.shape, generator=gen(22))):
        torch.library.opcheck(torch.ops.fastdistill.jvp_attn_bwd.default,
                              (do, q.detach(), k.detach(), v.detach(), o, lse, lo, dlse, True, 0.3, lay, use))


def test_compile_forward_ad(use):
    """Forward-AD traced by dynamo (torch.func.jvp or dual tensors inside the compiled function) is math attention
    in the graph, differentiated by PyTorch as stock SDPA's is: dynamo does not run an autograd.Function's custom
    jvp, so a traced fused pass differentiated the kernel launch (Triton: the interpreter failed, a GPU a zero or
    wrong tangent; the reference backend's differentiable math hid it in the tests), and a graph break instead
    (713b861) split the dual region into frames whose dual inputs dynamo sees as plain tensors (inductor then
    returned a None tangent; found by an audit). Now on every backend, as the sequence length changes, with a
    backward through the primal (MeanFlow), a graph break before the call, and fullgraph=True: equal to eager."""
    tol = dict(rtol=1e-5, atol=1e-6)
    for S in (9, 12):
        q, k, v, tq, tk, tv = qkv(Sq=S, Sk=S + 3, seed=23)
        eager = fd.jvp_attention(q, k, v, tq, tk, tv, causal=True)
        assert eager[1].abs().max() > 0.1

        def f(q, k, v, tq, tk, tv):
            return torch.func.jvp(lambda q, k, v: fd.jvp_attention(q, k, v, causal=True)[0], (q, k, v),
                                  (tq, tk, tv))

        if S == 9:
            torch._dynamo.reset()
            compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        o, t = compiled(q, k, v, tq, tk, tv)
        assert torch.allclose(o, eager[0], **tol) and torch.allclose(t, eager[1], **tol), S

        x, y = q.clone().requires_grad_(), q.clone().requires_grad_()  # the MeanFlow pattern: jvp, then backward
        (o, t), (o2, t2) = compiled(x, k, v, tq, tk, tv), f(y, k, v, tq, tk, tv)
        (o * t.detach()).sum().backward()
        (o2 * t2.detach()).sum().backward()
        assert torch.allclose(x.grad, y.grad, **tol), S

        def g(q, k, v, tq):  # (dual tensors that enter a separately compiled frame with requires_grad hit PyTorch's
            with fwAD.dual_level():  # "You must implement the jvp function" for any op: not covered here)
                p, t = fwAD.unpack_dual(fd.jvp_attention(fwAD.make_dual(q, tq), k, v, causal=True)[0])
                return p * 2, t

        def g2(q, k, v, tq):  # a graph break before the call: dynamo compiles the rest as a frame of its own,
            with fwAD.dual_level():  # where the dual q looks plain
                d = fwAD.make_dual(q, tq)
                torch._dynamo.graph_break()
                p, t = fwAD.unpack_dual(fd.jvp_attention(d, k, v, causal=True)[0])
                return p * 2, t

        p2, t2 = g(q, k, v, tq)
        assert torch.equal(t2, eager[1].new_tensor(fd.jvp_attention(q, k, v, tq, causal=True)[1]))
        for fn in (g, g2):
            torch._dynamo.reset()
            p, t = torch.compile(fn, backend="aot_eager")(q, k, v, tq)
            assert t is not None and torch.allclose(p, p2, **tol) and torch.allclose(t, t2, **tol), (S, fn.__name__)
    torch._dynamo.reset()


def test_compile_forward_ad_nested_inductor():
    """Dual tensors inside a compiled function whose attention sits one call deeper (as in any model), inductor,
    under jvp_sdpa: the tangent equals eager math SDPA's (before: None, silently; found by an audit)."""
    import torch.nn.functional as F

    from fastdistill.integrations import jvp_sdpa

    g = gen(61)
    W = torch.randn(16, 16, generator=g)
    q, k, v, tq = (torch.randn(1, 2, 8, 16, generator=g) for _ in range(4))
    f = lambda q: F.scaled_dot_product_attention(q @ W, k, v) * 2

    def dual_inside(q, tq):
        with fwAD.dual_level():
            return fwAD.unpack_dual(f(fwAD.make_dual(q, tq)))

    _, t_ref = torch.func.jvp(lambda q: fd.jvp_attention(q @ W, k, v, layout="bhsd")[0] * 2, (q,), (tq,))
    for plain in ("sdpa", "fastdistill"):
        torch._dynamo.reset()
        with jvp_sdpa(plain=plain):
            _, t = torch.compile(dual_inside)(q, tq)
        assert t is not None and (t - t_ref).abs().max() <= 1e-5 * t_ref.abs().max(), plain  # (inductor's fp32 sums)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- determinism
def test_deterministic(use):
    q, k, v, tq, tk, tv = qkv(B=1, Sq=70, Sk=90, seed=24)
    go = torch.randn(1, 70, 4, 8, generator=gen(25))
    runs = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o, to, lse, dlse = fd.jvp_attention(*leaves, tq, tk, tv, causal=True, return_lse=True)
        runs.append((o, to, lse, dlse, *torch.autograd.grad([o, lse], leaves, [go, torch.ones_like(lse)])))
    bits = lambda x: x.detach().reshape(-1).view(torch.uint8)
    for name, a, b in zip(("o", "to", "lse", "dlse", "dq", "dk", "dv"), *runs):
        assert torch.equal(bits(a), bits(b)), name


def test_dual_tangent_with_strided_head_dim():
    """A forward-AD tangent with a non-contiguous head dim (e.g. an expanded one) is accepted: the user
    does not choose the strides torch.func.jvp hands over."""
    q, k, v, tq, tk, tv = qkv(seed=31)
    t_exp = tq[..., :1].expand_as(tq)  # head-dim stride 0
    with fd.use_backend("reference"):
        o, t = torch.func.jvp(lambda q: fd.jvp_attention(q, k, v)[0], (q,), (t_exp,))
        o2, t2 = fd.jvp_attention(q, k, v, t_exp.contiguous())
    assert torch.equal(o, o2) and torch.allclose(t, t2, rtol=1e-6, atol=1e-6)


def test_outputs_follow_q_layout_and_no_zero_gradients(use):
    """o and its tangent take q's order of the sequence and head dims: for the transposed view of [B, S, H, D] memory
    that models pass (layout="bhsd"), o.transpose(1, 2).reshape(B, S, H·D) is a view (before: a contiguous o, so
    the model copied it and kept the copy for its next layer). A backward through o alone allocates no zero
    gradients for the unused outputs (before: the size of o and three [B, H, S]); through lse alone it works.
    Values bitwise those of contiguous inputs on the kernels (they read through the strides); the reference backend's
    torch matmuls may round strided and contiguous operands differently (an AVX-512 CPU's did, by an ulp): within
    2 ulps there. Found by a memory audit."""
    from test_kd import BigAllocations

    g = gen(51)
    B, S, H, D = 2, 9, 3, 8
    x, y, z = (torch.randn(B, S, H * D, generator=g) for _ in range(3))
    q, k, v = (t.view(B, S, H, D).transpose(1, 2).requires_grad_() for t in (x.clone(), y.clone(), z.clone()))
    tq = torch.randn(B, S, H * D, generator=g).view(B, S, H, D).transpose(1, 2)
    o, to = fd.jvp_attention(q, k, v, tq, None, None, layout="bhsd")
    assert o.transpose(1, 2).is_contiguous() and to.transpose(1, 2).is_contiguous()
    assert o.transpose(1, 2).reshape(B, S, H * D).data_ptr() == o.data_ptr()
    c = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    o2, to2 = fd.jvp_attention(*c, tq.contiguous(), None, None, layout="bhsd")
    eps = torch.finfo(o.dtype).eps
    same = torch.equal if use != "reference" else lambda a, b: torch.allclose(a, b, rtol=2 * eps, atol=2 * eps)
    assert same(o, o2) and same(to, to2)
    go = torch.randn(o.shape, generator=g)
    with BigAllocations(B * H * S) as log:
        o.backward(go)
    assert not [op for op in log.ops if "zeros" in op], log.ops
    o2.backward(go)
    for a, b in zip((q, k, v), c):
        assert same(a.grad, b.grad)
    q2 = q.detach().clone().requires_grad_()
    _, _, lse, _ = fd.jvp_attention(q2, k.detach(), v.detach(), tq, return_lse=True, layout="bhsd")
    lse.sum().backward()
    assert q2.grad is not None and q2.grad.abs().sum() > 0


def test_compile_forward_ad_lse_and_rows_without_keys(use):
    """The compiled forward-AD path (math in the graph) keeps the contract: lse and dlse, rows that see no key
    (causal, Sq > Sk) give o = 0, to = 0, lse = -inf, dlse = 0 and no NaN; GQA; equal to the eager fused pass. The
    gradient pass through it (causal and a key mask that masks a whole sample) has no NaN and matches the eager one."""
    q, k, v, tq, tk, tv = qkv(Sq=11, Sk=6, Hq=4, Hkv=2, seed=29)

    def f(q, k, v):
        return fd.jvp_attention(q, k, v, causal=True, return_lse=True)

    eager = fd.jvp_attention(q, k, v, tq, tk, tv, causal=True, return_lse=True)
    torch._dynamo.reset()
    (o, _, lse, _), (t_o, _, t_lse, _) = torch.compile(
        lambda q, k, v, tq, tk, tv: torch.func.jvp(f, (q, k, v), (tq, tk, tv)), backend="aot_eager",
        fullgraph=True)(q, k, v, tq, tk, tv)
    torch._dynamo.reset()
    assert not any(torch.isnan(x).any() for x in (o, t_o, lse, t_lse))
    assert torch.isneginf(lse[..., :5]).all() and (o[:, :5] == 0).all() and (t_o[:, :5] == 0).all()
    for name, a, b in (("o", o, eager[0]), ("to", t_o, eager[1]), ("dlse", t_lse, eager[3])):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    fin = torch.isfinite(eager[2])
    assert torch.equal(fin, torch.isfinite(lse)) and torch.allclose(lse[fin], eager[2][fin], rtol=1e-5, atol=1e-6)
    # the gradient pass through the same compiled JVP (MeanFlow's one forward): no NaN from the rows without keys
    # (causal, and a key mask that masks every key of the second sample: its scores are -inf before any fill)
    km = torch.tensor([[True] * 6, [False] * 6])[:, None, :]
    g = lambda q, k, v: fd.jvp_attention(q, k, v, causal=True, key_mask=km)[0]
    grads = []
    for run in ("eager", "compiled"):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        if run == "eager":
            out = fd.jvp_attention(*x, tq, tk, tv, causal=True, key_mask=km)[0]
        else:
            out = torch.compile(lambda q, k, v: torch.func.jvp(g, (q, k, v), (tq, tk, tv))[0], backend="aot_eager",
                                fullgraph=True)(*x)
            torch._dynamo.reset()
        assert (out[1] == 0).all()
        out.square().sum().backward()
        grads.append([t.grad for t in x])
    for name, a, b in zip(("dq", "dk", "dv"), grads[1], grads[0]):
        assert not torch.isnan(a).any() and torch.allclose(a, b, rtol=1e-4, atol=1e-5), name


def test_compile_inside_a_dual_level_explicit_pairs_and_autocast(use):
    """Under torch.compile inside a forward-AD dual level: (1) explicit (tq, tk, tv) pairs with plain q, k, v are
    the custom op's, as outside a dual level (before: sent to the math path, which raised "already carry
    forward-AD tangents"; with fullgraph=True an Unsupported error); (2) the math path keeps its scores and P·V
    in fp32 under autocast, as the eager fused pass does (before: autocast rounded its matmuls to bf16: o's error
    10x and to's 10x the eager pass's, against fp64 on the bf16-cast inputs). Found by a review."""
    q, k, v, tq, tk, tv = qkv(Sq=10, Sk=12, seed=71)
    ref = fd.jvp_attention(q, k, v, tq, tk, tv, causal=True)
    f = lambda *xs: fd.jvp_attention(*xs, causal=True)
    torch._dynamo.reset()
    with fwAD.dual_level():
        o, to = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, tq, tk, tv)
    assert torch.allclose(o, ref[0], rtol=1e-5, atol=1e-6) and torch.allclose(to, ref[1], rtol=1e-5, atol=1e-6)

    g = gen(72)
    S, D = 48, 32
    q, k, v, tq = (torch.randn(1, S, 2, D, generator=g) * 2 for _ in range(4))
    qb, kb, vb, tqb = (x.to(torch.bfloat16).double() for x in (q, k, v, tq))

    def math(q):  # fp64 oracle on the inputs autocast gives the op
        sc = torch.einsum("bqhd,bkhd->bhqk", q, kb) / D ** 0.5
        return torch.einsum("bhqk,bkhd->bqhd", sc.softmax(-1), vb)

    o64, to64 = torch.func.jvp(math, (qb,), (tqb,))
    h = lambda q, k, v, tq: torch.func.jvp(lambda q: fd.jvp_attention(q, k, v)[0], (q,), (tq,))
    errs = {}
    torch._dynamo.reset()
    for name, fn in (("eager", h), ("compiled", torch.compile(h, backend="aot_eager", fullgraph=True))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o, to = fn(q, k, v, tq)
        assert o.dtype == to.dtype == torch.bfloat16, name
        errs[name] = [(a.double() - b).abs().max().item() for a, b in ((o, o64), (to, to64))]
    torch._dynamo.reset()
    for (e_c, e_e), what in zip(zip(errs["compiled"], errs["eager"]), ("o", "to")):
        assert e_c <= 2 * e_e, (what, errs)
