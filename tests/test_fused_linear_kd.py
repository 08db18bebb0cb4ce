"""fused_linear_kd_loss vs an fp64 oracle: plain eager ``h @ W.T + b`` in float64, then the independent
kd oracle of test_kd.py (dense teachers) / test_kd_topk.py (top-k teachers); autograd of that gives dh, dW,
db. Every test with ``use`` runs under each CPU backend (reference; Triton when TRITON_INTERPRET=1)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from test_kd import DIVS, assert_finite_rel, assert_rel, gen, make_labels, oracle_kd, rel_err, upstream_for
from test_kd_topk import _oracle_D, _rel, confident_student_case, tail_bucket_logspace
from torch.utils.checkpoint import checkpoint

import fastdistill as fd
from fastdistill.ops import fused_linear_kd as flk
from fastdistill.ops.fused_linear_kd import _chunk_rows, fused_linear_kd_loss

F64 = torch.float64
TOL = 1e-10


# ----------------------------------------------------------------------------- cases and oracle
def make_case(lead=(7,), Hs=6, Ht=5, V=37, Vt=None, seed=0, dtype=F64):
    """Student (hidden, weight, bias) and teacher (hidden, weight, bias); logits of O(2) spread."""
    g = gen(seed)
    Vt = Vt or V
    r = lambda *sh, s=1.0: (torch.randn(*sh, generator=g, dtype=F64) * s).to(dtype)
    return dict(hs=r(*lead, Hs), W=r(V, Hs, s=0.8), b=r(V, s=0.5), ht=r(*lead, Ht), Wt=r(Vt, Ht, s=0.8),
                tb=r(Vt, s=0.5)), g


def _logits(h, W, b):
    z = h @ W.T
    return z + b if b is not None else z


def run(case, *, teacher="hidden", chunk_size=3, bias=True, tol=TOL, upstream=None, **kw):
    """Op (accum fp64) vs the oracle on fp64 inputs: loss, dh, dW, db under a non-unit upstream gradient."""
    x, w = case["hs"].clone().requires_grad_(), case["W"].clone().requires_grad_()
    bb = case["b"].clone().requires_grad_() if bias else None
    zt = _logits(case["ht"], case["Wt"], case["tb"])
    if teacher == "hidden":
        tkw = dict(teacher_hidden=case["ht"], teacher_weight=case["Wt"], teacher_bias=case["tb"])
    else:
        tkw = dict(teacher_logits=case.get("tlog", zt))
        zt = tkw["teacher_logits"]
    loss = fused_linear_kd_loss(x, w, **tkw, student_bias=bb, chunk_size=chunk_size, accum_dtype=F64, **kw)
    x2, w2 = case["hs"].clone().requires_grad_(), case["W"].clone().requires_grad_()
    b2 = case["b"].clone().requires_grad_() if bias else None
    z = _logits(x2, w2, b2)
    ref, zleaf = oracle_kd(z, zt, **kw)
    assert loss.shape == ref.shape, (loss.shape, ref.shape)
    assert_finite_rel(loss.detach(), ref.detach(), tol, "loss")
    up = upstream_for(ref) if upstream is None else upstream
    loss.backward(up)
    ref.backward(up)
    z.backward(zleaf.grad)
    grads = [("dh", x, x2), ("dW", w, w2)] + ([("db", bb, b2)] if bias else [])
    for name, a, e in ((n, a.grad, e.grad) for n, a, e in grads):
        assert a is not None and torch.isfinite(a).all(), f"{name}: {a}"
        assert_rel(a, e, tol, name)
    return loss.detach(), x.grad, w.grad


# ----------------------------------------------------------------------------- divergences × teacher
DIV_TEACHER = [(d, "hidden") for d in DIVS] + [(d, "logits") for d in ("fkl", "jsd-b0.3", "srkl-0.3", "tvd")]


@pytest.mark.parametrize("div,teacher", DIV_TEACHER, ids=[f"{d}-{t}" for d, t in DIV_TEACHER])
def test_flkd_divergences(use, div, teacher):
    case, _ = make_case(seed=1, Vt=37)
    run(case, teacher=teacher, temperature=2.0, t2_scale=True, **DIVS[div])


CASES = [
    dict(divergence="fkl", teacher_temperature=1.5, temperature=0.7),
    dict(divergence="fkl", labels=True, hard_label_alpha=0.3, chunk_size=1),
    dict(divergence="rkl", labels=True, ignore_index=-1, chunk_size=4),
    dict(divergence="skl", skew=0.3, mask=True, chunk_size=100),
    dict(divergence="tvd", weights=True, chunk_size=2),
    dict(divergence="jsd", beta=0.3, labels=True, mask=True, weights=True, hard_label_alpha=0.5),
    dict(divergence="fkl", reduction="sum", labels=True),
    dict(divergence="rkl", reduction="mean", mask=True, chunk_size=5),
    dict(divergence="srkl", reduction="none", labels=True, weights=True, chunk_size=1),
    dict(divergence="jsd", reduction="none", temperature=2.0, t2_scale=True, hard_label_alpha=0.2, labels=True),
    dict(divergence="fkl", num_items=23, labels=True),
    dict(divergence="tvd", reduction="mean", num_items=11, mask=True),
    dict(divergence="rkl", hard_label_alpha=1.0, labels=True),
    dict(divergence="fkl", softcap=3.0, logit_scale=0.7, temperature=2.0),
    dict(divergence="jsd", softcap=2.0, reduction="none", chunk_size=4),
    dict(divergence="fkl", Vt="+5", labels=True, hard_label_alpha=0.4),
    dict(divergence="rkl", Vt="+5", teacher="logits"),
    dict(divergence="jsd", Vt="-4", chunk_size=1),
    dict(divergence="srkl", Vt="-4", teacher="logits", reduction="none"),
    dict(divergence="fkl", lead=(2, 3), labels=True, reduction="none"),
    dict(divergence="jsd", lead=(2, 3), mask=True, weights=True, labels=True, hard_label_alpha=0.3, bias=False),
    dict(divergence="skl", Hs=9, Ht=3, V=41, Vt="+3", temperature=3.0, chunk_size=6),
]


def _id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_flkd_options(use, case):
    kw = dict(case)
    lead, V = kw.pop("lead", (7,)), kw.pop("V", 37)
    vt = kw.pop("Vt", None)
    shapes = dict(Hs=kw.pop("Hs", 6), Ht=kw.pop("Ht", 5))
    c, g = make_case(lead=lead, V=V, Vt=None if vt is None else V + int(vt), seed=2, **shapes)
    if kw.pop("labels", False):
        kw["labels"] = make_labels(lead, V, g, kw.get("ignore_index", -100))
    if kw.pop("mask", False):
        m = torch.rand(lead, generator=g) > 0.3
        m.view(-1)[-1], m.view(-1)[1] = True, False
        kw["mask"] = m
    if kw.pop("weights", False):
        kw["weights"] = torch.rand(lead, generator=g, dtype=F64) + 0.5
    run(c, **kw)


NEG_INF = [("batchmean", 1), ("batchmean", 50), ("mean", 3), ("none", 3)]


@pytest.mark.parametrize("reduction,chunk_size", NEG_INF, ids=[f"{r}-chunk{c}" for r, c in NEG_INF])
def test_flkd_neg_inf_teacher_rows(use, reduction, chunk_size):
    """Rows whose teacher logits are all −inf are invalid (kd_loss's rule): batchmean / mean divide by the
    rows left, known only after the sweep; dh is rescaled then (the correction factor)."""
    c, g = make_case(seed=3)
    t = _logits(c["ht"], c["Wt"], c["tb"])
    t[[1, 4]] = -math.inf
    t[2, :5] = -math.inf
    c["tlog"] = t
    loss, dh, _ = run(c, teacher="logits", chunk_size=chunk_size, reduction=reduction, divergence="jsd",
                      labels=make_labels((7,), 37, g), hard_label_alpha=0.2)
    assert (dh[[1, 4]] == 0).all()


def test_flkd_teacher_logits_bf16(use):
    """Stored bf16 teacher logits with an fp64 student: read as they are (the oracle upcasts the same values)."""
    c, g = make_case(seed=15, lead=(2, 4), Vt=40)
    c["tlog"] = _logits(c["ht"], c["Wt"], c["tb"]).bfloat16()
    run(c, teacher="logits", divergence="jsd", beta=0.3, reduction="none", labels=make_labels((2, 4), 37, g))


# ----------------------------------------------------------------------------- top-k teachers
def topk_oracle(z, ids, lps, mode, div, T=1.0, Tt=1.0, labels=None, alpha=0.0, weights=None, reduction="batchmean"):
    D = _oracle_D(mode, div, z, ids, lps, T, Tt)
    loss = (1 - alpha) * D
    valid = torch.ones(z.shape[0], dtype=torch.bool) if labels is None else labels != -100
    if alpha > 0:
        lab = labels.clamp_min(0)
        loss = loss + alpha * (torch.logsumexp(z, -1) - z.gather(1, lab[:, None])[:, 0])
    if weights is not None:
        loss = loss * weights
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss if reduction == "none" else loss.sum() / valid.sum()


TOPK = [("tail_bucket", "fkl", False), ("tail_bucket", "jsd", True), ("tail_bucket", "tvd", False),
        ("renorm", "rkl", True), ("renorm", "srkl", False), ("zero_tail", "fkl", True)]


@pytest.mark.parametrize("mode,div,opts", TOPK, ids=[f"{m}-{d}{'-options' * o}" for m, d, o in TOPK])
def test_flkd_topk(use, mode, div, opts):
    c, g = make_case(seed=4, V=40)
    zt = _logits(c["ht"], c["Wt"], c["tb"])
    lps, ids = torch.log_softmax(zt, -1).topk(6, -1)
    kw, okw = {}, {}
    if opts:
        lab = make_labels((7,), 40, g)
        lab[3] = ids[3, 1]
        w = torch.rand(7, generator=g, dtype=F64) + 0.5
        kw = dict(labels=lab, hard_label_alpha=0.3, weights=w, reduction="none", temperature=2.0,
                  teacher_temperature=1.5 if mode == "renorm" else None)
        okw = dict(labels=lab, alpha=0.3, weights=w, reduction="none", T=2.0, Tt=1.5 if mode == "renorm" else 1.0)
    x, w_ = c["hs"].clone().requires_grad_(), c["W"].clone().requires_grad_()
    loss = fused_linear_kd_loss(x, w_, teacher_topk=(ids, lps), topk_semantics=mode, divergence=div, chunk_size=3,
                                accum_dtype=F64, **kw)
    x2, w2 = c["hs"].clone().requires_grad_(), c["W"].clone().requires_grad_()
    ref = topk_oracle(x2 @ w2.T, ids, lps, mode, div, **okw)
    assert_rel(loss.detach(), ref.detach(), TOL, "loss")
    up = upstream_for(ref)
    loss.backward(up)
    ref.backward(up)
    assert_rel(x.grad, x2.grad, TOL, "dh")
    assert_rel(w_.grad, w2.grad, TOL, "dW")


@pytest.mark.parametrize("boost", [95.0, 120.0])
def test_flkd_topk_tail_bucket_confident_student_fp32(use, boost):
    """A top-k teacher through fused_linear_kd_loss runs kd_loss's kernels per chunk, tail_bucket's off-id tail
    included: test_kd_topk's confident fp32 student (tail mass e^{−boost}, in or below fp32's denormals) with h = I,
    so that the logits are Wᵀ exactly and dW is their gradient transposed. Forward KL's per-row losses and gradient
    finite and within 2x plain fp32 PyTorch's error (before, on Triton: +inf at 120)."""
    s, ids, lps = confident_student_case(boost, N=24)
    N = s.shape[0]
    W = s.t().contiguous().requires_grad_()
    loss = fused_linear_kd_loss(torch.eye(N), W, teacher_topk=(ids, lps), topk_semantics="tail_bucket",
                                divergence="fkl", reduction="none", chunk_size=7)
    loss.sum().backward()
    exact_x, plain_x = s.double().requires_grad_(), s.clone().requires_grad_()
    exact, plain = tail_bucket_logspace("fkl", exact_x, ids, lps), tail_bucket_logspace("fkl", plain_x, ids, lps)
    exact.sum().backward()
    plain.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(W.grad).all(), loss
    e_loss, p_loss = _rel(loss.detach(), exact.detach()), _rel(plain.detach(), exact.detach())
    e_grad, p_grad = _rel(W.grad.t(), exact_x.grad), _rel(plain_x.grad, exact_x.grad)
    assert e_loss <= 2 * p_loss + 1e-9, (e_loss, p_loss)
    assert e_grad <= 2 * p_grad + 1e-9, (e_grad, p_grad)


