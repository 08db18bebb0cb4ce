"""Generic benchmark runner: providers side by side, one table, one CSV with a fixed schema.

A *family* is a module ``fastdistill.bench.<module>`` (``FAMILIES``: name -> module) exposing
``cases(device, quick) -> list[Case]``.
Each ``Case`` is one (shape, mode) with zero-arg provider closures that each do one step. For
every provider the runner does: one warm-up call (JIT / autotune / ``torch.compile`` time is
excluded, and noted when it exceeds a second), the extra peak memory of one call (CUDA), the
timing, and the error check. A provider that raises at any point is reported as skipped with
its reason, never dropped. A ``fastdistill-*`` provider that raises, or whose error against the
fp64 result is not finite or far above the baseline's (``FAIL_ERR_FACTOR`` x, at least
``FAIL_ERR_FLOOR``), is marked FAILED; ``run`` then reports the failures and the CLI exits 1.
A CUDA error that poisons the context (an illegal memory access) stops the run after writing
the rows so far: every later call in the process would fail.

Timing: on CUDA ``triton.testing.do_bench`` (median, 20th and 80th percentile); on a CPU the
wall-clock median of a few ``time.perf_counter`` repeats (peak memory "n/a").
"""

from __future__ import annotations

import csv
import datetime
import importlib
import math
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastdistill._backend import interpreting

# registered families: name -> module fastdistill/bench/<module>.py ("all" on the CLI: every one)
FAMILIES = {
    "score": "score", "kd": "kd_softmax", "flkd": "fused_linear_kd", "attn": "jvp_attention", "scm": "scm_step",
}
FAIL_ERR_FACTOR, FAIL_ERR_FLOOR = 8.0, 5e-2  # a wrong result, not rounding: bf16 errors stay near 1e-2
# messages of CUDA errors after which the context is unusable (every later kernel launch fails too)
STICKY_CUDA = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
               "illegal instruction", "CUDA error: an illegal")
CPU_COMPILE_SKIP = "torch.compile rows run on CUDA only (on a CPU its compile time would dominate the run)"
HBM_BYTES_PER_S = 4.2e12  # H200 device-to-device copy, read + write counted (ANCHORS.md)
BF16_FLOPS_PER_S = 790e12  # H200 bf16 dense matmul (ANCHORS.md)
CSV_FIELDS = (
    "timestamp", "git_sha", "torch", "triton", "cuda", "gpu", "family", "shape", "mode", "provider",
    "ms", "ms_p20", "ms_p80", "gbps", "floor_frac", "speedup_vs_eager", "anchor", "speedup_vs_anchor",
    "extra_peak_mb", "rel_err", "note",
)


@dataclass
class Case:
    """One benchmark case: a shape in one mode, several providers of the same computation.

    ``providers`` maps a name to a zero-arg closure doing one full step (``mode == "full"``:
    forward + backward). ``bytes`` (or ``flops``) is the traffic (work) of the ideal fused step,
    formula stated where the case is built; the floor is ``bytes / 4.2 TB/s`` (``flops / 790
    TFLOP/s``). ``error(name)`` returns the provider's max relative error against an fp64 result.
    ``skipped`` holds providers known not to run here (name -> reason). ``reset`` is called
    before the memory measurement to drop state earlier calls left behind (e.g. ``x.grad``).
    ``baseline`` names the provider that speed-ups are relative to (default: the first whose
    name starts with "eager"); ``anchor`` the ANCHORS.md tool users run today that the issue's
    targets are stated against (liger-kernel, rCM's kernel), for the ``speedup_vs_anchor`` column.
    """

    shape: str
    mode: str
    providers: dict[str, Callable[[], object]]
    bytes: int | None = None
    flops: int | None = None
    error: Callable[[str], float] | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    reset: Callable[[], None] | None = None
    baseline: str | None = None
    anchor: str | None = None
    note: str = ""
    order: list[str] | None = None  # row order in the table/CSV (default: providers, then skipped)

    def __post_init__(self) -> None:
        if self.mode not in ("fwd", "bwd", "full"):
            raise ValueError(f"Case.mode: expected 'fwd', 'bwd' or 'full', got {self.mode!r}")
        if self.baseline is None:
            names = [n for n in (*self.providers, *self.skipped) if n.startswith("eager")]
            self.baseline = names[0] if names else None


