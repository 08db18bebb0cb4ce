"""CPU checks of the CUDA sources in csrc/ (no GPU needed):

1. The gate of CI's nvcc step (scripts/nvcc_check.py, run by .ci/run after the tests: every csrc/
   source compiles with nvcc for sm_80 and sm_90a with the extension build's flags, without warnings,
   and ptxas compiles each source's kernels without register spills or stack frames).
2. csrc/bindings.cpp compiles with the host compiler (pybind11 + the CUDA headers).
3. The kernels themselves run on the CPU: score.cu, kd_softmax.cu and bindings.cpp are compiled
   by g++ against a host emulation of the CUDA execution model (block threads as fibers on one OS
   thread, __syncthreads as a barrier, warp shuffles through a per-warp exchange, each block's
   threads run lowest-first or highest-first between barriers: EMULATION_HEADER; 128-thread
   finalize / reduce blocks), the emulated ``_C`` module stands in for the extension behind
   fastdistill.ops._score_cuda and fastdistill.ops._kd_cuda, and the GPU tier's cases (a subset
   of tests/gpu/test_score_cuda.py, all of tests/gpu/test_kd_cuda.py) are compared against the
   reference backend, each in both thread orders.
4. The dispatcher's reasons for refusing the CUDA backend (score: mixed term dtypes, more than 8
   terms; kd_loss: teacher dtype, fp64, top-k teachers).

Each test is skipped with a reason when its toolchain (nvcc, g++ with C++20 and <ucontext.h>, the CUDA
headers, pybind11) is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import fastdistill

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None]
    for h in homes:
        if h and (Path(h) / "include" / "cuda_runtime_api.h").is_file():
            return Path(h) / "include"
    return None


def _pybind11_include() -> str | None:
    try:
        import pybind11
    except ImportError:
        return None
    return pybind11.get_include()


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- nvcc + ptxas
def _nvcc_check_module():
    spec = importlib.util.spec_from_file_location("_fd_nvcc_check", ROOT / "scripts" / "nvcc_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_PTXAS_OK = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z2k2Pf' for 'sm_90a'
ptxas info    : Function properties for _Z2k2Pf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers
ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90a'
ptxas info    : Function properties for _Z1kPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers
"""


def test_nvcc_check_gate():
    """CI's nvcc step (.ci/run: scripts/nvcc_check.py; nvcc compiles each source once per CI run, so the suite does
    not compile them again) fails on spills, stack frames and a wrong kernel count: its ptxas parser on nvcc's
    output for two kernels, then with a spill, a stack frame, a kernel missing and another architecture."""
    C = _nvcc_check_module()
    assert C.N_KERNELS == 49 and C.N_KD_KERNELS == 79 and set(C.EXPECTED) == {"score.cu", "kd_softmax.cu"}
    assert {p.name for p in CSRC.glob("*.cu")} == set(C.EXPECTED)  # a new source needs its kernel count there
    assert C.ptxas_problems(_PTXAS_OK, "90a", 2) == []
    spill = _PTXAS_OK.replace("0 bytes spill stores", "4 bytes spill stores", 1)
    assert C.ptxas_problems(spill, "90a", 2) == [
        "sm_90a: _Z2k2Pf: stack frame / spill stores / spill loads 0/4/0 bytes"]
    stack = _PTXAS_OK.replace("    0 bytes stack frame", "    16 bytes stack frame")
    assert len(C.ptxas_problems(stack, "90a", 2)) == 2
    assert C.ptxas_problems(_PTXAS_OK, "90a", 3) == ["sm_90a: expected 3 kernels, ptxas compiled 2"]
    assert C.ptxas_problems(_PTXAS_OK, "80", 2) == ["sm_80: expected 2 kernels, ptxas compiled 0"]
    flags = C.nvcc_command(CSRC / "score.cu", "90a", Path("o"))
    assert {"--use_fast_math", "-O3", *C.BUILD_DEFINES} <= set(flags), flags
    assert "scripts/nvcc_check.py" in (ROOT / ".ci" / "run").read_text()


# ----------------------------------------------------------------------------- bindings.cpp
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
def test_bindings_compile(tmp_path):
    inc, pyb = _cuda_include(), _pybind11_include()
    if inc is None or pyb is None:
        pytest.skip("needs the CUDA headers and pybind11")
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-DFD_EXT_ABI=1", f"-I{inc}", f"-I{pyb}",
           f"-I{sysconfig.get_paths()['include']}", str(CSRC / "bindings.cpp")]
    r = _run(cmd, tmp_path)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr[-4000:]


