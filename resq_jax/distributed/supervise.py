"""A thin parent process for each process of a multi-process job: a failed job ends in one line, in bounded time.

JAX's distributed runtime ends a process whose job has failed by aborting it from C++ (SIGABRT, a fatal log and a
stack dump): when a peer stops sending heartbeats for the heartbeat timeout, when process 0 (which hosts the
coordination service) disappears, when the coordinator cannot be reached or rejects the process at start. A
collective whose peer died raises a Python error at once, and the process then waits in the runtime's shutdown
barrier until the heartbeat timeout names the dead peer. None of this can be caught inside the process.

So each process of a job runs the program as a child (``supervise``) and relays its output. When the child fails,
the runtime's messages (fatal logs, tracebacks) are read, not shown: the parent prints one line naming what failed
(``job_failure``) and exits 1, after ``cleanup(child_pid)`` (removing a half-written checkpoint staging folder).
A failure that is not the job's (a bug) is shown in full. The child dies with its parent (``PR_SET_PDEATHSIG``)
and runs in its own process group. SIGINT / SIGTERM (Ctrl-C) to the parent kill the child at once: a child
interrupted inside the runtime would wait in its shutdown barrier for peers that wait for it; killed, its peers
see it die and stop within the bound below.

The bound: a process exits at most about ``timeout_s`` (the heartbeat timeout, ``--job-timeout``) plus the
runtime's polling interval after a peer dies; at once when the dead peer was process 0 or the failure surfaced
in a collective whose peer had already been declared dead.
"""
from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
from typing import Callable

CHILD_ENV = "RESQ_JAX_JOB_CHILD"  # set in the child: it runs the program itself

# where the child's stderr starts a failure's report, held back from then on (read before it is shown): a
# traceback (possibly after a progress bar on the same line), a fatal log, the runtime's error logs
_HOLD = re.compile(rb"Traceback \(most recent call last\)|^Fatal Python error|^F\d{4} |"
                   rb"^E\d{4} .*(coordination|preemption|client\.h|distributed|gloo)")
# stdout lines that gloo prints in every process when it connects
_NOISE = re.compile(rb"^\[Gloo\] Rank \d+ is connected")


def is_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


def job_failure(report: str, process_id: int | None, coordinator: str | None, timeout_s: int) -> str | None:
    """The one line describing a job failure from the child's held-back output ``report``, or None when the
    failure is not the job's (a bug: its traceback is shown as is)."""
    me = "this process" if process_id is None else f"process {process_id}"
    at = f" at {coordinator}" if coordinator else ""
    dead = re.search(r"Task (\d+) heartbeat timeout", report) or re.search(
        r"unhealthy \(stopped sending heartbeats\):\s*\n?\s*(\d+)", report)
    if dead:
        return (f"process {dead.group(1)} of the job stopped responding for {timeout_s} s (it died, was killed or "
                f"its host is unreachable); {me} stopped too. Look at process {dead.group(1)}'s output, then "
                "restart every process")
    if "Unexpected task registered" in report:
        return (f"the coordinator{at} rejected {me}: the processes disagree on --num-processes (every process must "
                "pass the same --num-processes M and a distinct --process-id in 0..M-1)")
    if "RegisterTask" in report and ("DEADLINE_EXCEEDED" in report or "UNAVAILABLE" in report):
        if process_id == 0:
            return (f"process 0 waited {timeout_s} s{at} but not every process joined the job: start all of them "
                    "with the same --coordinator and --num-processes (or raise --job-timeout)")
        return (f"{me} could not join the job{at} within {timeout_s} s: process 0 is not running there, is not "
                "reachable, or not every process has started with the same --num-processes; check --coordinator "
                "and start all the processes")
    if re.search(r"Failed to send RPC to coordination service|leader task|coordination service.*(unavailable|"
                 r"Socket closed)", report, re.IGNORECASE) and "Terminating process" in report:
        return (f"lost the coordinator{at}: process 0 died, was killed or became unreachable; {me} stopped too. "
                "Look at process 0's output, then restart every process")
    if re.search(r"Gloo \w+ failed|Connection (closed|reset) by peer", report):
        return (f"a peer process closed its connection during a collective (it died or was killed); {me} "
                "stopped too. Look at the other processes' output, then restart every process")
    if "Terminating process because the JAX distributed service detected fatal errors" in report:
        status = re.search(r"absl::Status: ([^\n]*)", report)
        return (f"the JAX distributed runtime ended {me}: {status.group(1)[:200] if status else 'a fatal error'}; "
                "look at the other processes' output, then restart every process")
    return None


def _die_with_parent():  # runs in the child between fork and exec (Linux; elsewhere a no-op)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _relay_stdout(stream, out):
    for line in iter(stream.readline, b""):
        if not _NOISE.match(line):
            out.write(line)
            out.flush()


def _relay_stderr(stream, out, held: list[bytes]):
    """Copy stderr segments (ended by \\n or \\r, so progress bars stay live) to ``out`` until one starts a
    failure report (_HOLD); from then on keep them in ``held``."""
    buf = b""
    while True:
        chunk = os.read(stream.fileno(), 65536)
        buf += chunk
        parts = re.split(rb"(?<=[\r\n])", buf)
        buf = b"" if not chunk else parts.pop()
        for seg in parts:
            if not seg:
                continue
            start = None if held else _HOLD.search(seg)
            if start is not None:  # relay what precedes the report (a progress bar), hold the rest
                out.write(seg[:start.start()] + b"\n" if start.start() else b"")
                held.append(b"")
                seg = seg[start.start():]
            if held:
                held.append(seg)
            else:
                out.write(seg)
                out.flush()
        if not chunk:
            return


def supervise(command: list[str], *, process_id: int | None, coordinator: str | None, timeout_s: int,
              cleanup: Callable[[int], None] | None = None) -> int:
    """Run ``command`` (this program, as a child with CHILD_ENV set) and return its exit status; a job failure
    becomes one ``error: ...`` line on stderr and status 1, after ``cleanup(child pid)``."""
    env = {**os.environ, CHILD_ENV: "1", "PYTHONUNBUFFERED": "1"}
    # its own process group: a Ctrl-C reaches the parent alone, which ends the child
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0,
                             preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    interrupted: list[int] = []

    def stop(sig, frame):
        interrupted.append(sig)
        child.kill()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    held: list[bytes] = []
    threads = [threading.Thread(target=_relay_stdout, args=(child.stdout, sys.stdout.buffer), daemon=True),
               threading.Thread(target=_relay_stderr, args=(child.stderr, sys.stderr.buffer, held), daemon=True)]
    try:
        for t in threads:
            t.start()
        rc = child.wait()
        for t in threads:
            t.join()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    report = b"".join(held).decode(errors="replace")
    if rc != 0 and cleanup is not None:  # the child is gone: whatever it was writing is a leftover
        cleanup(child.pid)
    if interrupted:
        me = "this process" if process_id is None else f"process {process_id}"
        print(f"error: {me} was interrupted ({signal.Signals(interrupted[0]).name}); the other processes of the "
              "job stop too", file=sys.stderr)
        return 128 + interrupted[0]
    why = job_failure(report, process_id, coordinator, timeout_s) if rc not in (0, 2) else None
    if why is None:
        sys.stderr.write(report)
        sys.stderr.flush()
        return rc if rc >= 0 else 128 - rc
    print(f"error: {why}", file=sys.stderr)
    return 1
