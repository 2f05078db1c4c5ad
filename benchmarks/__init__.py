"""Benchmarks of edge-lam: each script writes benchmarks/results/<name>.{json,md}."""
