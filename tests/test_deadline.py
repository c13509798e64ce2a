"""The server's stop deadline: a stop that hangs ends the process, says what hung and leaves no child
process behind; a stop that finishes in time is not cut short."""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HUNG = """
import multiprocessing, sys, threading, time
from serving.deadline import StopDeadline

def sleeper():
    time.sleep(120)

def stuck_in_a_call():
    threading.Event().wait()

if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=sleeper, name="engine-core")
    child.start()
    print(child.pid, flush=True)
    threading.Thread(target=stuck_in_a_call, name="engine-loop").start()  # not a daemon: exit waits on it
    StopDeadline().arm(float(sys.argv[1]))
    time.sleep(float(sys.argv[2]))  # the stop's own work
"""


def _run(tmp_path, script: str, deadline: float, stop_takes: float):
    path = tmp_path / "stop.py"  # a file: a spawned child imports its parent's main module
    path.write_text(script)
    started = time.time()
    # files, not pipes: a child the backstop leaves to end on its own would hold a pipe open
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, str(path), str(deadline), str(stop_takes)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=err)
        try:
            proc.wait(60)
        finally:
            proc.kill()
    took = time.time() - started
    return subprocess.CompletedProcess(proc.args, proc.returncode, (tmp_path / "out").read_text(),
                                       (tmp_path / "err").read_text()), took


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waits for its parent (init here) to reap it
        return f.read().split(") ")[1][0] != "Z"


def test_a_stop_that_hangs_ends_in_time_naming_its_threads_and_killing_its_children(tmp_path):
    proc, took = _run(tmp_path, HUNG, deadline=1.0, stop_takes=0.1)  # the stop's work is done, a thread hangs exit
    child = int(proc.stdout.split()[0])
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert took < 30
    assert "the server's stop took over 1 s" in proc.stderr
    assert "stuck_in_a_call" in proc.stderr  # the hung thread's stack
    assert "killing child process engine-core" in proc.stderr
    for _ in range(50):
        if not _alive(child):
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        raise AssertionError("the deadline left the child process running")


def test_a_stop_that_finishes_in_time_is_not_cut_short(tmp_path):
    script = HUNG.replace('threading.Thread(target=stuck_in_a_call, name="engine-loop").start()', "") \
        .replace("time.sleep(float(sys.argv[2]))", "time.sleep(float(sys.argv[2])); child.kill(); child.join()")
    proc, took = _run(tmp_path, script, deadline=30, stop_takes=0.2)
    assert took < 25
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stop took over" not in proc.stderr


def test_where_no_python_thread_runs_the_backstop_still_ends_the_stop(tmp_path):
    """The deadline's own thread cannot run (here: it never wakes): faulthandler's watchdog ends the
    process 5 s after the deadline, with every thread's stack."""
    script = HUNG.replace("StopDeadline().arm(", "StopDeadline._expire = lambda self: None; StopDeadline().arm(")
    proc, took = _run(tmp_path, script, deadline=0.5, stop_takes=0.1)
    os.kill(int(proc.stdout.split()[0]), 9)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "stuck_in_a_call" in proc.stderr and "Timeout" in proc.stderr
    assert 5 <= took < 30
