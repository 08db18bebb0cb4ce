"""The bench runner end to end on the CPU at its small shapes (the flkd family: a few seconds)."""

from __future__ import annotations

import csv

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
