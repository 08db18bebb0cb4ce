"""Benchmark family "attn": JVP (forward-mode) flash attention, alone and with the primal backward.

Every provider computes, from the same inputs (q, k, v and tangents tq, tk, tv, all nonzero;
softmax scale s = D^-½; ``causal``: key j ≤ query i, Sq = Sk so top-left = bottom-right alignment):

    o = softmax(s·q kᵀ) v,   to = d/dε o(q + ε·tq, k + ε·tk, v + ε·tv) at ε = 0

Modes: ``fwd`` = the JVP forward (o and to) under ``torch.no_grad()``, as rCM runs it;
``full`` = the JVP forward with grad enabled, then ``o.backward(g)`` with a fixed random
upstream gradient g (the MeanFlow / DMF pattern: the primal of the JVP pass is trained; the
tangent is detached).

Providers (fastdistill ones get BSHD [B, S, H, D] contiguous inputs; the others get their own
BHSD [B, H, S, D] contiguous copies, as they are measured in ANCHORS.md, so no row pays a
layout copy):
  fastdistill-triton        ``fastdistill.jvp_attention(q, k, v, tq, tk, tv)``, backend triton,
                            ``FASTDISTILL_ATTN_JVP=fused`` (fp16 / bf16: fp32 always takes two_pass)
  fastdistill-triton-2pass  the same with ``FASTDISTILL_ATTN_JVP=two_pass``
  fastdistill-funcjvp       ``torch.func.jvp`` of ``lambda q, k, v: jvp_attention(q, k, v)[0]``
                            (the forward-AD path; default dispatch, default JVP algorithm)
  fastdistill-reference     backend reference (chunked PyTorch math): quick / CPU shapes only
  rcm                       rCM's Triton JVP forward, ``_attention.apply(q, k, v, tq, tk, tv, sm_scale)
                            -> (o, to)`` from NVlabs/rcm ``rcm/utils/flash_attention_jvp_triton.py``,
                            loaded from the file named by ``FASTDISTILL_RCM_JVP_PATH`` (never vendored);
                            no causal mask; its backward calls flash-attn, so ``full`` needs flash_attn
  jvp-flash-attn            jvp-flash-attention 0.14 (benchmark-only extra): ``torch.func.jvp`` of
                            ``JVPAttn.fwd_dual(q, k, v, causal=, sm_scale=)``; Sq = Sk, S even ≥ 32
                            (backward: S % 32 == 0), D ∈ {16, 32, 64, 128, 256}
  math-jvp                  ``torch.func.jvp`` of ``F.scaled_dot_product_attention`` under
                            ``sdpa_kernel(SDPBackend.MATH)``: the baseline of the speed-up column
                            (what NVlabs/FastGen's MeanFlow / sCM run today)
and, in a case of its own (same shape and mode, its own FLOPs): ``sdpa``, plain SDPA with the
default backends (flash / cuDNN), no tangent: the floor. A JVP costs 3× its FLOPs, so a JVP at
SDPA's own TFLOP/s would take 3× the ``sdpa`` fwd time.

FLOPs (Case.flops; tflops in the note): F = 4·B·H·Sq·Sk·D for one attention forward (q kᵀ and
P v, 2 FLOPs per multiply-add), halved when causal. JVP forward = 3F (6 matmuls per tile instead
of 2); ``full`` = 3F + 2.5F (the flash backward: 5 matmuls, counting the recompute of P).
``sdpa``: F (fwd), F + 2.5F (full). Two-pass and math providers do more work than these counts:
the TFLOP/s column is "useful" FLOPs per second.

Error column: max |x − x64| / max |x64| against float64 ``torch.func.jvp`` (and autograd) of plain
math attention written here (``_attention64``). ``fwd``: the larger of the errors of o and to
(``sdpa``: o); ``full``: the error of dq. At the standard shapes only the first and last
``ORACLE_ROWS`` query rows are compared (each query row of o, to and dq depends on that row of q,
tq, g and on all of k, v, tk, tv, so the oracle runs on those rows against full keys); the
oracle is computed once per shape and shared by both modes.

Peak memory: the runner's "extra peak MB" of one call over the inputs (``reset`` drops the
gradients first). ``math-jvp`` is skipped before it runs when its estimated footprint
(``MATH_BYTES_PER_SCORE`` bytes per score element, from ANCHORS.md) exceeds the free memory.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdistill.bench.runner import Case

# ANCHORS.md standard shapes: name -> (B, H, S, D, causal)
STANDARD = {
    "attn-s4k": (2, 16, 4096, 128, False),
    "attn-s4k-causal": (2, 16, 4096, 128, True),
    "attn-s16k": (1, 16, 16384, 128, False),
}
SMALL = {"attn-s256": (1, 2, 256, 64, False), "attn-s256-causal": (1, 2, 256, 64, True)}
MODES = ("fwd", "full")
# the third-party kernels last: an illegal memory access in one of them poisons the CUDA context for every
# provider after it (a compile or launch error only skips its row)
ORDER = ["fastdistill-triton", "fastdistill-triton-2pass", "fastdistill-funcjvp", "fastdistill-reference",
         "math-jvp", "rcm", "jvp-flash-attn"]
BASELINE = "math-jvp"
ORACLE_ROWS = 128  # fp64 oracle on the first and last 128 query rows when S > 2·128
# math-jvp extra memory per element of the [B, H, Sq, Sk] score matrix (ANCHORS.md, B2 H16 S4096 bf16:
# 10.8 GB fwd, 18.9 GB jvp + backward over 537M elements), with a little margin
MATH_BYTES_PER_SCORE = {"fwd": 21, "full": 37}
JFA_MISSING = ("jvp-flash-attention not installed (benchmark-only extra: "
               "pip install --no-deps jvp-flash-attention==0.14.0)")
RCM_ENV = "FASTDISTILL_RCM_JVP_PATH"
RCM_UNSET = (f"{RCM_ENV} is not set (path to NVlabs/rcm rcm/utils/flash_attention_jvp_triton.py; "
             "not vendored in fastdistill)")


def flops_forward(B: int, H: int, Sq: int, Sk: int, D: int, causal: bool) -> int:
    """F = 4·B·H·Sq·Sk·D (two matmuls), halved when causal."""
    f = 4 * B * H * Sq * Sk * D
    return f // 2 if causal else f


# ----------------------------------------------------------------------------- small helpers
@contextlib.contextmanager
def env_vars(**values: str | None) -> Iterator[None]:
    """Set (or, for None, unset) environment variables inside the block, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _triton_reasons(device: str) -> list[str]:
    from fastdistill._backend import triton_why_not

    return triton_why_not(torch.device(device))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    den = ref.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float(((out.detach().double() - ref).abs().max() / den).item())


