"""Code generation of the Triton kernels for Hopper (and Ampere), without a GPU.

Compiles every kernel specialisation the dispatcher can pick (worst case per op and dtype:
8 terms, a mask) ahead of time for sm_90a (``--arch 80``: sm_80, with the Ampere block
configurations of JVP attention) and reports registers, spill stores/loads and shared memory
from ptxas. ``tests/test_codegen.py`` fails if a gated configuration spills or needs more shared
memory than the architecture gives one block (``SMEM_LIMIT``).

    python benchmarks/triton_codegen.py [--arch 90|80] [--family attn] [--quick]
"""

from __future__ import annotations

import argparse
import faulthandler
import inspect
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# the checkout this script sits in, ahead of an installed fastdistill (an editable install of another checkout, e.g.
# the main one when this runs from a git worktree, would have it report on that checkout's kernels)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastdistill.kernels import jvp_attention as A  # noqa: E402
from fastdistill.kernels import kd_softmax as KD  # noqa: E402
from fastdistill.kernels import score as S  # noqa: E402

FMAX = {"fp32": 3.4028234663852886e38, "bf16": 3.3895313892515355e38, "fp16": 65504.0}  # torch.finfo(...).max
TDT = {"fp16": 0, "bf16": 1, "fp32": 2}  # kernels/score.py dtype codes (0x5555: the same code for all 8 terms)


def _ptxas(arch: int = 90) -> str:
    """The ptxas this Triton itself runs for ``arch`` first (3.6 uses its CUDA 12.8 ``ptxas`` below sm_100, 3.9
    ``ptxas-blackwell`` from sm_90: register counts differ between them), then any other that assembles the PTX."""
    nv = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        first = [get_ptxas(arch).path]
    except Exception:
        first = []
    for cand in (*first, os.path.join(nv, "ptxas-blackwell"), os.path.join(nv, "ptxas"), shutil.which("ptxas")):
        if cand and os.path.exists(cand):
            probe = subprocess.run([cand, "--version"], capture_output=True, text=True)
            if probe.returncode == 0:
                yield cand


def score_configs(quick: bool = False):
    """(name, kernel, signature, constexprs, num_warps) for the score kernels."""
    dtypes = ["bf16"] if quick else ["bf16", "fp16", "fp32"]
    K = 8
    for dt in dtypes:
        for op in (S.OP_SCORE, S.OP_SID, S.OP_SCM, S.OP_DENOISE):
            use = (1 << K) - 1
            common = {"x_ptr": f"*{dt}", "terms": (f"*{dt}",) * K, "coef_ptr": "*fp32", "coef_sb": "i32",
                      "mask_ptr": "*u8"}
            sig = dict(common, part_ptr="*fp32", M="i32", n_iter="i32", NB="i32", prm_ptr="*fp32")
            ce = {"OP": op, "K": K, "USE1": use, "USE2": use if op <= S.OP_SID else 0, "HAS_MASK": op != S.OP_SCM,
                  "PHI_HUBER": op == S.OP_SCORE, "NORM_ON_LOSS": False, "TNEED": use if op == S.OP_SID else 0,
                  "TDT": TDT[dt] * 0x5555, "UNIT": FMAX["fp16"], "XR": FMAX["fp16"] / FMAX[dt], "BLOCK": S.BLOCK,
                  "ACC": tl.float32}
            yield f"stats op={op} {dt} K={K}", S._score_stats_kernel, sig, ce, S.NUM_WARPS
            sig = dict(common, state_ptr="*fp32", go_ptr="*fp32", go_sb="i32", gx_ptr=f"*{dt}",
                       gterms=(f"*{dt}",) * K, M="i32", n_iter="i32", prm_ptr="*fp32")
            ce = {"OP": op, "K": K, "USE1": use, "USE2": use if op == S.OP_SID else 0, "HAS_MASK": op != S.OP_SCM,
                  "PHI_HUBER": op == S.OP_SCORE, "TO_NUM": True, "GMAX": FMAX[dt], "TDT": TDT[dt] * 0x5555,
                  "WRITE_X": True, "TGRAD": use if op == S.OP_SID else 0, "BLOCK": S.BLOCK, "ACC": tl.float32}
            yield f"grad  op={op} {dt} K={K}", S._score_grad_kernel, sig, ce, S.NUM_WARPS
    for op in (S.OP_SCORE, S.OP_SID, S.OP_SCM, S.OP_DENOISE):
        sig = {"part_ptr": "*fp32", "sums_ptr": "*fp32", "weight_ptr": "*fp32", "logvar_ptr": "*fp32",
               "state_ptr": "*fp32", "loss_i_ptr": "*fp32", "loss_ptr": "*fp32", "B": "i32", "M": "i32", "NB": "i32",
               "prm_ptr": "*fp32"}
        ce = {"OP": op, "NORM": 1, "NORM_ON_LOSS": False, "RED": 0, "SAMPLE_MEAN": True, "RMS": False,
              "TO_NUM": False, "HAS_WEIGHT": True, "HAS_LOGVAR": op == S.OP_SCM,
              "NBP": S.MAX_BLOCKS_PER_SAMPLE, "ACC": tl.float32}
        yield f"final op={op}", S._score_finalize_kernel, sig, ce, 4


