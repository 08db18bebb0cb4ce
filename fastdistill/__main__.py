"""``python -m fastdistill info | bench``.

    python -m fastdistill info      what can run here (Triton, CUDA extension, GPU), and why not
    python -m fastdistill bench [--family score|kd|flkd|attn|scm|all] [--quick] [--csv PATH | --no-csv]
                                [--device cuda|cuda:N|cpu]

bench exits 1 when a fastdistill row FAILED (raised, or an error against the fp64 result far above the
baseline's) or a CUDA error left the context unusable, 2 on a bad --device / --csv, else 0.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdistill", description="fastdistill: info | bench")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, devices, and which backend can run each op (and why not)")
    from fastdistill.bench.runner import FAMILIES

    bench = sub.add_parser("bench", help="run the benchmarks, print a table, append rows to a CSV")
    bench.add_argument("--family", action="append", choices=[*FAMILIES, "all"], metavar="NAME",
                       help=f"benchmark family, repeatable: {', '.join(FAMILIES)}, or all (the default)")
    bench.add_argument("--quick", action="store_true", help="small shapes, fewer repeats (a smoke run)")
    out = bench.add_mutually_exclusive_group()
    out.add_argument("--csv", metavar="PATH", default=None,
                     help="results CSV to append to (default: benchmarks/results/<gpu>.csv under the cwd)")
    out.add_argument("--no-csv", action="store_true", help="print the table only")
    bench.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)

    if args.command == "info":
        from fastdistill._backend import print_info

        print_info()
        return 0
    from fastdistill.bench.runner import DeviceLost, run

    out_csv = "" if args.no_csv else args.csv
    try:
        rows = run(args.family or ["all"], quick=args.quick, out_csv=out_csv, device=args.device)
    except ValueError as exc:  # a bad --device / --csv: before anything is measured
        print(f"python -m fastdistill bench: error: {exc}", file=sys.stderr)
        return 2
    except DeviceLost:
        return 1
    # a fastdistill row that raised or computed a wrong result fails the run (its table and CSV are complete)
    return 1 if any(r.get("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