# ----------------------------------------------------------------------------- inputs
@dataclass
class _Inputs:
    """BSHD tensors (q, k, v are leaves requiring grad) and BHSD contiguous copies of all of them."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    tq: torch.Tensor
    tk: torch.Tensor
    tv: torch.Tensor
    g: torch.Tensor  # upstream gradient of o (full mode)
    bhsd: dict[str, torch.Tensor]

    def leaves(self) -> list[torch.Tensor]:
        return [self.q, self.k, self.v, self.bhsd["q"], self.bhsd["k"], self.bhsd["v"]]

    def zero_grads(self) -> None:
        for t in self.leaves():
            t.grad = None


def _inputs(B: int, H: int, S: int, D: int, device: str, dtype: torch.dtype) -> _Inputs:
    g = torch.Generator(device=device).manual_seed(4321)

    def randn() -> torch.Tensor:
        return torch.randn(B, S, H, D, generator=g, device=device, dtype=torch.float32).to(dtype)

    t = {name: randn() for name in ("q", "k", "v", "tq", "tk", "tv", "g")}
    bhsd = {name: x.transpose(1, 2).contiguous() for name, x in t.items()}
    for name in ("q", "k", "v"):
        t[name].requires_grad_(True)
        bhsd[name].requires_grad_(True)
    return _Inputs(**t, bhsd=bhsd)


# ----------------------------------------------------------------------------- fp64 oracle
def _attention64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 q_pos: torch.Tensor | None) -> torch.Tensor:
    """Plain math attention, BSHD: q [B, R, H, D] (query rows at positions ``q_pos``, None: no mask),
    k, v [B, Sk, H, D] -> [B, R, H, D]. Causal when ``q_pos`` is given: key j is kept iff j ≤ q_pos."""
    s = torch.einsum("brhd,bshd->bhrs", q, k) * scale
    if q_pos is not None:
        masked = torch.arange(k.shape[1], device=k.device)[None, :] > q_pos[:, None]  # [R, Sk]
        s = s.masked_fill(masked, float("-inf"))
    return torch.einsum("bhrs,bshd->brhd", torch.softmax(s, dim=-1), v)


class _Oracle:
    """float64 o, to (fwd) and dq (full) on query rows ``self.rows`` (None: all), computed once."""

    def __init__(self, x: _Inputs, scale: float, causal: bool):
        self.x, self.scale, self.causal = x, scale, causal
        S = x.q.shape[1]
        dev = x.q.device
        if S > 2 * ORACLE_ROWS:
            self.rows = torch.cat([torch.arange(ORACLE_ROWS), torch.arange(S - ORACLE_ROWS, S)]).to(dev)
        else:
            self.rows = None
        self.q_pos = (self.rows if self.rows is not None else torch.arange(S, device=dev)) if causal else None
        self._fwd: tuple[torch.Tensor, torch.Tensor] | None = None
        self._dq: torch.Tensor | None = None

    def select(self, t: torch.Tensor) -> torch.Tensor:
        """The oracle's query rows of a BSHD tensor."""
        return t if self.rows is None else t.index_select(1, self.rows)

    def _fn(self) -> Callable[..., torch.Tensor]:
        return functools.partial(_attention64, scale=self.scale, q_pos=self.q_pos)

    def fwd(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fwd is None:
            x = self.x
            with torch.no_grad():
                primals = (self.select(x.q.detach()).double(), x.k.detach().double(), x.v.detach().double())
                tangents = (self.select(x.tq).double(), x.tk.double(), x.tv.double())
                self._fwd = torch.func.jvp(self._fn(), primals, tangents)
        return self._fwd

    def dq(self) -> torch.Tensor:
        if self._dq is None:
            x = self.x
            with torch.enable_grad():
                q64 = self.select(x.q.detach()).double().requires_grad_(True)
                o64 = self._fn()(q64, x.k.detach().double(), x.v.detach().double())
                (self._dq,) = torch.autograd.grad(o64, q64, self.select(x.g).double())
        return self._dq


_ORACLE: dict[tuple, _Oracle] = {}  # one shape at a time: cases run in order (fwd, then full)


def _oracle(key: tuple, x: _Inputs, scale: float, causal: bool) -> _Oracle:
    if key not in _ORACLE:
        _ORACLE.clear()
        _ORACLE[key] = _Oracle(x, scale, causal)
    return _ORACLE[key]


# ----------------------------------------------------------------------------- providers
# A provider "body" computes (o, to) in its own layout (to may be None: the sdpa floor); ``_step``
# wraps it into the runner's zero-arg step for a mode.
@dataclass
class _Provider:
    body: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]
    layout: str  # "bshd" | "bhsd"