# ----------------------------------------------------------------------------- host emulation
EMULATION_HEADER = r"""
// Host emulation of the CUDA execution model for csrc/*.cu (tests/test_csrc_build.py).
// The threads of a block are fibers (ucontext) on the calling thread; __syncthreads and every warp
// shuffle are barriers at which the fiber yields. The scheduler always resumes the lowest-numbered
// runnable thread (even blocks of a launch) or the highest (odd blocks; fd_emu_set_order(1) swaps
// the two). So each thread runs a barrier-free stretch whole, as far ahead of (or behind) the others
// as the barriers allow, and an access to __shared__ that lacks its barrier reads the wrong value in
// one of the two orders every time, not by chance.
#pragma once
#define __shared__ static
#define __launch_bounds__(...)
#include <cuda_runtime_api.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <vector_functions.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

struct FdEmuIdx { unsigned x = 0, y = 0, z = 0; };
inline FdEmuIdx threadIdx, blockIdx;  // the running fiber's: the scheduler sets them at every resume
inline FdEmuIdx blockDim, gridDim;
struct FdEmuBarrier { unsigned n = 0, arrived = 0; unsigned long long gen = 0; };
struct FdEmuFiber {
  ucontext_t ctx;
  const FdEmuBarrier* wait = nullptr;  // blocked until wait->gen moves past gen
  unsigned long long gen = 0;
  FdEmuIdx blk;
  bool done = false;
};
struct FdEmuWarp { FdEmuBarrier bar{32}; unsigned long long buf[2][32]; unsigned char par[32] = {}; };
inline ucontext_t fd_emu_sched;
inline FdEmuFiber* fd_emu_cur = nullptr;
inline FdEmuBarrier* fd_emu_block_bar = nullptr;
inline FdEmuWarp* fd_emu_warps = nullptr;
inline void (*fd_emu_fn)(void*) = nullptr;
inline void* fd_emu_arg = nullptr;
inline unsigned fd_emu_flip = 0;
extern "C" __attribute__((weak, visibility("default"))) void fd_emu_set_order(int flip) { fd_emu_flip = flip & 1; }

inline void fd_emu_sync(FdEmuBarrier& b) {  // arrive, then yield (the last arrival releases all, itself included)
  FdEmuFiber* me = fd_emu_cur;
  me->wait = &b;
  me->gen = b.gen;
  if (++b.arrived == b.n) b.arrived = 0, ++b.gen;
  swapcontext(&me->ctx, &fd_emu_sched);
}
inline void __syncthreads() { fd_emu_sync(*fd_emu_block_bar); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int o) {  // every lane of the warp takes part, as on the GPU
  static_assert(sizeof(T) <= 8);
  FdEmuWarp& w = fd_emu_warps[threadIdx.x >> 5];
  const int lane = threadIdx.x & 31, p = w.par[lane];
  w.par[lane] ^= 1;  // two buffers: a lane can be one shuffle ahead of a partner that has not read yet
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.buf[p][lane] = bits;
  fd_emu_sync(w.bar);
  bits = w.buf[p][lane ^ o];
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}
template <typename T>
inline T __ldg(const T* p) {  // a misaligned load (a 16-byte vector off its boundary) faults on the GPU: here too
  if (reinterpret_cast<unsigned long long>(p) % alignof(T) != 0)
    std::fprintf(stderr, "fd_emu: misaligned %zu-byte load at %p\n", sizeof(T), (const void*)p), std::abort();
  return *p;
}
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline cudaError_t fd_emu_ok() { return cudaSuccess; }
inline cudaError_t fd_emu_version(int* v) { *v = 0; return cudaSuccess; }
inline const char* fd_emu_error(cudaError_t) { return "emulated"; }
#define cudaGetLastError() fd_emu_ok()
#define cudaRuntimeGetVersion fd_emu_version
#define cudaGetErrorName fd_emu_error
#define cudaGetErrorString fd_emu_error

constexpr size_t FD_EMU_STACK = 256 << 10;  // per fiber, below it a guard page (an overflow faults)
inline char* fd_emu_stack(unsigned i) {
  static std::vector<char*> pool;
  while (pool.size() <= i) {
    void* m = mmap(nullptr, FD_EMU_STACK + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED || mprotect(m, 4096, PROT_NONE) != 0) std::perror("fd_emu: fiber stack"), std::abort();
    pool.push_back(static_cast<char*>(m) + 4096);
  }
  return pool[i];
}
template <typename F>
void fd_emu_tramp(void* f) { (*static_cast<F*>(f))(); }
inline void fd_emu_entry() {
  FdEmuFiber* me = fd_emu_cur;
  fd_emu_fn(fd_emu_arg);
  me->done = true;  // returning resumes the scheduler (uc_link)
}

// kernel<<<grid, block>>>(args): block.x fibers, each running every block of the grid in turn,
// with a barrier after each block (the __shared__ statics serve the next block). No runnable fiber
// before all are done (a barrier that not every thread reaches) aborts the process.
template <typename K, typename... Args>
void fd_emu_launch(K kernel, dim3 grid, dim3 block, Args... args) {
  const unsigned nt = block.x;
  if (nt == 0 || nt % 32 != 0 || nt > 1024) std::fprintf(stderr, "fd_emu: %u threads\n", nt), std::abort();
  blockDim = {block.x, 1, 1};
  gridDim = {grid.x, grid.y, 1};
  FdEmuBarrier bar{nt}, end{nt};  // __syncthreads; the end of a block (apart: a stray __syncthreads deadlocks)
  std::vector<FdEmuWarp> warps(nt / 32);
  std::vector<FdEmuFiber> fibers(nt);
  fd_emu_block_bar = &bar;
  fd_emu_warps = warps.data();
  auto body = [&] {
    FdEmuFiber* me = fd_emu_cur;
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = me->blk = {bx, by, 0};
        kernel(args...);
        fd_emu_sync(end);
      }
  };
  fd_emu_fn = &fd_emu_tramp<decltype(body)>;
  fd_emu_arg = &body;
  for (unsigned t = 0; t < nt; ++t) {
    ucontext_t& c = fibers[t].ctx;
    getcontext(&c);
    c.uc_stack.ss_sp = fd_emu_stack(t);
    c.uc_stack.ss_size = FD_EMU_STACK;
    c.uc_link = &fd_emu_sched;
    makecontext(&c, fd_emu_entry, 0);
  }
  for (unsigned left = nt; left > 0;) {
    const bool down = (end.gen + fd_emu_flip) & 1;  // end.gen: the blocks done
    unsigned t = nt;
    for (unsigned k = 0; k < nt && t == nt; ++k) {
      const unsigned i = down ? nt - 1 - k : k;
      const FdEmuFiber& f = fibers[i];
      if (!f.done && (f.wait == nullptr || f.wait->gen != f.gen)) t = i;
    }
    if (t == nt)
      std::fprintf(stderr, "fd_emu: deadlock (a barrier or shuffle that not every thread reaches)\n"), std::abort();
    FdEmuFiber& f = fibers[t];
    f.wait = nullptr;
    threadIdx = {t, 0, 0};
    blockIdx = f.blk;
    fd_emu_cur = &f;
    swapcontext(&fd_emu_sched, &f.ctx);
    left -= f.done;
  }
}
#define FD_LAUNCH(kernel, grid, block, stream, ...) fd_emu_launch(kernel, grid, block, __VA_ARGS__)
"""


