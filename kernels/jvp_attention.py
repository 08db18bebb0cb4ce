"""Triton JVP flash attention: forward + tangent in one FA2-style pass, primal backward.

Views are ``[B, H, S, D]`` with any strides (head dim contiguous); GQA maps query head h to
key/value head h // G. Derivation (DESIGN.md §1), per query row, in the log2 domain of the
online softmax (m, l the running max and sum, α = 2^(m_old − m_new)):

    P̃ = 2^(s·log2e·qkᵀ − m)            l ← α·l + Σ_j P̃
    Õ ← α·Õ + P̃ v                        (primal accumulator)
    Ṡ = s·(q̇ kᵀ + q k̇ᵀ)                 r ← α·r + Σ_j P̃⊙(Ṡ − c)    (fp32)
    T̃ ← α·T̃ + (P̃⊙(Ṡ − c)) v + P̃ v̇      (ONE tangent accumulator: both terms share α)
    O = Õ/l, μ = c + r/l, Ȯ = T̃/l − (r/l)·O, lse = ln2·m + ln l

Any shift c gives the same result in exact arithmetic; c = a/l, with a = Ṡ of the row's arg-max
key so far (P̃ = 1 there), is that key's weight times its Ṡ. Each block re-bases r and T̃ on its
new c first (r += (c_old − c_new)·l, T̃ += (c_old − c_new)·Õ). Unshifted, the epilogue
T̃/l − μ·O cancels two terms of size |Ṡ|·|v| where one key carries (almost) all of a row's
weight (a single context token; the first row of causal attention; an attention sink): with
c ≈ μ there, that key's term P̃⊙(Ṡ − c) is ≈ (1 − P)·Ṡ (exactly 0 for one key) and the
cancellation is gone; elsewhere |c| ≤ P·|Ṡ| keeps μ = c + r/l as accurate as Σ P̃⊙Ṡ / l. In
two_pass, P is final in the tangent pass (nothing to re-base): the primal pass records each row's
arg-max key, and _arg_shift_kernel forms c = P·Ṡ of that key with row-wise dots in between. Its
row dots sum in another order than the passes' (tensor-core) dots, so c can miss P̃·Ṡ of that key
by an ulp; the tangent pass then centres its epilogue on the rounded terms: with x_j = P̃⊙(Ṡ − c) as
rounded to the input dtype for the product with v and u = Σ_j x_j, Ȯ = T̃/l − (u/l)·O
= Σ_j x_j·(v_j − O)/l + P v̇, where the dominant key's v_j − O vanishes with its residual (μ keeps
r, the fp32 terms' sum).

A row that sees no key (causal with Sq > Sk, Sk = 0, every key masked) keeps l = 0 and gets O = Ȯ = 0, μ = 0,
lse = −inf. A key mask (HAS_KB) adds a per-key bias [B, H, Sk] (own strides; bool: 0 / −inf) to S after the scale,
in natural units (BASE2 off), with the low word of lse in every dtype (docs/jvp_attention.md, "Key masks").
``two_pass`` is the alternative of DESIGN.md: the primal pass stores O and lse, then the
tangent pass recomputes P = exp(S − lse) (5 matmuls, no rescaling) and reads O back. It is the
default above head dim 128 (where the fused pass cannot avoid spilling registers on sm_90a)
and selectable everywhere with FASTDISTILL_ATTN_JVP=fused|two_pass, except for fp32 inputs: their
logits come from float64 dots (_logits), which the fused pass cannot take, and they always use
two_pass.
Backward (FA2): Δ = rowsum(dO⊙O) − dlse, dS = P⊙(dP − Δ), P = exp((S − lse) − lse_lo) where
lse_lo, written by the forward for fp32 inputs and with a key mask, is the rounding error of lse = m + ln l (TwoSum);
for fp32 inputs S, dP and rowsum(dO⊙O) are float64 sums rounded once (_logits);
one kernel per key block accumulates dk, dv over the query blocks of every query head of its
group (no atomics: deterministic), one kernel per query block accumulates dq.
"""

from __future__ import annotations

import array
import functools
import os
import re

import torch
import triton
import triton.language as tl

from fastdistill._backend import on_tensor_device

LOG2E = 1.4426950408889634
MAX_GRID_YZ = 65535