def _step(p: _Provider, x: _Inputs, mode: str) -> Callable[[], tuple]:
    g = x.g if p.layout == "bshd" else x.bhsd["g"]

    def step():
        x.zero_grads()
        if mode == "fwd":
            with torch.no_grad():
                return p.body()
        o, to = p.body()
        to = None if to is None else to.detach()  # stop-gradient on the tangent (sCM / MeanFlow)
        o.backward(g)
        return o.detach(), to

    return step


def _fastdistill(x: _Inputs, device: str, small: bool, causal: bool, scale: float) -> tuple[dict, dict]:
    names = ("fastdistill-triton", "fastdistill-triton-2pass", "fastdistill-funcjvp", "fastdistill-reference")
    try:
        import fastdistill

        op = fastdistill.jvp_attention
    except Exception as exc:
        reason = f"fastdistill.jvp_attention is not available in this build ({type(exc).__name__}: {exc})"
        return {}, dict.fromkeys(names, reason)
    q, k, v, tq, tk, tv = x.q, x.k, x.v, x.tq, x.tk, x.tv
    why: dict[str, list[str]] | None = None
    try:
        r = fastdistill.available_backends("jvp_attention", q, head_dims=(q.shape[-1], v.shape[-1]))
        if isinstance(r, dict) and all(isinstance(r.get(b), list) for b in ("triton", "reference")):
            why = r
    except Exception:
        pass
    if why is None:  # the op's dispatcher entry is not queryable like this: decide from the device
        why = {"triton": _triton_reasons(device), "reference": []}

    def explicit(backend: str, algo: str | None) -> Callable:
        def body():
            with fastdistill.use_backend(backend), env_vars(FASTDISTILL_ATTN_JVP=algo):
                return op(q, k, v, tq, tk, tv, causal=causal, scale=scale)

        return body

    def funcjvp():
        return torch.func.jvp(lambda q, k, v: op(q, k, v, causal=causal, scale=scale)[0], (q, k, v), (tq, tk, tv))

    fns, skipped = {}, {}
    if why["triton"]:
        skipped["fastdistill-triton"] = skipped["fastdistill-triton-2pass"] = "; ".join(why["triton"])
    else:
        if q.dtype == torch.float32:  # the fused pass serves fp16 / bf16 only
            skipped["fastdistill-triton"] = ("fp32 inputs always take two_pass (float64 logits; docs/jvp_attention.md, "
                                             "Numerics): see fastdistill-triton-2pass")
        else:
            fns["fastdistill-triton"] = _Provider(explicit("triton", "fused"), "bshd")
        fns["fastdistill-triton-2pass"] = _Provider(explicit("triton", "two_pass"), "bshd")
    if why["triton"] and not small:
        skipped["fastdistill-funcjvp"] = ("default dispatch would pick the reference backend, too slow at the "
                                          "standard shapes: " + "; ".join(why["triton"]))
    else:
        fns["fastdistill-funcjvp"] = _Provider(funcjvp, "bshd")
    if why["reference"]:
        skipped["fastdistill-reference"] = "; ".join(why["reference"])
    elif not small:
        skipped["fastdistill-reference"] = "too slow at the standard shapes (chunked PyTorch math); runs with --quick"
    else:
        fns["fastdistill-reference"] = _Provider(explicit("reference", None), "bshd")
    return fns, skipped