@pytest.fixture(scope="module")
def emulated_ext(tmp_path_factory):
    gxx, inc, pyb = shutil.which("g++"), _cuda_include(), _pybind11_include()
    if gxx is None or inc is None or pyb is None:
        pytest.skip("the emulation needs g++, the CUDA headers and pybind11")
    d = tmp_path_factory.mktemp("emu")
    (d / "fd_emu.h").write_text(EMULATION_HEADER)
    so = d / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    # FD_SCORE_FIN_THREADS / FD_KD_RED_THREADS: the finalize / reduce blocks are written in terms of
    # blockDim; 128 emulated threads instead of 1024 make each barrier 8x cheaper (every thread is
    # resumed at each); 300 samples reach the finalize's loop past the thread count.
    flags = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-include", str(d / "fd_emu.h"), "-DFD_EXT_ABI=1",
             "-DFD_SCORE_FIN_THREADS=128", "-DFD_KD_RED_THREADS=128", f"-I{inc}", f"-I{pyb}",
             f"-I{sysconfig.get_paths()['include']}"]
    sources = [CSRC / "score.cu", CSRC / "kd_softmax.cu", CSRC / "bindings.cpp"]
    # one translation unit per process (the CPUs compile them side by side), then the link
    procs = [subprocess.Popen([gxx, *flags, "-c", "-x", "c++", str(src), "-o", str(d / f"{src.stem}.o")], cwd=d,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for src in sources]
    outs = [pr.communicate(timeout=600) for pr in procs]
    err = "".join(e for _, e in outs)
    r = subprocess.CompletedProcess([], max(pr.returncode for pr in procs), "", err)
    if r.returncode == 0:
        r = _run([gxx, "-shared", "-pthread", *[str(d / f"{src.stem}.o") for src in sources], "-o", str(so)], d)
    if r.returncode != 0 and "ucontext" in r.stderr and "error" in r.stderr and ".cu" not in r.stderr:
        pytest.skip(f"the host C library lacks <ucontext.h> (the emulation's fibers): {r.stderr[-500:]}")
    assert r.returncode == 0, f"emulation build failed:\n{r.stderr[-4000:]}"
    spec = importlib.util.spec_from_file_location("_C", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _other_order(ext):
    """Launches inside run each block's threads in the other order (EMULATION_HEADER: fd_emu_set_order)."""
    lib = ctypes.CDLL(ext.__file__)  # the loaded module itself (dlopen of the same path)
    lib.fd_emu_set_order(1)
    try:
        yield
    finally:
        lib.fd_emu_set_order(0)


def _bitwise_equal(a: dict, b: dict) -> None:
    bits = lambda x: x.new_empty(x.numel()).copy_(x.reshape(-1)).view(torch.uint8)
    for k, v in a.items():
        assert (v is None) == (b[k] is None), k
        if v is not None:
            assert v.dtype == b[k].dtype and torch.equal(bits(v), bits(b[k])), k


def _load_gpu_cases(name: str = "test_score_cuda"):
    path = ROOT / "tests" / "gpu" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_fd_{name}_cases", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


G = _load_gpu_cases()
EMU_CASES = (G.cases(sizes=((3, (1,)), (2, (4, 32, 32)))) + G.cases(sizes=((2, (7,)),), dtypes=(torch.bfloat16,))
             + [c for c in G.NAN_CASES if c.dtype != torch.float32]
             + [c for c in G.EDGE_CASES if c.misaligned and c.dtype == torch.bfloat16]
             # the finalize's loop over samples (stride FIN_THREADS = 128 here: 300 = 2·128 + 44), samples in more
             # than one warp of it that read its block sums (64 of them, mean over the valid elements), and a sample
             # of several block iterations (2^20 + 5 elements: n_iter 2 over 513 blocks, the last one partial)
             + [G.Case("scm", torch.float16, 300, (9,), kw=(("logvar", True), ("reduction", "none"))),
                next(c for c in G.EDGE_CASES if c.B == 64),
                # samples in the finalize's last warp (130 = 128 + 2 over 128 threads): its batch-wide sums (the
                # valid count of batchmean, the global normaliser) take every warp
                G.Case("score", torch.bfloat16, 130, (3,), kw=(("norm", "mean_abs_global"),), mask="rand"),
                G.Case("denoise", torch.bfloat16, 1, (2**20 + 5,), per_sample=True, mask="rand")])


@pytest.fixture
def cuda_on_cpu(emulated_ext, monkeypatch):
    """The "cuda" backend, on CPU tensors, through the emulated extension."""
    from fastdistill import _backend
    from fastdistill.ops import _score_cuda, _score_engine

    class _Stream:
        cuda_stream = 0

    monkeypatch.setattr(_score_cuda, "ext", lambda: emulated_ext)
    monkeypatch.setattr(_score_cuda, "require_cuda", lambda name, x: None)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: _Stream())
    for name in _score_engine.OP_NAMES.values():
        monkeypatch.setitem(_backend._REGISTRY[name], "cuda", lambda *a, **k: [])
    return "cuda"


def test_emulated_blocking_matches_triton(emulated_ext):
    pytest.importorskip("triton")
    from fastdistill.kernels import score as tk

    for M in (1, 7, 1024, 1025, 4096, 2**20, 2**20 + 1, 2**21 + 3, 10**9):
        assert tuple(emulated_ext.score_blocking(M)) == tk._blocking(M), M


@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: c.id)
def test_emulated_kernels_match_reference(emulated_ext, cuda_on_cpu, case):
    """Each case twice, the threads of every block in the two orders (a missing __syncthreads gives a wrong
    value in one of them): bitwise the same results (the kernels' reductions have a fixed order, as
    tests/gpu/test_score_cuda.py checks on a GPU), and the reference's within the GPU tier's tolerance."""
    got = G.run_case(case, "cuda", "cpu")
    with _other_order(emulated_ext):
        _bitwise_equal(got, G.run_case(case, "cuda", "cpu"))
    ref = G.run_case(case, "reference", "cpu")
    G.compare(case, got, ref)


def test_emulated_raise_policy(cuda_on_cpu):
    case = G.Case("sid", torch.bfloat16, 3, (5, 8), kw=(("nan", "raise"),), inject="nan")
    with pytest.raises(FloatingPointError, match=r"samples \[0, 1\]"):
        G.run_case(case, "cuda", "cpu")


def test_emulated_overflow_pins(cuda_on_cpu):
    """The zero_sample overflow rule and the non-finite logvar / x cases of test_score_edge.py, on the
    CUDA kernels."""
    from test_score_edge import overflow_pins

    overflow_pins("cuda")


