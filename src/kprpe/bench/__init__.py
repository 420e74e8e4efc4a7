"""Benchmarks: ``kprpe bench`` / ``python -m kprpe.bench`` (see docs/performance.md)."""

from .runner import Case, format_table, machine_info, run_case, run_suite

__all__ = ["Case", "format_table", "machine_info", "run_case", "run_suite"]
