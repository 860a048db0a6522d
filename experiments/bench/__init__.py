"""Benchmarks: what private, secure, federated SER costs, measured side by side in one run (`make bench`).

Every figure is a ratio against a baseline measured in the same run, or an
absolute figure labelled with the machine it ran on. Benchmarks are not tests:
nothing here asserts a time.
"""