# ----------------------------------------------------------------------------- environment
def git_sha() -> str:
    """``FASTDISTILL_GIT_SHA`` when set (a copy of the tree without .git, e.g. the lent GPU machine: the caller
    puts the commit in the command line), else the commit of the checkout this package was imported from (not
    the current directory's), ``-dirty`` when its tracked files are modified, else "unknown"."""
    env = os.environ.get("FASTDISTILL_GIT_SHA", "").strip()
    if env:
        return env
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        cmd = ["git", "-C", root, "describe", "--always", "--dirty", "--abbrev=7", "--exclude=*"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except Exception:
        return "unknown"


def gpu_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA GeForce RTX 4090' -> 'geforce-rtx-4090', 'cpu' -> 'cpu'."""
    s = re.sub(r"^nvidia\s+", "", name.strip().lower())
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "unknown"


def default_csv(device: str) -> str:
    return os.path.join("benchmarks", "results", f"{gpu_slug(gpu_name(device))}.csv")


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "none"


# ----------------------------------------------------------------------------- measuring
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


SLOW_CALL_S = 0.5  # a call at least this long (a whole training step) is timed over SLOW_REPS calls, not do_bench
SLOW_REPS = 3


def _time(fn: Callable[[], object], device: str, quick: bool, call_s: float = 0.0) -> tuple[float, float, float]:
    """(median, p20, p80) in ms. ``call_s``: the wall time of one call measured before (after the warm-up); at
    SLOW_CALL_S or more, do_bench (which makes 8+ calls: its estimate, warm-up and repeats) is replaced by
    SLOW_REPS calls timed with CUDA events (median, min, max)."""
    if device.startswith("cuda") and call_s >= SLOW_CALL_S:
        ms = []
        for _ in range(SLOW_REPS):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ms.append(a.elapsed_time(b))
        return statistics.median(ms), min(ms), max(ms)
    if device.startswith("cuda"):
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=25, rep=50 if quick else 100, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    # CPU: a few wall-clock repeats, at least ~0.2 s in all (the first call was the warm-up)
    samples: list[float] = []
    t_end = time.perf_counter() + (0.1 if quick else 0.5)
    while len(samples) < 3 or (time.perf_counter() < t_end and len(samples) < 50):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), q[1], q[7]


def _extra_peak_mb(fn: Callable[[], object], reset: Callable[[], None] | None, device: str) -> float | None:
    """Peak device memory of one call above what was allocated before it (the inputs)."""
    if not device.startswith("cuda"):
        return None
    if reset is not None:
        reset()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def _reason(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:300]}"


class DeviceLost(RuntimeError):
    """A sticky CUDA error: the process's CUDA context is unusable, so the run stops (rows so far are kept)."""


def _sticky(exc: BaseException) -> bool:
    return any(m in str(exc) for m in STICKY_CUDA)


def _measure(case: Case, name: str, fn: Callable[[], object], device: str, quick: bool) -> dict:
    """One provider of one case -> partial row (ms..., note, raised). Raises only ``DeviceLost`` (with the row
    as its argument) after a sticky CUDA error."""
    r: dict = {"provider": name, "ms": None, "ms_p20": None, "ms_p80": None, "extra_peak_mb": None,
               "rel_err": None, "note": [], "raised": False}
    if case.note:
        r["note"].append(case.note)
    try:
        t0 = time.perf_counter()
        fn()  # warm-up: JIT, autotune, torch.compile
        _sync(device)
        first = time.perf_counter() - t0
        if first > 1.0:
            r["note"].append(f"first call {first:.1f}s")
        t0 = time.perf_counter()
        r["extra_peak_mb"] = _extra_peak_mb(fn, case.reset, device)
        call_s = time.perf_counter() - t0
        if call_s >= SLOW_CALL_S and device.startswith("cuda"):
            r["note"].append(f"{SLOW_REPS} timed calls (one takes {call_s:.1f}s)")
        r["ms"], r["ms_p20"], r["ms_p80"] = _time(fn, device, quick, call_s)
    except Exception as exc:
        r["note"].append(f"skipped: {_reason(exc)}")
        r["ms"] = r["ms_p20"] = r["ms_p80"] = r["extra_peak_mb"] = None
        _raised(r, exc, device)
        return r
    if case.error is not None:
        try:
            r["rel_err"] = float(case.error(name))
        except Exception as exc:  # (it reruns the provider: a kernel fault may first show here)
            r["note"].append(f"error check failed: {_reason(exc)}")
            _raised(r, exc, device)
    return r


def _raised(r: dict, exc: BaseException, device: str) -> None:
    """Mark the row as raised; on CUDA free the cache, and raise DeviceLost(r) if the context is gone."""
    r["raised"] = True
    if device.startswith("cuda"):
        try:
            torch.cuda.empty_cache()
        except Exception as exc2:  # the context is gone: empty_cache raises the same error
            raise DeviceLost(r) from exc2
        if _sticky(exc):
            raise DeviceLost(r) from exc


def _blank(case: Case, name: str, why: str) -> dict:
    return {"provider": name, "ms": None, "ms_p20": None, "ms_p80": None, "extra_peak_mb": None, "rel_err": None,
            "raised": False, "note": ([case.note] if case.note else []) + [f"skipped: {why}"]}


