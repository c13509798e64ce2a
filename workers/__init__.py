"""The learning loop workers (RQ jobs and the worker entry point)."""
