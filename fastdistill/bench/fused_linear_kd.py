"""Benchmark family "flkd": KD through the lm_head without materialising the logits.

Every provider computes the same loss and its gradients from bf16 hidden states and heads: student
``h_s [N, H]`` (requires grad) with ``W_s [V, H]`` (requires grad), teacher ``h_t [N, H]`` with
``W_t [V, H]`` (constants), T = 1, reduction ``batchmean`` (sum over rows / N)::

    fkl  KL(P‖Q)        jsd  β·KL(P‖M) + (1−β)·KL(Q‖M), M = βP + (1−β)Q, β = 0.5

with P = softmax(h_t W_tᵀ) (teacher) and Q = softmax(h_s W_sᵀ) (student). Mode ``full``:
forward + backward (∂h_s, ∂W_s).

Providers: ``fastdistill`` (``fused_linear_kd_loss``, chunked, fp32 logits per chunk); ``eager``
(logits materialised, fp32 log-softmax, autograd: what training code does today);
``liger`` (liger-kernel 0.8.5 ``LigerFusedLinearJSD``, a benchmark-only extra; β = 0 is its
forward KL); ``torch-linear-ce`` (fkl only: ``F.linear_cross_entropy`` with the teacher's dense
probabilities as targets, where the installed torch has it — its value is KL + H(P), the same
gradient).

Work: ``4·N·V·H·2`` FLOP (student and teacher logits, ∂h_s and ∂W_s); the floor is that count at
790 TFLOP/s. Error column: max_j |∂h_s − ∂h_s⁽⁶⁴⁾| / max |∂h_s⁽⁶⁴⁾| on the first and last
``ORACLE_ROWS`` rows (each row's ∂h depends on that row's logits only; 1/N applied), the fp64
oracle being the eager math on float64 copies.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastdistill.bench.runner import Case

STANDARD = {"flkd-128k": (8192, 4096, 128256)}  # (N, H, V), ANCHORS.md
SMALL = {"flkd-n96-h64-v4099": (96, 64, 4099)}
DIVERGENCES = ("fkl", "jsd")
BETA = 0.5
ORACLE_ROWS = 64
LIGER_MISSING = "liger-kernel not installed (benchmark-only extra: pip install liger-kernel==0.8.5)"
ORDER = ["fastdistill", "eager", "liger", "torch-linear-ce"]


def _log_probs(hs, ws, ht, wt):
    acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
    ls = F.log_softmax((hs @ ws.T).to(acc), dim=-1)
    with torch.no_grad():
        lt = F.log_softmax((ht @ wt.T).to(acc), dim=-1)
    return ls, lt


def eager(div: str, hs, ws, ht, wt):
    ls, lt = _log_probs(hs, ws, ht, wt)
    if div == "fkl":
        rows = (lt.exp() * (lt - ls)).sum(-1)
    else:
        lm = torch.logaddexp(lt + math.log(BETA), ls + math.log1p(-BETA))
        rows = BETA * (lt.exp() * (lt - lm)).sum(-1) + (1 - BETA) * (ls.exp() * (ls - lm)).sum(-1)
    return rows.sum() / hs.shape[0]


def _liger(device: str):
    if importlib.util.find_spec("liger_kernel") is None:
        return None, LIGER_MISSING
    from fastdistill._backend import triton_why_not

    reasons = triton_why_not(torch.device(device))
    if reasons:
        return None, "liger-kernel runs Triton kernels: " + "; ".join(reasons)
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    except Exception as exc:
        return None, f"liger-kernel import failed ({type(exc).__name__}: {exc})"
    mods = {"fkl": LigerFusedLinearJSD(jsd_beta=0.0), "jsd": LigerFusedLinearJSD(jsd_beta=BETA)}
    # forward(student_input, student_weight, teacher_input, teacher_weight, shift_labels): no default in 0.8.5
    return (lambda div, hs, ws, ht, wt: mods[div](hs, ws, ht, wt, None)), None


def _torch_lce():
    """(loss fn, why not, note). ``F.linear_cross_entropy`` is called with ``LinearCrossEntropyOptions()`` (its
    chunked path) where this torch has it; the note says which path probability targets actually take (torch
    2.13's chunked path needs int64 targets and falls back to the reference path, which materialises the
    logits, with a warning: probed once on a tiny CPU input)."""
    fn = getattr(F, "linear_cross_entropy", None)
    if fn is None:
        return None, f"F.linear_cross_entropy is not in torch {torch.__version__}", ""
    opts = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    kw = {"options": opts()} if opts is not None else {}
    note = "torch-linear-ce takes torch's reference path (no LinearCrossEntropyOptions here)"
    if opts is not None:
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                fn(torch.zeros(2, 4), torch.zeros(3, 4), torch.full((2, 3), 1 / 3), reduction="mean", **kw)
        except Exception as exc:  # this torch's chunked path refuses the call: the reference path then
            kw, seen = {}, []
            note = f"torch-linear-ce: torch's reference path (options refused: {type(exc).__name__})"
        else:
            fell_back = any("options" in str(w.message) and "ignored" in str(w.message) for w in seen)
            note = ("torch-linear-ce: probability targets take torch's reference path (its chunked path needs "
                    "int64 targets)" if fell_back else "torch-linear-ce: torch's chunked path")

    def lce(div, hs, ws, ht, wt):
        with torch.no_grad():
            p = torch.softmax((ht @ wt.T).float(), dim=-1).to(hs.dtype)  # dense teacher targets [N, V]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback warning, probed above and stated in the note
            return fn(hs, ws, p, reduction="mean", **kw)

    return lce, None, note


def _inputs(N: int, H: int, V: int, device: str, dtype=torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(4321)
    r = lambda *s, std: (torch.randn(*s, generator=g, device=device, dtype=torch.float32) * std).to(dtype)
    hs = r(N, H, std=1.0).requires_grad_(True)
    ht = r(N, H, std=1.0)
    wt = r(V, H, std=2.5 / math.sqrt(H))  # logits of std ~2.5, like an LM head
    ws = (wt.float() + r(V, H, std=1.0 / math.sqrt(H)).float()).to(dtype).requires_grad_(True)
    return hs, ws, ht, wt


def _case(shape_name: str, div: str, inputs, fns: dict, skipped: dict, base_note: str) -> Case:
    hs, ws, ht, wt = inputs
    N = hs.shape[0]
    rows = torch.cat([torch.arange(min(ORACLE_ROWS, N)), torch.arange(max(N - ORACLE_ROWS, ORACLE_ROWS), N)])
    rows = rows.to(hs.device)

    def step_of(fn):
        def step():
            hs.grad = ws.grad = None
            loss = fn(div, hs, ws, ht, wt)
            loss.backward()
            return loss

        return step

    providers = {name: step_of(fn) for name, fn in fns.items()}
    cache: dict = {}

    def error(name):
        if "g" not in cache:  # fp64 ∂h_s on the oracle rows (the full batch's 1/N applied)
            h64 = hs.detach()[rows].double().requires_grad_(True)
            loss = eager(div, h64, ws.detach().double(), ht[rows].double(), wt.double()) * (len(rows) / N)
            (cache["g"],) = torch.autograd.grad(loss, h64)
        providers[name]()
        g = hs.grad[rows].double()
        return float(((g - cache["g"]).abs().max() / cache["g"].abs().max()).item())

    def reset():
        hs.grad = ws.grad = None
        if hs.is_cuda:
            torch.cuda.empty_cache()

    note = "; ".join(filter(None, [base_note, f"rel_err of h_s.grad on {len(rows)} rows",
                                   "torch-linear-ce's value is KL + H(P)" if div == "fkl" else ""]))
    H, V = hs.shape[1], ws.shape[0]
    return Case(shape=f"{shape_name}/{div}", mode="full", providers=providers, flops=8 * N * V * H, error=error,
                skipped=skipped, reset=reset, baseline="eager", anchor="liger", order=ORDER, note=note)


def cases(device: str, quick: bool) -> list[Case]:
    small = quick or not device.startswith("cuda")
    shapes = SMALL if small else STANDARD
    base_note = f"{'quick' if device.startswith('cuda') else 'cpu'}-small-shape" if small else ""
    liger, liger_why = _liger(device)
    lce, lce_why, lce_note = _torch_lce()
    out = []
    for shape_name, (N, H, V) in shapes.items():
        inputs = _inputs(N, H, V, device)
        for div in DIVERGENCES:
            fns: dict[str, Callable] = {}
            skipped: dict[str, str] = {}
            try:
                from fastdistill import fused_linear_kd_loss

                fns["fastdistill"] = lambda div, hs, ws, ht, wt: fused_linear_kd_loss(
                    hs, ws, ht, wt, divergence=div, beta=BETA, reduction="batchmean")
            except Exception as exc:
                skipped["fastdistill"] = f"fused_linear_kd_loss unavailable ({type(exc).__name__}: {exc})"
            fns["eager"] = eager
            if liger is not None:
                fns["liger"] = liger
            else:
                skipped["liger"] = liger_why
            if div == "fkl" and lce is not None:
                fns["torch-linear-ce"] = lce
            else:
                skipped["torch-linear-ce"] = lce_why if div == "fkl" else "cross-entropy has no JSD form"
            note = "; ".join(filter(None, [base_note, lce_note if "torch-linear-ce" in fns else ""]))
            out.append(_case(shape_name, div, inputs, fns, skipped, note))
    return out
