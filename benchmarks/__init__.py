"""The memory, time and FLOP benchmarks; run each from the repository root as ``python -m benchmarks.<name>``
(see :mod:`benchmarks.common`)."""