def test_emulated_argument_errors(emulated_ext):
    kw = dict(op=0, dtype=2, x=16, terms=[16], coef=16, coef_sb=0, mask=0, weight=0, logvar=0, part=16, sums=16,
              state=16, loss_i=16, loss=16, B=1, M=8, use1=1, use2=0, tneed=0, phi_huber=False, norm_on_loss=False,
              norm=1, red=0, sample_mean=False, rms=False, to_num=False, prm=16, stream=0)
    for bad, match in ((dict(terms=[16] * 9), "at most 8 term tensors"), (dict(op=4), "op: expected"),
                       (dict(dtype=3), "dtype: expected"), (dict(use1=2), "bitmasks name a term index"),
                       (dict(x=0), "x: expected a device pointer"), (dict(red=7), "red: expected"),
                       (dict(prm=0), "prm: expected a device pointer")):
        with pytest.raises(ValueError, match=match):
            emulated_ext.score_fwd(**{**kw, **bad})
    bwd = dict(op=1, dtype=0, x=16, terms=[16], coef=16, coef_sb=0, mask=0, state=16, grad_out=16, go_sb=0, gx=16,
               gterms=[0], B=1, M=8, use1=1, use2=0, phi_huber=False, to_num=False, prm=0, stream=0)
    with pytest.raises(ValueError, match="prm: expected a device pointer"):
        emulated_ext.score_bwd(**bwd)


# Calls back to back whose float options differ (huber_c, alpha, scale, clamp, eps, c, a float weight)
PARAM_PAIRS = [
    [G.Case("score", torch.bfloat16, 3, (7,), kw=(("phi", "pseudo_huber"), ("huber_c", hc), ("scale", s),
                                                  ("norm_clamp", cl), ("norm_eps", e)))
     for hc, s, cl, e in ((0.3, 2.0, 0.0, 0.01), (0.05, 0.5, 0.9, 0.2))],
    [G.Case("sid", torch.float32, 2, (5, 8), kw=(("alpha", a), ("scale", s), ("w_eps", e)))
     for a, s, e in ((0.5, 3.0, 0.1), (1.0, 0.7, 0.0))],
    [G.Case("scm", torch.float16, 2, (9,), kw=(("weight", w), ("c", c))) for w, c in ((2.5, 0.1), (0.5, 0.0))],
]


@pytest.mark.parametrize("pair", PARAM_PAIRS, ids=lambda p: p[0].op)
def test_emulated_float_options_of_each_call(emulated_ext, cuda_on_cpu, pair):
    """The CUDA kernels read each call's own float options from the parameter vector (fastdistill.ops._score_cuda:
    the plan's cached device vector): calls back to back with other values, then the first again, each within the
    reference's tolerance, the repeat bitwise the first (a stale or wrong vector gives the other call's values)."""
    runs = [G.run_case(c, "cuda", "cpu") for c in pair]
    for c, got in zip(pair, runs):
        G.compare(c, got, G.run_case(c, "reference", "cpu"))
    assert not torch.equal(runs[0]["loss"], runs[1]["loss"])
    _bitwise_equal(runs[0], G.run_case(pair[0], "cuda", "cpu"))


def test_score_params_match_triton():
    """One parameter vector serves both backends: the CUDA launcher's is the Triton kernels' (the same cached
    tensor in eager mode, for float32 accumulation and terms in x's dtype)."""
    pytest.importorskip("triton")
    from fastdistill.kernels import score as tk
    from fastdistill.ops import _score_cuda
    from fastdistill.ops._score_engine import Plan

    p = Plan(op=1, tneed=1, huber_c=0.3, alpha=0.7, scale=1.5, clamp=1e-3, eps=0.01, c=0.2)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.zeros(2, 8, dtype=dtype)
        want = tk._params(p, tk.grad_unit(p, dtype, [dtype]), x.device, torch.float32)
        assert _score_cuda.params(p, x) is want
        assert want.tolist() == [*torch.tensor([0.3, 0.7, 1.5, 1e-3, 0.01, 0.2]).tolist(), torch.finfo(dtype).max]


def test_emulated_compile_path_takes_the_device_vector(emulated_ext, cuda_on_cpu):
    """Under torch.compile the CUDA backend gets the parameter vector built in the graph on x's device (float32, the
    eager launcher's vector), no float64 CPU vector read with .tolist() in the op (a CPU op in a GPU graph: inductor
    skipped CUDA graphs); the reference keeps the CPU vector. The custom ops run on that vector alone (the plan's
    floats are NaN in there) with two plans back to back, then a compiled schedule of scale and huber_c."""
    from fastdistill.ops import _score_cuda
    from fastdistill.ops._score_engine import Plan, _OpPlan, _score_bwd_op, _score_fwd_op, op_args, plan_from_op

    plans = [Plan(op=0, use1=1, use2=2, norm=1, phi_huber=True, huber_c=hc, scale=s, clamp=cl, eps=e)
             for hc, s, cl, e in ((0.3, 1.5, 1e-3, 0.01), (0.05, 0.5, 0.9, 0.2))]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.empty(2, 8, dtype=dtype, device="meta")
        _, vals = op_args(plans[0], "cuda", x, [x, x])
        assert vals.device == x.device and vals.dtype == torch.float32 and vals.shape == (7,), vals
        _, vals = op_args(plans[0], "reference", x, [x, x])
        assert vals.device.type == "cpu" and vals.dtype == torch.float64

    g = torch.Generator().manual_seed(11)
    x, f, c = (torch.randn(3, 40, generator=g) for _ in range(3))
    coef = torch.tensor([[[0.0, 1.0, -1.0], [0.0, 0.0, 1.0]]])
    up = torch.tensor(0.75)
    outs = []
    for p in plans:
        ip, vals = op_args(p, "cuda", x, [f, c])
        assert torch.equal(vals, _score_cuda.params(p, x))
        q = plan_from_op(ip, vals, "cuda")
        assert isinstance(q, _OpPlan) and q.prm is vals and math.isnan(q.scale) and math.isnan(q.huber_c)
        got = _score_fwd_op(x, [f, c], coef, None, None, None, ip, vals, "cuda")
        ip_r, vals_r = op_args(p, "reference", x, [f, c])
        want = _score_fwd_op(x, [f, c], coef, None, None, None, ip_r, vals_r, "reference")
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        (gx,) = _score_bwd_op(x, [f, c], coef, None, got[2], up, ip, vals, True, [False, False], "cuda")[:1]
        (gr,) = _score_bwd_op(x, [f, c], coef, None, want[2], up, ip_r, vals_r, True, [False, False],
                              "reference")[:1]
        torch.testing.assert_close(gx, gr, rtol=1e-5, atol=1e-7)
        outs.append(got[0])
    assert not torch.equal(outs[0], outs[1])

    import torch._dynamo as dynamo
    from torch._dynamo.backends.registry import lookup_backend

    seen = []

    def backend(gm, example_inputs):  # the vector the graph hands the forward op
        for n in gm.graph.nodes:
            if n.target is torch.ops.fastdistill.score_fwd.default:
                seen.append(n.args[7].meta["example_value"])
        return lookup_backend("aot_eager")(gm, example_inputs)

    fn = lambda x, s: fastdistill.score_distill(x, [f, c], [1.0, -1.0], norm_terms=[c], norm_coeffs=[1.0],
                                                phi="pseudo_huber", huber_c=0.1 * s, scale=s)
    dynamo.reset()
    try:
        with fastdistill.use_backend("cuda"):
            cf = torch.compile(fn, fullgraph=True, backend=backend)
            for s in (1.5, 2.5, 0.7):
                x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
                got = cf(x1, s)
                got.backward()
                with fastdistill.use_backend("reference"):
                    want = fn(x2, s)
                want.backward()
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-7)
    finally:
        dynamo.reset()
    assert seen and all(v.dtype == torch.float32 and v.device == x.device and v.shape == (7,) for v in seen), seen


