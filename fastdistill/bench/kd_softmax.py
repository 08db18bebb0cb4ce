"""Benchmark family "kd": fused KD softmax losses over a large vocabulary (docs/kd_ops.md).

Every provider computes the same loss from bf16 logits ``s`` (student, requires grad) and ``t``
(teacher) of shape ``[N, V]``: one divergence per row between ``P = softmax(t/T)`` (teacher)
and ``Q = softmax(s/T)`` (student), T = 1, reduction ``batchmean`` (sum over rows / N):

    fkl  KL(P‖Q)            rkl  KL(Q‖P)            jsd  β·KL(P‖M) + (1−β)·KL(Q‖M), M = βP + (1−β)Q, β = 0.5
    skl  KL(P‖λP + (1−λ)Q)  srkl KL(Q‖(1−λ)P + λQ)  tvd  ½·Σ|P − Q|                  (λ = skew = 0.1)

Providers: ``fastdistill-{triton,cuda,reference}`` (``kd_loss`` with a forced backend),
``eager`` (fp32 PyTorch: ``F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True,
reduction="batchmean")`` for fkl, the plain formulas above for the others), ``compile``
(``torch.compile`` of ``eager``; for fkl and jsd only, the two ANCHORS.md baselines: each graph costs
seconds of compilation, which the GPU run's time budget cannot spend on all six), ``liger``
(liger-kernel 0.8.5, a benchmark-only extra:
``LigerKLDIVLoss`` for fkl and ``LigerJSD(beta=0.5)`` for jsd on the eager fp32 log-softmax
they need, ``LigerTVDLoss`` on fp32 softmax probabilities for tvd).

Top-k teacher rows (``<shape>/topk128-<semantics>-fkl``, semantics tail_bucket and renorm): forward KL against the
ids and fp32 log-probs of the teacher's 128 most likely tokens (DistillKit-style offline logits), from the same
``t``; providers ``fastdistill-triton`` / ``-reference`` and ``eager`` (the documented formulas in fp32 PyTorch,
``eager_topk_fkl``; no liger-kernel or torch.compile baseline in ANCHORS.md). ``topk128-tail_bucket-fkl-confident``:
the same with a student confident on every row (``_confident``), whose tail mass below 2⁻²⁰ takes the exact tail
sum, a second read of the row (docs/kd_ops.md): the worst case of tail_bucket's cost. Bytes: read s and the k ids
and log-probs (12 bytes each), and for ``full`` write ∂s (the confident rows' second read is not counted).

Error column: ``full``: max_j |g_j − g64_j| / max_j |g64_j| on the student-logit gradient;
``fwd``: the relative error of the loss value. The oracle is the eager math on float64 copies
of the inputs, computed once per (shape, divergence). At the standard shapes the fp64 gradient
(8192 × V would be ~10 GB) is computed for the first and last ``ORACLE_ROWS`` rows only and
those rows are compared (each row's gradient depends on that row alone; the 1/N factor is
applied); the fp64 loss is summed over all rows in chunks.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastdistill.bench.runner import CPU_COMPILE_SKIP, Case

# ANCHORS.md standard shapes: name -> (N, V)
STANDARD = {"kd-128k": (8192, 128256), "kd-152k": (8192, 151936)}
SMALL = {"kd-n64-v4099": (64, 4099), "kd-n33-v32000": (33, 32000)}
MODES = ("fwd", "full")
DIVERGENCES = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")
BETA, SKEW, TEMPERATURE = 0.5, 0.1, 1.0
ORACLE_ROWS = 128  # fp64 gradient on the first and last 128 rows when N > 2·128
ORACLE_CHUNK = 512  # rows per chunk of the fp64 loss
LIGER_MISSING = "liger-kernel not installed (benchmark-only extra: pip install liger-kernel==0.8.5)"
COMPILED_DIVS = ("fkl", "jsd")  # the divergences with a torch.compile row (ANCHORS.md has these two)
ORDER = ["fastdistill-triton", "fastdistill-cuda", "fastdistill-reference", "eager", "compile", "liger"]


# ----------------------------------------------------------------------------- eager (fp32) losses
def _up(x: torch.Tensor) -> torch.Tensor:
    """fp32 math, except float64 for float64 inputs (the oracle)."""
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _log_probs(s: torch.Tensor, t: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q, log p): the student's and the teacher's log-softmax at temperature T."""
    return F.log_softmax(_up(s) / T, dim=-1), F.log_softmax(_up(t) / T, dim=-1)


