"""Benchmarks, run as scripts (`python bench/x.py`); a package so its modules import each other
as `bench.x` and so `lint-imports` checks that they never import tests/."""
