"""Benchmarks: ``python -m fastdistill bench``. See ``runner.py`` for the case protocol."""

from fastdistill.bench.runner import FAMILIES, Case, run

__all__ = ["FAMILIES", "Case", "run"]