def _log_mix(la: torch.Tensor, lb: torch.Tensor, wa: float) -> torch.Tensor:
    """log(wa·e^la + (1 − wa)·e^lb): a mixture in probability space, evaluated in log space."""
    return torch.logaddexp(la + math.log(wa), lb + math.log1p(-wa))


def _batchmean(rows: torch.Tensor, n: int) -> torch.Tensor:
    return rows.sum() / n


def eager_fkl(s, t, T=TEMPERATURE):
    lq, lp = _log_probs(s, t, T)
    return F.kl_div(lq, lp, log_target=True, reduction="batchmean")  # Σ p (log p − log q) / N


def eager_rkl(s, t, T=TEMPERATURE):
    lq, lp = _log_probs(s, t, T)
    return _batchmean(lq.exp() * (lq - lp), s.shape[0])


def eager_jsd(s, t, T=TEMPERATURE, beta=BETA):
    lq, lp = _log_probs(s, t, T)
    lm = _log_mix(lp, lq, beta)  # M = βP + (1 − β)Q
    return _batchmean(beta * lp.exp() * (lp - lm) + (1 - beta) * lq.exp() * (lq - lm), s.shape[0])


def eager_skl(s, t, T=TEMPERATURE, skew=SKEW):
    lq, lp = _log_probs(s, t, T)
    lm = _log_mix(lp, lq, skew)  # λP + (1 − λ)Q
    return _batchmean(lp.exp() * (lp - lm), s.shape[0])


def eager_srkl(s, t, T=TEMPERATURE, skew=SKEW):
    lq, lp = _log_probs(s, t, T)
    lm = _log_mix(lp, lq, 1 - skew)  # (1 − λ)P + λQ
    return _batchmean(lq.exp() * (lq - lm), s.shape[0])


def eager_tvd(s, t, T=TEMPERATURE):
    lq, lp = _log_probs(s, t, T)
    return _batchmean(0.5 * (lp.exp() - lq.exp()).abs(), s.shape[0])


EAGER: dict[str, Callable[..., torch.Tensor]] = {
    "fkl": eager_fkl, "rkl": eager_rkl, "jsd": eager_jsd, "skl": eager_skl, "srkl": eager_srkl, "tvd": eager_tvd,
}
_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def eager_topk_fkl(s, t, semantics, T=TEMPERATURE):
    """Forward KL against a top-k teacher ``t = (ids, logprobs)`` (docs/kd_ops.md, "Top-k (offline) teachers") in
    fp32 PyTorch (float64 for float64 logits): ``tail_bucket`` over the k ids and the tail bucket, the student's
    tail a logsumexp of its log-probs off the ids; ``renorm`` over the k ids, both sides renormalised there."""
    ids, lps = t
    lp = lps.to(_up(s).dtype)
    if semantics == "renorm":
        lq = F.log_softmax(_up(s).gather(1, ids) / T, dim=-1)
        lpn = F.log_softmax(lp, dim=-1)
        return _batchmean((lpn.exp() * (lpn - lq)).sum(-1), s.shape[0])
    lq_all = F.log_softmax(_up(s) / T, dim=-1)
    lq = lq_all.gather(1, ids)
    lq_tail = torch.logsumexp(lq_all.scatter(1, ids, float("-inf")), dim=-1)
    p_tail = (1 - lp.exp().sum(-1)).clamp_min(0)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(torch.finfo(lp.dtype).tiny).log() - lq_tail), 0.0)
    return _batchmean((lp.exp() * (lp - lq)).sum(-1) + tail, s.shape[0])


def _compiled(div: str) -> Callable[..., torch.Tensor]:
    """``torch.compile`` of the eager loss, one per divergence (static shapes: one graph per shape)."""
    if div not in _COMPILED:
        _COMPILED[div] = torch.compile(EAGER[div], dynamic=False)
    return _COMPILED[div]


