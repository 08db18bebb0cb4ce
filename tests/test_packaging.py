"""The built wheel (not the editable install the tests run from) holds every subpackage of fastdistill."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_package(tmp_path):
    """A regular install (pip install ., a wheel) must import fastdistill.distributed / .integrations and the
    kernels (mapped from kernels/): before, setup.py listed its packages by hand and left two out."""
    src = tmp_path / "src"  # a clean copy: a build/ left in the checkout would leak its files into the wheel
    for name in ("fastdistill", "kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    env = dict(os.environ, FASTDISTILL_SKIP_CUDA_BUILD="1")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                        str(tmp_path), str(src)], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0 and "No module named pip" in r.stderr:
        pytest.skip("pip is not available")
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("fastdistill-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "fastdistill").rglob("__init__.py")}
    packages.add("fastdistill/kernels")
    for pkg in sorted(packages):
        assert f"{pkg}/__init__.py" in names, f"{pkg} is missing from the wheel"
    assert "fastdistill/kernels/jvp_attention.py" in names


def test_checkout_imported_from_its_root_finds_its_kernels():
    """A checkout imported from its root without the editable install's mapping (``python -m fastdistill`` in the
    repo after a non-editable ``pip install .``: the source ``fastdistill/`` shadows the installed one) finds
    ``kernels/`` as ``fastdistill.kernels``. Before: "No module named 'fastdistill.kernels'" on every Triton call."""
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in str(f)]\n"
        "sys.path_hooks[:] = [h for h in sys.path_hooks if '__editable__' not in str(h)]\n"
        "sys.path_importer_cache.clear()\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import fastdistill, fastdistill.kernels, importlib\n"
        "print(fastdistill.__file__); print(fastdistill.kernels.__file__)\n"
        "importlib.import_module('fastdistill.kernels.kd_softmax')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    pkg, kern = r.stdout.split()
    assert Path(pkg) == ROOT / "fastdistill" / "__init__.py"
    assert Path(kern) == ROOT / "kernels" / "__init__.py"


def test_sdist_carries_the_cuda_sources(tmp_path):
    """The sdist holds csrc/ (setup.py compiles it where torch has CUDA), docs/ (cited by error messages) and the
    tests. Before: no MANIFEST.in, and a wheel built from the sdist with a CUDA torch failed in os.listdir."""
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env=dict(os.environ, FASTDISTILL_SKIP_CUDA_BUILD="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    import tarfile

    (sdist,) = tmp_path.glob("fastdistill-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for f in ("csrc/kd_softmax.cu", "csrc/score.cu", "csrc/bindings.cpp", "csrc/fd_common.cuh",
              "kernels/kd_softmax.py", "docs/kd_ops.md", "tests/conftest.py", "MANIFEST.in"):
        assert f in names, f"{f} is missing from the sdist"
    assert not any("__pycache__" in n or n.endswith(".so") for n in names)


def test_another_checkout_imported_from_its_root_uses_its_own_kernels(tmp_path):
    """A second checkout imported from its root, in a venv whose editable install maps another checkout: its
    fastdistill/ and its kernels/ go together (before: the other checkout's kernels were kept, a mismatched pair;
    found by a review)."""
    clone = tmp_path / "clone"
    for name in ("fastdistill", "kernels"):
        shutil.copytree(ROOT / name, clone / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    code = "import fastdistill, fastdistill.kernels; print(fastdistill.__file__); print(fastdistill.kernels.__file__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=clone)
    assert r.returncode == 0, r.stderr[-2000:]
    pkg, kern = (Path(x).resolve() for x in r.stdout.split())
    assert pkg == (clone / "fastdistill" / "__init__.py").resolve()
    assert kern == (clone / "kernels" / "__init__.py").resolve()


def test_imports_on_the_oldest_supported_torch_compiler_api():
    """pyproject.toml allows torch >= 2.6, whose ``torch.compiler.disable(fn=None, recursive=True)`` takes no
    ``reason=`` (added in 2.8): with that signature in place, fastdistill and every op module import and a
    compiler.disable'd path still runs (before: ``import fastdistill`` raised a TypeError from a decorator applied
    at import time; found by a review)."""
    code = (
        "import torch, torch.compiler\n"
        "_orig = torch.compiler.disable\n"
        "def disable(fn=None, recursive=True):\n"
        "    return _orig(fn, recursive=recursive)\n"
        "torch.compiler.disable = disable\n"
        "import fastdistill as fd, fastdistill.integrations, fastdistill.distributed\n"
        "import torch.autograd.forward_ad as fwAD\n"
        "q, k, v, t = (torch.randn(1, 3, 1, 8) for _ in range(4))\n"
        "with fd.use_backend('reference'), fwAD.dual_level():\n"
        "    o = fd.jvp_attention(fwAD.make_dual(q, t), k, v)[0]\n"
        "    assert fwAD.unpack_dual(o).tangent is not None\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
