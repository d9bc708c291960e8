"""Stopping every process a launched run started (no verl import).

A run of verl's `main_ppo` starts a local Ray cluster whose processes share the session of the
launched command (`subprocess.Popen(..., start_new_session=True)`): a SIGKILLed driver leaves them
behind, and a finished one sometimes stragglers. None may outlive the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time


def session_members(session_id: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live process in the session, this one left out. The whole command line:
    without `-ww`, ps cuts it at the width it finds for its output (80 columns under pytest), which hid
    the word "ray" at the end of a long one. Zombies (dead, waiting for their parent to reap them) are not
    members: nothing can stop them further, and `kill_session` waited its 10 s for one."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True,
                         check=True).stdout
    members = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) < 3 or int(parts[1]) != session_id or int(parts[0]) == os.getpid() or parts[2].startswith("Z"):
            continue
        members.append((int(parts[0]), parts[3] if len(parts) == 4 else ""))
    return members


def kill_session(session_id: int, attempts: int = 20) -> None:
    """SIGKILL every process of the session until none is left (or `attempts` rounds of 0.5 s)."""
    for _ in range(attempts):
        members = session_members(session_id)
        if not members:
            return
        for pid, _ in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def supervise(process: subprocess.Popen, timeout_s: float | None = None, kill_when=None, stop=None,
              poll_s: float = 1.0) -> bool:
    """Wait for `process`, the leader of its own session, and leave nothing of that session running.

    Every `poll_s`: past `timeout_s` it raises TimeoutError; when `stop` (a threading.Event) is set, it
    raises InterruptedError; when `kill_when()` is true it SIGKILLs the session (a crash: no cleanup, no
    final save) and returns True. Returns False when the process exited by itself. Whatever happens,
    the whole session is killed before returning or raising."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while process.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"ran past {timeout_s:.0f} s")
            if stop is not None and stop.is_set():
                raise InterruptedError("stopped")
            if kill_when is not None and kill_when():
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return True
            time.sleep(poll_s)
        return False
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        kill_session(process.pid)