def kd_configs(quick: bool = False):
    """The kd_loss kernels at the largest vocabulary block, every flag on (worst case)."""
    block, nw = KD._cfg(1 << 17)
    for dt in (["bf16"] if quick else ["bf16", "fp16", "fp32"]):
        common = {"s_ptr": f"*{dt}", "t_ptr": f"*{dt}"}
        flags = {"HAS_SCALE": True, "HAS_SOFTCAP": True, "BLOCK_V": block, "ACC": tl.float32}
        for div in (KD.DIV_FKL, KD.DIV_RKL, 99):
            sig = dict(common, lab_ptr="*i64", mask_ptr="*u8", w_ptr="*fp32", st_ptr="*fp32", prm_ptr="*fp32",
                       V="i32", Vt="i32", s_stride="i64", t_stride="i64", R="i32", s_gstride="i64",
                       t_gstride="i64", ignore_index="i32")
            sig.update(ids_ptr="*i64", ids_stride="i64", K="i32")
            ce = dict(flags, DIV=div, HAS_LABELS=True, HAS_MASK=True, HAS_W=True, CE=True, CE_SEP=True,
                      TOPK=div == 99, TAIL=False, KB=1)
            yield f"kd stats div={div} {dt}", KD._kd_stats_kernel, sig, ce, nw
            if div == 99:  # top-k tail_bucket: the float64 sum-exp and the ids' terms (every k: chunks of K_CHUNK)
                yield (f"kd stats div={div} {dt} tail", KD._kd_stats_kernel, sig,
                       dict(ce, TAIL=True, KB=KD._k_block(1 << 20)), nw)
        for div in range(KD.DIV_JSD, KD.DIV_TVD + 1):
            sig = dict(common, w_ptr="*fp32", st_ptr="*fp32", prm_ptr="*fp32", V="i32", Vt="i32", s_stride="i64",
                       t_stride="i64", R="i32", s_gstride="i64", t_gstride="i64")
            yield f"kd div   div={div} {dt}", KD._kd_div_kernel, sig, dict(flags, DIV=div, HAS_W=True), nw
        for div in range(KD.DIV_FKL, KD.DIV_TVD + 1):
            sig = dict(common, lab_ptr="*i64", w_ptr="*fp32", st_ptr="*fp32", prm_ptr="*fp32", factor_ptr="*fp32",
                       go_ptr="*fp32", go_stride="i32", out_ptr=f"*{dt}", V="i32", Vt="i32", s_stride="i64",
                       t_stride="i64", o_stride="i64", R="i32", s_gstride="i64", t_gstride="i64", o_gstride="i64")
            sig.update(ids_ptr="*i64", ids_stride="i64", K="i32", stash_ptr=f"*{dt}")
            ce = dict(flags, DIV=div, HAS_LABELS=True, HAS_W=True, CE=True, MODE=0, KB=1, CE_SEP=True, STASH=False)
            yield f"kd grad  div={div} {dt}", KD._kd_grad_kernel, sig, ce, nw
            # top-k: KB = K_CHUNK serves every k >= 128 (the kernels loop over the ids in chunks); STASH: inplace_grad
            kb = KD._k_block(1 << 20)
            for mode in (1, 2, 3):
                if mode == 2 and div != KD.DIV_FKL:  # zero_tail: forward KL only
                    continue
                for stash in (False, True):  # out a separate buffer (the default), and inplace_grad's stash
                    yield (f"kd grad  div={div} {dt} top-k mode={mode}{' stash' if stash else ''}", KD._kd_grad_kernel,
                           sig, dict(ce, MODE=mode, KB=kb, STASH=stash), nw)
        kb = KD._k_block(1 << 20)
        for mode in (1, 2, 3):
            sig = dict(s_ptr=f"*{dt}", ids_ptr="*i64", lps_ptr="*fp32", w_ptr="*fp32", st_ptr="*fp32",
                       prm_ptr="*fp32", V="i32", K="i32", s_stride="i64", ids_stride="i64", lps_stride="i64",
                       R="i32", s_gstride="i64", sid_ptr="*i64", sid_stride="i64")
            for div in ((KD.DIV_FKL,) if mode == 2 else (KD.DIV_FKL, KD.DIV_JSD, KD.DIV_TVD)):
                ce = dict(DIV=div, MODE=mode, HAS_W=True, HAS_SCALE=True, HAS_SOFTCAP=True, KB=kb, TB=KD.TAIL_TB,
                          TW=KD.TAIL_TW, ACC=tl.float32)
                yield f"kd topk  mode={mode} div={div} {dt}", KD._kd_topk_kernel, sig, ce, 4
                if mode == 1:  # k in 33..64: the chunk loops' other block ([32, 64] exact-tail tiles spilled on sm_80)
                    yield f"kd topk  mode={mode} div={div} {dt} k<=64", KD._kd_topk_kernel, sig, dict(ce, KB=64), 4