def _math_jvp(x: _Inputs, mode: str, causal: bool, scale: float) -> _Provider:
    h = x.bhsd
    B, H, S, _ = h["q"].shape

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    too_big = None
    if h["q"].is_cuda:  # fail fast (a reason in the table) instead of an out-of-memory half-way through; read once,
        need = MATH_BYTES_PER_SCORE[mode] * B * H * S * S  # outside the timed body
        free, _ = torch.cuda.mem_get_info(h["q"].device)
        if need > free:
            too_big = (f"math attention would need ≈{need / 1e9:.0f} GB ({MATH_BYTES_PER_SCORE[mode]} B per score "
                       f"element), {free / 1e9:.0f} GB free")

    def body():
        if too_big is not None:
            raise MemoryError(too_big)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(fn, (h["q"], h["k"], h["v"]), (h["tq"], h["tk"], h["tv"]))

    return _Provider(body, "bhsd")


def _sdpa(x: _Inputs, causal: bool, scale: float) -> _Provider:
    h = x.bhsd

    def body():
        return F.scaled_dot_product_attention(h["q"], h["k"], h["v"], is_causal=causal, scale=scale), None

    return _Provider(body, "bhsd")


def _jvp_flash_attn(x: _Inputs, device: str, mode: str, causal: bool, scale: float) -> _Provider | str:
    """jvp-flash-attention 0.14 ``JVPAttn.fwd_dual`` inside ``torch.func.jvp``, or why it cannot run."""
    if importlib.util.find_spec("jvp_flash_attention") is None:
        return JFA_MISSING
    reasons = _triton_reasons(device)
    if reasons:
        return "jvp-flash-attention runs Triton kernels: " + "; ".join(reasons)
    h = x.bhsd
    _, _, S, D = h["q"].shape
    if D not in (16, 32, 64, 128, 256):
        return f"jvp-flash-attention supports head dims 16, 32, 64, 128, 256, not {D}"
    if S < 32 or S % 2:
        return f"jvp-flash-attention needs an even sequence length ≥ 32, not {S}"
    if mode == "full" and S % 32:
        return f"jvp-flash-attention's backward needs a sequence length that is a multiple of 32, not {S}"
    try:
        from jvp_flash_attention.jvp_attention import JVPAttn
    except Exception as exc:
        return f"jvp-flash-attention import failed ({type(exc).__name__}: {exc})"
    fn = functools.partial(JVPAttn.fwd_dual, causal=causal, sm_scale=scale)

    def body():
        return torch.func.jvp(fn, (h["q"], h["k"], h["v"]), (h["tq"], h["tk"], h["tv"]))

    return _Provider(body, "bhsd")


