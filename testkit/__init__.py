"""Test support shared by tests/ and bench/: the project's real processes (gateways, engine
workers, the fake engine, redis-server, Redis Cluster, the test databases), polling instead of
sleeping, metric parsing, and the hostile-request generator of the fuzz suite and the soak.

Not installed: tests and benches import it from the repository root (bench scripts put the root
on sys.path). It never imports tests/ or bench/ (checked by `lint-imports`).
"""