# ----------------------------------------------------------------------------- configurations
def _env_cfg(name: str) -> tuple[int, int, int, int] | None:
    """``FASTDISTILL_ATTN_FWD_CONFIG`` / ``..._BWD_CONFIG`` = "BM,BN,WARPS,STAGES" (benchmark sweeps)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        bm, bn, w, s = (int(x) for x in raw.split(","))
    except ValueError:
        raise ValueError(f"{name}: expected 'BM,BN,WARPS,STAGES' (integers), got {raw!r}") from None
    return bm, bn, w, s


# Defaults per padded head dim (bf16/fp16), from the sm_90a register report of
# benchmarks/triton_codegen.py (none spills), not yet from timings: benchmarks/attn_sweep.py is
# the GPU sweep that will pick them by measurement. fp32 inputs multiply in full precision on the
# CUDA cores (input_precision="ieee"): a correctness path, small tiles, not a speed target.
_FWD_PLAIN = {32: (128, 64, 8, 2), 64: (128, 64, 8, 2), 128: (128, 64, 8, 2), 256: (64, 32, 8, 2)}
_FWD_TANGENT = {32: (128, 32, 8, 2), 64: (128, 32, 8, 2), 128: (64, 16, 8, 2), 256: (32, 16, 8, 1)}
_BWD = {32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 64, 8, 2), 256: (16, 32, 4, 1)}
_FP32 = (32, 32, 4, 1)
_FP32_SM80_256 = (16, 16, 4, 1)  # fp32 at head dim 256 on sm_80–89: 32×32 needs 132 KiB of shared memory (> 99)
FUSED_MAX_HEAD_DIM = 128  # above: the fused pass spills at every block shape; two_pass does not
# Triton < 3.9 (checked: 3.6 with its bundled ptxas 12.8, sm_90a) spills with some of the tables above: the
# fused JVP forward at head dim 128 (184 B), the plain forward (120 B) and two_pass tangent pass (36/48 B)
# at 256, dq at 128 (72 B), the tangent shift at head dims 80-256 (24-204 B). These entries spill in neither
# 3.6 nor 3.9 (compile-only check, not timed).
_TRITON_VER = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
if _TRITON_VER < (3, 9):
    _FWD_PLAIN = {**_FWD_PLAIN, 256: (32, 32, 8, 2)}
    _FWD_TANGENT = {**_FWD_TANGENT, 128: (32, 16, 8, 2), 256: (16, 16, 8, 1)}
    _BWD = {**_BWD, 128: (64, 32, 8, 2)}


# Ampere / Ada (sm_80–sm_89) and consumer Blackwell (sm_120, also mma.sync and 99 KiB): mma.sync keeps
# more accumulator state per thread than wgmma, and the Hopper tables spill there. From
# benchmarks/attn_config_search.py --arch 80 (bf16, every tangent, causal): the largest BM·BN that spills
# nowhere in the bucket and fits 99 KiB of shared memory (sm_86 / sm_89), one entry serving both tangent
# schedules and one both backward kernels; the compiled grid is
# benchmarks/results/attn_config_search_sm80.csv. Not timed: no Ampere GPU has been lent.
_SM80_FWD_PLAIN = {32: (128, 64, 4, 2), 64: (128, 64, 4, 2), 128: (64, 64, 8, 2), 256: (32, 64, 4, 2)}
# Refreshed after the tangent shift: head dim 256 (two_pass only) 16×16 (16×32 spills 12 bytes now), head dim 64
# 128×32 (the two_pass tangent pass no longer spills there; ptxas's allocation is not monotone in the tile).
_SM80_FWD_TANGENT = {32: (128, 64, 8, 2), 64: (128, 32, 8, 2), 128: (32, 16, 8, 2), 256: (16, 16, 4, 2)}
_SM80_BWD = {32: (64, 64, 8, 2), 64: (64, 32, 4, 2), 128: (64, 32, 8, 2), 256: (32, 32, 8, 2)}
SM80_FUSED_MAX_HEAD_DIM = 128
# sm_86 / sm_87 / sm_89 / sm_120 under Triton 3.9: the same mma.sync code, but LLVM's SLP vectorizer runs (Triton
# turns it off for capability 80 only) and five entries above spill there (8-516 bytes). From
# benchmarks/attn_config_search.py --arch 89 (compile only, not timed): 8 warps for the plain forward at 64 and
# 256 and the tangent pass at 256; 128×16 for the tangent passes at 64; 32×64 for the backward at 32.
_SLP_FWD_PLAIN = {**_SM80_FWD_PLAIN, 64: (128, 64, 8, 2), 256: (32, 64, 8, 2)}
_SLP_FWD_TANGENT = {**_SM80_FWD_TANGENT, 64: (128, 16, 8, 2), 256: (16, 16, 8, 2)}
_SLP_BWD = {**_SM80_BWD, 32: (32, 64, 4, 2)}
if _TRITON_VER < (3, 9):
    # Triton < 3.9 (checked: 3.6, the Triton of torch 2.10 / 2.11) runs the SLP vectorizer on sm_80 too, and the
    # tables above spill there: on sm_80 the fused JVP pass at head dims 64-128 (32-64 B), the plain forward
    # (804 B) and two_pass tangent pass (60 B) at 256, dk/dv at 32 (24 B); on sm_89 the fused pass at 128 (40 B),
    # the tangent pass at 128 (8 B), the plain forward at 256 (96 B). No fused tile spills nowhere at head dim 128
    # on either (two_pass serves it); these entries spill on neither (attn_config_search.py run under 3.6, --arch
    # 80 and 89, the same ranking; compile only, not timed).
    SM80_FUSED_MAX_HEAD_DIM = 64
    _SM80_FWD_PLAIN = {**_SM80_FWD_PLAIN, 256: (64, 16, 8, 2)}
    _SM80_FWD_TANGENT = {**_SM80_FWD_TANGENT, 64: (128, 16, 8, 2), 256: (16, 32, 8, 2)}
    _SM80_BWD = {**_SM80_BWD, 32: (32, 64, 4, 2)}
    _SLP_FWD_PLAIN = {**_SLP_FWD_PLAIN, 256: (64, 16, 8, 2)}
    _SLP_FWD_TANGENT = {**_SLP_FWD_TANGENT, 128: (32, 64, 8, 2)}


# With a key mask (HAS_KB: the bias added in natural units, the low word of lse in every dtype) some bf16/fp16 entries
# above spill where the unmasked kernels do not (Triton 3.9, compile only, benchmarks/triton_codegen.py kmask rows):
# on sm_90a the plain forward at head dims 80 / 96 (16 B, padded to 128) and 256 (4 B), the two_pass tangent pass at 256
# (132 B); on sm_80 the fused pass at 64 (8 B), the tangent pass (8 B) and the tangent shift (8 B) at 256, dk/dv at 32
# (24 B); on sm_89 (the _SLP_ tables) the tangent passes at 64 (60 B, 8 B). Masked calls take these entries instead (the
# largest tiles tried that spill for neither schedule / backward kernel of the bucket; not timed). Not checked on
# sm_120.
_KM_FWD_PLAIN = {256: (64, 16, 8, 2)}
_KM_FWD_PLAIN_PADDED_128 = (128, 32, 8, 2)
_KM_FWD_TANGENT = {256: (16, 16, 8, 1)}
_KM_BWD: dict = {}
_KM_SM80_FWD_PLAIN: dict = {}
_KM_SM80_FWD_TANGENT = {64: (32, 64, 8, 2), 256: (16, 16, 8, 2)}
_KM_SM80_BWD = {32: (32, 64, 4, 2)}
_KM_SLP_FWD_PLAIN: dict = {}
_KM_SLP_FWD_TANGENT = {64: (32, 64, 8, 2)}
_KM_SLP_BWD: dict = {}
if _TRITON_VER < (3, 9):
    # Triton 3.6 (test_codegen under it): two masked kernels spill with the entries that serve them, the plain
    # forward at head dim 64 on sm_80 (128x64, 4 warps: 56 B) and the two_pass tangent pass at 128 on sm_89 (32x64:
    # 8 B at 128/128). These spill nowhere in their bucket under 3.6 (compile only, not timed; (16, 32) was the only
    # spill-free tile of 14 tried for the latter). sm_90a's masked entries spill nowhere under 3.6.
    _KM_SM80_FWD_PLAIN = {64: (128, 64, 8, 2)}
    _KM_SLP_FWD_TANGENT = {**_KM_SLP_FWD_TANGENT, 128: (16, 32, 8, 2)}
    # and on sm_80 (found by triton_codegen.py --arch 80 --gated-only under 3.6): the two_pass tangent pass at 32
    # (128x64: 46 B) and dk/dv at 256 (32x32, 2 stages: 8 B); these spill for neither schedule / backward kernel
    _KM_SM80_FWD_TANGENT = {**_KM_SM80_FWD_TANGENT, 32: (128, 32, 8, 2)}
    _KM_SM80_BWD = {**_KM_SM80_BWD, 256: (32, 32, 8, 1)}
    # and on sm_90a (the GPU image's Triton): the plain forward at 256 (64x16: 136 B) and dq at 256 (16x32: 32 B);
    # 32x32 spills for none of plain / dk,dv / dq there; on sm_89 the tangent passes at 32 (128x64: 30 B) and dk/dv
    # at 128/64 (64x32: 8 B) (attn_config_search.py --kmask under 3.6). Still spilling under 3.6 with a mask, no
    # tile of the search grid being spill-free: the two_pass tangent pass at head dim 256 on sm_80 (4 B) and sm_89
    # (8 B)
    _KM_FWD_PLAIN = {**_KM_FWD_PLAIN, 256: (32, 32, 8, 2)}
    _KM_BWD = {**_KM_BWD, 256: (32, 32, 8, 2)}
    _KM_SLP_FWD_TANGENT = {**_KM_SLP_FWD_TANGENT, 32: (128, 32, 8, 2)}
    _KM_SLP_BWD = {**_KM_SLP_BWD, 128: (32, 32, 4, 2)}


def centred(arch: int = 90) -> bool:
    """Whether two_pass's tangent pass centres its epilogue on the rounded terms (CENTRE, fp16 / bf16 inputs; the
    module docstring). Not on the Ampere tables under Triton < 3.9 (compile only, 3.6): its extra row sum spills
    there at head dim 256 on sm_80 at every tile tried (8 bytes), and on sm_89 with a key mask at head dims 32,
    64 / 128 and 256 with the current entries; that pass keeps the uncentred epilogue there (the fp16 rounding
    of the dominant key's residual in Ȯ, which shows only where every exact Ȯ is ~0)."""
    return not (_TRITON_VER < (3, 9) and _small_smem(arch))


def _bucket(dqk: int, dv: int) -> int:
    return max(32, triton.next_power_of_2(dqk), triton.next_power_of_2(dv))


def _small_smem(arch: int) -> bool:
    """The Ampere tables (mma.sync, <= 99 KiB of shared memory per block) serve sm_80–89 and consumer
    Blackwell (sm_120: no wgmma, 99 KiB); the Hopper tables sm_90–sm_10x (227 KiB)."""
    return arch < 90 or arch >= 110


def fp32_supported(arch: int) -> bool:
    """Whether the kernels serve fp32 inputs on compute capability ``arch``: sm_80 and sm_90, where their float64
    logits (``_logits``) run on FP64 tensor cores (mma .f64) and their configurations are compile-checked. On
    sm_86 / sm_87 / sm_89 and consumer Blackwell (sm_120) Triton makes the float64 dots FMA loops at 1/64 of the
    fp32 rate, staging their operands in shared memory: 112 KiB from head dim 80, above the 99 KiB sm_86 / sm_89
    / sm_120 give a block (a launch failure). sm_100 / sm_103 get mma .f64 from Triton 3.9 only (3.6: FMA) and
    no fp32 check compiles for them. Elsewhere the reference backend (cuBLAS fp32, chunked) serves fp32."""
    return arch in (80, 90)


def _check_fp32_arch(q: torch.Tensor, arch: int) -> None:
    if q.dtype == torch.float32 and not fp32_supported(arch):
        raise ValueError(f"q: float32 inputs need FP64 tensor cores (sm_80, sm_90), not sm_{arch}; "
                         "use the reference backend (kernels/jvp_attention.py, fp32_supported)")


def device_arch(x: torch.Tensor) -> int:
    """Compute capability of x's device as 10·major + minor; 90 off CUDA (the interpreter compiles nothing)."""
    if x.device.type != "cuda":
        return 90
    return _cc(x.device.index if x.device.index is not None else torch.cuda.current_device())


@functools.cache
def _cc(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def fwd_config(dqk: int, dv: int, tangent: bool, fp32: bool = False, arch: int = 90,
               kmask: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward (``tangent``: the fused pass or the
    tangent pass of two_pass) on compute capability ``arch``; ``kmask``: with a key mask (its own entries where the
    unmasked one spills). ``FASTDISTILL_ATTN_FWD_CONFIG`` overrides."""
    cfg = _env_cfg("FASTDISTILL_ATTN_FWD_CONFIG")
    if cfg is not None:
        return cfg
    if fp32:
        return _fp32_config(dqk, dv, arch)
    b = _bucket(dqk, dv)
    if _small_smem(arch):
        if arch != 80:
            km = (_KM_SLP_FWD_TANGENT if tangent else _KM_SLP_FWD_PLAIN) if kmask else {}
            return km.get(b) or (_SLP_FWD_TANGENT if tangent else _SLP_FWD_PLAIN)[b]
        km = (_KM_SM80_FWD_TANGENT if tangent else _KM_SM80_FWD_PLAIN) if kmask else {}
        return km.get(b) or (_SM80_FWD_TANGENT if tangent else _SM80_FWD_PLAIN)[b]
    padded = triton.next_power_of_2(dqk) != dqk or triton.next_power_of_2(dv) != dv
    if kmask:
        if not tangent and padded and b == 128:
            return _KM_FWD_PLAIN_PADDED_128
        km = (_KM_FWD_TANGENT if tangent else _KM_FWD_PLAIN).get(b)
        if km is not None:
            return km
    if tangent and padded and _bucket(dqk, dv) == 128:  # head dims 80, 96, ...: the masked head dim costs registers
        # (8 warps: with 4 the shifted tangent accumulator spills 8 bytes on sm_90a)
        return (32, 16, 8, 2)
    return (_FWD_TANGENT if tangent else _FWD_PLAIN)[_bucket(dqk, dv)]


def bwd_config(dqk: int, dv: int, fp32: bool = False, arch: int = 90, kmask: bool = False) -> tuple[int, int, int, int]:
    cfg = _env_cfg("FASTDISTILL_ATTN_BWD_CONFIG")
    if cfg is not None:
        return cfg
    if fp32:
        return _fp32_config(dqk, dv, arch)
    b = _bucket(dqk, dv)
    if _small_smem(arch):
        km = (_KM_SM80_BWD if arch == 80 else _KM_SLP_BWD) if kmask else {}
        return km.get(b) or (_SM80_BWD if arch == 80 else _SLP_BWD)[b]
    return (_KM_BWD.get(b) if kmask else None) or _BWD[b]


def _fp32_config(dqk: int, dv: int, arch: int) -> tuple[int, int, int, int]:
    return _FP32_SM80_256 if _small_smem(arch) and _bucket(dqk, dv) == 256 else _FP32


def jvp_mode(dqk: int = 0, dv: int = 0, arch: int = 90, f32: bool = False) -> str:
    """"fused" or "two_pass", the JVP schedule the forward runs: ``FASTDISTILL_ATTN_JVP`` if set, else fused up
    to head dim 128 on Hopper (``FUSED_MAX_HEAD_DIM``), up to ``SM80_FUSED_MAX_HEAD_DIM`` with the Ampere tables
    (``_small_smem``). fp32 inputs (``f32``) always take two_pass: their float64 logits (``_logits``) are not
    in the fused pass. The variable is validated either way."""
    mode = os.environ.get("FASTDISTILL_ATTN_JVP", "").strip()
    if mode and mode not in ("fused", "two_pass"):
        raise ValueError(f"FASTDISTILL_ATTN_JVP: expected 'fused' or 'two_pass', got {mode!r}")
    if f32:
        return "two_pass"
    if not mode:
        limit = SM80_FUSED_MAX_HEAD_DIM if _small_smem(arch) else FUSED_MAX_HEAD_DIM
        return "fused" if _bucket(dqk, dv) <= limit else "two_pass"
    return mode


# ----------------------------------------------------------------------------- forward
@triton.jit
def _exp(x, BASE2: tl.constexpr):
    # BASE2 (fp16/bf16): scores carry log2(e) folded into the scale, one exp2 per element; fp32 keeps
    # natural units (one more multiply) so that large logits lose no accuracy to the extra roundings
    if BASE2:
        return tl.math.exp2(x)
    return tl.exp(x)


@triton.jit
def _ld(ptrs, msk, MASK: tl.constexpr):
    if MASK:
        return tl.load(ptrs, mask=msk, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _kbias(ptrs, msk, MASK: tl.constexpr, BOOL: tl.constexpr):
    """The per-key additive bias of a key mask (HAS_KB), fp32 in natural units: a float mask's values (SDPA's
    attn_mask semantics: added to the scaled scores), or 0 / −inf for a boolean mask (read as uint8: True keeps
    the key). Keys past Sk (MASK) read 0: their scores are −inf anyway."""
    if BOOL:
        return tl.where(_ld(ptrs, msk, MASK) != 0, 0.0, float("-inf"))
    return _ld(ptrs, msk, MASK).to(tl.float32)


@triton.jit
def _logits(x64, scale):
    """fp32 logits from a float64 dot (S64, fp32 inputs): scaled in float64, rounded to fp32 once. The products of
    fp32 values are exact in float64 and the sum keeps 29 more bits, so a logit is within half an ulp of its
    value plus about 2⁻⁵³·s·Σ|q_d k_d| (far below an fp32 ulp unless the logit cancels to 2⁻²⁹ of that). One
    fp32 dot over the head dim is one FMA chain per entry on the CUDA cores (and a numpy dot in the
    interpreter), with an error that grows with the head dim; Ȯ moves by about |Ṡ_j − μ|·|v_j − O| times a
    logit's error and O by P(1 − P)|v_i − v_j| times it, enough at head dims ≥ 128 to miss the plain PyTorch
    rule (whose small CPU matmuls sum in several lanes). The forward and both backward kernels form every
    logit this way, so that the backward's P = exp(S − lse) is the forward's (1 for a row's only key). On the
    GPU the float64 dots run on the FP64 tensor cores (mma .f64: sm_80, sm_90; ``fp32_supported``). Not in the
    fused JVP pass: compiled with them for sm_90a, it aborts in LLVM's SLP vectorizer inside Triton 3.9 (head
    dims 64-128, 32×32 tiles; chained fp32 dots can too: benchmarks/repro/triton39_slp_abort.py); fp32 inputs
    take two_pass (jvp_mode)."""
    return (x64 * scale).to(tl.float32)


@triton.jit
def _dot64(a, b):
    """The float64 dot of two fp32 tiles (exact products; mma .f64 on the GPU). out_dtype given: Triton 3.6
    types a float64 dot's result float32 otherwise."""
    return tl.dot(a.to(tl.float64), b.to(tl.float64), input_precision="ieee", out_dtype=tl.float64)


@triton.jit
def _fwd_step(q, tq, m_i, lo_i, l_i, acc, r_i, u_i, c_i, tacc, n0, offs_m, offs_n, offs_dq, offs_dv, dq_ok, dv_ok,
              k_base, v_base, tk_base, tv_base, kb_base, sks, svs, stks, stvs, skbk, Sq, Sk, qk2, scale,
              DQK: tl.constexpr, DV: tl.constexpr, BDQK: tl.constexpr, BDV: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
              PRIMAL: tl.constexpr, TANGENT: tl.constexpr, DOT_PREC: tl.constexpr, BASE2: tl.constexpr,
              HAS_LO: tl.constexpr, ARG: tl.constexpr, S64: tl.constexpr, HAS_KB: tl.constexpr,
              KB_BOOL: tl.constexpr, CENTRE: tl.constexpr):
    """One key block of the forward (see the module docstring). MASKED: the block may hold keys
    past Sk or (causal) keys above the diagonal; unmasked blocks skip every sequence mask. S64 (fp32
    inputs, never the fused pass): the logits S and Ṡ from float64 dots, scaled, then rounded once (_logits).
    HAS_KB: S gets the key mask's bias (natural units: the launcher clears BASE2), after the scale as in SDPA.
    CENTRE (the tangent pass of two_pass, fp16 / bf16): also u, the Σ of P̃⊙(Ṡ − c) as rounded for the product
    with v (the module docstring)."""
    tl.static_assert(not (S64 and PRIMAL and TANGENT), "float64 logits: not in the fused pass (see _logits)")
    tl.static_assert(not (HAS_KB and BASE2), "a key bias is added in natural units (BASE2 off)")
    cols = n0 + offs_n
    col_ok = cols < Sk
    kt_msk = dq_ok[:, None] & col_ok[None, :]
    v_msk = col_ok[:, None] & dv_ok[None, :]
    # unmasked blocks mask only a padded head dim
    KM: tl.constexpr = MASKED or BDQK != DQK
    VM: tl.constexpr = MASKED or BDV != DV
    kt = _ld(k_base + cols[None, :] * sks + offs_dq[:, None], kt_msk, KM)
    v = _ld(v_base + cols[:, None] * svs + offs_dv[None, :], v_msk, VM)
    if S64:
        s = _logits(_dot64(q, kt), qk2)
    else:
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk2
    if HAS_KB:  # a masked key's −inf never meets another −inf here: m_use is 0 where a whole row is −inf
        s += _kbias(kb_base + cols * skbk, col_ok, MASKED, KB_BOOL)[None, :]
    if MASKED:
        ok = col_ok[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= offs_m[:, None] + (Sk - Sq))
        s = tl.where(ok, s, float("-inf"))
    if TANGENT:
        if HAS_TQ or HAS_TK:  # Ṡ/s first: s and Ṡ live together, then P̃ replaces s
            if S64:  # Ṡ scaled here (the fp32-dot path scales it below)
                if HAS_TQ:
                    ts = _dot64(tq, kt)
                    if HAS_TK:
                        ts += _dot64(q, _ld(tk_base + cols[None, :] * stks + offs_dq[:, None], kt_msk, KM))
                else:
                    ts = _dot64(q, _ld(tk_base + cols[None, :] * stks + offs_dq[:, None], kt_msk, KM))
                ts = _logits(ts, scale)
            elif HAS_TQ:
                ts = tl.dot(tq, kt, input_precision=DOT_PREC)
                if HAS_TK:
                    tkt = _ld(tk_base + cols[None, :] * stks + offs_dq[:, None], kt_msk, KM)
                    ts = tl.dot(q, tkt, ts, input_precision=DOT_PREC)
            else:
                tkt = _ld(tk_base + cols[None, :] * stks + offs_dq[:, None], kt_msk, KM)
                ts = tl.dot(q, tkt, input_precision=DOT_PREC)
    SHIFT: tl.constexpr = PRIMAL and TANGENT and (HAS_TQ or HAS_TK)
    tl.static_assert(not CENTRE or (TANGENT and not PRIMAL and not S64), "CENTRE: two_pass's tangent pass, fp16/bf16")
    if PRIMAL:
        m_blk = tl.max(s, 1)
        m_new = tl.maximum(m_i, m_blk)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = _exp(m_i - m_use, BASE2)
        if SHIFT:  # Ṡ at the block's max from s before P̃ replaces it (s, Ṡ and P̃ never live together)
            ts = ts * scale
            a_blk = tl.max(tl.where(s == m_blk[:, None], ts, float("-inf")), 1)
        if ARG:  # the first key at the block's max, where it raises the row's (as a float: exact below 2^24)
            k_blk = tl.min(tl.where(s == m_blk[:, None], cols[None, :], Sk), 1)
            c_i = tl.where(m_blk > m_i, k_blk.to(tl.float32), c_i)
        p = _exp(s - m_use[:, None], BASE2)
        l_new = l_i * alpha + tl.sum(p, 1)
        if TANGENT:
            if SHIFT:  # c = a/l, a = Ṡ of the row's arg-max key (c_i: the c of the previous block, a = c·l):
                # re-base r, T̃ on the new c, then rescale
                a_new = tl.where(m_blk > m_i, a_blk, c_i * l_i)
                c_use = tl.where(l_new > 0.0, a_new / l_new, 0.0)
                dc = c_i - c_use
                r_i = (r_i + dc * l_i) * alpha
                tacc = (tacc + dc[:, None] * acc) * alpha[:, None]
                c_i = c_use
            else:
                tacc = tacc * alpha[:, None]
        l_i = l_new
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    elif HAS_LO:  # S − lse_hi first (exact near the row max), then the low word
        p = _exp((s - m_i[:, None]) - lo_i[:, None], BASE2)
    else:
        p = _exp(s - m_i[:, None], BASE2)
    if TANGENT:
        if HAS_TQ or HAS_TK:
            if not SHIFT:  # two_pass: c from _arg_shift_kernel (0 where the kernel is used without it)
                if not S64:
                    ts = ts * scale
                c_use = c_i
            pts = p * (ts - c_use[:, None])  # P̃⊙(Ṡ − c) in fp32; masked entries have P̃ = 0 and finite Ṡ
            r_i += tl.sum(pts, 1)
            pts = pts.to(v.dtype)
            if CENTRE:  # u = Σ pts as rounded for the product with v (the epilogue's centring, module docstring)
                u_i += tl.sum(pts.to(tl.float32), 1)
            tacc = tl.dot(pts, v, tacc, input_precision=DOT_PREC)
        if HAS_TV:
            tv = _ld(tv_base + cols[:, None] * stvs + offs_dv[None, :], v_msk, VM)
            tacc = tl.dot(p.to(tv.dtype), tv, tacc, input_precision=DOT_PREC)
    return m_i, l_i, acc, r_i, u_i, c_i, tacc


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, TQ, TK, TV, O, TO, LSE, MU, LO, KB,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
    stqb, stqh, stqs, stkb, stkh, stks, stvb, stvh, stvs,
    sob, soh, sos, stob, stoh, stos, slb, slh, skbb, skbh, skbk,
    G, Sq, Sk, scale,
    DQK: tl.constexpr, DV: tl.constexpr, BDQK: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
    PRIMAL: tl.constexpr, TANGENT: tl.constexpr, DOT_PREC: tl.constexpr, WIDE: tl.constexpr, BASE2: tl.constexpr,
    HAS_LO: tl.constexpr, ARG: tl.constexpr, S64: tl.constexpr, HAS_KB: tl.constexpr, KB_BOOL: tl.constexpr,
    CENTRE: tl.constexpr = False,
):
    # PRIMAL and TANGENT: the fused pass. PRIMAL only: plain flash attention (O, lse); ARG: also each row's
    # arg-max key index, into MU (the primal pass of two_pass). TANGENT only: the second pass of two_pass (reads
    # lse, O and the shift c that _arg_shift_kernel left in MU; writes Ȯ and μ).
    pid = tl.program_id(0)
    if CAUSAL:  # heavy (late) query blocks first
        pid = tl.num_programs(0) - 1 - pid
    h = tl.program_id(1).to(tl.int64)  # h × head stride can pass 2^31 while each is below it
    b = tl.program_id(2).to(tl.int64)
    hk = h // G
    offs_m = pid * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    if WIDE:  # S x sequence stride >= 2^31: 64-bit offsets
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    offs_dq = tl.arange(0, BDQK)
    offs_dv = tl.arange(0, BDV)
    row_ok = offs_m < Sq
    dq_ok = offs_dq < DQK
    dv_ok = offs_dv < DV
    q_msk = row_ok[:, None] & dq_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_dq[None, :], mask=q_msk, other=0.0)
    tq = q
    if HAS_TQ:
        tq = tl.load(TQ + b * stqb + h * stqh + offs_m[:, None] * stqs + offs_dq[None, :], mask=q_msk, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    tk_base = TK + b * stkb + hk * stkh
    tv_base = TV + b * stvb + hk * stvh
    kb_base = KB  # (None without a key mask)
    if HAS_KB:
        kb_base = KB + b * skbb + h * skbh  # the key bias of query head h
    qk2 = scale * (1.4426950408889634 if BASE2 else 1.0)  # scores in the log2 domain (BASE2)

    if PRIMAL:
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, BDV], tl.float32)
    else:  # the tangent pass of two_pass: P = 2^(S·log2e − lse·log2e), no rescaling
        lse_in = tl.load(LSE + b * slb + h * slh + offs_m, mask=row_ok, other=float("-inf"))
        m_i = tl.where(lse_in == float("-inf"), 0.0, lse_in * (1.4426950408889634 if BASE2 else 1.0))
    lo_i = tl.zeros([BM], tl.float32)
    if HAS_LO and not PRIMAL:
        lo_i = tl.load(LO + b * slb + h * slh + offs_m, mask=row_ok, other=0.0)
    c_i = tl.zeros([BM], tl.float32)  # the tangent shift c (ARG: the running arg-max key's index)
    if TANGENT and not PRIMAL and (HAS_TQ or HAS_TK):  # two_pass: c from _arg_shift_kernel
        c_i = tl.load(MU + b * slb + h * slh + offs_m, mask=row_ok, other=0.0)
    if TANGENT:
        r_i = tl.zeros([BM], tl.float32)
        u_i = tl.zeros([BM], tl.float32)
        tacc = tl.zeros([BM, BDV], tl.float32)

    if not PRIMAL:
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, BDV], tl.float32)
    if not TANGENT:
        r_i = tl.zeros([BM], tl.float32)
        u_i = tl.zeros([BM], tl.float32)
        tacc = tl.zeros([BM, BDV], tl.float32)
    # key blocks [0, n_full) need no sequence mask, [n_full, hi) do (the tail; the causal diagonal)
    hi = Sk
    n_full = (Sk // BN) * BN
    if CAUSAL:  # bottom-right: query i sees key j iff j <= i + Sk - Sq
        hi = tl.minimum(Sk, pid * BM + BM + Sk - Sq)
        n_full = tl.minimum(n_full, tl.maximum(0, ((pid * BM + Sk - Sq + 1) // BN) * BN))
    for n0 in range(0, n_full, BN):
        m_i, l_i, acc, r_i, u_i, c_i, tacc = _fwd_step(
            q, tq, m_i, lo_i, l_i, acc, r_i, u_i, c_i, tacc, n0, offs_m, offs_n, offs_dq, offs_dv, dq_ok, dv_ok,
            k_base, v_base, tk_base, tv_base, kb_base, sks, svs, stks, stvs, skbk, Sq, Sk, qk2, scale,
            DQK, DV, BDQK, BDV, False, CAUSAL, HAS_TQ, HAS_TK, HAS_TV, PRIMAL, TANGENT, DOT_PREC, BASE2, HAS_LO,
            ARG, S64, HAS_KB, KB_BOOL, CENTRE)
    for n0 in range(n_full, hi, BN):
        m_i, l_i, acc, r_i, u_i, c_i, tacc = _fwd_step(
            q, tq, m_i, lo_i, l_i, acc, r_i, u_i, c_i, tacc, n0, offs_m, offs_n, offs_dq, offs_dv, dq_ok, dv_ok,
            k_base, v_base, tk_base, tv_base, kb_base, sks, svs, stks, stvs, skbk, Sq, Sk, qk2, scale,
            DQK, DV, BDQK, BDV, True, CAUSAL, HAS_TQ, HAS_TK, HAS_TV, PRIMAL, TANGENT, DOT_PREC, BASE2, HAS_LO,
            ARG, S64, HAS_KB, KB_BOOL, CENTRE)

    o_msk = row_ok[:, None] & dv_ok[None, :]
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * sos + offs_dv[None, :]
    if PRIMAL:
        seen = l_i > 0.0
        inv = 1.0 / tl.where(seen, l_i, 1.0)
        o = acc * inv[:, None]
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=o_msk)
        m_nat = m_i * (0.6931471805599453 if BASE2 else 1.0)
        log_l = tl.log(tl.where(seen, l_i, 1.0))
        lse = m_nat + log_l
        tl.store(LSE + b * slb + h * slh + offs_m, tl.where(seen, lse, float("-inf")), mask=row_ok)
        if HAS_LO:  # the rounding error of m + ln l (TwoSum): lse_hi + lo = m + ln l exactly
            m_back = lse - log_l
            lo = (m_nat - m_back) + (log_l - (lse - m_back))
            tl.store(LO + b * slb + h * slh + offs_m, tl.where(seen, lo, 0.0), mask=row_ok)
        if ARG:
            tl.store(MU + b * slb + h * slh + offs_m, c_i, mask=row_ok)
    else:
        inv = tl.full([BM], 1.0, tl.float32)
        o = tl.load(o_ptrs, mask=o_msk, other=0.0).to(tl.float32)
    if TANGENT:
        dmu = r_i * inv  # μ − c
        if CENTRE:  # T̃/l − (u/l)·O = Σ rounded P̃⊙(Ṡ − c) ⊙ (v − O) / l (+ P v̇): the roundings meet v − O
            to = tacc * inv[:, None] - (u_i * inv)[:, None] * o
        else:
            to = tacc * inv[:, None] - dmu[:, None] * o
        mu = c_i + dmu  # 0 for a row that sees no key (c = 0, r = 0)
        tl.store(TO + b * stob + h * stoh + offs_m[:, None] * stos + offs_dv[None, :], to.to(TO.dtype.element_ty),
                 mask=o_msk)
        tl.store(MU + b * slb + h * slh + offs_m, mu, mask=row_ok)


def _dot_prec(x: torch.Tensor) -> str:
    # fp32 inputs get full fp32 products (TF32 would miss the accuracy contract)
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _s3(x: torch.Tensor | None, like: torch.Tensor) -> tuple[int, int, int]:
    t = like if x is None else x
    return t.stride(0), t.stride(1), t.stride(2)


def _wide(*xs: torch.Tensor | None) -> bool:
    """True when some sequence offset (S × sequence stride) needs more than 32 bits."""
    return any(x is not None and x.shape[2] * x.stride(2) + x.shape[3] >= 2**31 for x in xs)


def _check_grid(B: int, H: int) -> None:
    if B > MAX_GRID_YZ or H > MAX_GRID_YZ:
        raise ValueError(f"q: batch ({B}) and heads ({H}) must each be <= {MAX_GRID_YZ} for the Triton kernels")


def _check_rows(name: str, x: torch.Tensor | None) -> None:
    """The kernels address per-row statistics [B, H, S] with a sequence stride of 1."""
    if x is not None and x.dim() == 3 and x.shape[2] > 1 and x.stride(2) != 1:
        raise ValueError(f"{name}: the Triton kernels need a sequence stride of 1, got strides {x.stride()}")


def _lo_ok(lse_lo: torch.Tensor | None, lse: torch.Tensor, q: torch.Tensor, kb: torch.Tensor | None = None) -> bool:
    """Whether the low word of lse is used: fp32 inputs, or any with a key bias (the kernels' natural-unit paths),
    same strides as lse."""
    if lse_lo is None:
        return False
    if q.dtype != torch.float32 and kb is None:
        raise ValueError(f"lse_lo: only for float32 inputs or with a key bias (q is {q.dtype})")
    if lse_lo.shape != lse.shape or lse_lo.stride() != lse.stride() or lse_lo.dtype != torch.float32:
        raise ValueError(f"lse_lo: expected float32 {tuple(lse.shape)} with lse's strides {lse.stride()}, got "
                         f"{lse_lo.dtype} {tuple(lse_lo.shape)} strides {lse_lo.stride()}")
    return True


def _as_f32(x: float) -> float:
    """A softmax scale as the kernels' fp32 argument holds it on the GPU. Triton's interpreter keeps a Python
    float's double value in an fp32 scalar argument: the forward (scale·1.0, an fp32 product) and the backward
    (float64 logits times the scale) would then round differently, and the backward's S not be the forward's."""
    return array.array("f", [x])[0]  # fp32 rounding (inf past its range) without a tensor per call


def _kb_args(kb: torch.Tensor | None, lse: torch.Tensor) -> tuple:
    """(pointer, batch / head / key strides) of a key bias ``[B, H, Sk]`` (any strides: 0 where it broadcasts), a
    bool mask as its uint8 view (no copy); without one, four Nones: Triton makes them constexprs, so an unmasked
    kernel has the parameters it had before key masks (four more, unused, moved ptxas's register allocation: the
    fused pass at head dim 128 spilled 8 bytes on sm_90a)."""
    if kb is None:
        return None, None, None, None
    return (kb.view(torch.uint8) if kb.dtype == torch.bool else kb), *kb.stride()


def _kb_flags(kb: torch.Tensor | None) -> dict:
    return dict(HAS_KB=kb is not None, KB_BOOL=kb is not None and kb.dtype == torch.bool)


def _kb_wide(kb: torch.Tensor | None) -> bool:
    return kb is not None and kb.shape[2] * abs(kb.stride(2)) >= 2**31


def _check_kbias(kb: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> None:
    """A key bias is a [B, Hq, Sk] view (the op layer broadcasts the caller's mask there), bool or float."""
    if kb is None:
        return
    want = (q.shape[0], q.shape[1], k.shape[2])
    if kb.dim() != 3 or tuple(kb.shape) != want:
        raise ValueError(f"key_bias: expected shape {want} ([B, Hq, Sk]), got {tuple(kb.shape)}")
    if kb.dtype != torch.bool and not kb.dtype.is_floating_point:
        raise TypeError(f"key_bias: expected bool or a float dtype, got {kb.dtype}")
    if kb.device != q.device:
        raise ValueError(f"key_bias: device {kb.device} differs from q's {q.device}")


def _launch_fwd(q, k, v, tq, tk, tv, o, to, lse, mu, lo, causal, scale, primal, tangent, cfg, kb=None,
                centre=False):
    B, H, Sq, Dqk = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    BM, BN, warps, stages = cfg
    grid = (triton.cdiv(Sq, BM), H, B)
    kb_ptr, *kb_strides = _kb_args(kb, lse)
    _attn_fwd_kernel[grid](
        q, k, v, q if tq is None else tq, k if tk is None else tk, v if tv is None else tv,
        o, o if to is None else to, lse, lse if mu is None else mu, lse if lo is None else lo, kb_ptr,
        *_s3(q, q), *_s3(k, k), *_s3(v, v), *_s3(tq, q), *_s3(tk, k), *_s3(tv, v),
        *_s3(o, o), *_s3(to, o), lse.stride(0), lse.stride(1), *kb_strides,
        H // Hkv, Sq, Sk, scale,
        DQK=Dqk, DV=Dv, BDQK=max(16, triton.next_power_of_2(Dqk)), BDV=max(16, triton.next_power_of_2(Dv)),
        BM=BM, BN=BN, CAUSAL=bool(causal), HAS_TQ=tq is not None, HAS_TK=tk is not None, HAS_TV=tv is not None,
        PRIMAL=primal, TANGENT=tangent, DOT_PREC=_dot_prec(q),
        WIDE=_wide(q, k, v, tq, tk, tv, o, to) or _kb_wide(kb),
        # a key bias is added in natural units (BASE2 off): any finite bias, finfo.min included, stays finite (in
        # the log2 domain, bias·log2(e) overflows to −inf below −2.4e38 and a row masked by finfo(fp32).min alone
        # would see no key, where SDPA averages its values)
        BASE2=q.dtype != torch.float32 and kb is None, HAS_LO=lo is not None,
        ARG=primal and not tangent and mu is not None, S64=q.dtype == torch.float32, **_kb_flags(kb),
        CENTRE=centre, num_warps=warps, num_stages=stages,
    )


@triton.jit
def _arg_shift_kernel(Q, K, TQ, TK, LSE, LO, MU, KB, sqb, sqh, sqs, skb, skh, sks, stqb, stqh, stqs, stkb, stkh,
                      stks, slb, slh, skbb, skbh, skbk, G, Sq, Sk, scale, DQK: tl.constexpr, BDQK: tl.constexpr,
                      BM: tl.constexpr, HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_LO: tl.constexpr,
                      WIDE: tl.constexpr, HAS_KB: tl.constexpr, KB_BOOL: tl.constexpr, S64: tl.constexpr = False):
    """two_pass, between its passes: MU holds each row's arg-max key j (the primal pass, ARG); replace it with the
    tangent shift c = P_j·Ṡ_j = exp(s·q·k_j − lse)·s·(q̇·k_j + q·k̇_j), row-wise dots in fp32 (0 for a row that
    sees no key). A kernel of its own: formed in the tangent pass's prologue it spills registers.
    S64 (fp32 inputs): s_j and Ṡ_j as the passes form them (_logits of float64 dots: exact products, summed in
    float64 over chunks of the head dim), so that P_j and Ṡ_j are the tangent pass's own values and the dominant
    key's P̃⊙(Ṡ − c) is 0 where P̃ = 1. With fp32 row dots they were an ulp off: c missed P̃_j·Ṡ_j by ~ulp(Ṡ_j),
    and Ȯ = T̃/l − (r/l)·O kept a rounding of that term (2⁻³⁷ where the exact Ȯ was 1e-26)."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # h × head stride can pass 2^31 while each is below it
    b = tl.program_id(2).to(tl.int64)
    hk = h // G
    offs_m = pid * BM + tl.arange(0, BM)
    if WIDE:
        offs_m = offs_m.to(tl.int64)
    lse = tl.load(LSE + b * slb + h * slh + offs_m, mask=offs_m < Sq, other=float("-inf"))
    ok = (offs_m < Sq) & (lse != float("-inf"))
    # the index as recorded (a float: past 2^24 keys it may round, even to Sk; any key is exact, only c's accuracy
    # depends on it)
    key = tl.minimum(tl.load(MU + b * slb + h * slh + offs_m, mask=ok, other=0.0).to(offs_m.dtype), Sk - 1)
    # row dots over chunks of 16 of the head dim; S64: exact products summed in float64 (a whole fp64 tile of q
    # and k_j would spill), rounded as _logits rounds the passes' logits
    ACC: tl.constexpr = tl.float64 if S64 else tl.float32
    sj = tl.zeros([BM], ACC)
    sd = tl.zeros([BM], ACC)
    for d0 in tl.static_range(0, BDQK, 16):
        offs_c = d0 + tl.arange(0, 16)
        mc = ok[:, None] & (offs_c < DQK)[None, :]
        qc = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_c[None, :], mask=mc, other=0.0).to(ACC)
        kc = tl.load(K + b * skb + hk * skh + key[:, None] * sks + offs_c[None, :], mask=mc, other=0.0).to(ACC)
        sj += tl.sum(qc * kc, 1)
        if HAS_TQ:
            tqc = tl.load(TQ + b * stqb + h * stqh + offs_m[:, None] * stqs + offs_c[None, :], mask=mc, other=0.0)
            sd += tl.sum(tqc.to(ACC) * kc, 1)
        if HAS_TK:
            tkc = tl.load(TK + b * stkb + hk * stkh + key[:, None] * stks + offs_c[None, :], mask=mc, other=0.0)
            sd += tl.sum(qc * tkc.to(ACC), 1)
    if S64:
        sj = _logits(sj, scale)
        sd = _logits(sd, scale)
    else:
        sj = sj * scale
        sd = sd * scale
    if HAS_KB:  # the bias before lse, as the forward's S (a row that sees a key has its arg-max at a finite S)
        sj += tl.where(ok, _kbias(KB + b * skbb + h * skbh + key * skbk, ok, True, KB_BOOL), 0.0)
    ls = sj - tl.where(ok, lse, 0.0)  # ln P_j
    if HAS_LO:
        ls -= tl.load(LO + b * slb + h * slh + offs_m, mask=ok, other=0.0)
    c = tl.where(ok, tl.exp(tl.minimum(ls, 0.0)) * sd, 0.0)
    tl.store(MU + b * slb + h * slh + offs_m, c, mask=offs_m < Sq)


ARG_SHIFT_BM, ARG_SHIFT_WARPS = (32, 4) if _TRITON_VER >= (3, 9) else (16, 8)  # 32x4 spills under Triton 3.6
# with a key mask: 32x4 spills 8 bytes at head dim 256 on sm_80 (Triton 3.9); 32x8 spills on neither sm_80 nor sm_90a
ARG_SHIFT_KMASK = (32, 8) if _TRITON_VER >= (3, 9) else (16, 8)


def arg_shift_config(kmask: bool = False) -> tuple[int, int]:
    """(BM, num_warps) of the tangent shift kernel (two_pass), with or without a key mask."""
    return ARG_SHIFT_KMASK if kmask else (ARG_SHIFT_BM, ARG_SHIFT_WARPS)


def _launch_arg_shift(q, k, tq, tk, lse, lo, mu, scale, kb=None):
    B, H, Sq, Dqk = q.shape
    BM, warps = arg_shift_config(kb is not None)
    kb_ptr, *kb_strides = _kb_args(kb, lse)
    _arg_shift_kernel[(triton.cdiv(Sq, BM), H, B)](
        q, k, q if tq is None else tq, k if tk is None else tk, lse, lse if lo is None else lo, mu, kb_ptr,
        *_s3(q, q), *_s3(k, k), *_s3(tq, q), *_s3(tk, k), lse.stride(0), lse.stride(1), *kb_strides, H // k.shape[1],
        Sq, k.shape[2], scale,
        DQK=Dqk, BDQK=max(16, triton.next_power_of_2(Dqk)), BM=BM, HAS_TQ=tq is not None, HAS_TK=tk is not None,
        HAS_LO=lo is not None, WIDE=_wide(q, k, tq, tk) or _kb_wide(kb), **_kb_flags(kb),
        S64=q.dtype == torch.float32, num_warps=warps,
    )


@on_tensor_device
def attn_fwd(q, k, v, tq, tk, tv, o, to, lse, mu, *, causal: bool, scale: float,
             lse_lo: torch.Tensor | None = None, key_bias: torch.Tensor | None = None) -> None:
    """Write O, lse and (when ``to``/``mu`` are given) Ȯ, μ; see the module docstring. ``lse_lo`` (float32
    inputs): also write the rounding error of lse = m + ln l, so that lse + lse_lo is m + ln l exactly; the
    backward (and the tangent pass of two_pass) subtracts it after S − lse, which keeps P = exp(S − lse)
    accurate to a few ulp at large logits, where rounding lse alone costs up to ulp(lse)/2 relative.
    ``key_bias``: a key mask, ``[B, Hq, Sk]`` with any strides (0 where it broadcasts), bool (False: the key is
    masked) or float (added to the scaled scores); a row whose every key is masked is a row that sees no key."""
    B, H, Sq, Dqk = q.shape
    if B * H * Sq == 0:
        return
    scale = _as_f32(scale)
    _check_grid(B, H)
    for name, x in (("lse", lse), ("mu", mu), ("lse_lo", lse_lo)):
        _check_rows(name, x)
    _check_kbias(key_bias, q, k)
    kb = key_bias
    tangent = to is not None
    if tangent and mu is None:
        mu = torch.empty_like(lse)
    if mu is not None and any(n > 1 and a != b for n, a, b in zip(lse.shape, mu.stride(), lse.stride())):
        # the kernels address both with lse's strides (a dimension of size 1 is never stepped)
        raise ValueError(f"mu: expected lse's strides {lse.stride()}, got {mu.stride()}")
    Dv = v.shape[3]
    f32 = q.dtype == torch.float32
    lo = lse_lo if _lo_ok(lse_lo, lse, q, kb) else None
    arch = device_arch(q)
    _check_fp32_arch(q, arch)
    fused = tangent and jvp_mode(Dqk, Dv, arch, f32) == "fused"  # FASTDISTILL_ATTN_JVP is read only with tangents
    if not fused:  # two_pass; with Ṡ, the primal pass leaves each row's arg-max key in mu for the shift c
        shift = tangent and (tq is not None or tk is not None)
        _launch_fwd(q, k, v, None, None, None, o, None, lse, mu if shift else None, lo, causal, scale, True, False,
                    fwd_config(Dqk, Dv, False, f32, arch, kb is not None), kb)
        if shift:
            _launch_arg_shift(q, k, tq, tk, lse, lo, mu, scale, kb)
    if tangent:
        _launch_fwd(q, k, v, tq, tk, tv, o, to, lse, mu, lo, causal, scale, fused, True,
                    fwd_config(Dqk, Dv, True, f32, arch, kb is not None), kb,
                    centre=not fused and not f32 and centred(arch))


# ----------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_pre_kernel(O, DO, DLSE, DELTA, sob, soh, sos, sdb, sdh, sds, slb, slh, sls, H, Sq,
                         DV: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, HAS_DLSE: tl.constexpr,
                         WIDE: tl.constexpr, S64: tl.constexpr = False):
    # Δ = rowsum(dO ⊙ O) − dlse, into a contiguous fp32 [B, H, Sq] buffer
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # h × head stride can pass 2^31 while each is below it
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid * BM + tl.arange(0, BM)
    if WIDE:
        offs_m = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BDV)
    msk = (offs_m < Sq)[:, None] & (offs_d < DV)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], mask=msk, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :], mask=msk, other=0.0)
    if S64:  # fp32 inputs: summed in float64 (exact products) and rounded once, as dP (_dot64)
        delta = tl.sum(o.to(tl.float64) * do.to(tl.float64), 1).to(tl.float32)
    else:
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + b * slb + h * slh + offs_m * sls, mask=offs_m < Sq, other=0.0).to(tl.float32)
    tl.store(DELTA + (b * H + h) * Sq + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, LO, DELTA, KB, DK, DV_,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, slb, slh, skbb, skbh, skbk,
    sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
    H, G, Sq, Sk, scale,
    DQK: tl.constexpr, DV: tl.constexpr, BDQK: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, WIDE: tl.constexpr,
    HAS_LO: tl.constexpr, S64: tl.constexpr, HAS_KB: tl.constexpr, KB_BOOL: tl.constexpr,
):
    # one key block of one key/value head; loops over the query blocks of its G query heads:
    # dv = Σ Pᵀ dO, dk = s·Σ dSᵀ q with dS = P ⊙ (dO vᵀ − Δ). Transposed tiles: [BN, BM].
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    hk64 = hk.to(tl.int64)  # hk × head stride can pass 2^31 while each is below it
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid * BN + tl.arange(0, BN)
    offs_m0 = tl.arange(0, BM)
    if WIDE:
        offs_n = offs_n.to(tl.int64)
        offs_m0 = offs_m0.to(tl.int64)
    offs_dq = tl.arange(0, BDQK)
    offs_dv = tl.arange(0, BDV)
    col_ok = offs_n < Sk
    dq_ok = offs_dq < DQK
    dv_ok = offs_dv < DV
    k_msk = col_ok[:, None] & dq_ok[None, :]
    v_msk = col_ok[:, None] & dv_ok[None, :]
    k = tl.load(K + b * skb + hk64 * skh + offs_n[:, None] * sks + offs_dq[None, :], mask=k_msk, other=0.0)
    v = tl.load(V + b * svb + hk64 * svh + offs_n[:, None] * svs + offs_dv[None, :], mask=v_msk, other=0.0)
    dk = tl.zeros([BN, BDQK], tl.float32)
    dv = tl.zeros([BN, BDV], tl.float32)
    lo = 0
    if CAUSAL:  # the first query row that sees key pid·BN: i >= j − (Sk − Sq)
        lo = tl.maximum(0, pid * BN - (Sk - Sq))
        lo = (lo // BM) * BM
    for g in range(0, G):
        h = (hk * G + g).to(tl.int64)
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        lse_base = LSE + b * slb + h * slh  # per query head: hoisted out of the query-block loop
        lo_base = LO + b * slb + h * slh
        delta_base = DELTA + (b * H + h) * Sq
        if HAS_KB:  # the key bias of query head h, per key of this block
            kb_t = _kbias(KB + b * skbb + h * skbh + offs_n * skbk, col_ok, True, KB_BOOL)
        for m0 in range(lo, Sq, BM):
            offs_m = m0 + offs_m0
            row_ok = offs_m < Sq
            q = tl.load(q_base + offs_m[:, None] * sqs + offs_dq[None, :], mask=row_ok[:, None] & dq_ok[None, :],
                        other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sds + offs_dv[None, :], mask=row_ok[:, None] & dv_ok[None, :],
                         other=0.0)
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
            if HAS_KB:  # a row the key mask hides entirely (lse = −inf): P = exp(S − ∞) = 0, also at S = −inf
                lse = tl.where(lse == float("-inf"), float("inf"), lse)
            lse_lo = tl.zeros([BM], tl.float32)
            if HAS_LO:
                lse_lo = tl.load(lo_base + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
            if S64:  # the forward's logits (_logits), scaled
                st = _logits(_dot64(k, tl.trans(q)), scale)
            else:
                st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale
            if HAS_KB:
                st += kb_t[:, None]
            ok = col_ok[:, None] & row_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_n[:, None] <= offs_m[None, :] + (Sk - Sq))
            # rows that saw no key (lse = −inf) have no visible entry: ok is False there
            # S − lse in natural units first (exact near the row max), then the low word of lse, then base 2
            pt = tl.where(ok, tl.math.exp2(((st - lse[None, :]) - lse_lo[None, :]) * 1.4426950408889634), 0.0)
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
            if S64:  # dP over the head dim as the logits (_dot64 rounded once: one fp32 FMA chain drifts)
                dpt = _dot64(v, tl.trans(do)).to(tl.float32)
            else:
                dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dst = pt * (dpt - delta[None, :])
            dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)
    dk_ptrs = DK + b * sdkb + hk64 * sdkh + offs_n[:, None] * sdks + offs_dq[None, :]
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=k_msk)
    tl.store(DV_ + b * sdvb + hk64 * sdvh + offs_n[:, None] * sdvs + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=v_msk)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, LO, DELTA, KB, DQ,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, slb, slh, skbb, skbh, skbk, sdqb, sdqh, sdqs,
    H, G, Sq, Sk, scale,
    DQK: tl.constexpr, DV: tl.constexpr, BDQK: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, WIDE: tl.constexpr,
    HAS_LO: tl.constexpr, S64: tl.constexpr, HAS_KB: tl.constexpr, KB_BOOL: tl.constexpr,
):
    # one query block: dq = s·Σ_j dS k, dS = P ⊙ (dO vᵀ − Δ)
    pid = tl.program_id(0)
    if CAUSAL:
        pid = tl.num_programs(0) - 1 - pid
    h = tl.program_id(1).to(tl.int64)  # h × head stride can pass 2^31 while each is below it
    b = tl.program_id(2).to(tl.int64)
    hk = h // G
    offs_m = pid * BM + tl.arange(0, BM)
    offs_n0 = tl.arange(0, BN)
    if WIDE:
        offs_m = offs_m.to(tl.int64)
        offs_n0 = offs_n0.to(tl.int64)
    offs_dq = tl.arange(0, BDQK)
    offs_dv = tl.arange(0, BDV)
    row_ok = offs_m < Sq
    dq_ok = offs_dq < DQK
    dv_ok = offs_dv < DV
    q_msk = row_ok[:, None] & dq_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_dq[None, :], mask=q_msk, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_dv[None, :],
                 mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    lse = tl.load(LSE + b * slb + h * slh + offs_m, mask=row_ok, other=0.0)
    if HAS_KB:  # a row the key mask hides entirely (lse = −inf): P = exp(S − ∞) = 0, also at S = −inf
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
    lse_lo = tl.zeros([BM], tl.float32)
    if HAS_LO:
        lse_lo = tl.load(LO + b * slb + h * slh + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + (b * H + h) * Sq + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BM, BDQK], tl.float32)
    kb_base = KB
    if HAS_KB:
        kb_base = KB + b * skbb + h * skbh
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    hi = Sk
    if CAUSAL:
        hi = tl.minimum(Sk, pid * BM + BM + Sk - Sq)
    for n0 in range(0, hi, BN):
        cols = n0 + offs_n0
        col_ok = cols < Sk
        k = tl.load(k_base + cols[:, None] * sks + offs_dq[None, :], mask=col_ok[:, None] & dq_ok[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * svs + offs_dv[None, :], mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
        if S64:  # the forward's logits (_logits), scaled
            s = _logits(_dot64(q, tl.trans(k)), scale)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
        if HAS_KB:
            s += _kbias(kb_base + cols * skbk, col_ok, True, KB_BOOL)[None, :]
        ok = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            ok = ok & (cols[None, :] <= offs_m[:, None] + (Sk - Sq))
        p = tl.where(ok, tl.math.exp2(((s - lse[:, None]) - lse_lo[:, None]) * 1.4426950408889634), 0.0)
        if S64:  # as in the dk/dv kernel
            dp = _dot64(do, tl.trans(v)).to(tl.float32)
        else:
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqs + offs_dq[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=q_msk)


@on_tensor_device
def attn_bwd(do, q, k, v, o, lse, dlse, dq, dk, dv, *, causal: bool, scale: float,
             lse_lo: torch.Tensor | None = None, key_bias: torch.Tensor | None = None) -> None:
    """dq, dk, dv of ``o`` (upstream ``do``) and of ``lse`` (upstream ``dlse``, may be None); ``lse_lo``: the
    low word of lse from ``attn_fwd`` (float32 inputs), None to recompute P from lse alone; ``key_bias``: the
    forward's key mask (``attn_fwd``), which gets no gradient."""
    B, H, Sq, Dqk = q.shape
    scale = _as_f32(scale)
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if B * H == 0:
        return
    if Sq == 0 or Sk == 0:  # nothing reaches k, v (or there is no key to differentiate through)
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return
    _check_grid(B, H)
    for name, x in (("lse", lse), ("lse_lo", lse_lo)):  # dlse may have any strides (read with its own)
        _check_rows(name, x)
    _check_kbias(key_bias, q, k)
    arch = device_arch(q)
    _check_fp32_arch(q, arch)
    BM, BN, warps, stages = bwd_config(Dqk, Dv, q.dtype == torch.float32, arch, key_bias is not None)
    bdq, bdv = max(16, triton.next_power_of_2(Dqk)), max(16, triton.next_power_of_2(Dv))
    delta = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    _attn_bwd_pre_kernel[(triton.cdiv(Sq, 64), H, B)](
        o, do, lse if dlse is None else dlse, delta, *_s3(o, o), *_s3(do, do),
        *(dlse.stride() if dlse is not None else (0, 0, 0)), H, Sq,  # any upstream strides (expanded zeros)
        DV=Dv, BDV=bdv, BM=64, HAS_DLSE=dlse is not None, WIDE=_wide(o, do), S64=q.dtype == torch.float32,
        num_warps=4)
    kb = key_bias
    lo = lse_lo if _lo_ok(lse_lo, lse, q, kb) else None
    common = dict(DQK=Dqk, DV=Dv, BDQK=bdq, BDV=bdv, BM=BM, BN=BN, CAUSAL=bool(causal), DOT_PREC=_dot_prec(q),
                  WIDE=_wide(q, k, v, do, dq, dk, dv) or _kb_wide(kb), HAS_LO=lo is not None,
                  S64=q.dtype == torch.float32, **_kb_flags(kb), num_warps=warps, num_stages=stages)
    kb_ptr, *kb_strides = _kb_args(kb, lse)
    strides = (*_s3(q, q), *_s3(k, k), *_s3(v, v), *_s3(do, do), lse.stride(0), lse.stride(1), *kb_strides)
    lo_arg = lse if lo is None else lo  # a valid pointer either way; read only under HAS_LO
    _attn_bwd_dkdv_kernel[(triton.cdiv(Sk, BN), Hkv, B)](
        q, k, v, do, lse, lo_arg, delta, kb_ptr, dk, dv, *strides, *_s3(dk, dk), *_s3(dv, dv), H, H // Hkv, Sq, Sk,
        scale, **common)
    _attn_bwd_dq_kernel[(triton.cdiv(Sq, BM), H, B)](
        q, k, v, do, lse, lo_arg, delta, kb_ptr, dq, *strides, *_s3(dq, dq), H, H // Hkv, Sq, Sk, scale, **common)
