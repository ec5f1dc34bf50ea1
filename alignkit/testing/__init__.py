"""What tests and benchmarks share: the float64 oracle (``alignkit.testing.oracle``)."""
