"""The bench runner end to end on the CPU at its small shapes (the flkd family: a few seconds)."""

from __future__ import annotations

import csv

import pytest

import fastdistill
from fastdistill.bench.runner import CSV_FIELDS, run


def test_flkd_family_runs_and_checks_errors(tmp_path):
    out = tmp_path / "cpu.csv"
    with fastdistill.use_backend("reference"):  # (the Triton interpreter would time ~100x slower)
        rows = run(["flkd"], quick=True, out_csv=str(out), device="cpu")
    by = {(r["shape"], r["provider"]): r for r in rows}
    for div in ("fkl", "jsd"):
        shape = f"flkd-n96-h64-v4099/{div}"
        for prov in ("fastdistill", "eager"):
            r = by[(shape, prov)]
            assert r["ms"] is not None and r["rel_err"] is not None, r
        # fp32 logits: only the bf16 storage of the gradient (2^-8) remains; eager rounds logits to bf16 too
        assert by[(shape, "fastdistill")]["rel_err"] < 4e-3
        assert "skipped" in "; ".join(by[(shape, "liger")]["note"]) or by[(shape, "liger")]["ms"] is not None
    with open(out, newline="") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == CSV_FIELDS and len(table) == 1 + len(rows)


def test_scm_family_times_both_attention_paths():
    with fastdistill.use_backend("reference"):
        rows = run(["scm"], quick=True, out_csv="", device="cpu")
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"fastdistill", "math-sdpa"}
    for r in rows:
        assert r["shape"] == "scm-toy" and r["ms"] is not None and r["ms"] > 0, r
    assert by["fastdistill"]["speedup_vs_eager"] is not None  # relative to math-sdpa


def test_interrupted_case_keeps_the_rows_measured(tmp_path, monkeypatch, capsys):
    """A run cut short by SIGINT (gpu_check.sh's ``timeout -s INT``) keeps the rows of the providers measured so far:
    the case is appended with the rest marked skipped, then the interrupt propagates (before: the whole case was
    lost, its rows being written only once every provider had run)."""
    import types

    import pytest

    from fastdistill.bench import runner

    calls = []

    def slow():  # its second call (the memory measurement after the warm-up): the time limit hits
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    case = runner.Case(shape="toy", mode="fwd", providers={"eager": lambda: None, "fastdistill": slow})
    monkeypatch.setitem(runner.FAMILIES, "toy", "toy_family_for_test")
    monkeypatch.setattr(runner.importlib, "import_module",
                        lambda name: types.SimpleNamespace(cases=lambda device, quick: [case, case]))
    out = tmp_path / "rows.csv"
    with pytest.raises(KeyboardInterrupt):
        run(["toy"], quick=True, out_csv=str(out), device="cpu")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["provider"] for r in rows] == ["eager", "fastdistill"]
    assert rows[0]["ms"] and not rows[1]["ms"] and "interrupted" in rows[1]["note"]


def test_git_sha_from_the_environment(monkeypatch):
    """The lent GPU machine gets a copy of the tree without .git: the commit comes from FASTDISTILL_GIT_SHA
    (before: every row of its CSV said "unknown")."""
    from fastdistill.bench import runner

    monkeypatch.setenv("FASTDISTILL_GIT_SHA", "abc1234-dirty")
    assert runner.git_sha() == "abc1234-dirty"


def test_flkd_liger_call_matches_liger_085(monkeypatch):
    """liger-kernel 0.8.5's LigerFusedLinearJSD.forward has a required ``shift_labels`` argument (no default):
    calling it with four tensors raised TypeError on the GPU, and the runner recorded both liger rows as skipped.
    A stand-in with that signature (liger itself is a GPU-only benchmark extra)."""
    import importlib.util
    import sys
    import types

    import torch

    from fastdistill.bench import fused_linear_kd as flkd

    calls = []

    class LigerFusedLinearJSD(torch.nn.Module):  # 0.8.5: __init__(jsd_beta=0.5, ignore_index=-100, temperature=1.0)
        def __init__(self, jsd_beta=0.5, ignore_index=-100, temperature=1.0):
            super().__init__()

        def forward(self, student_input, student_weight, teacher_input, teacher_weight, shift_labels):
            calls.append(shift_labels)
            return student_input.sum()

    mod = types.ModuleType("liger_kernel.transformers.fused_linear_jsd")
    mod.LigerFusedLinearJSD = LigerFusedLinearJSD
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: object() if n == "liger_kernel" else real_find_spec(n, *a))
    monkeypatch.setattr("fastdistill._backend.triton_why_not", lambda device: [])
    fn, why = flkd._liger("cpu")
    assert why is None
    x = torch.ones(2, 3)
    fn("jsd", x, x, x, x)
    assert calls == [None]


