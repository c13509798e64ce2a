"""Benchmarks: each prints its figures and, with --json, one JSON object on the last line."""
