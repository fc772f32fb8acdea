"""Simulated devices of each family, for tests, demos and benchmarks (`camfleet simulate`)."""