# ----------------------------------------------------------------------------- empty and all-ignored
EMPTY = [("N=0", r) for r in ("batchmean", "sum", "mean", "none")] + [
    ("labels", "batchmean"), ("labels", "none"), ("mask", "mean"), ("mask", "sum"), ("num_items", "batchmean"),
    ("num_items", "mean"), ("neg-inf-teacher", "batchmean"), ("neg-inf-teacher", "none")] + [
    ("V=0", r) for r in ("batchmean", "mean", "sum", "none")]  # every row has an empty vocabulary: invalid


@pytest.mark.parametrize("how,reduction", EMPTY, ids=[f"{h}-{r}" for h, r in EMPTY])
def test_flkd_empty_and_all_ignored(use, how, reduction):
    c, _ = make_case(lead=(0,) if how == "N=0" else (5,), seed=5)
    N = c["hs"].shape[0]
    kw = dict(reduction=reduction, hard_label_alpha=0.2, labels=torch.randint(0, 37, (N,)))
    tkw = dict(teacher_hidden=c["ht"], teacher_weight=c["Wt"])
    if how == "labels":
        kw["labels"] = torch.full((N,), -100)
    elif how == "mask":
        kw["mask"] = torch.zeros(N, dtype=torch.bool)
    elif how == "num_items":
        kw.update(labels=torch.full((N,), -100), num_items=8)
    elif how == "neg-inf-teacher":
        tkw = dict(teacher_logits=torch.full((N, 37), -math.inf, dtype=F64))
    elif how == "V=0":  # rows counted valid up front (mean: 1 / (n V) must not become inf)
        c.update(W=c["W"][:0], b=c["b"][:0])
        tkw["teacher_weight"] = c["Wt"][:0]
        kw.update(hard_label_alpha=0.0, labels=None, mask=torch.ones(N, dtype=torch.bool))
    x, w, b = (c[k].clone().requires_grad_() for k in ("hs", "W", "b"))
    loss = fused_linear_kd_loss(x, w, **tkw, student_bias=b, chunk_size=2, accum_dtype=F64, **kw)
    assert loss.shape == ((N,) if reduction == "none" else ())
    assert torch.isfinite(loss).all() and (loss == 0).all(), loss
    loss.backward(upstream_for(loss))
    for t in (x, w, b):
        assert t.grad is not None and t.grad.shape == t.shape and torch.isfinite(t.grad).all()
        assert (t.grad == 0).all()


