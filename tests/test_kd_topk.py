"""kd_loss with an offline top-k teacher (docs/kd_ops.md, "Top-k teachers"), against fp64
autograd oracles written from the three documented semantics; plus torch.compile of kd_loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastdistill as fd

F64 = torch.float64
DIVS = ["fkl", "rkl", "jsd", "skl", "srkl", "tvd"]


def _div(name, p, q, beta=0.5, lam=0.1, lp=None, lq=None):
    """The divergence of p and q along the last dim; lp, lq: their logs where given (a q that underflows to 0
    while log q is finite: forward KL's log p − log q stays finite)."""
    lp = p.log() if lp is None else lp
    lq = q.log() if lq is None else lq
    xl = lambda w, a: torch.where(w > 0, w * a, torch.zeros_like(a))
    if name == "fkl":
        return xl(p, lp - lq).sum(-1)
    if name == "rkl":
        return xl(q, lq - lp).sum(-1)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * xl(p, lp - m.log()).sum(-1) + (1 - beta) * xl(q, lq - m.log()).sum(-1)
    if name == "skl":
        return xl(p, lp - (lam * p + (1 - lam) * q).log()).sum(-1)
    if name == "srkl":
        return xl(q, lq - ((1 - lam) * p + lam * q).log()).sum(-1)
    return 0.5 * (p - q).abs().sum(-1)


def _oracle_D(mode, name, z, ids, lps, T, Tt=1.0):
    if mode == "tail_bucket":
        q = torch.softmax(z / T, -1)
        p = lps.exp()
        tail = (1 - p.sum(-1, keepdim=True)).clamp_min(0)
        if ids.shape[1] == z.shape[1]:  # documented: ids covering the vocabulary leave no tail (1 − Σp is rounding)
            tail = torch.zeros_like(tail)
        P = torch.cat([p, tail], 1)
        # the student's tail summed over the columns off the ids (= 1 − Σ q_ids without its cancellation)
        Q = torch.cat([q.gather(1, ids), q.scatter(1, ids, 0.0).sum(-1, keepdim=True)], 1)
        return _div(name, P, Q)
    if mode == "zero_tail":
        return (lps.exp() * (lps - torch.log_softmax(z / T, -1).gather(1, ids))).sum(-1)
    return _div(name, torch.softmax(lps / Tt, -1), torch.softmax(z.gather(1, ids) / T, -1))


def _case(N=5, V=300, k=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V, generator=g, dtype=F64).requires_grad_()
    lps, ids = torch.log_softmax(2 * torch.randn(N, V, generator=g, dtype=F64), -1).topk(k, -1)
    return s, ids, lps


CASES = [(m, d) for m in ("tail_bucket", "renorm") for d in DIVS] + [("zero_tail", "fkl")]


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("mode,div", CASES, ids=[f"{m}-{d}" for m, d in CASES])
def test_topk_semantics(use, mode, div, T):
    s, ids, lps = _case()
    loss = fd.kd_loss(s, teacher_topk=(ids, lps), topk_semantics=mode, divergence=div, temperature=T,
                      accum_dtype=F64)
    loss.backward()
    g = s.grad.clone()
    s.grad = None
    ref = _oracle_D(mode, div, s, ids, lps, T).mean()
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-11, atol=1e-14)
    assert torch.allclose(g, s.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("mode", ["tail_bucket", "zero_tail", "renorm"])
def test_topk_with_every_option(use, mode):
    """CE mixing (a label inside and outside the k ids, an ignored row), T², softcap, weights,
    reduction='none' with a non-unit upstream gradient; renorm re-tempers the stored log-probs."""
    s, ids, lps = _case(N=6, V=257, k=9, seed=1)
    N = s.shape[0]
    lab = torch.randint(0, 257, (N,))
    lab[1] = -100
    lab[3] = ids[3, 2]
    w = torch.rand(N, dtype=F64) + 0.5
    Tt = 1.5 if mode == "renorm" else None
    up = torch.linspace(0.5, 2.0, N, dtype=F64)
    loss = fd.kd_loss(s, teacher_topk=(ids, lps), topk_semantics=mode, temperature=2.0, teacher_temperature=Tt,
                      t2_scale=True, labels=lab, hard_label_alpha=0.3, weights=w, softcap=5.0, reduction="none",
                      accum_dtype=F64)
    (loss * up).sum().backward()
    g = s.grad.clone()
    s.grad = None
    z = 5 * torch.tanh(s / 5)
    D = _oracle_D(mode, "fkl", z, ids, lps, 2.0, Tt or 1.0)
    ce = F.cross_entropy(z, lab.clamp_min(0), reduction="none")
    ref = (0.7 * 4 * D + 0.3 * ce) * w * (lab != -100)
    (ref * up).sum().backward()
    assert torch.allclose(loss, ref, rtol=1e-11, atol=1e-14)
    assert torch.allclose(g, s.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("mode", ["tail_bucket", "zero_tail", "renorm"])
def test_topk_inplace_grad(use, mode):
    """inplace_grad=True writes the gradient over the logits: the k ids' fix-up must use the logits as
    they were (a regression: the Triton kernel re-read them after the row had been overwritten)."""
    s, ids, lps = _case(N=4, V=300, k=17, seed=2)
    kw = dict(teacher_topk=(ids, lps), topk_semantics=mode, divergence="fkl", temperature=1.5, accum_dtype=F64)
    fd.kd_loss(s, **kw).backward()
    expected = s.grad.clone()
    x = s.detach().clone().requires_grad_()
    buf = x * 1.0  # a non-leaf buffer the gradient may overwrite
    fd.kd_loss(buf, inplace_grad=True, **kw).backward()
    assert torch.allclose(x.grad, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("mode,div", CASES, ids=[f"{m}-{d}" for m, d in CASES])
def test_topk_many_ids(use, mode, div, inplace):
    """k = 300, more ids than the kernels take per step (K_CHUNK = 128): three chunks, the last partial. With every
    option: T (and the teacher's for renorm), CE with labels inside a later chunk and off the ids, weights, softcap.
    inplace_grad: the logits at the ids are stashed before the row is overwritten. Rows 0 and 1 are confident (the
    ids hold all but ~1e-7 of the student's mass): tail_bucket's exact tail sum, its id comparison chunked too."""
    N, V, k = 4, 700, 300
    s, ids, lps = _case(N=N, V=V, k=k, seed=5)
    s = s.detach().scatter_add(1, ids, torch.tensor([[40.0], [40.0], [0.0], [0.0]], dtype=F64).expand(N, k))
    s.requires_grad_()
    lab = torch.stack([ids[0, 250], ids[1, 3], torch.tensor(5), ids[3, 140]])
    lab[2] = next(j for j in range(V) if j not in set(ids[2].tolist()))
    w = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=F64)
    Tt = 1.25 if mode == "renorm" else None
    kw = dict(teacher_topk=(ids, lps), topk_semantics=mode, divergence=div, temperature=1.5, teacher_temperature=Tt,
              labels=lab, hard_label_alpha=0.25, weights=w, softcap=30.0, accum_dtype=F64)
    x = s.detach().clone().requires_grad_()
    buf = x * 1.0 if inplace else x  # a non-leaf buffer the gradient may overwrite
    loss = fd.kd_loss(buf, inplace_grad=inplace, **kw)
    loss.backward()
    z = 30 * torch.tanh(s / 30)
    D = _oracle_D(mode, div, z, ids, lps, 1.5, Tt or 1.0)
    ref = ((0.75 * D + 0.25 * F.cross_entropy(z, lab, reduction="none")) * w).sum() / N
    ref.backward()
    if mode == "tail_bucket":  # the confident rows' tail: below TAIL_EXACT (2^-20), on the exact path
        q = torch.softmax(z / 1.5, -1)
        assert (q.scatter(1, ids, 0.0).sum(-1)[:2] < 2.0 ** -20).all()
    assert torch.allclose(loss, ref, rtol=1e-11, atol=1e-14)
    assert torch.allclose(x.grad, s.grad, rtol=1e-10, atol=1e-14)


def _exact_tail_layouts(k, V):
    """Id sets that stress the exact tail's walk over the sorted ids (kernels/kd_softmax.py _off_ids: tiles of 256
    columns, windows of 4 ids): runs across tile boundaries and into the last partial tile, ids on both edges of
    every tile, a run from column 0, any order (descending, shuffled)."""
    g = torch.Generator().manual_seed(k)
    edges = [c for t in range(0, V, 256) for c in (t, t + 255) if c < V] + [V - 1]
    rows = [torch.arange(256 - k // 2, 256 - k // 2 + k),  # 8x a window's width, across a tile boundary
            torch.arange(V - k, V).flip(0),  # up to the last column, descending
            torch.tensor(list(dict.fromkeys(edges + torch.randperm(V, generator=g).tolist()))[:k]),
            torch.arange(k),
            torch.randperm(V, generator=g)[:k]]
    return torch.stack([r[torch.randperm(k, generator=g)] if i >= 2 else r for i, r in enumerate(rows)])


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("k", [1, 6, 40])
@pytest.mark.parametrize("div", ["fkl", "jsd"])
def test_topk_tail_bucket_exact_tail_id_layouts(use, div, k, ids_dtype):
    """Confident rows (tail below TAIL_EXACT: the exact tail sum over the columns off the ids) with the id layouts of
    _exact_tail_layouts at V = 777 (three full tiles and a partial one): loss and gradient per row against the fp64
    oracle. A walk that drops an id sums its column into the tail (a tail ~e^{−40} of the row gains e^{+40}); one
    that skips a column past an id loses that column's tail term."""
    N, V = 5, 777
    ids = _exact_tail_layouts(k, V)
    g = torch.Generator().manual_seed(3)
    s = torch.randn(N, V, generator=g, dtype=F64).scatter_add(1, ids, torch.full((N, k), 40.0, dtype=F64))
    lps = torch.log_softmax(torch.randn(N, k, generator=g, dtype=F64), -1) + math.log(0.7)
    x = s.clone().requires_grad_()
    loss = fd.kd_loss(x, teacher_topk=(ids.to(ids_dtype), lps), topk_semantics="tail_bucket", divergence=div,
                      reduction="none", accum_dtype=F64)
    loss.sum().backward()
    ref_x = s.clone().requires_grad_()
    ref = _oracle_D("tail_bucket", div, ref_x, ids, lps, 1.0)
    ref.sum().backward()
    assert (torch.softmax(s, -1).scatter(1, ids, 0.0).sum(-1) < 2.0 ** -20).all()  # every row on the exact path
    assert torch.allclose(loss, ref, rtol=1e-11, atol=0), (loss, ref)
    assert torch.allclose(x.grad, ref_x.grad, rtol=1e-10, atol=1e-14)


def tail_bucket_logspace(div, x, ids, lps):
    """tail_bucket in plain PyTorch in x's dtype, the student's tail as a logsumexp of its off-id log-probs (q_tail
    itself underflows to 0 on a confident row while log q_tail is finite; _oracle_D's linear sum gives +inf)."""
    ls = torch.log_softmax(x, -1)
    lq = torch.cat([ls.gather(1, ids), torch.logsumexp(ls.scatter(1, ids, float("-inf")), -1, keepdim=True)], 1)
    lp = lps.to(x.dtype)
    lp = torch.cat([lp, (1 - lp.exp().sum(-1, keepdim=True)).clamp_min(0).log()], 1)
    return _div(div, lp.exp(), lq.exp(), lp=lp, lq=lq)


def confident_student_case(boost, N=64, V=300, k=17, seed=41):
    """fp32 student logits ~ N(0, 1) with ``boost`` added at the k teacher ids: its tail mass is ~e^{−boost}; teacher
    log-probs of an unrelated distribution (fp32), whose tail p_tail = 1 − Σ p is O(1)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, V, generator=g, dtype=F64)
    lps, ids = torch.log_softmax(2 * torch.randn(N, V, generator=g, dtype=F64), -1).topk(k, -1)
    return base.scatter_add(1, ids, torch.full((N, k), boost, dtype=F64)).float(), ids, lps.float()


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def _tail_bucket_three_ways(div, s, ids, lps):
    """tail_bucket per-row losses of fp32 logits ``s`` by the formula in fp64 and in fp32 and by fastdistill, each
    summed and backpropagated: (exact_x, plain_x, x, exact, plain, got); fastdistill's finite."""
    exact_x, plain_x, x = s.double().requires_grad_(), s.clone().requires_grad_(), s.clone().requires_grad_()
    exact, plain = tail_bucket_logspace(div, exact_x, ids, lps), tail_bucket_logspace(div, plain_x, ids, lps)
    got = fd.kd_loss(x, teacher_topk=(ids, lps), topk_semantics="tail_bucket", divergence=div, reduction="none")
    for v in (exact, plain, got):
        v.sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(x.grad).all()
    return exact_x, plain_x, x, exact, plain, got


@pytest.mark.parametrize("boost", [95.0, 120.0])
@pytest.mark.parametrize("div", DIVS)
def test_topk_tail_bucket_confident_student_fp32(use, div, boost):
    """tail_bucket with an extremely confident fp32 student (+boost at the k ids): its tail mass e^{−boost} is in
    fp32's denormals (95) or below them (120), while the teacher's p_tail is O(1), so forward KL
    p_tail·log(p_tail / q_tail) is large but finite. Per-row losses and the gradient within 2x the error of plain fp32
    PyTorch (the tail as a logsumexp of log_softmax: finite) against the same formula in fp64. Before: Triton summed
    q_tail linearly (+inf forward KL at 120; at 95, 6x / 9x plain's loss / gradient error from the denormals'
    digits), and the off-id forward-KL gradient −p_tail·q_j/q_tail was dropped where q_j underflowed to 0 (reference
    and Triton: 0.12 relative gradient error at 120)."""
    s, ids, lps = confident_student_case(boost)
    exact_x, plain_x, x, exact, plain, got = _tail_bucket_three_ways(div, s, ids, lps)
    e_loss, p_loss = _rel(got.detach(), exact.detach()), _rel(plain.detach(), exact.detach())
    e_grad, p_grad = _rel(x.grad, exact_x.grad), _rel(plain_x.grad, exact_x.grad)
    assert e_loss <= 2 * p_loss + 1e-9, (e_loss, p_loss)
    assert e_grad <= 2 * p_grad + 1e-9, (e_grad, p_grad)


MID_TAILS = (0.5, 0.2, 0.05, 0.02, 1 / 64 + 1e-3, 0.01)


def mid_tail_case(k, rows=24, V=2000, seed=43):
    """fp32 student logits ~ N(0, 1) plus a per-row boost at k ids, solved (in fp64) so that the student's tail mass
    off the ids is each of MID_TAILS in turn, ``rows`` rows each; teacher log-probs (fp32) of a distribution with
    p_tail = 0.3 at the same ids (a teacher unlike the student there: its p_tail·log(p_tail / q_tail) and the like
    weigh any relative error of q_tail by p_tail / q_tail)."""
    g = torch.Generator().manual_seed(seed + k)
    n = rows * len(MID_TAILS)
    base = torch.randn(n, V, generator=g, dtype=F64)
    t = base + 0.5 * torch.randn(n, V, generator=g, dtype=F64)
    ids = t.topk(k, -1).indices
    on = torch.zeros(n, V, dtype=torch.bool).scatter(1, ids, True)

    def boosted(x, tail):
        e = x.exp()
        return x + torch.log((e * ~on).sum(1) * (1 / tail - 1) / (e * on).sum(1))[:, None] * on

    q_tail = torch.tensor(MID_TAILS, dtype=F64).repeat_interleave(rows)
    return boosted(base, q_tail).float(), ids, torch.log_softmax(boosted(t, 0.3), -1).gather(1, ids).float()


@pytest.mark.parametrize("k", [16, 128])
@pytest.mark.parametrize("div", DIVS)
def test_topk_tail_bucket_mid_tail_fp32(use, div, k):
    """tail_bucket in fp32 with the student's tail mass q_tail from 0.5 down to 0.01, across the Triton kernel's
    former switch at 1/64 (TAIL_EXACT) from q_tail = 1 − Σ q_ids to the exact sum over the columns off the ids:
    per-row losses and the gradient within 2x plain fp32 PyTorch's error (the tail as a logsumexp of log_softmax)
    against the same formula in fp64, at each q_tail (as relative L2 errors over its rows). Before: Triton's
    1 − Σ q_ids in fp32 lost digits just above 1/64: at q_tail = 0.05–0.017 forward KL's loss error 3.9–10.8x
    plain's, JSD 3.3–8.6x, skew KL 3.0–5.9x, reverse and skew reverse KL up to 3.1x, and the gradient's up to 3.3x
    (forward KL) and 3.1x (skew KL). 1 − Σ q_ids from float64 log-probs summed in float64 still reached 4.7x (forward
    KL's loss): the fp32 sum-exp behind the logsumexp, off by ~4e-8, shifts 1 − Σ q by as much."""
    s, ids, lps = mid_tail_case(k)
    exact_x, plain_x, x, exact, plain, got = _tail_bucket_three_ways(div, s, ids, lps)
    keep = torch.ones(s.shape[0], dtype=torch.bool)
    if div == "tvd":  # ½ sign(q − p) jumps where p = q: rows with a bucket within fp32's resolution of a tie left out
        lq = torch.log_softmax(s.double(), -1)
        lq = torch.cat([lq.gather(1, ids), torch.logsumexp(lq.scatter(1, ids, float("-inf")), 1, keepdim=True)], 1)
        lp = lps.double()
        lp = torch.cat([lp, (1 - lp.exp().sum(1, keepdim=True)).log()], 1)
        keep = ((lp - lq).abs() > 1e-6).all(1)
    rows = s.shape[0] // len(MID_TAILS)
    bad = []
    for i, tail in enumerate(MID_TAILS):
        r = torch.arange(i * rows, (i + 1) * rows)
        r = r[keep[r]]
        assert r.numel() > rows * 0.9
        e_loss, p_loss = _rel(got.detach()[r], exact.detach()[r]), _rel(plain.detach()[r], exact.detach()[r])
        e_grad, p_grad = _rel(x.grad[r], exact_x.grad[r]), _rel(plain_x.grad[r], exact_x.grad[r])
        if e_loss > 2 * p_loss + 1e-9 or e_grad > 2 * p_grad + 1e-9:
            bad.append((tail, round(e_loss / p_loss, 2), round(e_grad / p_grad, 2)))
    assert not bad, bad

def test_topk_bad_args():
    s, ids, lps = _case()
    with pytest.raises(ValueError, match="exactly one"):
        fd.kd_loss(s, torch.randn(5, 300, dtype=F64), teacher_topk=(ids, lps))
    with pytest.raises(ValueError, match="k = 301 exceeds"):
        fd.kd_loss(s[:, :10], teacher_topk=(torch.zeros(5, 301, dtype=torch.long), torch.zeros(5, 301)))
    with pytest.raises(ValueError, match="differ in shape"):
        fd.kd_loss(s, teacher_topk=(ids, lps[:, :3]))
    with pytest.raises(ValueError, match="zero_tail' defines forward KL only"):
        fd.kd_loss(s, teacher_topk=(ids, lps), topk_semantics="zero_tail", divergence="jsd")
    with pytest.raises(ValueError, match="teacher_temperature: only topk_semantics='renorm'"):
        fd.kd_loss(s, teacher_topk=(ids, lps), teacher_temperature=2.0)
    with pytest.raises(ValueError, match=r"ids: values must be in \[0, 300\)"):
        fd.kd_loss(s, teacher_topk=(ids + 300, lps))
    with pytest.raises(TypeError, match="ids: expected an int64/int32"):
        fd.kd_loss(s, teacher_topk=(ids.double(), lps))
    with pytest.raises(ValueError, match="topk_semantics: expected one of"):
        fd.kd_loss(s, teacher_topk=(ids, lps), topk_semantics="tail")
    with pytest.raises(ValueError, match="teacher_topk: k = 0"):
        fd.kd_loss(s, teacher_topk=(ids[:, :0], lps[:, :0]))


@pytest.mark.parametrize("div", DIVS)
def test_topk_ids_covering_the_vocabulary(use, div):
    """k = V (the ids cover the vocabulary): the tail bucket has no columns and is dropped; the loss is the dense
    divergence, finite (before: p_tail = 1 − Σp, rounding noise of either sign, against the student's exact zero
    tail made forward KL +inf on some rows)."""
    N, V = 6, 40
    g = torch.Generator().manual_seed(31)
    s = torch.randn(N, V, generator=g, dtype=F64).requires_grad_()
    lps, ids = torch.log_softmax(2 * torch.randn(N, V, generator=g, dtype=F64), -1).topk(V, -1)
    assert ((1 - lps.exp().sum(-1)) > 0).any(), "the construction must leave rounding noise in 1 − Σp"
    loss = fd.kd_loss(s, teacher_topk=(ids, lps), divergence=div, reduction="none", accum_dtype=F64)
    p = torch.zeros(N, V, dtype=F64).scatter(1, ids, lps.exp())
    s2 = s.detach().clone().requires_grad_()
    ref = _div(div, p, torch.softmax(s2, -1))
    assert torch.isfinite(loss).all()
    assert torch.allclose(loss, ref, rtol=1e-10, atol=1e-12), (loss, ref)
    w = torch.randn(N, generator=g, dtype=F64)
    (loss * w).sum().backward()
    (ref * w).sum().backward()
    assert torch.allclose(s.grad, s2.grad, rtol=1e-8, atol=1e-12)


def test_topk_bad_id_row_is_nan_with_labels():
    """A row with an out-of-range id gives NaN (documented) also with labels and hard_label_alpha on the reference
    (its label check reused the id check's variable: a finite loss from clamped ids). Reached through
    torch.compile, where the eager CPU ValueError is skipped (as on a GPU)."""
    N, V, k = 3, 20, 4
    g = torch.Generator().manual_seed(32)
    s = torch.randn(N, V, generator=g)
    ids = torch.randn(N, V, generator=g).topk(k, -1).indices
    ids[1, 0] = V + 5
    lps = torch.log_softmax(torch.randn(N, k, generator=g), -1)
    f = lambda x: fd.kd_loss(x, teacher_topk=(ids, lps), reduction="none", labels=torch.tensor([1, 2, 3]),
                             hard_label_alpha=0.5)
    with fd.use_backend("reference"):
        torch._dynamo.reset()
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(s)
    assert out[1].isnan() and torch.isfinite(out[[0, 2]]).all(), out


@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
def test_out_of_range_at_the_boundary_is_nan_without_the_host_check(use, topk):
    """The in-kernel checks at their boundaries: an id or a label equal to V (one past the last column) or −1
    makes its row NaN, the other rows keep their values. Reached through torch.compile, where the eager CPU
    ValueError is skipped (as on a GPU). A mutation check found the boundary untested: the Triton kernels with
    ``ids > V`` for ``ids >= V`` (or ``label <= V`` for ``label < V``) clamped the id to V − 1 (read the label's
    column as 0) and returned a finite, wrong loss while every test passed (the other tests use V + 5)."""
    N, V, k = 6, 20, 4
    g = torch.Generator().manual_seed(33)
    s = torch.randn(N, V, generator=g)
    ids = torch.randn(N, V, generator=g).topk(k, -1).indices
    ids[1, 2], ids[2, 0] = V, -1
    lps = torch.log_softmax(torch.randn(N, k, generator=g), -1)
    labels = torch.tensor([1, 2, 3, V, -1, 5])
    kw = dict(teacher_topk=(ids, lps)) if topk else dict(teacher_logits=torch.randn(N, V, generator=g))
    f = lambda x: fd.kd_loss(x, reduction="none", labels=labels, hard_label_alpha=0.5, **kw)
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(s)
    bad = torch.tensor([False, topk, topk, True, True, False])
    assert out[bad].isnan().all() and torch.isfinite(out[~bad]).all(), out
    with fd.use_backend("reference"):  # the finite rows as the (eager, host-checked) reference computes them
        good = ~bad
        ref = fd.kd_loss(s[good], reduction="none", labels=labels[good], hard_label_alpha=0.5,
                         **(dict(teacher_topk=(ids[good], lps[good])) if topk else
                            dict(teacher_logits=kw["teacher_logits"][good])))
    torch.testing.assert_close(out[good], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
def test_kd_torch_compile_fullgraph(use, topk):
    s, ids, lps = _case(N=4, V=64, k=5, seed=2)
    s = s.detach().float().requires_grad_()
    t = torch.randn(4, 64)
    kw = dict(teacher_topk=(ids, lps.float())) if topk else dict(teacher_logits=t)

    def f(x):
        return fd.kd_loss(x * 1.0, divergence="jsd", temperature=2.0, **kw) * 3

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(s)
    (g,) = torch.autograd.grad(out, s)
    ref = f(s)
    (gr,) = torch.autograd.grad(ref, s)
    assert torch.allclose(out, ref, rtol=1e-6) and torch.allclose(g, gr, rtol=1e-6, atol=1e-9)


def test_kd_torch_compile_fullgraph_temperature_that_changes(use):
    """A temperature schedule under torch.compile(fullgraph=True) (and dynamic=True): from its second value the
    float is symbolic, and the option check must trace (before: math.isfinite raised "Unsupported")."""
    s = torch.randn(4, 40, generator=torch.Generator().manual_seed(3))
    t = torch.randn(4, 40, generator=torch.Generator().manual_seed(4))

    def f(x, T):
        return fd.kd_loss(x, t, divergence="jsd", beta=T / 4, temperature=T, t2_scale=True)

    for dynamic in (None, True):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=dynamic)
        for T in (1.5, 2.5):
            x, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
            out, ref = compiled(x, T), f(x2, T)
            (g,), (gr,) = torch.autograd.grad(out, x), torch.autograd.grad(ref, x2)
            assert torch.allclose(out, ref, rtol=1e-6) and torch.allclose(g, gr, rtol=1e-6, atol=1e-9), (dynamic, T)
    with pytest.raises(ValueError, match="temperature"):
        fd.kd_loss(s, t, temperature=float("inf"))


def test_kd_torch_compile_ignore_index_that_changes(use):
    """An ignore_index that changes between calls under torch.compile(dynamic=True) is a SymInt: the int check must
    trace (it raised "Unsupported" on hasattr for a while)."""
    s = torch.randn(4, 9, generator=torch.Generator().manual_seed(5))
    t = torch.randn(4, 9, generator=torch.Generator().manual_seed(6))
    lab = torch.tensor([0, 1, 3, 5])

    def f(x, ii):
        return fd.kd_loss(x, t, labels=lab, ignore_index=ii, hard_label_alpha=0.5)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for ii in (-100, 1, 5):
        assert torch.allclose(compiled(s, ii), f(s, ii), rtol=1e-6), ii


def test_kd_nan_input_shows(use):
    """A NaN logit makes its row's loss NaN (never silently dropped); other rows are unaffected."""
    s = torch.randn(3, 40, dtype=F64)
    t = torch.randn(3, 40, dtype=F64)
    s[1, 5] = float("nan")
    per = fd.kd_loss(s, t, reduction="none", accum_dtype=F64)
    assert torch.isnan(per[1]) and torch.isfinite(per[[0, 2]]).all()


@pytest.mark.parametrize("semantics", ["renorm", "zero_tail", "tail_bucket"])
def test_kd_nan_topk_logprob_shows(use, semantics):
    """A NaN teacher log-prob makes its row's loss NaN on every backend (docs/kd_ops.md). The reference backend
    dropped the row with "renorm" (loss 0, not counted: its all −inf test was amax > −inf, false for NaN)."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(3, 9, generator=g, dtype=F64), torch.randn(3, 9, generator=g, dtype=F64)
    lps, ids = torch.topk(t.log_softmax(-1), 3)
    lps[1, 0] = float("nan")
    lps[2, 0], lps[2, 1:] = float("nan"), -math.inf  # NaN and −inf only: not an all −inf (dead) row either
    per = fd.kd_loss(s, teacher_topk=(ids, lps), topk_semantics=semantics, reduction="none")
    assert torch.isnan(per[1:]).all() and torch.isfinite(per[0]), per


def test_kd_alpha_one_ignores_infinite_divergence(use):
    """hard_label_alpha = 1 is pure CE even where the KD term is infinite (student q = 0 where p > 0)."""
    s = torch.randn(2, 30, dtype=F64)
    s[:, 3] = float("-inf")
    s.requires_grad_()
    t = torch.randn(2, 30, dtype=F64)
    lab = torch.tensor([1, 7])
    loss = fd.kd_loss(s, t, labels=lab, hard_label_alpha=1.0, accum_dtype=F64)
    loss.backward()
    ref = F.cross_entropy(s.detach(), lab)
    assert torch.allclose(loss, ref) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("div,base", [("skl", "fkl"), ("srkl", "rkl")])
def test_kd_skew_zero_is_plain_kl(use, div, base):
    """skew = 0 is exactly forward / reverse KL, with its finite gradient where q = 0 < p."""
    s = torch.randn(2, 30, dtype=F64)
    if base == "fkl":
        s[:, 3] = float("-inf")
    s.requires_grad_()
    t = torch.randn(2, 30, dtype=F64)
    a = fd.kd_loss(s, t, divergence=div, skew=0.0, accum_dtype=F64)
    (ga,) = torch.autograd.grad(a, s)
    b = fd.kd_loss(s, t, divergence=base, accum_dtype=F64)
    (gb,) = torch.autograd.grad(b, s)
    assert torch.equal(a, b) and torch.equal(ga, gb) and torch.isfinite(ga).all()


@pytest.mark.parametrize("side", ["teacher", "student"])
@pytest.mark.parametrize("div", ["fkl", "jsd", "rkl", "tvd"])
def test_topk_renorm_row_without_teacher_is_invalid(use, div, side):
    """renorm: a row whose k teacher log-probs are all −inf has no teacher distribution; like a dense teacher row of
    −inf logits it is invalid: it adds nothing, gets a zero gradient and is not counted by batchmean (the loss equals
    the call with that row masked out). It gave 0 (fkl) or NaN (jsd) before.
    The same for a row whose student logits at the k ids are all −inf (finite elsewhere): the student renormalised
    over the ids is 0/0, no distribution, as a dense student row of −inf logits. It gave a NaN loss and NaN
    gradients before, on both backends."""
    s, ids, lps = _case(N=4, V=50, k=5, seed=3)
    lps = lps.clone()
    if side == "teacher":
        lps[1] = -math.inf
    else:
        s = s.detach().clone()
        s[1, ids[1]] = -math.inf
    out = []
    for mask in (None, torch.tensor([True, False, True, True])):
        x = s.detach().clone().requires_grad_()
        loss = fd.kd_loss(x, teacher_topk=(ids, lps), topk_semantics="renorm", divergence=div, mask=mask,
                          accum_dtype=F64)
        loss.backward()
        out.append((loss.detach(), x.grad))
    assert torch.isfinite(out[0][0]) and torch.all(out[0][1][1] == 0), out[0]
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("div", ["fkl", "rkl"])
@pytest.mark.parametrize("offset", [0.0, 60.0, 300.0])
def test_topk_renorm_fp32_close_teacher_large_logits(use, div, offset):
    _check_renorm_close_teacher(div, offset)


def _check_renorm_close_teacher(div, offset):
    """renorm in fp32 with a teacher close to the student at logits ~offset: the tolerance rule (at most 2x the error
    of plain PyTorch's formula in fp32, as a relative L2 error over the per-row losses and the gradient). The
    student's logsumexp over the k ids is kept as hi + lo (before: hi alone, rounded at |m|, 3-70x plain's error)."""
    g = torch.Generator().manual_seed(int(offset) + 7)
    N, V, k = 16, 1000, 50
    s = (torch.randn(N, V, generator=g, dtype=F64) * 2 + offset).float()
    t = s.double() + 0.05 * torch.randn(N, V, generator=g, dtype=F64)
    lps, ids = torch.log_softmax(t, -1).topk(k, -1)
    lps = lps.float()
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    exact_x, plain_x = s.double().requires_grad_(), s.clone().requires_grad_()
    exact = _oracle_D("renorm", div, exact_x, ids, lps.double(), 1.0)
    plain = _oracle_D("renorm", div, plain_x, ids, lps, 1.0)
    exact.sum().backward()
    plain.sum().backward()
    x = s.clone().requires_grad_()
    loss = fd.kd_loss(x, teacher_topk=(ids, lps), topk_semantics="renorm", divergence=div, reduction="none")
    loss.sum().backward()
    assert rel(loss, exact.detach()) <= 2 * rel(plain, exact.detach()) + 1e-7, (rel(loss, exact), rel(plain, exact))
    assert rel(x.grad, exact_x.grad) <= 2 * rel(plain_x.grad, exact_x.grad) + 1e-7
