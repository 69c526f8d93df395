"""Synthetic inputs (drawn people, tiny checkpoints) for tests, benchmarks and the bundled quickstart."""