def _judge(case: Case, rows: list[dict]) -> None:
    """Mark the fastdistill rows that FAILED: the provider raised (a known reason is in ``case.skipped``
    instead), or its error is not finite or more than FAIL_ERR_FACTOR x the baseline's (at least
    FAIL_ERR_FLOOR)."""
    base_err = next((r["rel_err"] for r in rows if r["provider"] == case.baseline), None)
    bound = max(FAIL_ERR_FACTOR * base_err, FAIL_ERR_FLOOR) if base_err is not None and math.isfinite(
        base_err) else FAIL_ERR_FLOOR
    for r in rows:
        if not r["provider"].startswith("fastdistill"):
            continue
        err = r["rel_err"]
        why = None
        if r["raised"]:
            why = "raised (see the reason)"
        elif err is not None and not (math.isfinite(err) and err <= bound):
            why = (f"rel_err {err:.3g} above {bound:.3g} ({FAIL_ERR_FACTOR:g}x the baseline's, at least "
                   f"{FAIL_ERR_FLOOR})")
        if why:
            r["failed"] = why
            r["note"].insert(0, f"FAILED: {why}")


def run_case(case: Case, device: str, quick: bool) -> tuple[list[dict], str | None]:
    """The case's rows, and why the run must stop after it (None: it need not): "interrupted" (KeyboardInterrupt:
    SIGINT, e.g. a ``timeout -s INT``) or "device lost" (a sticky CUDA error). The providers measured so far keep
    their rows and the others are marked skipped."""
    rows = []
    names = list(dict.fromkeys([*(case.order or []), *case.providers, *case.skipped]))
    stop = None
    for name in names:
        if stop or name in case.skipped or name not in case.providers:
            why = {"interrupted": "interrupted (time limit)", "device lost": "not run: the CUDA context was lost "
                   "earlier in this case"}.get(stop) or case.skipped.get(name, "no provider for this case")
            rows.append(_blank(case, name, why))
        else:
            try:
                rows.append(_measure(case, name, case.providers[name], device, quick))
            except KeyboardInterrupt:
                stop = "interrupted"
                rows.append(_blank(case, name, "interrupted (time limit)"))
            except DeviceLost as lost:
                stop = "device lost"
                rows.append(lost.args[0])
    _judge(case, rows)
    base = next((r["ms"] for r in rows if r["provider"] == case.baseline), None)
    anchor = next((r["ms"] for r in rows if r["provider"] == case.anchor), None)
    on_gpu = device.startswith("cuda")
    for r in rows:
        ms = r["ms"]
        r.update(shape=case.shape, mode=case.mode, gbps=None, floor_frac=None, speedup_vs_eager=None,
                 anchor=case.anchor, speedup_vs_anchor=None)
        if ms is None:
            continue
        if case.bytes is not None:
            r["gbps"] = case.bytes / (ms * 1e-3) / 1e9
            floor_ms = case.bytes / HBM_BYTES_PER_S * 1e3
        elif case.flops is not None:
            r["note"].append(f"tflops={case.flops / (ms * 1e-3) / 1e12:.1f}")
            floor_ms = case.flops / BF16_FLOPS_PER_S * 1e3
        else:
            floor_ms = None
        if floor_ms is not None and on_gpu:  # the floor is an H200 figure: meaningless on a CPU
            r["floor_frac"] = floor_ms / ms
        if base:
            r["speedup_vs_eager"] = base / ms
        if anchor:
            r["speedup_vs_anchor"] = anchor / ms
    return rows, stop


# ----------------------------------------------------------------------------- output
def _fmt(v, spec: str, na: str = "-") -> str:
    return na if v is None else format(v, spec)


def print_table(family: str, rows: list[dict], on_gpu: bool, header: bool = True) -> None:
    if header:
        head = (f"{'shape':<20} {'mode':<5} {'provider':<21} {'ms':>9} {'GB/s':>8} {'%floor':>7} "
                f"{'speedup':>8} {'x anchor':>8} {'peak MiB':>9} {'rel.err':>9}  note")
        print(f"\n== family {family} ==")
        print(head)
        print("-" * len(head))
    for r in rows:
        peak = _fmt(r["extra_peak_mb"], "9.1f", "-" if on_gpu else "n/a")
        pct = None if r["floor_frac"] is None else 100 * r["floor_frac"]
        print(f"{r['shape']:<20} {r['mode']:<5} {r['provider']:<21} {_fmt(r['ms'], '9.4f'):>9} "
              f"{_fmt(r['gbps'], '8.1f'):>8} {_fmt(pct, '6.1f') + '%' if pct is not None else '-':>7} "
              f"{_fmt(r['speedup_vs_eager'], '7.2f') + 'x' if r['speedup_vs_eager'] else '-':>8} "
              f"{_fmt(r['speedup_vs_anchor'], '7.2f') + 'x' if r['speedup_vs_anchor'] else '-':>8} "
              f"{peak:>9} {_fmt(r['rel_err'], '9.2e'):>9}  {'; '.join(r['note'])}")


