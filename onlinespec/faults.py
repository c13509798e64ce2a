"""Failpoints: named places where a process can be made to die, for the fault tests and
``onlinespec bench faults`` (a crash exactly between publish and acknowledge cannot be timed
from outside). ``ONLINESPEC_FAILPOINTS=before_ack`` kills the process there with SIGKILL, as
the kernel's out-of-memory killer or a lost machine would. Unset (always, in production), a
failpoint is one dictionary lookup."""

from __future__ import annotations

import os
import signal

__all__ = ["failpoint", "FAILPOINTS"]

FAILPOINTS = ("before_publish", "before_ack")


def failpoint(name: str) -> None:
    assert name in FAILPOINTS, f"unknown failpoint {name!r}"
    armed = os.environ.get("ONLINESPEC_FAILPOINTS")
    if armed and name in armed.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