SMEM_LIMIT = {80: 99 * 1024, 90: 227 * 1024}  # bytes per block: sm_86 / sm_89 allow 99 KiB (sm_80 163), sm_90 227
# fp32 attention runs on the kernels on sm_80 and sm_90 only (A.fp32_supported; sm_86 / sm_89 / sm_120 take the
# reference backend), so on --arch 80 its rows are held to what sm_80 gives a block (A100, A30)
SMEM_LIMIT_FP32_SM80 = 163 * 1024


def smem_limit(arch: int, name: str) -> int:
    """Shared memory per block that the configuration ``name`` may use on ``arch`` (a launch failure above)."""
    if arch == 80 and name.startswith("attn") and " fp32 " in name:
        return SMEM_LIMIT_FP32_SM80
    return SMEM_LIMIT[80 if A._small_smem(arch) else 90]


GATED = ("bf16", "fp16")  # attention dtypes whose spills fail the run (fp32: reported only)
ATTN_HEAD_DIMS = ((32, 32), (64, 64), (80, 80), (96, 96), (128, 128), (256, 256), (128, 64), (64, 128))
KMASK_HEAD_DIMS = ATTN_HEAD_DIMS  # key-mask variants (bf16 / fp16)


def attn_kernel(kind: str, dt: str, dqk: int, dv: int, cfg: tuple[int, int, int, int], kmask: bool = False,
                centre: bool = True):
    """One JVP-attention specialisation: ``kind`` in jvp | plain | 2pass (forward modes) | shift | dkdv | dq, with every
    tangent present and causal masking (the worst case), at block configuration ``cfg`` =
    (BM, BN, warps, stages). ``kmask``: with a key mask (a float bias in the input dtype, as diffusers passes it; the
    launcher's flags for it: natural units, BASE2 off, and the low word of lse, HAS_LO, in every dtype); the name
    ends in " kmask". ``centre`` (2pass, fp16 / bf16): the centred epilogue (CENTRE), as ``A.centred`` dispatches
    it. Returns (name, kernel, signature, constexprs, num_warps, num_stages)."""
    prec = "ieee" if dt == "fp32" else "tf32"
    f32 = dt == "fp32"
    bdq, bdv = max(16, triton.next_power_of_2(dqk)), max(16, triton.next_power_of_2(dv))
    bm, bn, nw, ns = cfg
    km = " kmask" if kmask else ""
    # unmasked: the launcher passes None for the key bias and its strides (constexprs: no parameters)
    kb_sig = dict(KB=f"*{dt}", skbb="i64", skbh="i64", skbk="i32") if kmask else {}
    kb_ce = dict(HAS_KB=kmask, KB_BOOL=False, **({} if kmask else dict(KB=None, skbb=None, skbh=None, skbk=None)))
    lo = f32 or kmask
    if kind in ("jvp", "plain", "2pass"):
        primal, tangent = {"jvp": (True, True), "plain": (True, False), "2pass": (False, True)}[kind]
        ptrs = dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", TQ=f"*{dt}", TK=f"*{dt}", TV=f"*{dt}", O=f"*{dt}",
                    TO=f"*{dt}", LSE="*fp32", MU="*fp32", LO="*fp32", **kb_sig)
        # sequence strides are i32 at run time (Triton types ints < 2^31 as i32; the launcher
        # switches the kernel to 64-bit offsets, WIDE, beyond that); batch / head strides i64 (worst case)
        strides = {n: ("i32" if n.endswith("s") else "i64") for n in (
            "sqb sqh sqs skb skh sks svb svh svs stqb stqh stqs stkb stkh stks stvb stvh stvs sob soh sos "
            "stob stoh stos slb slh").split()}
        sig = dict(ptrs, **strides, G="i32", Sq="i32", Sk="i32", scale="fp32")
        ce = dict(DQK=dqk, DV=dv, BDQK=bdq, BDV=bdv, BM=bm, BN=bn, CAUSAL=True, HAS_TQ=tangent,
                  HAS_TK=tangent, HAS_TV=tangent, PRIMAL=primal, TANGENT=tangent, DOT_PREC=prec, WIDE=False,
                  BASE2=not f32 and not kmask, HAS_LO=lo,  # the low word of lse: fp32 inputs, key masks (as dispatched)
                  ARG=kind == "plain",  # the primal pass of two_pass also records the arg-max key: the worst case
                  S64=f32, CENTRE=kind == "2pass" and not f32 and centre, **kb_ce)  # fp32: float64 logits
        return f"attn fwd {kind:5s} {dt} D{dqk}/{dv} {bm}x{bn}{km}", A._attn_fwd_kernel, sig, ce, nw, ns
    if kind == "shift":  # two_pass's tangent shift between its passes (row-wise dots, no block configuration)
        sig = dict(Q=f"*{dt}", K=f"*{dt}", TQ=f"*{dt}", TK=f"*{dt}", LSE="*fp32", LO="*fp32", MU="*fp32", **kb_sig,
                   **{n: ("i32" if n.endswith("s") else "i64")
                      for n in "sqb sqh sqs skb skh sks stqb stqh stqs stkb stkh stks slb slh".split()},
                   G="i32", Sq="i32", Sk="i32", scale="fp32")
        bm_s, warps_s = A.arg_shift_config(kmask)
        ce = dict(DQK=dqk, BDQK=bdq, BM=bm_s, HAS_TQ=True, HAS_TK=True, HAS_LO=lo, WIDE=False, S64=f32, **kb_ce)
        return f"attn shift {dt} D{dqk}{km}", A._arg_shift_kernel, sig, ce, warps_s, 3
    ce = dict(DQK=dqk, DV=dv, BDQK=bdq, BDV=bdv, BM=bm, BN=bn, CAUSAL=True, DOT_PREC=prec, WIDE=False, HAS_LO=lo,
              S64=f32, **kb_ce)
    bstr = {n: ("i32" if n.endswith("s") else "i64")
            for n in "sqb sqh sqs skb skh sks svb svh svs sdb sdh sds slb slh".split()}
    common = dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", DO=f"*{dt}", LSE="*fp32", LO="*fp32", DELTA="*fp32",
                  **{n: t for n, t in kb_sig.items() if n == "KB"})
    tail = dict(H="i32", G="i32", Sq="i32", Sk="i32", scale="fp32")
    bstr.update({n: t for n, t in kb_sig.items() if n != "KB"})
    if kind == "dkdv":
        sig = dict(common, DK=f"*{dt}", DV_=f"*{dt}", **bstr, sdkb="i64", sdkh="i64", sdks="i32", sdvb="i64",
                   sdvh="i64", sdvs="i32", **tail)
        return f"attn dkdv {dt} D{dqk}/{dv} {bm}x{bn}{km}", A._attn_bwd_dkdv_kernel, sig, ce, nw, ns
    if kind == "dq":
        sig = dict(common, DQ=f"*{dt}", **bstr, sdqb="i64", sdqh="i64", sdqs="i32", **tail)
        return f"attn dq   {dt} D{dqk}/{dv} {bm}x{bn}{km}", A._attn_bwd_dq_kernel, sig, ce, nw, ns
    raise ValueError(f"kind: {kind!r}")


