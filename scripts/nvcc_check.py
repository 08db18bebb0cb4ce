"""Compile-check of the CUDA sources in csrc/ with nvcc, for each architecture of the extension's default
TORCH_CUDA_ARCH_LIST (sm_80, sm_90a), with the flags of the real build (setup.py's nvcc arguments and the defines
torch's BuildExtension adds to every nvcc command line). Fails when nvcc fails or warns, when ptxas compiles another
number of kernels than a source defines (score.cu: N_KERNELS, kd_softmax.cu: N_KD_KERNELS), or when a kernel spills
registers or has a local-memory stack frame. CI (.ci/run) runs it after the test command; the parser is unit-tested in
tests/test_csrc_build.py.

    python scripts/nvcc_check.py [--arch 80 --arch 90a] [SOURCE ...]   (default: every csrc/*.cu and *.cpp)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
# what torch's BuildExtension adds to every nvcc command line of the real build
BUILD_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                 "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
N_KERNELS = 2 * 4 * 3 * 2 + 1  # score.cu: (stats, grad) x ops x dtypes x (vector, scalar) + finalize
# kd_softmax.cu: dtypes x (vector, scalar) x (stats: fkl/rkl/other, div: 4, grad: 6) + reduce
N_KD_KERNELS = 3 * 2 * (3 + 4 + 6) + 1
EXPECTED = {"score.cu": N_KERNELS, "kd_softmax.cu": N_KD_KERNELS}  # kernels per architecture; .cpp files: none


def ptxas_problems(report: str, arch: str, n_kernels: int) -> list[str]:
    """What is wrong in nvcc's ``-Xptxas -v`` output for ``arch`` (e.g. "90a"): another kernel count than
    ``n_kernels``, and every kernel with a local-memory stack frame or spill stores / loads. Empty: all well."""
    blocks = re.split(r"ptxas info\s*: Compiling entry function '", report)[1:]
    blocks = [b for b in blocks if f"for 'sm_{arch}'" in b.split("\n", 1)[0]]
    out = [] if len(blocks) == n_kernels else [f"sm_{arch}: expected {n_kernels} kernels, ptxas compiled {len(blocks)}"]
    for b in blocks:
        name = b.split("'", 1)[0]
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", b)
        if m is None:
            out.append(f"sm_{arch}: no resource line for {name}")
        elif m.groups() != ("0", "0", "0"):
            out.append(f"sm_{arch}: {name}: stack frame / spill stores / spill loads {'/'.join(m.groups())} bytes")
    return out


def nvcc_command(src: Path, arch: str, obj: Path) -> list[str]:
    """setup.py's nvcc arguments and macros, BuildExtension's defines, the include paths of bindings.cpp."""
    try:
        import pybind11

        pyb = [f"-I{pybind11.get_include()}"]
    except ImportError:  # (bindings.cpp then fails to compile, and says why)
        pyb = []
    return ["nvcc", "-std=c++17", "-O3", "--use_fast_math", "-lineinfo", *BUILD_DEFINES, "-Xcompiler", "-fPIC",
            f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", f"-I{CSRC}", *pyb,
            f"-I{sysconfig.get_paths()['include']}", "-DFD_EXT_ABI=1", f'-DFD_CUDA_ARCHS="sm_{arch}"',
            '-DFD_BUILD_TORCH="ci"', "-c", str(src), "-o", str(obj)]


def check(src: Path, arch: str, tmp: Path) -> list[str]:
    obj = tmp / f"sm_{arch}-{src.name}.o"
    r = subprocess.run(nvcc_command(src, arch, obj), capture_output=True, text=True, timeout=1200)
    report = r.stdout + r.stderr
    if r.returncode != 0 or not obj.is_file() or obj.stat().st_size == 0:
        return [f"sm_{arch} {src.name}: nvcc failed (exit status {r.returncode}):\n{report[-4000:]}"]
    bad = [f"sm_{arch} {src.name}: {line}" for line in report.splitlines() if "warning" in line.lower()]
    bad += [f"{src.name} {p}" for p in ptxas_problems(report, arch, EXPECTED.get(src.name, 0))]
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", help="80, 90a, ... (repeatable; default: 80 and 90a)")
    ap.add_argument("sources", nargs="*", type=Path)
    a = ap.parse_args(argv)
    archs = a.arch or ["80", "90a"]
    sources = a.sources or sorted([*CSRC.glob("*.cu"), *CSRC.glob("*.cpp")])
    bad = []
    with tempfile.TemporaryDirectory() as d:
        for arch in archs:
            for src in sources:
                problems = check(src, arch, Path(d))
                print(f"sm_{arch} {src.name}: " + ("FAILED" if problems else
                                                   f"{EXPECTED.get(src.name, 0)} kernels, no spills, no stack frame"),
                      flush=True)
                bad += problems
    for p in bad:
        print(p, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
