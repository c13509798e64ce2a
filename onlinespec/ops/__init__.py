"""Operations: running the whole system on one machine and measuring it.

``up`` (Redis, server and workers in one command), ``traffic`` (generation traffic through the
HTTP API), ``watch`` (a terminal view of the loop) and ``bench/`` (benchmarks that print their
figures). The top of the stack: may import anything, ``serving`` and ``workers`` included.
"""
