"""Synthetic sample data in the real on-disk layouts of the source releases (sample_data.py), drawn as shapes
scenes with true captions, boxes and attributes (scenes.py): what the quickstart, the tests and the benchmarks
build shards from."""