def attn_configs(quick: bool = False, arch: int = 90, kmask_dims=None):
    """Every JVP-attention kernel the dispatcher can pick on ``arch``: each head-dim bucket (incl. Dqk != Dv),
    forward in its modes (fused JVP where it is the default, i.e. head dim <= 128; plain; the
    two-pass tangent pass), backward, at the default block configuration, with every tangent
    present and causal masking (the worst case). fp32 configurations (full-precision products on
    the CUDA cores, a correctness path) are reported but not gated: see ``GATED``."""
    dims = ((64, 64), (128, 128)) if quick else ATTN_HEAD_DIMS
    fp32 = ["fp32"] if A.fp32_supported(arch) else []  # elsewhere fp32 runs on the reference backend
    for dt in (["bf16"] if quick else ["bf16", "fp16", *fp32]):
        f32 = dt == "fp32"
        for dqk, dv in dims:
            forced = "FASTDISTILL_ATTN_JVP" in os.environ and not f32  # fp32 takes two_pass (jvp_mode)
            fused = forced or A.jvp_mode(dqk, dv, arch, f32) == "fused"
            for kind in (["jvp"] if fused else []) + ["plain", "2pass"]:
                yield attn_kernel(kind, dt, dqk, dv, A.fwd_config(dqk, dv, kind != "plain", f32, arch),
                                  centre=A.centred(arch))
            yield attn_kernel("shift", dt, dqk, dv, (0, 0, 0, 0))
            for kind in ("dkdv", "dq"):
                yield attn_kernel(kind, dt, dqk, dv, A.bwd_config(dqk, dv, f32, arch))
            if f32 or (dqk, dv) not in (KMASK_HEAD_DIMS if kmask_dims is None else kmask_dims):
                continue
            # with a key mask (kmask: the dispatcher's entries for masked calls)
            for kind in (["jvp"] if fused else []) + ["plain", "2pass"]:
                yield attn_kernel(kind, dt, dqk, dv, A.fwd_config(dqk, dv, kind != "plain", f32, arch, True), True,
                                  A.centred(arch))
            yield attn_kernel("shift", dt, dqk, dv, (0, 0, 0, 0), True)
            for kind in ("dkdv", "dq"):
                yield attn_kernel(kind, dt, dqk, dv, A.bwd_config(dqk, dv, f32, arch, True), True)