# ----------------------------------------------------------------------------- autograd behaviour
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_flkd_backward_twice_and_upstream(use, reduction):
    c, g = make_case(seed=6)
    kw = dict(teacher_hidden=c["ht"], teacher_weight=c["Wt"], divergence="jsd", reduction=reduction,
              labels=make_labels((7,), 37, g), chunk_size=3)
    x, w, b = (c[k].clone().requires_grad_() for k in ("hs", "W", "b"))
    loss = fused_linear_kd_loss(x, w, student_bias=b, **kw)
    up = upstream_for(loss.detach())
    loss.backward(up, retain_graph=True)
    first = [t.grad.clone() for t in (x, w, b)]
    loss.backward(3 * up)
    for t, g1 in zip((x, w, b), first):
        assert_rel(t.grad, 4 * g1, 1e-6, "second backward")
    assert x.grad.dtype == w.grad.dtype == torch.float64  # inputs fp64, accumulation fp32


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_flkd_double_backward_raises(use, reduction):
    """A gradient taken with create_graph=True and differentiated again raises (before: the scalar reductions'
    saved gradient was a constant, silently dropped when another term was present; reduction="none" recomputed
    under grad mode and overwrote a recorded tensor: a wrong Hessian-vector product)."""
    c, g = make_case(seed=16)
    x, w = (c[k].clone().requires_grad_() for k in ("hs", "W"))
    loss = fused_linear_kd_loss(x, w, teacher_hidden=c["ht"], teacher_weight=c["Wt"], divergence="jsd",
                                reduction=reduction, chunk_size=3)
    gx, = torch.autograd.grad(loss.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="fused_linear_kd_loss: double backward is not supported"):
        (gx.square().sum() + w.sum()).backward()


def test_flkd_keeps_no_hidden_state_alive(use):
    """The scalar reductions save only the gradients: the hidden states are freed once the caller drops them, before
    and after backward, while the loss lives (the double-backward guard once held them as anchors)."""
    import weakref

    c, g = make_case(seed=17)
    x = c["hs"].clone().requires_grad_()
    h = x * 1.0  # the hidden states, a non-leaf as a model produces them
    wh = weakref.ref(h)
    loss = fused_linear_kd_loss(h, c["W"].clone().requires_grad_(), teacher_hidden=c["ht"], teacher_weight=c["Wt"],
                                divergence="jsd", chunk_size=3)
    del h
    assert wh() is None, "the hidden states outlive the forward"
    loss.backward()
    assert wh() is None and x.grad is not None


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_flkd_checkpoint(use, reduction):
    """torch.utils.checkpoint (use_reentrant=False): the forward is recomputed in backward, same gradients."""
    c, _ = make_case(seed=7)

    def f(x, w, b):
        return fused_linear_kd_loss(x, w, c["ht"], c["Wt"], student_bias=b, divergence="rkl", reduction=reduction,
                                    chunk_size=2, accum_dtype=F64) * 2.0

    grads = []
    for ckpt in (False, True):
        ts = [c[k].clone().requires_grad_() for k in ("hs", "W", "b")]
        out = checkpoint(f, *ts, use_reentrant=False) if ckpt else f(*ts)
        out.backward(upstream_for(out.detach()))
        grads.append([t.grad for t in ts])
    for a, e in zip(*grads):
        assert_rel(a, e, 1e-13, "checkpointed grad")


def test_flkd_grad_only_where_asked(use):
    c, _ = make_case(seed=8)
    kw = dict(teacher_hidden=c["ht"], teacher_weight=c["Wt"], student_bias=c["b"], accum_dtype=F64)
    w = c["W"].clone().requires_grad_()
    with torch.no_grad():
        loss = fused_linear_kd_loss(c["hs"], w, **kw)
    assert not loss.requires_grad
    x = c["hs"].clone()
    loss2 = fused_linear_kd_loss(x, w, **kw)  # only the weight
    assert_rel(loss2.detach(), loss, 1e-14, "loss")
    loss2.backward()
    assert x.grad is None and w.grad is not None
    c["ht"].requires_grad_()  # the teacher never gets a gradient
    loss3 = fused_linear_kd_loss(c["hs"], c["W"], **kw)
    assert not loss3.requires_grad


def test_flkd_held_gradient_times_go_in_row_slices():
    """An fp32 gradient held for fp16 parameters is scaled by the upstream gradient and cast in slices of 2**24
    elements (no second full-size fp32 temporary): every slice, the last partial one included, is written."""
    x = torch.randn((1 << 22) + 3, 4)  # 2**24 + 12 elements: one full slice of 2**22 rows, then 3 rows
    go = torch.tensor(0.75)
    out = flk._times_go(x, go, torch.float16)
    assert out.dtype == torch.float16 and out.shape == x.shape
    assert torch.equal(out, (x * go).half())
    assert flk._times_go(None, go, torch.float16) is None
    assert torch.equal(flk._times_go(x[:5], go, torch.float32), x[:5] * go)


def test_flkd_chunk_rows():
    assert _chunk_rows("auto", None, 10000, 1 << 20) == 2000  # 2048 rows fit 2 GiB: 5 equal chunks
    assert _chunk_rows("auto", 1, 10, 1 << 20) == 1
    assert _chunk_rows("auto", None, 7, 100) == 7
    assert _chunk_rows(4, None, 10, 0) == 4  # ceil(10 / 4) = 3 chunks of 4, 4, 2
    assert _chunk_rows(3, None, 10, 0) == 3
    assert _chunk_rows(100, None, 0, 0) == 1