def test_attn_sweep_rows_carry_commit_and_versions(tmp_path, monkeypatch):
    """benchmarks/attn_sweep.py's CSV records the commit, torch, Triton and the GPU on every row (before: none,
    so a committed sweep table could not say which code and toolchain chose the defaults)."""
    import pathlib
    import sys

    import torch
    import triton

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    monkeypatch.setenv("FASTDISTILL_GIT_SHA", "abc1234")
    sys.modules.pop("attn_sweep", None)
    import attn_sweep

    out = tmp_path / "sweep.csv"
    sweep = attn_sweep.Sweep(str(out), max_seconds=10)
    sweep.record("attn-s4k", "jvp-fused", (64, 32, 4, 2), 1.5, 10**12, "ok")
    sweep.f.close()
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["git_sha"] == "abc1234" and rows[0]["torch"] == torch.__version__
    assert rows[0]["triton"] == triton.__version__ and rows[0]["gpu"]


def _toy_family(monkeypatch, cases):
    import types

    from fastdistill.bench import runner

    monkeypatch.setitem(runner.FAMILIES, "toy", "toy_family_for_test")
    monkeypatch.setattr(runner.importlib, "import_module",
                        lambda name: types.SimpleNamespace(cases=lambda device, quick: cases))
    return runner


def test_failed_fastdistill_rows_fail_the_run(tmp_path, monkeypatch, capsys):
    """A fastdistill provider that raises, or whose error is far above the baseline's, is FAILED and the CLI exits 1
    (before: a "skipped" row and exit 0, so gpu_check.sh reported the step ok); other providers only skip."""
    from fastdistill.__main__ import main
    from fastdistill.bench.runner import Case

    def boom():
        raise RuntimeError("kernel compile failed")

    errs = {"eager": 1e-3, "fastdistill-good": 2e-3, "fastdistill-wrong": 0.9, "anchor-tool": 1e-3}
    # fastdistill-nocheck: its error check raises (KeyError), e.g. an output of the wrong shape
    ok = Case(shape="toy", mode="fwd", providers={n: (lambda: None) for n in [*errs, "fastdistill-nocheck"]},
              error=lambda n: errs[n], anchor="anchor-tool")
    bad = Case(shape="toy2", mode="fwd", providers={"eager": lambda: None, "fastdistill-x": boom,
                                                   "other-tool": boom})
    _toy_family(monkeypatch, [ok, bad])
    out = tmp_path / "rows.csv"
    assert main(["bench", "--family", "toy", "--csv", str(out), "--device", "cpu"]) == 1
    text = capsys.readouterr().out
    assert "FAILED: 3 fastdistill row(s)" in text, text
    with open(out, newline="") as f:
        rows = {(r["shape"], r["provider"]): r for r in csv.DictReader(f)}
    assert rows[("toy", "fastdistill-wrong")]["note"].startswith("FAILED: rel_err 0.9 above 0.05")
    assert "FAILED" not in rows[("toy", "fastdistill-good")]["note"]
    assert rows[("toy", "fastdistill-nocheck")]["note"].startswith("FAILED: raised")
    assert rows[("toy2", "fastdistill-x")]["note"].startswith("FAILED: raised")
    assert "FAILED" not in rows[("toy2", "other-tool")]["note"] and "skipped" in rows[("toy2", "other-tool")]["note"]
    good = rows[("toy", "fastdistill-good")]
    assert good["anchor"] == "anchor-tool" and float(good["speedup_vs_anchor"]) > 0
    # all rows right: exit 0
    _toy_family(monkeypatch, [Case(shape="t", mode="fwd", providers={"eager": lambda: None,
                                                                     "fastdistill-a": lambda: None})])
    assert main(["bench", "--family", "toy", "--no-csv", "--device", "cpu"]) == 0


def test_bad_csv_and_device_refused_before_measuring(tmp_path, monkeypatch, capsys):
    """A directory as --csv, or --device cuda without CUDA: exit 2 with a message before any provider runs (before:
    a traceback after the first case had been measured, or an AssertionError from torch)."""
    import torch

    from fastdistill.__main__ import main
    from fastdistill.bench.runner import Case

    calls = []
    _toy_family(monkeypatch, [Case(shape="t", mode="fwd", providers={"eager": lambda: calls.append(1)})])
    assert main(["bench", "--family", "toy", "--csv", str(tmp_path), "--device", "cpu"]) == 2
    assert "is a directory" in capsys.readouterr().err and not calls
    if not torch.cuda.is_available():
        assert main(["bench", "--family", "toy", "--no-csv", "--device", "cuda"]) == 2
        assert "--device cuda: no CUDA device" in capsys.readouterr().err and not calls
    assert main(["bench", "--family", "toy", "--no-csv", "--device", "tpu:0"]) == 2
    assert "--device" in capsys.readouterr().err and not calls


