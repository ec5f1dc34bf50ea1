"""Benchmarks shipped with the package: one harness (timing in interleaved rounds, exact peak
memory), one set of methods (alignkit and its peers), and ``alignkit bench``."""
