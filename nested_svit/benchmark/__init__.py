"""Throughput harness: batch-size sweeps of dense and pruned models, FLOP model, peak memory."""
from .flops import flops_per_image
from .harness import BenchConfig, run_benchmark

__all__ = ["flops_per_image", "BenchConfig", "run_benchmark"]