@pytest.mark.parametrize("teacher", ["head", "logits-sliced-3d", "logits-2d", "topk"])
def test_flkd_auto_chunks_fit_the_budget(monkeypatch, teacher):
    """chunk_size="auto": each chunk's temporaries fit memory_budget_mb — the student's fp32 logits, plus the
    teacher's where they are computed here (a teacher head) or copied per chunk (a sliced [B, T, Vt] tensor, whose
    chunks cross sequence boundaries), plus a top-k teacher's stash of k logits — and the chunks are as few as
    that allows (equal sizes)."""
    V, Vt, B, T, k = 37, 41, 3, 9, 4
    N = B * (T - 1)
    c, g = make_case(lead=(B, T - 1), V=V, Vt=Vt, dtype=torch.float32)
    kw = dict(teacher_hidden=c["ht"], teacher_weight=c["Wt"])
    per_row = 4 * V
    if teacher == "head":
        per_row += 4 * Vt
    elif teacher == "logits-sliced-3d":
        kw = dict(teacher_logits=torch.randn(B, T, Vt, generator=g)[:, :-1])
        per_row += 4 * Vt
    elif teacher == "logits-2d":
        kw = dict(teacher_logits=torch.randn(B, T - 1, Vt, generator=g))  # rows viewed in place: no copy
    else:
        ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)]).view(B, T - 1, k)
        kw = dict(teacher_topk=(ids, torch.log_softmax(torch.randn(B, T - 1, k, generator=g), -1) - 0.1))
        per_row += 4 * k
    budget = per_row * 5.5  # room for 5 rows: 24 rows in 5 chunks of at most 5
    seen = []
    logits = flk._Head.logits

    def spy(self, x):
        if self.Wc.shape[0] == V:  # the student's head
            seen.append(x.shape[0])
        return logits(self, x)

    monkeypatch.setattr(flk._Head, "logits", spy)
    with fd.use_backend("reference"):
        fused_linear_kd_loss(c["hs"], c["W"].requires_grad_(), **kw, memory_budget_mb=budget / 2**20)
    assert sum(seen) == N
    assert max(seen) * per_row <= budget, (seen, per_row)
    assert len(seen) == math.ceil(N / 5), seen


def test_flkd_numpy_and_tensor_sizes(use):
    """chunk_size and memory_budget_mb as numpy scalars or one-element tensors (values read from a config array)
    act as the Python numbers (before: a numpy int chunk_size raised "expected 'auto' or an int")."""
    c, _ = make_case(seed=4)
    args = (c["hs"], c["W"], c["ht"], c["Wt"])
    want = fused_linear_kd_loss(*args, chunk_size=2)
    for cs in (np.int64(2), np.int32(2), torch.tensor(2)):
        assert torch.equal(fused_linear_kd_loss(*args, chunk_size=cs), want), cs
    want = fused_linear_kd_loss(*args, memory_budget_mb=0.001)
    for mb in (np.float32(0.001), np.float64(0.001), torch.tensor(0.001, dtype=F64)):
        assert torch.equal(fused_linear_kd_loss(*args, memory_budget_mb=mb), want), mb


def test_flkd_auto_chunks_match(use):
    c, _ = make_case(seed=9)
    args = (c["hs"], c["W"], c["ht"], c["Wt"])
    a = fused_linear_kd_loss(*args, accum_dtype=F64, divergence="tvd")
    b = fused_linear_kd_loss(*args, accum_dtype=F64, divergence="tvd", memory_budget_mb=1e-4)  # one row a chunk
    assert_rel(b, a, 1e-13, "auto chunks")


