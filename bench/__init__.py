"""Benchmarks: each script measures one part against a baseline run in the same invocation and prints ratios.

They run from a checkout of the project (`python bench/bench_loader.py ...`, or `python -m bench.bench_loader`):
bench/ is not part of the installed package, and the ones that need a local S3 start the tests' SeaweedFS server
(tests/seaweed.py) through bench/local_s3.py.
"""
