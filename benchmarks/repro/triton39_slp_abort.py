"""Triton 3.9.0 (bundled LLVM 24.0.0git b010a18d2b64) aborts in LLVM's SLP vectorizer compiling this kernel
(ahead of time, no GPU needed):
  SLPVectorizer.cpp:27316: void llvm::slpvectorizer::BoUpSLP::scheduleBlock(const BoUpSLP &, BlockScheduling *):
  Assertion `all_of(Bundles, [](const ScheduleBundle *Bundle) { return Bundle->isScheduled(); })
  && "must be scheduled at this point"' failed.
  python benchmarks/repro/triton39_slp_abort.py [ARCH] [--one-dot] [--no-copyable]
ARCH 90 (default); 86, 89, 100, 103, 120 abort too. These compile:
  80             (Triton passes disable_slp_vectorizer=True for sm_80 only)
  --one-dot      (drop one of the two chained dots into `tacc`)
  --no-copyable  (LLVM option -slp-copyable-elements=false, set through LLVMParseCommandLineOptions)
Plain fp32 FMA dots (input_precision="ieee"); no float64 needed. Triton 3.6 compiles it (sm_90).
Why it matters here: docs/jvp_attention.md (fp32 takes two_pass); benchmarks/triton_codegen.py compiles each
configuration in a forked child so that such an abort fails one row, not the run."""
import ctypes
import os
import sys

os.environ.setdefault("TRITON_ALWAYS_COMPILE", "1")  # a cached success must not hide the crash
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def kernel(P, V, O, TO, Sk, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, TWO: tl.constexpr):
    m = tl.arange(0, BM)
    n = tl.arange(0, BN)
    d = tl.arange(0, D)
    acc = tl.zeros([BM, D], tl.float32)
    tacc = tl.zeros([BM, D], tl.float32)
    for n0 in range(0, Sk, BN):
        p = tl.load(P + m[:, None] * Sk + (n0 + n)[None, :])
        v = tl.load(V + (n0 + n)[:, None] * D + d[None, :])
        acc = tl.dot(p, v, acc * tl.max(p, 1)[:, None], input_precision="ieee")
        tacc = tl.dot(p, v, tacc, input_precision="ieee")
        if TWO:
            tacc = tl.dot(p, v, tacc, input_precision="ieee")
    tl.store(O + m[:, None] * D + d[None, :], acc)
    tl.store(TO + m[:, None] * D + d[None, :], tacc)


if __name__ == "__main__":
    arch = int(next((a for a in sys.argv[1:] if a.isdigit()), 90))
    if "--no-copyable" in sys.argv:
        import triton._C.libtriton as lt
        args = [b"triton", b"-slp-copyable-elements=false"]
        ctypes.CDLL(lt.__file__).LLVMParseCommandLineOptions(2, (ctypes.c_char_p * 2)(*args), None)
    ce = dict(BM=16, BN=16, D=64, TWO="--one-dot" not in sys.argv)
    sig = dict(P="*fp32", V="*fp32", O="*fp32", TO="*fp32", Sk="i32", **{k: "constexpr" for k in ce})
    print(f"triton {triton.__version__}, sm_{arch}, {sys.argv[1:]}: compiling...", flush=True)
    triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=ce), target=GPUTarget("cuda", arch, 32),
                   options={"num_warps": 4, "num_stages": 1})
    print("compiled OK")
