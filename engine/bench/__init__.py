"""Benchmarks, separate from the tests (no timed asserts): per-step latency side by side with the
baselines (`python -m engine.bench`, steps.py), end to end per request (`engine.bench.e2e`), image
throughput (`engine.bench.batch`), one TP collective + matmul (`engine.bench.tp_ops`)."""