def test_flkd_torch_compile():
    c, _ = make_case(seed=10, dtype=torch.float32)
    x = c["hs"].clone().requires_grad_()

    def f(x):
        return fused_linear_kd_loss(x * 1.0, c["W"], c["ht"], c["Wt"], divergence="jsd") * 3

    out = torch.compile(f, backend="eager")(x)
    (g,) = torch.autograd.grad(out, x)
    ref = f(x)
    (gr,) = torch.autograd.grad(ref, x)
    assert torch.allclose(out, ref, rtol=1e-6) and torch.allclose(g, gr, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_flkd_autocast_cpu(use, reduction):
    """Autocast is off inside the op: on the CPU the logits stay fp32 GEMMs (autocast would round them)."""
    c, _ = make_case(seed=13, dtype=torch.float32)
    out = []
    for ac in (False, True):
        x = c["hs"].clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
            loss = fused_linear_kd_loss(x, c["W"], c["ht"], c["Wt"], divergence="jsd", reduction=reduction)
        loss.backward(torch.ones_like(loss))
        out.append((loss.detach(), x.grad))
    assert out[1][0].dtype == torch.float32 and out[1][1].dtype == torch.float32
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


# ----------------------------------------------------------------------------- low precision
def check_low_precision(div, dtype, device="cpu", lead=(9,), Hs=64, Ht=48, V=300, chunk_size=4):
    """Tolerance rule: error vs the fp64 oracle ≤ 2× that of eager in the input dtype (``h @ W.T + b`` in
    ``dtype``, then fp32 math, autograd back through the ``dtype`` matmul; at least the error of storing the
    exact gradient in ``dtype``) + a floor (fp32: see below)."""
    c, g = make_case(lead=lead, Hs=Hs, Ht=Ht, V=V, seed=11, dtype=dtype)
    kw = dict(DIVS[div], temperature=1.5, labels=make_labels(lead, V, g), hard_label_alpha=0.1)
    up = torch.tensor(1.7)
    dev = {k: v.to(device) for k, v in c.items()}
    ts = [dev[k].clone().requires_grad_() for k in ("hs", "W", "b")]
    kw_dev = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
    loss = fused_linear_kd_loss(*ts[:2], dev["ht"], dev["Wt"], student_bias=ts[2], teacher_bias=dev["tb"],
                                chunk_size=chunk_size, **kw_dev)
    loss.backward(up.to(device))
    assert loss.dtype == torch.float32 and [t.grad.dtype for t in ts] == [dtype] * 3

    def oracle(cdt):  # cdt: the dtype of the matmuls; the kd math is fp64 (cdt = fp64) or fp32 (plain eager)
        ls = [dev[k].to(cdt, copy=True).requires_grad_() for k in ("hs", "W", "b")]
        z = _logits(*ls)
        zt = _logits(*(dev[k].to(cdt) for k in ("ht", "Wt", "tb")))
        acc = F64 if cdt == F64 else torch.float32
        ref, zleaf = oracle_kd(z.to(acc).cpu(), zt.to(acc).cpu(), compute_dtype=acc, **kw)
        ref.backward(up.to(acc))
        z.backward(zleaf.grad.to(device, cdt))
        return ref.detach(), [t.grad.cpu() for t in ls]

    ref, rgrads = oracle(F64)
    plain, pgrads = oracle(dtype)
    # fp32: the kd gradient's own rounding (~1e-7, test_kd) is coherent along a row, so the sums over V (dh)
    # and over rows (dW, db) keep it where eager's averages out: a floor of ~30 fp32 ulps of the largest entry
    floor = 4e-6 if dtype == torch.float32 else 1e-6
    assert_rel(loss.detach().double().cpu(), ref, 2 * rel_err(plain, ref) + floor, f"loss {dtype}")
    for name, a, p_, r in zip(("dh", "dW", "db"), [t.grad.cpu() for t in ts], pgrads, rgrads):
        store = rel_err(r.to(dtype), r)  # storing the exact gradient in dtype: a floor no one beats
        assert_rel(a, r, 2 * max(rel_err(p_, r), store) + floor, f"{name} {dtype}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("div", ["fkl", "jsd-b0.5", "srkl-0.3"])
def test_flkd_low_precision(use, div, dtype):
    """On the CPU the GEMMs run in fp32 on upcast operands."""
    check_low_precision(div, dtype)


@pytest.mark.parametrize("addmm_ok", [True, False], ids=["addmm-out-fp32", "sliced-mm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_flkd_cuda_gemm_path_emulated(monkeypatch, dtype, addmm_ok):
    """The CUDA GEMM path (fp32-output GEMMs on bf16/fp16 operands, the gradient chunk cast to the operand
    dtype for the backward GEMMs, dW accumulated in fp32 by addmm or by vocabulary slices) run on the CPU with
    the two fp32-output GEMMs emulated by upcasting; held to the same tolerance rule."""
    monkeypatch.setattr(flk, "_lowp_gemm", lambda device, dt: (True, addmm_ok) if dt in flk._LOWP else (False, False))
    monkeypatch.setattr(flk, "_mm32", lambda a, b: torch.mm(a.float(), b.float()))
    monkeypatch.setattr(flk, "_addmm32_", lambda c, a, b: c.addmm_(a.float(), b.float()))
    calls = []
    orig = flk._Head.backward
    monkeypatch.setattr(flk._Head, "backward", lambda self, *a: calls.append(self.lowp) or orig(self, *a))
    check_low_precision("jsd-b0.5", dtype, chunk_size=3)
    assert calls and all(calls)


@pytest.mark.parametrize("gemm", ["cpu", "cuda-emulated"])
def test_flkd_fp16_loss_scaling(monkeypatch, use, gemm):
    """fp16 hidden states, weight and bias under loss scaling (GradScaler's 65536): the scalar reductions hold
    dh, dW, db in fp32 until backward has applied the upstream gradient, so gradients below fp16's range survive,
    as in kd_loss. Bound: storing the exact scaled gradient in fp16, ×4. Before: dh and dW were rounded to fp16
    in the forward, unscaled (about 8% of dh flushed to zero here; relative error ~5e-2)."""
    if gemm == "cuda-emulated":  # the CUDA path's fp32-output GEMMs on fp16 operands, emulated by upcasting
        monkeypatch.setattr(flk, "_lowp_gemm", lambda d, dt: (True, True) if dt in flk._LOWP else (False, False))
        monkeypatch.setattr(flk, "_mm32", lambda a, b: torch.mm(a.float(), b.float()))
        monkeypatch.setattr(flk, "_addmm32_", lambda c, a, b: c.addmm_(a.float(), b.float()))
    c, g = make_case(lead=(64,), Hs=16, V=48, seed=3, dtype=torch.float16)
    tlog = (torch.randn(64, 48, generator=g, dtype=F64) * 2).float()
    kw = dict(num_items=1 << 20)  # batchmean over a large accumulated batch: every gradient below fp16's range
    scale = 65536.0
    ts = [c[k].clone().requires_grad_() for k in ("hs", "W", "b")]
    loss = fused_linear_kd_loss(ts[0], ts[1], teacher_logits=tlog, student_bias=ts[2], chunk_size=16, **kw)
    (loss * scale).backward()
    ls = [c[k].double().requires_grad_() for k in ("hs", "W", "b")]
    z = _logits(*ls)
    ref, zleaf = oracle_kd(z, tlog.double(), **kw)
    ref.backward()
    z.backward(zleaf.grad)
    for name, t, r in zip(("dh", "dW", "db"), ts, ls):
        got, exact = t.grad.double() / scale, r.grad
        assert t.grad.dtype == torch.float16, name
        store = rel_err((exact * scale).half().double() / scale, exact)
        assert_rel(got, exact, 4 * store + 1e-6, f"{name} (fp16, loss x {scale:g})")
        representable = (exact * scale).abs() >= torch.finfo(torch.float16).tiny
        assert (got[representable] != 0).all(), f"{name}: gradients flushed to zero"


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_flkd_meta_tensors(reduction):
    """Shapes on the meta device (model-size dry runs), forward and backward, as kd_loss (before: torch.autocast
    raised 'unsupported scalarType' for device type meta)."""
    h = torch.empty(2, 3, 8, device="meta", requires_grad=True)
    w = torch.empty(40, 8, device="meta", requires_grad=True)
    loss = fused_linear_kd_loss(h, w, teacher_logits=torch.empty(2, 3, 40, device="meta"), reduction=reduction)
    assert loss.device.type == "meta" and loss.shape == ((2, 3) if reduction == "none" else ())
    loss.sum().backward()
    assert h.grad.shape == h.shape and w.grad.shape == w.shape and h.grad.device.type == "meta"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("div", ["fkl", "jsd-b0.5", "srkl-0.3"])
def test_flkd_cuda_low_precision(div, dtype):
    check_low_precision(div, dtype, device="cuda", lead=(33,), Hs=256, Ht=128, V=1271, chunk_size=16)


@pytest.mark.gpu
def test_flkd_cuda_autocast():
    """fp32 parameters under bf16 autocast: the GEMM operands are bf16 (as F.linear's), the logits fp32, the
    gradients fp32; the same as passing bf16 copies, up to the gradients' final rounding to bf16."""
    c, _ = make_case(lead=(40,), Hs=128, Ht=96, V=1000, seed=14, dtype=torch.float32)
    c = {k: v.cuda() for k, v in c.items()}
    res = []
    for ac in (True, False):
        cast = (lambda t: t.clone()) if ac else (lambda t: t.bfloat16())
        x, w = cast(c["hs"]).requires_grad_(), cast(c["W"]).requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ac):
            loss = fused_linear_kd_loss(x, w, cast(c["ht"]), cast(c["Wt"]), divergence="jsd", chunk_size=16)
        loss.backward()
        res.append((loss.detach(), x.grad.float(), w.grad.float()))
    assert res[0][1].dtype == torch.float32 and torch.allclose(res[0][0], res[1][0], rtol=1e-6)
    for a, b in zip(res[0][1:], res[1][1:]):
        assert_rel(a.cpu(), b.cpu().double(), 1e-2, "autocast grad")


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_flkd_cuda_no_host_sync(reduction):
    """Forward and backward under torch.cuda.set_sync_debug_mode("error") after a warm-up call."""
    c, g = make_case(lead=(2, 17), Hs=128, Ht=96, V=1000, seed=12, dtype=torch.bfloat16)
    c = {k: v.cuda() for k, v in c.items()}
    lab = make_labels((2, 17), 1000, g).cuda()

    def step():
        x, w = c["hs"].clone().requires_grad_(), c["W"].clone().requires_grad_()
        loss = fused_linear_kd_loss(x, w, c["ht"], c["Wt"], divergence="jsd", labels=lab, hard_label_alpha=0.2,
                                    reduction=reduction, chunk_size=8)
        loss.backward(torch.ones_like(loss))
        return x.grad, w.grad

    step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ----------------------------------------------------------------------------- bad inputs
def _bad():
    c, _ = make_case()
    hs, W, ht, Wt = c["hs"], c["W"], c["ht"], c["Wt"]
    lab = torch.randint(0, 37, (7,))
    ids = torch.zeros(7, 38, dtype=torch.long)
    top3 = dict(teacher_hidden=None, teacher_weight=None)  # + teacher_topk: 3 ids per row, log-probs −2
    ids3, lp3 = torch.arange(3).repeat(7, 1), torch.full((7, 3), -2.0, dtype=F64)
    return {
        "hidden-1d": (dict(student_hidden=hs[0]), "student_hidden"),
        "hidden-int": (dict(student_hidden=hs.long()), "student_hidden"),
        "weight-hidden-size": (dict(student_weight=W[:, :4]), "student_weight"),
        "weight-1d": (dict(student_weight=W[0]), "student_weight"),
        "weight-device": (dict(student_weight=W.to("meta")), "student_weight"),
        "bias-shape": (dict(student_bias=torch.zeros(36, dtype=F64)), "student_bias"),
        "no-teacher": (dict(teacher_hidden=None, teacher_weight=None), "exactly one way"),
        "two-teachers": (dict(teacher_logits=torch.zeros(7, 37, dtype=F64)), "exactly one way"),
        "teacher-weight-missing": (dict(teacher_weight=None), "teacher_weight"),
        "teacher-hidden-rows": (dict(teacher_hidden=ht[:5]), "teacher_hidden"),
        "teacher-weight-size": (dict(teacher_weight=Wt[:, :3]), "teacher_weight"),
        "teacher-bias-shape": (dict(teacher_bias=torch.zeros(3, dtype=F64)), "teacher_bias"),
        "teacher-bias-with-logits": (dict(teacher_hidden=None, teacher_weight=None, teacher_bias=c["tb"],
                                          teacher_logits=torch.zeros(7, 37, dtype=F64)), "teacher_bias"),
        "teacher-logits-rows": (dict(teacher_hidden=None, teacher_weight=None,
                                     teacher_logits=torch.zeros(6, 37, dtype=F64)), "teacher_logits"),
        "topk-k": (dict(teacher_hidden=None, teacher_weight=None, teacher_topk=(ids, ids.double())), "k = 38"),
        "topk-ids-at-V": (dict(top3, teacher_topk=(ids3.index_put((torch.tensor(2), torch.tensor(1)), torch.tensor(37)),
                                                   lp3)), r"teacher_topk ids: values must be in \[0, 37\)"),
        "topk-ids-negative": (dict(top3, teacher_topk=(ids3 - 1, lp3)), r"teacher_topk ids: values must be in"),
        "topk-zero-tail-jsd": (dict(top3, teacher_topk=(ids3, lp3), divergence="jsd", topk_semantics="zero_tail"),
                               "zero_tail' defines forward KL only"),
        "topk-tail-bucket-teacher-temperature": (dict(top3, teacher_topk=(ids3, lp3), teacher_temperature=2.0),
                                                 "teacher_temperature: only topk_semantics='renorm'"),
        "topk-ids-float": (dict(teacher_hidden=None, teacher_weight=None,
                                teacher_topk=(ids[:, :3].double(), ids[:, :3].double())), "ids"),
        "topk-not-pair": (dict(teacher_hidden=None, teacher_weight=None, teacher_topk=ids), "teacher_topk"),
        "labels-shape": (dict(labels=lab[:4]), "labels"),
        "labels-shape-7x1": (dict(labels=lab.view(7, 1)), r"labels: expected shape \(7,\)"),
        "labels-range": (dict(labels=lab + 37), "labels"),
        "labels-at-V": (dict(labels=torch.where(torch.arange(7) == 3, 37, lab)),
                        r"labels: values must be in \[0, 37\)"),
        "labels-negative": (dict(labels=torch.where(torch.arange(7) == 3, -1, lab)), r"labels: values must be in"),
        "mask-dtype": (dict(mask=torch.ones(7)), "mask"),
        "weights-shape": (dict(weights=torch.ones(3, dtype=F64)), "weights"),
        "divergence": (dict(divergence="kl"), "divergence"),
        "reduction": (dict(reduction="avg"), "reduction"),
        "temperature": (dict(temperature=0.0), "temperature"),
        "beta": (dict(divergence="jsd", beta=1.5), "beta"),
        "alpha-without-labels": (dict(hard_label_alpha=0.5), "labels"),
        "rkl-smaller-teacher-vocab": (dict(divergence="rkl", teacher_weight=Wt[:30]), "reverse KL"),
        "rkl-teacher-vocab-one-short": (dict(divergence="rkl", teacher_weight=Wt[:36]),
                                        "teacher_weight: vocabulary 36 < the student's 37"),
        "chunk-size-0": (dict(chunk_size=0), "chunk_size"),
        "chunk-size-str": (dict(chunk_size="big"), "chunk_size"),
        "chunk-size-bool": (dict(chunk_size=True), "chunk_size"),
        "budget-negative": (dict(memory_budget_mb=-1), "memory_budget_mb"),
        "budget-bool": (dict(memory_budget_mb=True), "memory_budget_mb: expected a positive finite"),
        "budget-inf": (dict(memory_budget_mb=float("inf")), "memory_budget_mb: expected a positive finite"),
        "weights-require-grad": (dict(weights=torch.ones(7, dtype=F64, requires_grad=True)), "weights: requires grad"),
        "budget-with-int-chunk": (dict(memory_budget_mb=10, chunk_size=4), "memory_budget_mb"),
        "accum-dtype": (dict(accum_dtype=torch.float16), "accum_dtype"),
        "num-items": (dict(num_items=0), "num_items"),
    }


BAD = _bad()


@pytest.mark.parametrize("name", list(BAD))
def test_flkd_bad_inputs(name):
    c, _ = make_case()
    kw = dict(student_hidden=c["hs"], student_weight=c["W"], teacher_hidden=c["ht"], teacher_weight=c["Wt"])
    kw.update(BAD[name][0])
    with pytest.raises((ValueError, TypeError), match=re.compile(BAD[name][1])):
        fused_linear_kd_loss(**kw)


# ----------------------------------------------------------------------------- FSDP2 (CPU, gloo)
def _fsdp_worker(rank: int, world: int, rendezvous: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    # a file rendezvous: no TCP port to race for with other tests' process groups
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        with fd.use_backend("reference"):
            for reduction in ("batchmean", "none"):
                _fsdp_case(rank, world, reduction, fully_shard)
    finally:
        dist.destroy_process_group()


class _Head(torch.nn.Module):
    """The FSDP2 unit: the op runs inside its forward, where lm_head's parameters are unsharded."""

    def __init__(self, Hs, V):
        super().__init__()
        self.lm_head = torch.nn.Linear(Hs, V, dtype=F64)

    def forward(self, h, ht, Wt, reduction):
        return fused_linear_kd_loss(h, self.lm_head.weight, ht, Wt, student_bias=self.lm_head.bias,
                                    divergence="jsd", reduction=reduction, chunk_size=3, accum_dtype=F64)


class _Model(torch.nn.Module):
    def __init__(self, Hs, V):
        super().__init__()
        self.proj = torch.nn.Linear(Hs, Hs, dtype=F64)
        self.head = _Head(Hs, V)

    def forward(self, x, ht, Wt, reduction):
        return self.head(self.proj(x), ht, Wt, reduction)


def _fsdp_case(rank, world, reduction, fully_shard):
    """head is a non-root FSDP2 unit (resharded after forward: reduction="none" recomputes in backward after
    FSDP2 has all-gathered the weight again); the root holds a projection in front of it."""
    torch.manual_seed(0)
    Hs, Ht, V, N = 6, 5, 37, 7
    model = _Model(Hs, V)
    params0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    Wt = torch.randn(V, Ht, dtype=F64)
    data = [(torch.randn(N, Hs, dtype=F64), torch.randn(N, Ht, dtype=F64)) for _ in range(world)]
    up = torch.linspace(0.5, 2.0, N, dtype=F64) if reduction == "none" else torch.tensor(1.5, dtype=F64)
    fully_shard(model.head, reshard_after_forward=True)
    fully_shard(model)
    x, ht = data[rank]
    model(x, ht, Wt, reduction).backward(up)
    # expected: the mean over ranks of each rank's unsharded gradient (FSDP2 averages data-parallel gradients)
    expected = {k: torch.zeros_like(v) for k, v in params0.items()}
    for xr, htr in data:
        p = {k: v.clone().requires_grad_() for k, v in params0.items()}
        z = (xr @ p["proj.weight"].T + p["proj.bias"]) @ p["head.lm_head.weight"].T + p["head.lm_head.bias"]
        ref, zl = oracle_kd(z, htr @ Wt.T, divergence="jsd", reduction=reduction)
        ref.backward(up)
        z.backward(zl.grad)
        for k in expected:
            expected[k] += p[k].grad / world
    for k, v in model.named_parameters():
        assert_rel(v.grad.full_tensor(), expected[k], 1e-10, f"FSDP2 {reduction} {k} rank {rank}")
    with pytest.raises(TypeError, match="student_weight: got a DTensor"):  # sharded, outside the forward
        fused_linear_kd_loss(x, model.head.lm_head.weight, ht, Wt)


def test_flkd_fsdp2_gloo(tmp_path):
    """Two CPU processes (gloo): FSDP2-sharded lm_head, the op called inside the module's forward."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    pytest.importorskip("torch.distributed.fsdp").fully_shard  # noqa: B018
    torch.multiprocessing.spawn(_fsdp_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


def test_fullgraph_compile_says_why_it_runs_eagerly():
    """fullgraph=True around fused_linear_kd_loss fails (its row loop runs eagerly); dynamo's error gives the reason
    (before: "Skip calling torch.compiler.disable()d function (reason: None)")."""
    import torch._dynamo as dynamo

    dynamo.reset()
    g = torch.Generator().manual_seed(1)
    h, W = torch.randn(8, 16, generator=g), torch.randn(40, 16, generator=g)
    f = torch.compile(lambda h: fd.fused_linear_kd_loss(h, W, h, W), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="fused_linear_kd_loss runs eagerly"):
        f(h)
    dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_empty_batch_backward_low_precision(dtype):
    """No rows at all (N = 0) with half-precision parameters: a zero loss and zero gradients of the parameters'
    shapes and dtypes (found by the explore profile: the fp16 path's held fp32 gradients are scaled in backward
    in slices sized from the first row, which an empty dh does not have: IndexError)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(0, 8, generator=g).to(dtype).requires_grad_()
    W = torch.randn(5, 8, generator=g).to(dtype).requires_grad_()
    b = torch.randn(5, generator=g).to(dtype).requires_grad_()
    ht, Wt = torch.randn(0, 8, generator=g).to(dtype), torch.randn(5, 8, generator=g).to(dtype)
    loss = fd.fused_linear_kd_loss(h, W, ht, Wt, student_bias=b)
    loss.backward(torch.tensor(3.0))
    assert loss.item() == 0.0
    for x in (h, W, b):
        assert x.grad is not None and x.grad.dtype == dtype and x.grad.shape == x.shape
        assert not x.grad.any()


def test_float_option_schedule_does_not_recompile_per_value():
    """A compiled step that calls fused_linear_kd_loss with a new temperature / alpha each step: the frame compiles
    for the first value and once more when a value changes, then serves every value (before: two more frames per
    value, up to the recompile limit: the options were traced as graph inputs up to the eager loop and specialised
    there). Loss and gradients equal eager's at each value."""
    import torch._dynamo as dynamo
    import torch._dynamo.testing as dt

    dynamo.reset()
    g = torch.Generator().manual_seed(3)
    W, Wt = torch.randn(60, 16, generator=g, requires_grad=True), torch.randn(60, 12, generator=g)
    h, ht = torch.randn(10, 16, generator=g, requires_grad=True), torch.randn(10, 12, generator=g)
    lab = torch.randint(0, 60, (10,), generator=g)

    def step(h, W, T, a):
        x = h * 2.0
        return fd.fused_linear_kd_loss(x, W, ht, Wt, divergence="jsd", temperature=T, hard_label_alpha=a,
                                       labels=lab) + x.sum() * 0.0

    cnt = dt.CompileCounterWithBackend("aot_eager")
    f = torch.compile(step, backend=cnt)
    frames = []
    for i, T in enumerate((1.0, 1.5, 2.0, 2.5, 3.0, 0.7)):
        a = 0.1 + 0.1 * i
        got = f(h, W, T, a)
        dh, dW = torch.autograd.grad(got, (h, W))
        want = step(h, W, T, a)
        wdh, wdW = torch.autograd.grad(want, (h, W))
        assert torch.equal(got, want) and torch.equal(dh, wdh) and torch.equal(dW, wdW), T
        frames.append(cnt.frame_count)
    assert frames[-1] == frames[1], frames
    dynamo.reset()


def test_flkd_shifted_teacher_logits_and_dw_read_in_place(use):
    """Shifted teacher logits (logits[:, :-1] of [B, T, Vt]) are read a chunk at a time, never copied whole
    (before: reshape(N, Vt) copied them, 2.1 GB at flkd-128k bf16, live for the whole forward), also with chunks that
    cross a sequence boundary; and dW is scaled in place (before: dW_acc * f was a second fp32 [V, H], the op's
    peak). Values and gradients bitwise those of a contiguous teacher. Found by a memory audit."""
    from test_kd import BigAllocations

    g = gen(41)
    B, T, H, V, Vt = 3, 6, 8, 64, 70
    N = B * (T - 1)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64).float()
    W = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3).float()
    TL = torch.randn(B, T, Vt, generator=g, dtype=torch.float64).float() * 2
    lab = make_labels((B, T - 1), V, g)
    for chunk in (4, 5, 7):  # 4, 7: chunks cross sequences (a copy of such a chunk alone); 5: a sequence a chunk
        kw = dict(divergence="jsd", labels=lab, hard_label_alpha=0.2, chunk_size=chunk)
        x, w = h.clone().requires_grad_(), W.clone().requires_grad_()
        t_in = TL[:, :-1]
        with BigAllocations(N * Vt) as log:
            loss = fused_linear_kd_loss(x[:, :-1], w, teacher_logits=t_in, **kw)
        assert not log.ops, (chunk, log.ops)
        with BigAllocations(V * H) as log:
            loss.backward()
        x2, w2 = h.clone().requires_grad_(), W.clone().requires_grad_()
        ref = fused_linear_kd_loss(x2[:, :-1], w2, teacher_logits=TL[:, :-1].contiguous(), **kw)
        ref.backward()
        assert torch.equal(loss, ref) and torch.equal(x.grad, x2.grad) and torch.equal(w.grad, w2.grad), chunk
    w = W.clone().requires_grad_()
    with BigAllocations(V * H) as log:  # the scalar path computes dW in the forward: dW_acc is the one [V, H]
        fused_linear_kd_loss(h, w, teacher_logits=TL, divergence="fkl", chunk_size=5)
    assert len(log.ops) == 1, log.ops


def test_flkd_fp64_teacher_keeps_the_student_fp32():
    """An fp64 teacher head (or fp64 teacher logits) next to an fp32 student: the student's logits, GEMMs and dW
    accumulator stay fp32 (before: an fp64 teacher head turned them fp64, an fp64 copy of the student weight and an
    fp64 dW: 2 x 8·V·H bytes, and fp64 GEMMs on a GPU). The result matches the all-fp32 call to fp32 rounding."""
    from test_kd import BigAllocations

    g = gen(43)
    N, H, Ht, V = 12, 8, 6, 64
    h, th = torch.randn(N, H, generator=g), torch.randn(N, Ht, generator=g, dtype=torch.float64)
    W, tW = torch.randn(V, H, generator=g) * 0.3, torch.randn(V, Ht, generator=g, dtype=torch.float64) * 0.3
    w = W.clone().requires_grad_()
    with BigAllocations(V * H) as log:
        loss = fused_linear_kd_loss(h, w, th, tW, divergence="jsd", chunk_size=5)
        loss.backward()
    assert not [o for o in log.outs if o[1] == torch.float64 and o[2] == (V, H)], log.outs
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32
    w2 = W.clone().requires_grad_()
    ref = fused_linear_kd_loss(h, w2, th.float(), tW.float(), divergence="jsd", chunk_size=5)
    ref.backward()
    assert_rel(loss.double(), ref.double(), 1e-5, "loss")
    assert_rel(w.grad.double(), w2.grad.double(), 1e-4, "dW")


def test_flkd_chunk_budget_counts_every_student_temporary():
    """chunk_size="auto": the per-row bytes count, on CUDA, the gradient's operand copy also for fp32 weights under
    bf16 autocast (before: only for bf16/fp16 weights), and the fp32 vocabulary-slice products of dW where torch's
    addmm has no fp32 accumulator (before: uncounted, a 2 GiB budget held ~3.4 GiB). Found by the audits."""
    bf, f32 = torch.bfloat16, torch.float32
    V = 1000
    assert flk._student_row_bytes(V, f32, 0, False, f32, None, (False, False)) == 4 * V  # the CPU
    assert flk._student_row_bytes(V, f32, 64, False, f32, None, (False, False)) == 4 * (V + 64)  # top-k's stash
    assert flk._student_row_bytes(V, f32, 0, True, bf, bf, (True, True)) == 6 * V
    assert flk._student_row_bytes(V, f32, 0, True, f32, bf, (True, True)) == 6 * V  # fp32 W, bf16 autocast
    assert flk._student_row_bytes(V, f32, 0, True, bf, bf, (True, False)) == 10 * V  # no fp32 addmm
    assert flk._student_row_bytes(V, torch.float64, 0, True, bf, bf, (True, False)) == 10 * V  # fp64 logits


def test_flkd_shifted_teacher_logits_under_compile():
    """fused_linear_kd_loss with teacher_logits=logits[:, :-1] inside torch.compile (the op itself runs eagerly):
    equal to eager. Before, a view probed with try/except before the eager boundary failed while dynamo traced
    ("Cannot view a tensor ..."; found by a review)."""
    import torch._dynamo as dynamo

    dynamo.reset()
    g = gen(45)
    h, W = torch.randn(2, 5, 8, generator=g), torch.randn(30, 8, generator=g) * 0.3
    TL = torch.randn(2, 5, 30, generator=g)
    f = lambda h, w, tl: fused_linear_kd_loss(h[:, :-1], w, teacher_logits=tl[:, :-1], divergence="jsd", chunk_size=3)
    w1, w2 = W.clone().requires_grad_(), W.clone().requires_grad_()
    a, b = torch.compile(f, backend="aot_eager")(h, w1, TL), f(h, w2, TL)
    a.backward()
    b.backward()
    assert torch.equal(a, b) and torch.equal(w1.grad, w2.grad)
    dynamo.reset()


class _LiveChunks(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest number of new storages of at least ``n`` elements (logits chunks) alive at once. Frees are seen
    through weakref finalizers; cyclic garbage (the Triton interpreter's) is collected before each GEMM."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.live, self.peak = n, 0, 0

    def _free(self):
        self.live -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import gc
        import weakref

        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):  # before a logits GEMM
            gc.collect()
        ins = {x.untyped_storage().data_ptr() for x in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(x, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.set_:  # (the interpreter's views of a storage it was handed)
            return out
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.numel() >= self.n and o.untyped_storage().data_ptr() not in ins:
                self.live += 1
                self.peak = max(self.peak, self.live)
                weakref.finalize(o.untyped_storage(), self._free)
        return out


@pytest.mark.parametrize("backend", ["triton"])  # (the reference backend's kd_loss has [rows, V] temporaries)
def test_flkd_without_gradient_holds_one_chunk_at_a_time(use, backend):
    """Without a gradient (no_grad, and the forward of reduction="none") the sweep frees a chunk's logits before
    the next chunk's GEMMs: the student and teacher logits of one chunk at most (before: the previous chunk's were
    still referenced, 3 chunks live with a teacher head, 2 with teacher logits: 1.5-2x the memory budget). Found
    by a memory audit."""
    g = gen(47)
    N, H, V, rows = 15, 4, 33, 5
    h, th = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    W, tW = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    TL = torch.randn(N, V, generator=g)
    for teacher, most in (((th, tW), 2), ((), 1)):
        kw = dict(chunk_size=rows, divergence="jsd")
        if not teacher:
            kw["teacher_logits"] = TL
        with torch.no_grad(), _LiveChunks(rows * V) as log:
            fused_linear_kd_loss(h, W, *teacher, **kw)
        assert log.peak == most, (bool(teacher), log.peak)
        with _LiveChunks(rows * V) as log:  # the forward of "none" sweeps without a gradient too
            fused_linear_kd_loss(h, W.clone().requires_grad_(), *teacher, reduction="none", **kw)
        assert log.peak == most, (bool(teacher), "none", log.peak)
