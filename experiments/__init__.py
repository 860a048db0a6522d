"""Entry points: the Hydra-configured federated run (`python -m experiments.train`), sweeps and benchmarks."""