def _assemble(ptx: str, arch: int) -> tuple[str, str, bytes]:
    """``ptxas -v`` on ``ptx`` for ``arch``, by the first of ``_ptxas(arch)`` that assembles it: (its report, its
    name, the cubin)."""
    err = None
    with tempfile.TemporaryDirectory() as d:
        path, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(path, "w") as f:
            f.write(ptx)
        for ptxas in _ptxas(arch):
            gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # arch-specific features exist from sm_90a
            r = subprocess.run([ptxas, f"-arch={gpu}", "-v", path, "-o", cubin], capture_output=True, text=True)
            if r.returncode == 0:
                with open(cubin, "rb") as f:
                    return r.stdout + r.stderr, os.path.basename(ptxas), f.read()
            err = r.stderr.strip().splitlines()[-1] if r.stderr else f"rc={r.returncode}"
    raise RuntimeError(f"no ptxas could assemble the PTX ({err})")


def compile_report(kernel, signature, constexprs, num_warps: int, arch: int = 90, num_stages: int = 3) -> dict:
    """Compiles one configuration and reports ptxas's registers, spills and stack, and the shared memory. ptxas runs
    once: the ``_assemble`` run that is reported stands in for the assembly stage of Triton's pipeline (which would
    assemble the same PTX again, with its own flags). Its cubins go to a Triton cache of their own (this script's:
    ``codegen_cache_dir``), so that no launch ever loads one."""
    from triton.backends.nvidia.compiler import CUDABackend

    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    # the kernel's launch options from its module (kernels/kd_softmax.py: LAUNCH_OPTS, no fp fusion), as launched
    extra = getattr(inspect.getmodule(kernel.fn), "LAUNCH_OPTS", {}).get(kernel.fn.__name__, {})
    done = {}

    def add_stages(self, stages, options, *rest):
        add_stages_triton(self, stages, options, *rest)

        def cubin(src, metadata):
            done["asm"] = _assemble(src, arch)
            return done["asm"][2]

        stages["cubin"] = cubin

    add_stages_triton, cache_dir = CUDABackend.add_stages, os.environ.get("TRITON_CACHE_DIR")
    CUDABackend.add_stages, os.environ["TRITON_CACHE_DIR"] = add_stages, codegen_cache_dir()
    try:
        ck = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages, **extra})
    finally:
        CUDABackend.add_stages = add_stages_triton
        if cache_dir is None:
            del os.environ["TRITON_CACHE_DIR"]
        else:
            os.environ["TRITON_CACHE_DIR"] = cache_dir
    out, ptxas, _ = done.get("asm") or _assemble(ck.asm["ptx"], arch)  # (a cache hit runs no stage)
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    stack = re.search(r"(\d+) bytes stack frame", out)
    return {"registers": regs, "spill_stores": int(spill.group(1)), "spill_loads": int(spill.group(2)),
            "stack": int(stack.group(1)), "shared": ck.metadata.shared, "ptxas": ptxas}


