"""Benchmarks: `specc bench ...`. Speed is measured here, side by side in one run, never in tests."""