def test_sticky_cuda_error_stops_the_case(monkeypatch):
    """An illegal memory access leaves the CUDA context unusable: the case's later providers are marked not run
    and the run stops (before: each later call failed too, and torch.cuda.empty_cache() raised out of _measure,
    losing the family's remaining rows)."""
    import torch

    from fastdistill.bench import runner

    def crash():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    ran = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    case = runner.Case(shape="t", mode="fwd", providers={"fastdistill-x": crash, "eager": lambda: ran.append(1)},
                       order=["fastdistill-x", "eager"])
    rows, stop = runner.run_case(case, "cuda", quick=True)
    assert stop == "device lost" and not ran
    assert rows[0]["note"][0].startswith("FAILED") and "illegal memory access" in "; ".join(rows[0]["note"])
    assert "the CUDA context was lost" in "; ".join(rows[1]["note"])


def test_git_sha_is_the_packages_checkout(tmp_path, monkeypatch):
    """Run from another directory (another repository, or none), the sha is that of the checkout fastdistill was
    imported from (before: the current directory's repository, or "unknown")."""
    import os
    import subprocess

    import pytest

    from fastdistill.bench import runner

    root = os.path.dirname(os.path.dirname(os.path.abspath(runner.__file__)))
    head = subprocess.run(["git", "-C", root, "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("fastdistill is not imported from a git checkout")
    monkeypatch.delenv("FASTDISTILL_GIT_SHA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert runner.git_sha().split("-")[0] == head.stdout.strip()


def test_derived_columns_on_a_gpu(monkeypatch):
    """The ratios the GPU table reports, from fixed timings (runner._measure replaced; no GPU needed): GB/s and the
    fraction of the 4.2 TB/s floor for a bytes case, TFLOP/s and the fraction of 790 TFLOP/s for a FLOP case, the
    speed-ups over the baseline and the anchor, and the FAILED bound (8x the baseline's error, at least 0.05)."""
    from fastdistill.bench import runner

    ms = {"eager": 4.0, "fastdistill": 1.25, "liger": 2.5, "fastdistill-bad": 2.0}
    err = {"eager": 1e-2, "fastdistill": 7.9e-2, "liger": 1e-3, "fastdistill-bad": 8.1e-2}

    def fake(case, name, fn, device, quick):
        return {"provider": name, "ms": ms[name], "ms_p20": ms[name], "ms_p80": ms[name], "extra_peak_mb": 1.0,
                "rel_err": err[name], "note": [], "raised": False}

    monkeypatch.setattr(runner, "_measure", fake)
    provs = {n: (lambda: None) for n in ms}
    rows, stop = runner.run_case(runner.Case(shape="b", mode="full", providers=provs, bytes=int(4.2e9),
                                             anchor="liger"), "cuda", quick=True)
    by = {r["provider"]: r for r in rows}
    assert stop is None
    f = by["fastdistill"]
    assert f["gbps"] == pytest.approx(4.2e9 / 1.25e-3 / 1e9) and f["floor_frac"] == pytest.approx(1.0 / 1.25)
    assert f["speedup_vs_eager"] == pytest.approx(4.0 / 1.25) and f["speedup_vs_anchor"] == pytest.approx(2.5 / 1.25)
    assert by["eager"]["speedup_vs_eager"] == pytest.approx(1.0) and by["liger"]["floor_frac"] == pytest.approx(0.4)
    assert "failed" not in f and by["fastdistill-bad"]["failed"].startswith("rel_err 0.081 above 0.08")
    assert "failed" not in by["liger"]  # only fastdistill rows are judged
    rows, _ = runner.run_case(runner.Case(shape="f", mode="fwd", providers=provs, flops=int(790e9)), "cuda",
                              quick=True)
    by = {r["provider"]: r for r in rows}
    f = by["fastdistill"]
    assert f["gbps"] is None and f["floor_frac"] == pytest.approx(1.0 / 1.25) and "tflops=632.0" in f["note"]
    assert f["speedup_vs_anchor"] is None  # no anchor named
    rows, _ = runner.run_case(runner.Case(shape="c", mode="fwd", providers=provs, bytes=100), "cpu", quick=True)
    assert all(r["floor_frac"] is None for r in rows)  # an H200 figure: not reported for a CPU


@pytest.mark.parametrize("value,noted", [("1", True), ("false", False)])
def test_interpreter_note_reads_triton_interpret_as_triton(monkeypatch, value, noted):
    """Rows get the "triton-interpreter" note when Triton is interpreting, read as Triton reads TRITON_INTERPRET
    (before: "false" counted as on)."""
    from fastdistill.bench.runner import Case

    runner = _toy_family(monkeypatch, [Case(shape="t", mode="fwd", providers={"eager": lambda: None})])
    monkeypatch.setenv("TRITON_INTERPRET", value)
    rows = runner.run(["toy"], quick=True, out_csv="", device="cpu")
    assert ("triton-interpreter" in rows[0]["note"]) == noted
