"""Failpoints: named places where a process can be made to die, for the fault tests and
``onlinespec bench faults`` (a crash exactly between publish and acknowledge cannot be timed
from outside). ``ONLINESPEC_FAILPOINTS=before_ack`` kills the process there with SIGKILL, as
the kernel's out-of-memory killer or a lost machine would. With ``ONLINESPEC_FAILPOINT_ONCE``
naming a file, only the first process to reach an armed failpoint dies (it creates the file), so
a supervisor's restart of the same command runs on. Unset (always, in production), a failpoint
is one dictionary lookup."""

from __future__ import annotations

import os
import signal

__all__ = ["failpoint", "FAILPOINTS"]

FAILPOINTS = ("before_publish", "before_ack")


def failpoint(name: str, detail: str = "") -> None:
    """Die here if armed; ``detail`` (what the process was doing) goes into the once-file."""
    assert name in FAILPOINTS, f"unknown failpoint {name!r}"
    armed = os.environ.get("ONLINESPEC_FAILPOINTS")
    if not armed or name not in armed.split(","):
        return
    once = os.environ.get("ONLINESPEC_FAILPOINT_ONCE")
    if once:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, detail.encode())
            os.fsync(fd)
            os.close(fd)
        except FileExistsError:
            return  # fired already, in an earlier life of this command
    os.kill(os.getpid(), signal.SIGKILL)
