"""Benchmarks of rlsc_kernels against the implementations people would use instead.

    python -m benchmarks.compare --help        # the peer comparison (JSON + table + chart)
    python -m benchmarks.train_step --help     # one RLSC training step, naive vs fused
    python -m benchmarks.measure_entropy       # the token entropy the synthetic inputs imitate
    pytest benchmarks/ --benchmark-only        # pytest-benchmark microbenchmarks
"""