# ----------------------------------------------------------------------------- kd_loss (emulated)
K = _load_gpu_cases("test_kd_cuda")
# the whole GPU grid (rows are independent CTAs, so the emulation is cheap here), and rows in more than one warp of
# the reduce kernel (its sums over the warps; at most 6 rows elsewhere)
KD_EMU_CASES = K.ALL_CASES + [K.Case("fkl", torch.float32, 40, 64, labels="some")]


@pytest.fixture
def kd_cuda_on_cpu(emulated_ext, monkeypatch):
    """The "cuda" backend of kd_loss, on CPU tensors, through the emulated extension."""
    from fastdistill import _backend
    from fastdistill.ops import _kd_cuda

    class _Stream:
        cuda_stream = 0

    monkeypatch.setattr(_kd_cuda, "ext", lambda: emulated_ext)
    monkeypatch.setattr(_kd_cuda, "require_cuda", lambda name, x: None)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: _Stream())
    monkeypatch.setitem(_backend._REGISTRY["kd_loss"], "cuda", lambda *a, **k: [])
    return "cuda"


@pytest.mark.parametrize("case", KD_EMU_CASES, ids=lambda c: c.id)
def test_emulated_kd_kernels_match_reference(emulated_ext, kd_cuda_on_cpu, case):
    """As test_emulated_kernels_match_reference: both thread orders, bitwise the same, the GPU tier's rule."""
    got = K.run_case(case, "cuda", "cpu")
    with _other_order(emulated_ext):
        _bitwise_equal(got, K.run_case(case, "cuda", "cpu"))
    r32 = K.run_case(case, "reference", "cpu")
    r64 = K.run_case(case, "reference", "cpu", fp64=True)
    K.compare(case, got, r32, r64, floor=1e-6)


@pytest.mark.parametrize("div", ["fkl", "rkl"])
def test_emulated_kd_underflowed_mass_at_an_infinite_log_ratio(kd_cuda_on_cpu, div):
    """A thread's (or a merged partner's) divergence sum that is +inf in its own frame, rescaled by a factor that
    underflows to 0, gives the fp32 reference's finite value, not NaN (tests/test_kd.py, the same rows)."""
    from test_kd import check_underflow_rows

    check_underflow_rows(div)


def test_emulated_kd_nonfinite_dense_rows(kd_cuda_on_cpu):
    """Infinite reverse KL (zero KD gradient), a weight-0 row with an infinite divergence, beta / skew within
    fp32 rounding of 1: tests/test_kd.py's check, on the CUDA kernels."""
    from test_kd import check_nonfinite_dense_rows

    check_nonfinite_dense_rows()


@pytest.mark.parametrize("div", ["fkl", "rkl"])
def test_emulated_kd_teacher_offset_accuracy(kd_cuda_on_cpu, div):
    """fkl / rkl with a teacher offset by +30 logits from a close student: the per-thread sums and the warp merges
    keep each model's own max frame (tests/test_kd.py, the same rows and rule)."""
    from test_kd import check_teacher_offset

    check_teacher_offset(div, lambda s, t: fastdistill.kd_loss(s, t, divergence=div, reduction="none"))


@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd-b0.3", "tvd"])
def test_emulated_kd_alpha_one_ignores_the_teacher(kd_cuda_on_cpu, div):
    from test_kd import check_alpha_one_ignores_the_teacher

    with fastdistill.use_backend(kd_cuda_on_cpu):
        check_alpha_one_ignores_the_teacher(div)


def test_emulated_kd_ce_softcap(kd_cuda_on_cpu):
    """softcap's tanh series (csrc tanh_fd) read absolutely through the CE term (tests/test_kd_close_teacher.py)."""
    from test_kd_close_teacher import check_ce_softcap

    with fastdistill.use_backend(kd_cuda_on_cpu):
        check_ce_softcap()


@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd-b0.3", "skl", "tvd"])
def test_emulated_kd_nonnegative_near_equal(kd_cuda_on_cpu, div):
    from test_kd import check_nonnegative_near_equal

    with fastdistill.use_backend(kd_cuda_on_cpu):
        check_nonnegative_near_equal(div, torch.float32)


def test_emulated_kd_softcap_keeps_neginf(kd_cuda_on_cpu):
    from test_kd import check_softcap_neginf

    with fastdistill.use_backend(kd_cuda_on_cpu):
        check_softcap_neginf()


def test_emulated_kd_shifted_views_read_in_place(kd_cuda_on_cpu):
    """logits[:, :-1] of a batch read in place by the CUDA kernels (rows R a group, group-major): no copy, bitwise
    the result on contiguous copies, inplace_grad into the shifted rows only (tests/test_kd.py, the same check)."""
    from test_kd import check_shifted_views_read_in_place

    with fastdistill.use_backend(kd_cuda_on_cpu):
        check_shifted_views_read_in_place(topk=False)