_RCM: dict[str, tuple[types.ModuleType | None, bool, str | None]] = {}


def _load_rcm(path: str) -> tuple[types.ModuleType | None, bool, str | None]:
    """(module, flash_attn importable, why not) for rCM's kernel file, loaded once.

    The file imports ``flash_attn`` (its backward) and ``einops`` (its Sq ≠ Sk backward) at module
    level. When they are missing, stand-ins that raise are put in ``sys.modules`` for the import
    only, so the forward still loads.
    """
    if path in _RCM:
        return _RCM[path]
    has_flash = importlib.util.find_spec("flash_attn") is not None
    stubs: dict[str, types.ModuleType] = {}

    def missing(name: str) -> Callable:
        def fn(*args, **kwargs):
            raise RuntimeError(f"{name} is not installed (stand-in loaded by fastdistill.bench)")

        return fn

    if not has_flash:
        iface = types.ModuleType("flash_attn.flash_attn_interface")
        iface._flash_attn_backward = missing("flash_attn")
        iface._flash_attn_varlen_backward = missing("flash_attn")
        pkg = types.ModuleType("flash_attn")
        pkg.flash_attn_interface = iface
        stubs = {"flash_attn": pkg, "flash_attn.flash_attn_interface": iface}
    if importlib.util.find_spec("einops") is None:
        einops = types.ModuleType("einops")
        einops.rearrange = missing("einops")
        stubs["einops"] = einops
    old = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location("_fastdistill_bench_rcm_jvp", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path!r} as a Python module")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _ = mod._attention.apply
        result = (mod, has_flash, None)
    except Exception as exc:
        result = (None, has_flash, f"loading rCM from {path} failed ({type(exc).__name__}: {exc})")
    finally:
        for name, m in old.items():
            if m is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = m
    _RCM[path] = result
    return result


def _rcm(x: _Inputs, device: str, mode: str, causal: bool, scale: float) -> _Provider | str:
    """rCM's ``_attention.apply(q, k, v, tq, tk, tv, sm_scale) -> (o, to)`` on BHSD, or why it cannot run."""
    path = os.environ.get(RCM_ENV)
    if not path:
        return RCM_UNSET
    if causal:
        return "rCM's JVP kernel has no causal mask (removed in NVlabs/rcm b4ca2b4, 2026-01-16)"
    reasons = _triton_reasons(device)
    if reasons:
        return "rCM's kernel runs on Triton: " + "; ".join(reasons)
    if not os.path.isfile(path):
        return f"{RCM_ENV}={path!r} is not a file"
    mod, has_flash, why = _load_rcm(path)
    if mod is None:
        return str(why)
    if mode == "full" and not has_flash:
        return "rCM's backward calls flash-attn's _flash_attn_backward: flash_attn is not installed"
    h = x.bhsd
    apply = mod._attention.apply

    def body():
        return apply(h["q"], h["k"], h["v"], h["tq"], h["tk"], h["tv"], scale)

    return _Provider(body, "bhsd")