def codegen_cache_dir() -> str:
    """The Triton cache of this script's compilations, beside the user's (TRITON_CACHE_DIR or ~/.triton/cache)."""
    base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return base.rstrip(os.sep) + "-fd-codegen"


def isolated(fn, *args):
    """``fn(*args)`` in a forked child, so that a compiler abort (LLVM asserts inside Triton kill the process:
    benchmarks/repro/triton39_slp_abort.py) fails that one configuration, not the run: returns fn's result, or
    raises ``CompilerAbort`` when the child dies by SIGABRT, RuntimeError naming another signal (the OOM
    killer's SIGKILL, say) or carrying the child's exception text. No timeout: a hung compile hangs the run."""
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report through the pipe, never return into the caller's stack
        code = 0
        try:
            faulthandler.disable()  # an abort prints LLVM's assertion, not a Python traceback per row
            os.close(rd)
            try:
                msg = ("ok", fn(*args))
            except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
                msg = ("err", f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}")
            with os.fdopen(wr, "wb") as f:
                pickle.dump(msg, f)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(wr)
    try:
        with os.fdopen(rd, "rb") as f:  # read to the end before waiting: a large result cannot block the child
            data = f.read()
    finally:
        _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGABRT:
            raise CompilerAbort("the compiler aborted (SIGABRT)")
        raise RuntimeError(f"the compiling child died by signal {sig}")
    kind, val = pickle.loads(data) if data else ("err", f"no result (exit status {os.WEXITSTATUS(status)})")
    if kind == "err":
        raise RuntimeError(val)
    return val


class CompilerAbort(RuntimeError):
    pass


