"""Benchmark harness: `python -m pipeline.bench` (or `make bench`).

Every attack of the project against its peers (torchattacks, Foolbox, ART, AdverTorch)
and against the forward+backward floor, on one machine, model, image set and batch size,
in one run; plus the eps-list path, training, and a whole sweep's overhead.
"""