# ----------------------------------------------------------------------------- cases
def _error_fn(key: tuple, x: _Inputs, scale: float, causal: bool, mode: str, steps: dict[str, Callable],
              provs: dict[str, _Provider]) -> Callable[[str], float]:
    def error(name: str) -> float:
        oracle = _oracle(key, x, scale, causal)
        o, to = steps[name]()
        bshd = provs[name].layout == "bshd"
        if mode == "full":
            dq = x.q.grad if bshd else x.bhsd["q"].grad.transpose(1, 2)
            return _rel_err(oracle.select(dq), oracle.dq())
        if not bshd:
            o, to = o.transpose(1, 2), (None if to is None else to.transpose(1, 2))
        o64, to64 = oracle.fwd()
        err = _rel_err(oracle.select(o), o64)
        return err if to is None else max(err, _rel_err(oracle.select(to), to64))

    return error


def cases(device: str, quick: bool) -> list[Case]:
    on_gpu = device.startswith("cuda")
    small = quick or not on_gpu
    shapes = SMALL if small else STANDARD
    dtype = torch.bfloat16 if on_gpu else torch.float32
    base_note = f"{'quick' if on_gpu else 'cpu'}-small-shape" if small else ""
    out = []
    for shape_name, (B, H, S, D, causal) in shapes.items():
        x = _inputs(B, H, S, D, device, dtype)
        scale = D ** -0.5
        F1 = flops_forward(B, H, S, S, D, causal)
        fd, fd_skipped = _fastdistill(x, device, small, causal, scale)
        key = (device, shape_name)
        rows = "" if S <= 2 * ORACLE_ROWS else f" on query rows 0-{ORACLE_ROWS - 1}, {S - ORACLE_ROWS}-{S - 1}"
        for mode in MODES:
            provs: dict[str, _Provider] = dict(fd)
            skipped = dict(fd_skipped)
            for name, p in (("rcm", _rcm(x, device, mode, causal, scale)),
                            ("jvp-flash-attn", _jvp_flash_attn(x, device, mode, causal, scale))):
                if isinstance(p, str):
                    skipped[name] = p
                else:
                    provs[name] = p
            provs["math-jvp"] = _math_jvp(x, mode, causal, scale)
            steps = {name: _step(p, x, mode) for name, p in provs.items()}

            def reset(x=x):  # before each memory measurement: drop the last gradients and cached blocks
                x.zero_grads()
                if x.q.is_cuda:
                    torch.cuda.empty_cache()

            err_note = ("rel_err max(o, to)" if mode == "fwd" else "rel_err of dq") + rows
            note = "; ".join(filter(None, [base_note, err_note]))
            # JVP forward 3F; full: + primal backward 2.5F
            flops = 3 * F1 + (5 * F1 // 2 if mode == "full" else 0)
            # the anchor of the speed-up targets: rCM's kernel (issue targets), else jvp-flash-attention
            anchor = next((a for a in ("rcm", "jvp-flash-attn") if a in steps), None)
            out.append(Case(shape=shape_name, mode=mode, providers=steps, flops=flops,
                            error=_error_fn(key, x, scale, causal, mode, steps, provs), skipped=skipped,
                            reset=reset, baseline=BASELINE, anchor=anchor, order=ORDER, note=note))
            # the floor: plain SDPA (no tangent), its own FLOPs: F fwd, F + 2.5F full
            floor = {"sdpa": _sdpa(x, causal, scale)}
            floor_steps = {"sdpa": _step(floor["sdpa"], x, mode)}
            floor_note = "floor: plain SDPA, no tangent; " + ("rel_err of o" if mode == "fwd" else "rel_err of dq")
            out.append(Case(shape=shape_name, mode=mode, providers=floor_steps,
                            flops=F1 + (5 * F1 // 2 if mode == "full" else 0),
                            error=_error_fn(key, x, scale, causal, mode, floor_steps, floor), reset=reset,
                            note="; ".join(filter(None, [base_note, floor_note + rows]))))
    return out
