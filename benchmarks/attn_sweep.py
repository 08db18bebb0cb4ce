"""Block-config sweep of fastdistill's Triton JVP attention kernels (one GPU run).

    python benchmarks/attn_sweep.py [--csv PATH] [--shapes attn-s4k,attn-s4k-causal,attn-s16k]
                                    [--max-seconds 75] [--bm 64,128] [--bn 32,64,128] [--warps 4,8]
                                    [--stages 2,3] [--all-configs] [--dry-run]

For each shape (ANCHORS.md names; bf16, BSHD contiguous, tangents on q, k and v) and each
config (BM, BN, warps, stages) it times three kernels with ``triton.testing.do_bench``:

    jvp-fused     fused JVP forward (o, to)        FASTDISTILL_ATTN_JVP=fused     FASTDISTILL_ATTN_FWD_CONFIG
    jvp-two-pass  primal pass, then tangent pass   FASTDISTILL_ATTN_JVP=two_pass  FASTDISTILL_ATTN_FWD_CONFIG
                  (the override sets both passes)
    bwd           backward of o (dq, dk, dv)       FASTDISTILL_ATTN_BWD_CONFIG

TFLOP/s: F = 4·B·H·S²·D (halved when causal); a JVP forward counts 3F, the backward 2.5F. Each
(shape, kernel) is also timed once with the built-in default config (status "ok: default").
A config whose results differ from the default config's by more than 2e-2 (max-abs relative to
max |x|) is recorded as "mismatch". A config that fails to compile or launch is recorded as
"failed: <reason>".

Pruning (``--all-configs`` turns it off), lower bounds for D = 128 bf16 on sm_90 (227 KB of
shared memory per block, 255 registers per thread), so a pruned config cannot fit:
  shared memory: (stages − 1) pipelined copies of the streamed tiles + the resident tiles;
    forward (both JVP kernels): 4 streamed BN×D tiles (k, v, tk, tv), 2 resident BM×D (q, tq);
    backward: dk/dv kernel 2 streamed BM×D (q, do) + 2 resident BN×D (k, v), dq kernel the converse.
  registers: fp32 accumulators alone per thread (warps·32 threads);
    fused: O, Ȯ (2·BM·D) + S, Ṡ (2·BM·BN); two-pass tangent pass: Ȯ + S, Ṡ;
    backward: dk, dv (2·BN·D) + P, dP (2·BM·BN), dq kernel dq (BM·D) + P, dP.
Configs run in an order that puts moderate tile-per-thread sizes first (the usual Hopper
winners), each config through all three kernels, so a run cut by ``--max-seconds`` still has
comparable coverage of every kernel; shapes run in the order given (attn-s4k first).

CSV (``--csv``, appended; default benchmarks/results/attn_sweep_<gpu>.csv): shape, kernel, BM,
BN, warps, stages, ms, tflops, status, git_sha (FASTDISTILL_GIT_SHA where there is no .git), torch, triton,
gpu. Without a GPU: a message, exit 0 with ``--dry-run`` (the
plan is printed), else exit 2.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections.abc import Callable

import torch
import triton

from fastdistill.bench.jvp_attention import STANDARD, env_vars, flops_forward

CSV_FIELDS = ("shape", "kernel", "BM", "BN", "warps", "stages", "ms", "tflops", "status", "git_sha", "torch", "triton",
              "gpu")
KERNELS = ("jvp-fused", "jvp-two-pass", "bwd")
SMEM_BYTES = 227 * 1024  # sm_90 shared memory per block (opt-in maximum)
MAX_REGS = 255
MISMATCH_TOL = 2e-2


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def prune_reason(kernel: str, BM: int, BN: int, warps: int, stages: int, D: int = 128, esize: int = 2) -> str | None:
    """Why (BM, BN, warps, stages) cannot fit ``kernel`` (lower bounds, module docstring), or None."""
    piped = max(stages - 1, 1)
    if kernel == "bwd":
        smem = max(piped * 2 * BM * D + 2 * BN * D, piped * 2 * BN * D + 2 * BM * D) * esize
        acc = max(2 * BN * D + 2 * BM * BN, BM * D + 2 * BM * BN)
    else:
        smem = (piped * 4 * BN * D + 2 * BM * D) * esize
        acc = (2 if kernel == "jvp-fused" else 1) * BM * D + 2 * BM * BN
    regs = acc / (warps * 32)
    if smem > SMEM_BYTES:
        return f"pruned: shared memory >= {smem // 1024} KB > {SMEM_BYTES // 1024} KB"
    if regs > MAX_REGS:
        return f"pruned: fp32 accumulators alone need {regs:.0f} registers per thread > {MAX_REGS}"
    return None


def plan(bms: list[int], bns: list[int], warps: list[int], stages: list[int]) -> list[tuple[int, int, int, int]]:
    """All configs, moderate tile elements per thread (BM·BN / threads ≈ 32) first, then more stages."""
    cfgs = [(m, n, w, s) for m in bms for n in bns for w in warps for s in stages]
    return sorted(cfgs, key=lambda c: (abs(math.log2(c[0] * c[1] / (c[2] * 32)) - 5), -c[3], -c[0], -c[1], c[2]))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = b.float().abs().max().clamp_min(1e-30)
    return float(((a.float() - b.float()).abs().max() / den).item())


class Sweep:
    def __init__(self, csv_path: str, max_seconds: float):
        self.csv_path = csv_path
        self.deadline = time.perf_counter() + max_seconds
        self.rows: list[dict] = []
        from fastdistill.bench.runner import git_sha

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        self.versions = (git_sha(), torch.__version__, triton.__version__, gpu)
        new = not os.path.exists(csv_path) or os.path.getsize(csv_path) == 0
        if not new:
            with open(csv_path, newline="") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != CSV_FIELDS:
                raise SystemExit(f"--csv {csv_path}: existing header {header} differs from {list(CSV_FIELDS)}")
        os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
        self.f = open(csv_path, "a", newline="")  # closed in close()
        self.w = csv.writer(self.f)
        if new:
            self.w.writerow(CSV_FIELDS)

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    def record(self, shape: str, kernel: str, cfg, ms: float | None, flops: int, status: str) -> None:
        tflops = None if ms is None else flops / (ms * 1e-3) / 1e12
        row = dict(zip(CSV_FIELDS, (shape, kernel, *cfg, ms, tflops, status, *self.versions)))
        self.rows.append(row)
        self.w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row.values()])
        self.f.flush()
        cfg_s = ",".join(str(c) for c in cfg)
        t = "" if ms is None else f"{ms:9.4f} ms {tflops:7.1f} TFLOP/s"
        print(f"{shape:<16} {kernel:<13} {cfg_s:<14} {t:<30} {status}", flush=True)

    def close(self) -> None:
        self.f.close()


def _shape_runs(shape: str, device: str, dtype: torch.dtype):
    """(kernel -> (env for the kernel, zero-arg step returning the tensors to compare, flops))."""
    import fastdistill

    B, H, S, D, causal = STANDARD[shape]
    g = torch.Generator(device=device).manual_seed(4321)
    q, k, v, tq, tk, tv, do = (torch.randn(B, S, H, D, generator=g, device=device, dtype=torch.float32).to(dtype)
                               for _ in range(7))
    F1 = flops_forward(B, H, S, S, D, causal)

    def fwd():
        with torch.no_grad():
            return fastdistill.jvp_attention(q, k, v, tq, tk, tv, causal=causal)

    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    with env_vars(FASTDISTILL_ATTN_JVP="fused", FASTDISTILL_ATTN_FWD_CONFIG=None):
        o, _ = fastdistill.jvp_attention(qg, kg, vg, tq, tk, tv, causal=causal)  # graph kept for every bwd call

    def bwd():
        return torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True)

    return {
        "jvp-fused": ({"FASTDISTILL_ATTN_JVP": "fused"}, "FASTDISTILL_ATTN_FWD_CONFIG", fwd, 3 * F1),
        "jvp-two-pass": ({"FASTDISTILL_ATTN_JVP": "two_pass"}, "FASTDISTILL_ATTN_FWD_CONFIG", fwd, 3 * F1),
        "bwd": ({}, "FASTDISTILL_ATTN_BWD_CONFIG", bwd, 5 * F1 // 2),
    }, D


def _time(fn: Callable, env: dict) -> tuple[float, tuple]:
    from triton.testing import do_bench

    with env_vars(**env):
        out = fn()  # compile + launch (raises on a bad config)
        torch.cuda.synchronize()
        ms = do_bench(fn, warmup=5, rep=25)
    return float(ms), out


def _default_cfg(kernel: str, D: int) -> tuple:
    try:
        from fastdistill.kernels import jvp_attention as K

        arch = K.device_arch(torch.empty(0, device="cuda"))
        return K.bwd_config(D, D, arch=arch) if kernel == "bwd" else K.fwd_config(D, D, True, arch=arch)
    except Exception:
        return ("default",) * 4


def run(args: argparse.Namespace, shapes: list[str], cfgs: list[tuple]) -> int:
    sweep = Sweep(args.csv, args.max_seconds)
    skipped_budget = 0
    try:
        for shape in shapes:
            if sweep.out_of_time():
                skipped_budget += len(cfgs) * len(KERNELS)
                continue
            runs, D = _shape_runs(shape, "cuda", torch.bfloat16)
            ref: dict[str, tuple] = {}
            for kernel, (env, cfg_var, fn, flops) in runs.items():
                status = "ok: default"
                if kernel == "jvp-two-pass":
                    try:
                        from fastdistill.kernels import jvp_attention as K

                        arch = K.device_arch(torch.empty(0, device="cuda"))
                        status += " (primal pass {},{},{},{})".format(*K.fwd_config(D, D, False, arch=arch))
                    except Exception:
                        pass
                try:
                    ms, ref[kernel] = _time(fn, {**env, cfg_var: None})
                    sweep.record(shape, kernel, _default_cfg(kernel, D), ms, flops, status)
                except Exception as exc:
                    sweep.record(shape, kernel, _default_cfg(kernel, D), None, flops, f"failed: {_reason(exc)}")
            for cfg in cfgs:
                for kernel, (env, cfg_var, fn, flops) in runs.items():
                    why = None if args.all_configs else prune_reason(kernel, *cfg, D=D)
                    if why:
                        sweep.record(shape, kernel, cfg, None, flops, why)
                        continue
                    if sweep.out_of_time():
                        skipped_budget += 1
                        continue
                    try:
                        ms, out = _time(fn, {**env, cfg_var: ",".join(map(str, cfg))})
                    except Exception as exc:
                        sweep.record(shape, kernel, cfg, None, flops, f"failed: {_reason(exc)}")
                        torch.cuda.empty_cache()
                        continue
                    if kernel not in ref:
                        status = "ok (unchecked: the default config failed)"
                    else:
                        err = max((_rel(a, b) for a, b in zip(out, ref[kernel]) if a is not None), default=0.0)
                        status = "ok" if err <= MISMATCH_TOL else f"mismatch: {err:.2e} vs the default config"
                    sweep.record(shape, kernel, cfg, ms, flops, status)
            del runs
            torch.cuda.empty_cache()
    finally:
        sweep.close()
    if skipped_budget:
        print(f"\n--max-seconds {args.max_seconds:g} reached: {skipped_budget} (shape, kernel, config) runs not done")
    print_best(sweep.rows)
    print(f"\nappended {len(sweep.rows)} rows to {args.csv}")
    return 0


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def print_best(rows: list[dict]) -> None:
    print("\n== best per (shape, kernel) ==")
    print(f"{'shape':<16} {'kernel':<13} {'BM,BN,w,s':<14} {'ms':>9} {'TFLOP/s':>8} {'default ms':>10} {'gain':>6}")
    keys = list(dict.fromkeys((r["shape"], r["kernel"]) for r in rows))
    for shape, kernel in keys:
        mine = [r for r in rows if (r["shape"], r["kernel"]) == (shape, kernel) and r["ms"] is not None
                and r["status"].startswith("ok")]
        default = next((r["ms"] for r in mine if r["status"].startswith("ok: default")), None)
        if not mine:
            print(f"{shape:<16} {kernel:<13} (no config ran)")
            continue
        b = min(mine, key=lambda r: r["ms"])
        cfg = ",".join(str(b[c]) for c in ("BM", "BN", "warps", "stages"))
        gain = f"{default / b['ms']:5.2f}x" if default else "-"
        dflt = f"{default:10.4f}" if default else f"{'-':>10}"
        print(f"{shape:<16} {kernel:<13} {cfg:<14} {b['ms']:9.4f} {b['tflops']:8.1f} {dflt} {gain:>6}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csv", default=None, help="CSV to append to (default: benchmarks/results/attn_sweep_<gpu>.csv)")
    ap.add_argument("--shapes", default="attn-s4k,attn-s4k-causal,attn-s16k",
                    help=f"comma-separated, run in this order; known: {', '.join(STANDARD)}")
    ap.add_argument("--max-seconds", type=float, default=75.0, help="stop starting new runs after this (default 75)")
    ap.add_argument("--bm", type=_ints, default=[64, 128])
    ap.add_argument("--bn", type=_ints, default=[32, 64, 128])
    ap.add_argument("--warps", type=_ints, default=[4, 8])
    ap.add_argument("--stages", type=_ints, default=[2, 3])
    ap.add_argument("--all-configs", action="store_true", help="no pruning")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, time nothing (exit 0)")
    args = ap.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in STANDARD]
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; known: {', '.join(STANDARD)}")
    cfgs = plan(args.bm, args.bn, args.warps, args.stages)
    print(f"attn_sweep: {len(shapes)} shapes x {len(cfgs)} configs x {len(KERNELS)} kernels, "
          f"budget {args.max_seconds:g}s")
    for cfg in cfgs:
        why = {k: None if args.all_configs else prune_reason(k, *cfg) for k in KERNELS}
        print(f"  {','.join(map(str, cfg)):<14} " + "; ".join(f"{k}: {why[k] or 'run'}" for k in KERNELS))
    if not torch.cuda.is_available():
        print("attn_sweep: no GPU (torch.cuda.is_available() is False): nothing timed", file=sys.stderr)
        return 0 if args.dry_run else 2
    if args.dry_run:
        return 0
    try:
        import fastdistill

        fastdistill.jvp_attention  # noqa: B018 (the op must exist)
        from fastdistill._backend import triton_why_not

        why = triton_why_not(torch.device("cuda"))
    except Exception as exc:
        why = [f"fastdistill.jvp_attention unavailable ({_reason(exc)})"]
    if why:
        print(f"attn_sweep: cannot run the Triton kernels: {'; '.join(why)}", file=sys.stderr)
        return 1
    if args.csv is None:
        from fastdistill.bench.runner import gpu_name, gpu_slug

        args.csv = os.path.join("benchmarks", "results", f"attn_sweep_{gpu_slug(gpu_name('cuda'))}.csv")
    print(f"gpu {torch.cuda.get_device_name()}, torch {torch.__version__}")
    return run(args, shapes, cfgs)


if __name__ == "__main__":
    sys.exit(main())