def test_emulated_kd_ce_large_offset(kd_cuda_on_cpu):
    """The CE term's accuracy at a logit offset of 300 (tests/test_kd_close_teacher.py, the same check; dense
    teachers: top-k teachers do not run on the CUDA backend)."""
    from test_kd_close_teacher import check_ce_large_offset

    with fastdistill.use_backend(kd_cuda_on_cpu):
        check_ce_large_offset(topk=False)


def _guarded_rows(N: int, V: int, before: bool):
    """[N, V] fp32 logits right after (``before``) or right before an unreadable page: a read outside the rows
    segfaults. Returns the tensor and the mapping that owns it."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    mm = mmap.mmap(-1, 3 * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    buf = torch.frombuffer(mm, dtype=torch.float32)
    n = N * V
    if before:
        x = buf[page // 4 : page // 4 + n].view(N, V)
        guard = base
    else:
        x = buf[2 * page // 4 - n : 2 * page // 4].view(N, V)
        guard = base + 2 * page
    if libc.mprotect(guard, page, 0) != 0:
        pytest.skip("mprotect is not available")
    return x, mm


def test_emulated_kd_labels_never_read_outside_the_row(kd_cuda_on_cpu, monkeypatch):
    """The CE term reads the label's logit only for a label in range: ignore_index on the first row and an
    out-of-range label on the last (the CPU range check bypassed, as on a GPU, where labels are not read on the
    host) next to unreadable pages give 0 and NaN for those rows, the others the reference's values (a first
    cut of 08dc92b read s_row[label] before the range check: a segfault here, an illegal address on a GPU;
    found by a review)."""
    from fastdistill.ops import kd_softmax as ops

    monkeypatch.setattr(ops, "_eager_cpu", lambda t: False)
    g = torch.Generator().manual_seed(0)
    N, V = 4, 8
    for before, row, val in ((True, 0, -100), (False, N - 1, V), (False, N - 1, V + 5000)):
        x, mm = _guarded_rows(N, V, before)
        x.copy_(torch.randn(N, V, generator=g))
        t = torch.randn(N, V, generator=g)
        lab = torch.randint(0, V, (N,), generator=g)
        lab[row] = val
        with fastdistill.use_backend(kd_cuda_on_cpu):
            got = fastdistill.kd_loss(x, t, labels=lab, hard_label_alpha=0.5, reduction="none")
        keep = torch.arange(N) != row
        lab_ok = lab.clone()
        lab_ok[row] = -100
        with fastdistill.use_backend("reference"):
            want = fastdistill.kd_loss(x.clone(), t, labels=lab_ok, hard_label_alpha=0.5, reduction="none")
        assert torch.allclose(got[keep], want[keep], rtol=1e-5, atol=1e-6), (before, val)
        assert (got[row] == 0) if val == -100 else torch.isnan(got[row]), (before, val, got)
        del x, mm


def test_emulated_kd_vector_path_conditions(kd_cuda_on_cpu):
    """The 16-byte path is taken only where every vector is whole and aligned (csrc/kd_softmax.cu use_vector): a
    vocabulary that is a multiple of the vector but a row stride that is not (the student a column slice of a
    wider buffer), a group stride that is not ([B, T, V] rows of a padded buffer), and a teacher vocabulary that is
    not (the teacher's last row right before an unreadable page: nothing past it is read) each take the scalar path
    and give the reference's values. The emulation's loads fault when misaligned, as on the GPU. (A vector path
    taken for the last case would read at most 3 elements past a row inside its aligned 16 bytes, masked: it
    cannot fault, here or on a GPU, so only the values are checked.)"""
    g = torch.Generator().manual_seed(3)
    kw = dict(divergence="jsd", beta=0.3, reduction="none")

    def check(s, t, what):
        with fastdistill.use_backend(kd_cuda_on_cpu):
            got = fastdistill.kd_loss(s, t, **kw)
        with fastdistill.use_backend("reference"):
            want = fastdistill.kd_loss(s.contiguous(), t.contiguous(), **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=what)

    N, V = 3, 64
    wide = torch.randn(N, V + 1, generator=g, dtype=torch.bfloat16)
    check(wide[:, :V], torch.randn(N, V, generator=g, dtype=torch.bfloat16), "row stride V + 1")
    B, T = 2, 3
    padded = torch.randn(B, T * V + 1, generator=g)
    s = padded[:, : T * V].view(B, T, V)
    assert s.stride() == (T * V + 1, V, 1)
    check(s, torch.randn(B, T, V, generator=g), "group stride T·V + 1")
    t, mm = _guarded_rows(1, V - 2, before=False)
    t.copy_(torch.randn(1, V - 2, generator=g))
    check(torch.randn(1, V, generator=g), t, "teacher vocabulary V − 2 before an unreadable page")
    del t, mm


def test_emulated_kd_posinf_logit_is_nan(kd_cuda_on_cpu):
    """+inf logits count as NaN inputs, the CE term alone included (tests/test_kd.py, the same check)."""
    from test_kd import check_posinf_logit_is_nan

    with fastdistill.use_backend(kd_cuda_on_cpu):
        check_posinf_logit_is_nan()


def test_emulated_kd_row_offsets_past_2_31(kd_cuda_on_cpu):
    """Row addresses past 2^31 elements with every stride below it, the in-place gradient included (tests/test_kd.py,
    the same check; top-k teachers do not run on the CUDA backend)."""
    from test_kd import check_row_offsets_past_2_31

    with fastdistill.use_backend(kd_cuda_on_cpu):
        check_row_offsets_past_2_31(topk=False)


def test_emulated_kd_softcap_saturated_gradient(kd_cuda_on_cpu):
    from test_kd import check_softcap_saturated

    check_softcap_saturated()


def test_emulated_kd_state_matches_reference(kd_cuda_on_cpu):
    """The per-row state [N, 11] itself (lse_s, lse_t, lse_s1, D, S, contrib, ce, valid, lse_s_lo, lse_t_lo,
    lse_s1_lo) and the factor, for a 2-pass and a 3-pass divergence with every row kind (invalid by label / −inf, an
    out-of-range label)."""
    from fastdistill.ops import _kd_cuda
    from fastdistill.ops.kd_softmax import KDPlan
    from fastdistill.reference import kd_softmax as ref

    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(7, 300, generator=g) * 2, torch.randn(7, 310, generator=g) * 2
    s[0], t[1] = -math.inf, -math.inf
    labels = torch.tensor([3, 7, -100, 299, 0, 300, 5])  # 300 = V: out of range (no host check here): NaN CE
    w = torch.rand(7, generator=g) + 0.5
    for div in (0, 4):
        p = KDPlan(div=div, temperature=1.5, teacher_temperature=1.5, alpha=0.25, t2=2.25, skew=0.3)
        got = _kd_cuda.kd_fwd(p, s, t, labels, None, w)
        exp = ref.kd_fwd(p, s, t, labels, None, w)
        for name, a, b in zip(("loss", "contrib", "state", "factor"), got, exp):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            if name == "state":  # invalid rows: D and S are never read (the kernels clamp D with fmax, as
                a, b = a.clone(), b.clone()  # Triton's tl.maximum does, where the reference's NaN propagates)
                a[b[:, 7] == 0, 3:5] = 0
                b[b[:, 7] == 0, 3:5] = 0
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), (name, a, b)
            fin = b.isfinite()
            torch.testing.assert_close(a[fin], b[fin], rtol=2e-6, atol=2e-6, msg=name)


def test_emulated_kd_argument_errors(emulated_ext):
    fwd = dict(dtype=2, s=16, t=16, labels=0, labels_i64=True, mask=0, weights=0, prm=16, st=16, loss=16, factor=16,
               N=2, V=8, Vt=8, s_stride=8, t_stride=8, rows_per_group=2, s_gstride=16, t_gstride=16,
               ignore_index=-100, div=0, red=0, ce=False, ce_sep=False, softcap=False, num_items=0.0, stream=0)
    for bad, match in ((dict(dtype=3), "dtype: expected"), (dict(div=6), "div: expected"),
                       (dict(red=4), "red: expected"), (dict(s=0), "s: expected a device pointer"),
                       (dict(ce=True), "needs labels"), (dict(ce_sep=True, labels=16), "ce_sep"),
                       (dict(div=1, Vt=7), "reverse KL is infinite"), (dict(N=-1), "non-negative"),
                       (dict(V=2**31), "at most 2\\^30 columns"), (dict(num_items=-1.0), "num_items"),
                       (dict(t_stride=-8), "t_stride"), (dict(rows_per_group=0), "rows_per_group"),
                       (dict(N=4, rows_per_group=3), "rows_per_group: expected >= 1 and a divisor"),
                       (dict(s_gstride=-1), "s_gstride")):
        with pytest.raises(ValueError, match=match):
            emulated_ext.kd_fwd(**{**fwd, **bad})
    bwd = {k: v for k, v in fwd.items() if k not in ("mask", "loss", "red", "ce_sep", "num_items", "ignore_index")}
    bwd.update(grad_out=16, go_stride=0, out=16, o_stride=8, o_gstride=16)
    for bad, match in ((dict(go_stride=2), "go_stride"), (dict(out=0), "out: expected a device pointer"),
                       (dict(o_stride=4), "rows of out overlap"), (dict(div=-1), "div: expected"),
                       (dict(N=4, o_gstride=8), "groups of rows of out overlap"), (dict(o_gstride=-1), "o_gstride")):
        with pytest.raises(ValueError, match=match):
            emulated_ext.kd_bwd(**{**bwd, **bad})
    emulated_ext.kd_fwd(**{**fwd, "N": 0})  # nothing to do: no launch, no pointer read


def test_kd_params_match_triton():
    pytest.importorskip("triton")
    from fastdistill.kernels import kd_softmax as tk
    from fastdistill.ops import _kd_cuda
    from fastdistill.ops.kd_softmax import KDPlan

    for p in (KDPlan(), KDPlan(temperature=2.0, teacher_temperature=0.7, alpha=0.3, t2=4.0, logit_scale=1.7,
                                softcap=30.0, beta=0.25, skew=0.4)):
        assert torch.equal(_kd_cuda.params(p, torch.device("cpu")), tk.params(p, torch.device("cpu"), torch.float32))


# ----------------------------------------------------------------------------- dispatcher
def test_cuda_why_not_reasons():
    """The dispatcher's reasons for the CUDA backend (checked without running it)."""
    x = torch.zeros(2, 4, dtype=torch.bfloat16)
    why = fastdistill.available_backends("score_distill", x, term_dtypes=(torch.bfloat16, torch.float32))["cuda"]
    assert any("every term in x's dtype (bfloat16), got terms in float32" in r for r in why), why
    why = fastdistill.available_backends("sid_loss", x, term_dtypes=(torch.bfloat16,) * 9)["cuda"]
    assert any("at most 8 distinct term tensors, got 9" in r for r in why), why
    why = fastdistill.available_backends("sid_loss", x, term_dtypes=(torch.bfloat16,) * 8)["cuda"]
    assert not any("term" in r for r in why), why
    assert fastdistill.available_backends("scm_tangent_loss", x, term_dtypes=(torch.float32,))["reference"] == []
    # a pseudo-Huber constant whose square is subnormal in fp32: flushed to 0 by the build's fast math
    why = fastdistill.available_backends("score_distill", x, huber_c=1e-20)["cuda"]
    assert any("huber_c = 1e-20" in r and "flushes to 0" in r for r in why), why
    assert not any("huber_c" in r for r in fastdistill.available_backends("score_distill", x, huber_c=1e-3)["cuda"])


@pytest.mark.parametrize("arch, cap, runs", [
    ("sm_80", (8, 0), True), ("sm_80", (8, 6), True), ("sm_80", (8, 9), True), ("sm_86", (8, 0), False),
    ("sm_80", (9, 0), False), ("sm_90a", (9, 0), True), ("sm_90a", (10, 0), False), ("sm_90", (12, 0), False),
    ("compute_90", (10, 0), True), ("compute_90", (8, 9), False), ("compute_90a", (10, 0), False),
    ("sm_100f", (10, 3), True), ("sm_100f", (12, 0), False), ("sm_120", (12, 0), True), ("unknown", (9, 0), None),
    ("compute_100f", (10, 3), True), ("compute_100f", (12, 0), False),  # family PTX: that major only
    (" sm_90a ", (9, 0), True),
])
def test_arch_runs(arch, cap, runs):
    """Which builds of the extension run on which GPU (machine code within a major version, PTX forward)."""
    from fastdistill._backend import arch_runs

    assert arch_runs(arch, *cap) is runs


def test_stale_extension_refused(monkeypatch):
    """An extension built by another fastdistill (another binding ABI) is not used: the reason names both ABIs and
    the rebuild."""
    import types

    from fastdistill import _backend

    fake = types.ModuleType("fastdistill._C")
    fake.EXT_ABI = _backend.EXT_ABI - 1
    monkeypatch.setitem(sys.modules, "fastdistill._C", fake)
    monkeypatch.setattr(fastdistill, "_C", fake, raising=False)
    for name, value in (("_EXT", None), ("_EXT_ERR", None), ("_EXT_PROBED", False), ("_EXT_WARNED", True)):
        monkeypatch.setattr(_backend, name, value)
    assert _backend.extension() is None
    err = _backend.extension_error()
    assert f"binding ABI {fake.EXT_ABI} but this fastdistill expects {_backend.EXT_ABI}" in err and "rebuild" in err
    fake.EXT_ABI = _backend.EXT_ABI
    monkeypatch.setattr(_backend, "_EXT_PROBED", False)
    monkeypatch.setattr(_backend, "_EXT_ERR", None)
    assert _backend.extension() is fake and _backend.extension_error() is None


@pytest.mark.parametrize("archs, cap, refused", [
    ("sm_80,sm_90a", (9, 0), False), ("sm_80,sm_90a", (8, 9), False), ("sm_80,sm_90a", (10, 0), True),
    ("sm_80,sm_90a", (12, 0), True), ("sm_80", (9, 0), True), ("sm_90a,compute_90a", (10, 0), True),
    ("sm_90a,compute_90", (10, 0), False), ("unknown", (10, 0), False),
    ("sm_80, sm_90a", (9, 0), False), ("sm_80, sm_90a", (10, 0), True),  # spaces after the commas
    ("", (9, 0), False),  # no arch list: not judged
])
def test_cuda_backend_refused_on_a_gpu_the_build_does_not_cover(monkeypatch, archs, cap, refused):
    """The default build (sm_80, sm_90a) on a Blackwell GPU: the dispatcher must not pick the CUDA backend
    (every launch would fail with "no kernel image"); it says why and names the rebuild."""
    from fastdistill import _backend

    class Ext:
        CUDA_ARCHS = archs

    monkeypatch.setattr(_backend, "extension", lambda: Ext)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cap)
    why = _backend.cuda_why_not(torch.device("cuda"))
    hit = [r for r in why if "does not run on this GPU" in r]
    assert bool(hit) is refused, why
    if refused:
        assert f"TORCH_CUDA_ARCH_LIST=\"{cap[0]}.{cap[1]}\"" in hit[0], hit


