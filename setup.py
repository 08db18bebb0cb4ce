"""Build: the Python package always; the CUDA extension ``fastdistill._C`` when a CUDA toolkit
and a CUDA build of torch are present (or when forced).

Switches (documented in README.md, "Environment variables"):
  FASTDISTILL_FORCE_CUDA_BUILD=1  build the extension even without a CUDA torch / GPU (needs nvcc)
  FASTDISTILL_SKIP_CUDA_BUILD=1   never build it
  TORCH_CUDA_ARCH_LIST            e.g. "8.0;9.0a" (the default: Ampere and Hopper with wgmma)
  MAX_JOBS                        parallel nvcc jobs (default: from cores and free RAM)

The extension is torch-free (raw device pointers through pybind11, cudart linked statically),
so it does not depend on the torch ABI. Build it with ``pip install --no-build-isolation -e .``
so that setup.py sees the installed torch (an isolated build would not).
"""

import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_ABI = 1  # must match fastdistill/_backend.py EXT_ABI


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _cuda_home():
    """torch's CUDA_HOME where it holds the toolkit; a CPU build of torch leaves that None, and a CUDA build guesses
    it as two levels above nvcc on PATH (``/usr/local`` for a wrapper script in /usr/local/bin, without the CUDA
    headers): then the toolkit from $CUDA_HOME / $CUDA_PATH, /usr/local/cuda, or the real nvcc on PATH."""
    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    for home in (cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                 os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None


def _cuda_decision():
    if _flag("FASTDISTILL_SKIP_CUDA_BUILD"):
        return False, "FASTDISTILL_SKIP_CUDA_BUILD=1"
    force = _flag("FASTDISTILL_FORCE_CUDA_BUILD")
    try:
        import torch
    except Exception as exc:
        if force:
            raise RuntimeError(f"FASTDISTILL_FORCE_CUDA_BUILD=1 but torch is not importable: {exc}") from exc
        return False, "torch is not importable in the build environment (use --no-build-isolation)"
    if _cuda_home() is None:
        if force:
            raise RuntimeError("FASTDISTILL_FORCE_CUDA_BUILD=1 but no CUDA toolkit (nvcc / CUDA_HOME) was found")
        return False, "no CUDA toolkit found"
    if force:
        return True, "forced"
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}"


def _arch_flags():
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    flags, names = [], []
    for a in re.split(r"[;\s,]+", archs.strip()):
        if not a:
            continue
        ptx = a.endswith("+PTX")
        a = a.removesuffix("+PTX")
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", a)
        if not m:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot parse {a!r}")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        names.append(f"sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
            names.append(f"compute_{num}")
    return flags, ",".join(names)


def _max_jobs():
    if "MAX_JOBS" in os.environ:
        return
    cores = os.cpu_count() or 1
    try:
        free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        free_gb = 8.0
    os.environ["MAX_JOBS"] = str(max(1, min(cores, int(free_gb // 3))))  # ~3 GB per nvcc job


def _extensions():
    build, why = _cuda_decision()
    print(f"fastdistill: CUDA extension {'will be built' if build else 'skipped'} ({why})", file=sys.stderr)
    if not build:
        return [], {}
    import pybind11
    import torch
    from setuptools import Extension
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension

    CUDA_HOME = cpp_extension.CUDA_HOME = _cuda_home()  # BuildExtension finds nvcc through this global
    _max_jobs()
    gencode, arch_names = _arch_flags()
    macros = [("FD_EXT_ABI", str(EXT_ABI)), ("FD_CUDA_ARCHS", f'"{arch_names}"'),
              ("FD_BUILD_TORCH", f'"{torch.__version__}"')]
    csrc = os.path.join(ROOT, "csrc")
    sources = sorted(os.path.join("csrc", f) for f in os.listdir(csrc) if f.endswith((".cu", ".cpp"))) \
        if os.path.isdir(csrc) else []
    if not sources:
        raise RuntimeError(f"fastdistill: the CUDA extension is to be built ({why}) but {csrc} holds no CUDA sources "
                           "(an sdist made without MANIFEST.in?); build from a checkout, or set "
                           "FASTDISTILL_SKIP_CUDA_BUILD=1 for the Triton / reference backends only")
    ext = Extension(
        "fastdistill._C",
        sources=sources,
        include_dirs=[pybind11.get_include(), os.path.join(ROOT, "csrc"), os.path.join(CUDA_HOME, "include")],
        library_dirs=[os.path.join(CUDA_HOME, "lib64"), os.path.join(CUDA_HOME, "lib")],
        libraries=["cudart_static", "rt", "pthread", "dl"],
        define_macros=macros,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", *gencode]},
        language="c++",
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=[*find_packages(include=["fastdistill", "fastdistill.*"]), "fastdistill.kernels"],
    package_dir={"fastdistill.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