# ----------------------------------------------------------------------------- other providers
def _fastdistill_providers(s: torch.Tensor, t: torch.Tensor, small: bool) -> tuple[dict, dict[str, str]]:
    """div -> {name: loss(s, t)} for the backends that can run, and name -> reason for the others. The reference
    backend (fp32 PyTorch, several [N, V] temporaries) runs at the small shapes only: at the standard ones it is
    the eager row again, and the GPU run's time budget cannot spend seconds of fp64 oracles on it."""
    names = {"triton": "fastdistill-triton", "cuda": "fastdistill-cuda", "reference": "fastdistill-reference"}
    try:
        import fastdistill

        kd_loss = fastdistill.kd_loss
        why = fastdistill.available_backends("kd_loss", s)
    except Exception as exc:
        reason = f"fastdistill.kd_loss unavailable ({type(exc).__name__}: {exc})"
        return {}, {n: reason for n in names.values()}
    fns, skipped = {}, {}
    for backend, name in names.items():
        reasons = why.get(backend, ["backend not reported by available_backends"])
        if reasons:
            skipped[name] = "; ".join(reasons)
            continue
        if backend == "reference" and not small:
            skipped[name] = "at the small shapes only (--quick or a CPU): PyTorch math, like the eager row"
            continue

        def fn(s, t, div, semantics=None, backend=backend):
            teacher = dict(teacher_topk=t, topk_semantics=semantics) if semantics else dict(teacher_logits=t)
            with fastdistill.use_backend(backend):
                return kd_loss(s, **teacher, divergence=div, beta=BETA, skew=SKEW, temperature=TEMPERATURE,
                               reduction="batchmean")

        fns[name] = fn
    return fns, skipped


def _liger_losses(device: str) -> tuple[dict[str, Callable], str | None]:
    """div -> liger-kernel loss(s, t), or ({}, why not). liger-kernel is imported only here."""
    if importlib.util.find_spec("liger_kernel") is None:
        return {}, LIGER_MISSING
    from fastdistill._backend import triton_why_not

    reasons = triton_why_not(torch.device(device))
    if reasons:
        return {}, "liger-kernel runs Triton kernels: " + "; ".join(reasons)
    try:
        from liger_kernel.transformers.jsd import LigerJSD
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss
        from liger_kernel.transformers.tvd import LigerTVDLoss
    except Exception as exc:
        return {}, f"liger-kernel import failed ({type(exc).__name__}: {exc})"
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)  # forward(log q, log p) = KL(P‖Q)
    jsd = LigerJSD(beta=BETA)  # forward(log q, log p): student first
    tvd = LigerTVDLoss(reduction="batchmean")  # forward(a, b): the gradient goes to a only -> student first

    def liger_fkl(s, t):
        return kl(*_log_probs(s, t, TEMPERATURE))

    def liger_jsd(s, t):
        return jsd(*_log_probs(s, t, TEMPERATURE))

    def liger_tvd(s, t):
        return tvd(torch.softmax(_up(s) / TEMPERATURE, dim=-1), torch.softmax(_up(t) / TEMPERATURE, dim=-1))

    return {"fkl": liger_fkl, "jsd": liger_jsd, "tvd": liger_tvd}, None