def test_cuda_backend_refused_below_ampere(monkeypatch):
    from fastdistill import _backend

    class Ext:
        CUDA_ARCHS = "sm_80,sm_90a"

    monkeypatch.setattr(_backend, "extension", lambda: Ext)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    assert _backend.cuda_why_not(torch.device("cuda")) == ["GPU compute capability 7.x < 8.0 is not supported"]


def test_kd_cuda_why_not_reasons():
    x = torch.zeros(2, 4, dtype=torch.bfloat16)
    why = fastdistill.available_backends("kd_loss", x, teacher_dtype=torch.float32)["cuda"]
    assert any("teacher_logits in the student's dtype (bfloat16), got float32" in r for r in why), why
    why = fastdistill.available_backends("kd_loss", x, teacher_dtype=torch.bfloat16)["cuda"]
    assert not any("dtype" in r for r in why), why
    why = fastdistill.available_backends("kd_loss", x.float(), fp64=True)["cuda"]
    assert any("accum_dtype=float64" in r for r in why), why
    why = fastdistill.available_backends("kd_loss", x, teacher_dtype=torch.float32, topk=True)["cuda"]
    assert any("top-k teachers" in r for r in why) and not any("student's dtype" in r for r in why), why
    assert any("tensors are on cpu" in r for r in why), why
    with fastdistill.use_backend("cuda"), pytest.raises(fastdistill.BackendUnavailableError, match="student's dtype"):
        fastdistill.kd_loss(x, torch.zeros(2, 4))