_TODO: list = []  # the configurations of this run (forked into the worker processes)


@triton.jit
def _warm_kernel(x_ptr, n, B: tl.constexpr):
    o = tl.arange(0, B)
    tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n) * 2.0, mask=o < n)


def warm(arch: int) -> None:
    """Does in this process, before the compiling processes fork from it, what every compilation would otherwise do
    again in its own forked child: Triton's cache key (``triton_key`` hashes its 500 MB libtriton, ~0.45 s) and the
    backend's, and the compiler's first-use setup (a small kernel compiled for ``arch``, into a throwaway cache)."""
    cache_dir = os.environ.get("TRITON_CACHE_DIR")
    try:
        with tempfile.TemporaryDirectory() as d:
            os.environ["TRITON_CACHE_DIR"] = d
            triton.compile(ASTSource(fn=_warm_kernel, signature={"x_ptr": "*fp32", "n": "i32", "B": "constexpr"},
                                     constexprs={"B": 128}), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": 4})
    except Exception as e:  # noqa: BLE001 - only time is lost
        print(f"(warm-up: {type(e).__name__}: {e})", file=sys.stderr)
    finally:
        if cache_dir is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = cache_dir


def _report(args) -> dict:
    i, arch = args
    _, kern, sig, ce, nw, *ns = _TODO[i]
    try:
        return isolated(compile_report, kern, sig, ce, nw, arch, *ns)
    except CompilerAbort as e:
        return {"abort": str(e)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--family", choices=("all", "score", "kd", "attn"), default="all")
    ap.add_argument("--gated-only", action="store_true", help="skip the reported-only fp32 attention configurations")
    ap.add_argument("--only", default=None, help="a regular expression: compile the configurations it finds")
    ap.add_argument("--spills-not-gated", action="store_true",
                    help="report spills without failing (compiler aborts and shared memory still fail the run)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    a = ap.parse_args(argv)
    bad = 0
    print(f"{'kernel':40s} {'regs':>5s} {'spill st/ld':>12s} {'stack':>6s} {'smem':>6s}")
    fams = {"score": score_configs, "kd": kd_configs, "attn": lambda quick: attn_configs(quick, a.arch)}
    todo = [c for f, gen in fams.items() if a.family in ("all", f) for c in gen(a.quick)]
    if a.gated_only:
        todo = [c for c in todo if not c[0].startswith("attn") or any(f" {d} " in c[0] for d in GATED)]
    if a.only:
        todo = [c for c in todo if re.search(a.only, c[0])]
    uniq = {}  # one compilation of each (attention's tangent shift is the same kernel for every Dv of a Dqk)
    for c in todo:
        if uniq.setdefault(c[0], c) is not c and [*uniq[c[0]][1:4], *uniq[c[0]][4:]] != [*c[1:4], *c[4:]]:
            raise ValueError(f"two configurations named {c[0]!r}")
    todo = list(uniq.values())
    _TODO[:] = todo
    warm(a.arch)
    with ProcessPoolExecutor(max(1, a.jobs), mp_context=multiprocessing.get_context("fork")) as ex:
        reports = ex.map(_report, [(i, a.arch) for i in range(len(todo))])
        for (name, *_), r in zip(todo, reports):
            if "abort" in r:  # gated, every dtype: the user's process would die at its first call
                bad += 1
                print(f"{name:40s} ABORT: {r['abort']}", flush=True)
                continue
            spills = r["spill_stores"] or r["spill_loads"]
            gated = not a.spills_not_gated and (not name.startswith("attn") or any(f" {d} " in name for d in GATED))
            flag = ("  SPILLS" if gated else "  spills (not gated)") if spills else ""
            big = r["shared"] > smem_limit(a.arch, name)  # a launch failure: gated, every dtype
            flag += "  SMEM" if big else ""
            bad += bool(spills and gated) + big
            print(f"{name:40s} {r['registers']:5d} {r['spill_stores']:6d}/{r['spill_loads']:<5d} {r['stack']:6d} "
                  f"{r['shared']:6d}{flag}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
