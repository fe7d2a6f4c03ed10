"""Benchmarks and their shared harness (timing, roofline ceilings, result files). See bench/README.md.

A package so tests can `import bench.harness`; the scripts in here also run directly as
`python bench/<script>.py`. Nothing here touches CUDA at import time.
"""