@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd", "skl", "srkl", "tvd"])
def test_emulated_kd_close_teacher(kd_cuda_on_cpu, div):
    """fp32 with a teacher close to the student: loss and gradient within the tolerance rule through the CUDA
    kernels' code (tests/test_kd_close_teacher.py; the emulation's exp / log are the host's, so this checks the
    kernels' formulas — TwoSum log-ratio, expm1 forms, the double logsumexp — not the GPU's fast-math)."""
    from test_kd_close_teacher import check_close_teacher, close_teacher_case

    s, t = close_teacher_case("dense", 60.0, V=512)  # (the emulation's time grows with N·V)
    with fastdistill.use_backend("cuda"):
        check_close_teacher("dense", div, s, t, lambda x: fastdistill.kd_loss(x, t, divergence=div, reduction="none"))


@pytest.mark.parametrize("div", ["fkl", "jsd-b0.3", "skl", "tvd"])
def test_emulated_kd_large_magnitude_and_nan_rows(kd_cuda_on_cpu, div):
    """The CUDA kernels' code on rows of huge magnitude (finfo.min fills, ties at 1e12: the logsumexp's low word),
    a NaN teacher logit (the row's loss NaN, not hidden by p·log(p/m)'s 0 where p is not > 0) and, for TVD, a
    log-ratio whose TwoSum overflows (tests/test_kd.py, the same rows)."""
    from test_kd import check_large_magnitude_rows, check_nan_teacher_logit, test_kd_tvd_sign_at_overflowing_log_ratio

    with fastdistill.use_backend("cuda"):
        check_large_magnitude_rows(div)
        check_nan_teacher_logit(div)
        if div == "tvd":
            test_kd_tvd_sign_at_overflowing_log_ratio("cuda")