def _csv_value(v, on_gpu: bool, key: str) -> str:
    if v is None:
        return "n/a" if key == "extra_peak_mb" and not on_gpu else ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def check_csv(path: str) -> None:
    """Before anything is measured: ``path`` must be a writable file whose header (if it has one) is CSV_FIELDS."""
    if os.path.isdir(path):
        raise ValueError(f"--csv {path}: is a directory; give a file path")
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != CSV_FIELDS:
            raise ValueError(f"--csv {path}: existing header {header} differs from the schema "
                             f"{list(CSV_FIELDS)}; write to another file")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a"):  # writable (a new file stays empty: the header comes with the first rows)
        pass


def append_csv(path: str, family: str, rows: list[dict], env: dict, on_gpu: bool) -> None:
    """Append rows; a new file gets the header. An existing file with another header is an error."""
    check_csv(path)
    new = os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(CSV_FIELDS)
        for r in rows:
            full = {**env, "family": family, **r, "note": "; ".join(r["note"])}
            w.writerow([_csv_value(full.get(k), on_gpu, k) for k in CSV_FIELDS])


# ----------------------------------------------------------------------------- entry point
def run(families: list[str] | None = None, quick: bool = False, out_csv: str | None = None,
        device: str | None = None) -> list[dict]:
    """Run the named families (all registered ones if empty or "all") and return the rows.

    ``device``: "cuda" if available else "cpu" when None. ``out_csv``: None -> the default
    ``benchmarks/results/<gpu-slug>.csv`` under the current directory; "" -> no CSV.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device: {device!r} is not a torch device ({exc})") from None
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"--device: expected cuda, cuda:N or cpu, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is visible to torch {torch.__version__} here")
        if dev.index is not None:
            if dev.index >= torch.cuda.device_count():
                raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
            torch.cuda.set_device(dev)  # memory stats, synchronize and do_bench use the current device
    on_gpu = device.startswith("cuda")
    families = list(FAMILIES) if not families or "all" in families else list(dict.fromkeys(families))
    for fam in families:
        if fam not in FAMILIES:
            raise ValueError(f"family: unknown benchmark family {fam!r}; registered: {', '.join(FAMILIES)}")
    if out_csv is None:
        out_csv = default_csv(device)
    if out_csv:
        check_csv(out_csv)
    interp = interpreting()  # as Triton reads it ("false" / "off" are off)
    env = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda or "none",
        "gpu": gpu_name(device),
    }
    print(f"fastdistill bench on {env['gpu']} ({device}); torch {env['torch']}, triton {env['triton']}, "
          f"cuda {env['cuda']}, git {env['git_sha']}{', quick' if quick else ''}"
          f"{'; TRITON_INTERPRET=1: Triton rows time the interpreter' if interp else ''}")
    if on_gpu and "H200" not in env["gpu"]:
        print(f"note: %floor uses H200 figures ({HBM_BYTES_PER_S / 1e12:.1f} TB/s, {BF16_FLOPS_PER_S / 1e12:.0f} "
              f"TFLOP/s), not this GPU's")
    all_rows = []
    for fam in families:
        mod = importlib.import_module(f"fastdistill.bench.{FAMILIES[fam]}")
        print_table(fam, [], on_gpu)
        # rows are printed and appended case by case: a run cut short (a timeout) keeps what it measured
        for case in mod.cases(device, quick):
            if interp:
                case.note = "; ".join(filter(None, [case.note, "triton-interpreter"]))
            rows, stop = run_case(case, device, quick)
            print_table(fam, rows, on_gpu, header=False)
            if out_csv:
                append_csv(out_csv, fam, rows, env, on_gpu)
            all_rows.extend({**env, "family": fam, **r} for r in rows)
            if stop == "interrupted":  # the rows measured so far are kept; the run stops here
                print(f"\ninterrupted: appended {len(all_rows)} rows to {out_csv or '(no CSV)'}")
                raise KeyboardInterrupt
            if stop:
                _report_failed(all_rows)
                print(f"\nSTOPPED: a CUDA error left the context unusable (see the last row); appended "
                      f"{len(all_rows)} rows to {out_csv or '(no CSV)'}")
                raise DeviceLost(all_rows)
    if out_csv:
        print(f"\nappended {len(all_rows)} rows to {out_csv}")
    _report_failed(all_rows)
    return all_rows


def _report_failed(rows: list[dict]) -> None:
    failed = [r for r in rows if r.get("failed")]
    if failed:
        print(f"\nFAILED: {len(failed)} fastdistill row(s):")
        for r in failed:
            print(f"  {r['family']} {r['shape']} {r['mode']} {r['provider']}: {r['failed']}")