# ----------------------------------------------------------------------------- inputs, oracle
def _inputs(N: int, V: int, device: str, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated LM-like logits (std ≈ 2.7), made in row chunks to bound the fp32 temporaries."""
    g = torch.Generator(device=device).manual_seed(1234)
    s = torch.empty(N, V, device=device, dtype=dtype)
    t = torch.empty(N, V, device=device, dtype=dtype)
    for r0 in range(0, N, 1024):
        n = min(1024, N - r0)

        def randn(n=n):
            return torch.randn(n, V, generator=g, device=device, dtype=torch.float32)

        base = 2.5 * randn()
        t[r0:r0 + n] = (base + 0.5 * randn()).to(dtype)
        s[r0:r0 + n] = (base + 1.0 * randn()).to(dtype)
        del base
    return s.requires_grad_(True), t


def _rows(t, idx):
    """Rows of a teacher: logits, or (ids, logprobs)."""
    return tuple(x[idx] for x in t) if isinstance(t, tuple) else t[idx]


def _f64(t):
    return tuple(x.double() if x.is_floating_point() else x for x in t) if isinstance(t, tuple) else t.double()


class _Oracle:
    """fp64 loss (all rows) and student gradient (rows ``self.rows``) of one loss ``fn(s, t)``, computed once."""

    def __init__(self, fn: Callable, s: torch.Tensor, t):
        self.fn, self.s, self.t = fn, s, t
        N = s.shape[0]
        if N > 2 * ORACLE_ROWS:
            self.rows = torch.cat([torch.arange(ORACLE_ROWS), torch.arange(N - ORACLE_ROWS, N)]).to(s.device)
        else:
            self.rows = None
        self._loss: torch.Tensor | None = None
        self._grad: torch.Tensor | None = None

    def loss(self) -> torch.Tensor:
        if self._loss is None:
            N = self.s.shape[0]
            total = torch.zeros((), dtype=torch.float64, device=self.s.device)
            with torch.no_grad():
                for r0 in range(0, N, ORACLE_CHUNK):  # batchmean of a chunk, reweighted to 1/N
                    sl = slice(r0, r0 + ORACLE_CHUNK)
                    sc, tc = self.s[sl].double(), _f64(_rows(self.t, sl))
                    total += self.fn(sc, tc) * (sc.shape[0] / N)
            self._loss = total
        return self._loss

    def grad(self) -> torch.Tensor:
        if self._grad is None:
            s, t, N = self.s.detach(), self.t, self.s.shape[0]
            if self.rows is not None:
                s, t = s[self.rows], _rows(t, self.rows)
            s64 = s.double().requires_grad_(True)
            loss = self.fn(s64, _f64(t)) * (s64.shape[0] / N)  # the full batch's 1/N
            (self._grad,) = torch.autograd.grad(loss, s64)
        return self._grad


_ORACLE: dict[tuple, _Oracle] = {}  # one (shape, divergence) at a time: cases run in order


def _oracle(key: tuple, fn: Callable, s: torch.Tensor, t) -> _Oracle:
    if key not in _ORACLE:
        _ORACLE.clear()
        _ORACLE[key] = _Oracle(fn, s, t)
    return _ORACLE[key]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    den = ref.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float(((out.detach().double() - ref).abs().max() / den).item())


def _step(loss_fn: Callable, s: torch.Tensor, t: torch.Tensor, mode: str) -> Callable[[], torch.Tensor]:
    def step():
        s.grad = None
        loss = loss_fn(s, t)
        if mode == "full":
            loss.backward()
        return loss

    return step


# ----------------------------------------------------------------------------- cases
TOPK_K = 128  # top-k teacher rows: k ids per row (DistillKit-style offline logits), forward KL
TOPK_SEMANTICS = ("tail_bucket", "renorm")
TOPK_ORDER = ["fastdistill-triton", "fastdistill-cuda", "fastdistill-reference", "eager"]


def _topk_teacher(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, fp32 log-probs) of the teacher's k most likely tokens, made in row chunks (bounded fp32 temporaries)."""
    N = t.shape[0]
    ids = torch.empty(N, k, dtype=torch.long, device=t.device)
    lps = torch.empty(N, k, dtype=torch.float32, device=t.device)
    for r0 in range(0, N, 1024):
        v, i = F.log_softmax(t[r0:r0 + 1024].float() / TEMPERATURE, dim=-1).topk(k, dim=-1)
        lps[r0:r0 + 1024], ids[r0:r0 + 1024] = v, i
    return ids, lps


CONFIDENT_BOOST = 30.0
CONFIDENT_NOTE = ("student confident on every row (its top-1 id's logit set to the row max + 30: q_tail ≲ V·e^-30 < "
                  "2^-20, the exact tail sum's second read of the row)")


def _confident(s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A copy of the student ``s`` (a new leaf) whose logit at each row's first id is the row's max + CONFIDENT_BOOST:
    its mass off the ids is ≲ V·e^{−30} (1.2e-8 at V = 128k), below TAIL_EXACT (2⁻²⁰) on every row."""
    with torch.no_grad():
        c = s.detach().clone()
        c.scatter_(1, ids[:, :1], c.amax(1, keepdim=True) + CONFIDENT_BOOST)
    return c.requires_grad_()


def _mode_cases(shape: str, losses: dict, skipped: dict, order: list, anchor, s, t, loss_fn: Callable, key: tuple,
                nbytes: dict[str, int], base_note: str) -> list[Case]:
    """One Case per mode (fwd, full) of the losses ``losses[name](s, t)``; error against ``loss_fn`` in fp64."""
    out = []
    N = s.shape[0]
    for mode in MODES:
        providers = {name: _step(fn, s, t, mode) for name, fn in losses.items()}

        def error(name, mode=mode, providers=providers):
            oracle = _oracle(key, loss_fn, s, t)
            loss = providers[name]()
            if mode == "fwd":
                return _rel_err(loss, oracle.loss())
            g = s.grad if oracle.rows is None else s.grad[oracle.rows]
            return _rel_err(g, oracle.grad())

        def reset():  # before each provider's memory measurement: drop the last ∂s and the
            s.grad = None  # blocks earlier providers (other shapes, the fp64 oracle) left cached
            if s.is_cuda:
                torch.cuda.empty_cache()

        if mode == "fwd":
            err_note = "rel_err of the loss value"
        elif N > 2 * ORACLE_ROWS:
            err_note = (f"rel_err of s.grad on rows 0-{ORACLE_ROWS - 1} and {N - ORACLE_ROWS}-{N - 1} "
                        f"(fp64 oracle on {2 * ORACLE_ROWS} of {N} rows)")
        else:
            err_note = ""
        note = "; ".join(filter(None, [base_note, err_note]))
        out.append(Case(shape=shape, mode=mode, providers=providers, bytes=nbytes[mode], error=error,
                        skipped=dict(skipped), reset=reset, baseline="eager", order=order, anchor=anchor,
                        note=note))
    return out


def cases(device: str, quick: bool) -> list[Case]:
    small = quick or not device.startswith("cuda")
    shapes = SMALL if small else STANDARD
    base_note = f"{'quick' if device.startswith('cuda') else 'cpu'}-small-shape" if small else ""
    liger, liger_why = _liger_losses(device)
    out = []
    for shape_name, (N, V) in shapes.items():
        s, t = _inputs(N, V, device)
        fd, fd_skipped = _fastdistill_providers(s, t, small)
        esize = s.element_size()
        for div in DIVERGENCES:
            losses: dict[str, Callable] = {n: (lambda s, t, fn=fn, div=div: fn(s, t, div)) for n, fn in fd.items()}
            losses["eager"] = EAGER[div]
            skipped = dict(fd_skipped)
            if div in COMPILED_DIVS and not device.startswith("cuda"):
                skipped["compile"] = CPU_COMPILE_SKIP
            elif div in COMPILED_DIVS:
                losses["compile"] = lambda s, t, div=div: _compiled(div)(s, t)
            else:
                skipped["compile"] = (f"compiled for {' and '.join(COMPILED_DIVS)} only (the ANCHORS.md baselines; "
                                      "compilation time)")
            order = ORDER[:-1]
            if div in ("fkl", "jsd", "tvd"):
                order = ORDER
                if liger_why is None:
                    losses["liger"] = liger[div]
                else:
                    skipped["liger"] = liger_why
            # bytes of the ideal fused step (N·V elements of the input dtype each):
            #   fwd:  read s, read t                    2·N·V·esize
            #   full: read s, read t, write ∂s          3·N·V·esize   (per-row fp32 stats: negligible)
            out += _mode_cases(f"{shape_name}/{div}", losses, skipped, order, "liger" if div in ("fkl", "jsd", "tvd")
                               else None, s, t, EAGER[div], (device, shape_name, div),
                               {m: (2 + (m == "full")) * N * V * esize for m in MODES}, base_note)
        # a top-k teacher (ids + fp32 log-probs of the teacher's TOPK_K most likely tokens), forward KL
        tk = _topk_teacher(t, TOPK_K)
        for sem, student, tag in [(sem, s, "") for sem in TOPK_SEMANTICS] + [("tail_bucket", None, "-confident")]:
            note = base_note
            if student is None:  # every row confident: tail_bucket's exact tail sum (a second read of each row)
                student = _confident(s, tk[0])
                note = "; ".join(filter(None, [base_note, CONFIDENT_NOTE]))
            losses = {n: (lambda s, t, fn=fn, sem=sem: fn(s, t, "fkl", sem)) for n, fn in fd.items()
                      if n != "fastdistill-cuda"}
            losses["eager"] = lambda s, t, sem=sem: eager_topk_fkl(s, t, sem)
            skipped = {n: why for n, why in fd_skipped.items() if n != "fastdistill-cuda"}
            skipped["fastdistill-cuda"] = "top-k teachers: not implemented by the CUDA kernels (Triton serves them)"
            # bytes of the ideal fused step: read s (N·V·esize) and the k ids + log-probs (12·N·k); full: write ∂s
            out += _mode_cases(f"{shape_name}/topk{TOPK_K}-{sem}-fkl{tag}", losses, skipped, TOPK_ORDER, None, student,
                               tk, lambda s, t, sem=sem: eager_topk_fkl(s, t, sem),
                               (device, shape_name, "topk", sem + tag),
                               {m: (1 + (m == "full")) * N * V * esize + 12 * N * TOPK_K for m in MODES}, note)
    return out
