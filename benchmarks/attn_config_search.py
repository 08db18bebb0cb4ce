"""Register-level search of the JVP-attention block configurations for one GPU architecture, without a GPU.

For every kernel (fused JVP forward, plain forward, the two_pass tangent pass, dk/dv, dq) and head-dim
bucket, compiles a grid of (BLOCK_M, BLOCK_N, warps, stages) ahead of time (bf16, every tangent present,
causal: the worst case) and keeps the configurations that neither spill registers nor exceed the shared
memory limit. Among those it proposes the one with the most work per program (BM·BN, then BM, then fewer
warps): the only ranking available without timings. The GPU sweep (benchmarks/attn_sweep.py) ranks by
time where a GPU of that architecture is lent; until then these are the defaults.

    python benchmarks/attn_config_search.py --arch 80 [--csv out.csv]

Shared memory limit: 99 KiB per block for --arch 80..89 (sm_86 / sm_89 allow 99 KiB; sm_80 allows 163 KiB,
so one table serves Ampere and Ada), 227 KiB for --arch 90.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import triton

sys.path.insert(0, os.path.dirname(__file__))
from fastdistill.kernels import jvp_attention as A  # noqa: E402
from triton_codegen import SMEM_LIMIT as SMEM  # noqa: E402
from triton_codegen import attn_kernel, compile_report, isolated, warm  # noqa: E402

# worst-case (Dqk, Dv) per bucket: the table entry must not spill for any dims the bucket serves
BUCKETS = {32: [(32, 32)], 64: [(64, 64)], 128: [(128, 128), (96, 96), (128, 64), (64, 128)], 256: [(256, 256)]}
GRID = {
    "jvp": dict(BM=(32, 64, 128), BN=(16, 32, 64), W=(4, 8), S=(2,)),
    "plain": dict(BM=(16, 32, 64, 128), BN=(16, 32, 64), W=(4, 8), S=(1, 2)),
    "2pass": dict(BM=(16, 32, 64, 128), BN=(16, 32, 64), W=(4, 8), S=(1, 2)),
    "dkdv": dict(BM=(16, 32, 64), BN=(32, 64, 128), W=(4, 8), S=(2,)),
    "dq": dict(BM=(32, 64, 128), BN=(16, 32, 64), W=(4, 8), S=(2,)),
}
# fp32 inputs (float64 logits on mma.f64, the other products as fp32 FMAs): only small tiles can fit
GRID_FP32 = dict(BM=(16, 32), BN=(16, 32), W=(2, 4, 8), S=(1, 2))


def _job(args):
    kind, dt, dqk, dv, cfg, arch, kmask = args
    _, kern, sig, ce, nw, ns = attn_kernel(kind, dt, dqk, dv, cfg, kmask, A.centred(arch))
    try:  # in a forked child: an LLVM abort inside Triton fails this configuration, not the search
        r = isolated(compile_report, kern, sig, ce, nw, arch, ns)
    except Exception as e:  # out of resources at compile time, a compiler abort and the like: not a candidate
        return args, {"error": str(e).splitlines()[-1][:120]}
    return args, r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=80)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--kinds", default=",".join(GRID))
    ap.add_argument("--buckets", default=",".join(map(str, BUCKETS)))
    ap.add_argument("--csv", default=None)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--kmask", action="store_true", help="the key-mask variants (the dispatcher's _KM_* entries)")
    a = ap.parse_args(argv)
    limit = SMEM[80 if A._small_smem(a.arch) else 90]
    jobs = []
    for kind in a.kinds.split(","):
        g = GRID_FP32 if a.dtype == "fp32" else GRID[kind]
        for bucket in map(int, a.buckets.split(",")):
            if kind == "jvp" and (bucket > 128 or a.dtype == "fp32"):
                continue  # above head dim 128, and for fp32 inputs, the tangent runs as two_pass
            for dqk, dv in BUCKETS[bucket]:
                for cfg in itertools.product(g["BM"], g["BN"], g["W"], g["S"]):
                    jobs.append((kind, a.dtype, dqk, dv, cfg, a.arch, a.kmask))
    rows = []
    warm(a.arch)
    with ProcessPoolExecutor(max(1, a.jobs), mp_context=multiprocessing.get_context("fork")) as ex:
        for (kind, dt, dqk, dv, cfg, arch, _), r in ex.map(_job, jobs):
            ok = "error" not in r and not (r["spill_stores"] or r["spill_loads"]) and r["shared"] <= limit
            rows.append(dict(arch=arch, kind=kind, dtype=dt, dqk=dqk, dv=dv, BM=cfg[0], BN=cfg[1], warps=cfg[2],
                             stages=cfg[3], regs=r.get("registers", ""), spill_st=r.get("spill_stores", ""),
                             spill_ld=r.get("spill_loads", ""), smem=r.get("shared", ""), ok=int(ok),
                             kmask=int(a.kmask), error=r.get("error", ""), triton=triton.__version__))
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    print(f"arch sm_{a.arch}, {a.dtype}{', key mask' if a.kmask else ''}, shared memory limit {limit // 1024} KiB: "
          "proposed (BM, BN, warps, stages)")
    for kind in a.kinds.split(","):
        for bucket in map(int, a.buckets.split(",")):
            dims = BUCKETS[bucket]
            mine = [r for r in rows if r["kind"] == kind and (r["dqk"], r["dv"]) in dims]
            if not mine:
                continue
            ok = {(r["dqk"], r["dv"], r["BM"], r["BN"], r["warps"], r["stages"]) for r in mine if r["ok"]}
            cfgs = {(r["BM"], r["BN"], r["warps"], r["stages"]) for r in mine}
            good = [c for c in cfgs if all((*d, *c) in ok for d in dims)]
            # most work per program; then more stages (latency hiding), then fewer warps
            best = max(good, key=lambda c: (c[0] * c[1], c[0], c[3], -c[2]), default=None)
            print(f"  {kind:5s} bucket {bucket:3d}: {best if best else 'NONE fits'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
