"""lookalike benchmarks and reliability scenarios: `make bench`, `make bench-quick`, `make soak`."""
