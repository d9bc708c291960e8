"""Every process a launched run started is stopped: its whole session (Ray's processes included), and
an orphan of a killed launcher before the run resumes into the same folder."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from m2po.testbed.verl_engine import RUNNING, _stop_orphan
from m2po.utils.processes import kill_session, session_members

# a parent and a grandchild, both in a new session, both sleeping; the marker word names them
TREE = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{word}']); time.sleep(60)"


def _start_tree(word: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", TREE.format(word=word), word], start_new_session=True)
    deadline = time.time() + 30
    while len(session_members(process.pid)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert len(session_members(process.pid)) == 2
    return process


def test_kill_session_stops_the_whole_tree():
    process = _start_tree("ray")
    kill_session(process.pid)
    # the leader is our child: dead but not yet reaped (a zombie), which is no longer a member
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(process.pid)], capture_output=True, text=True).stdout
    assert state.strip().startswith("Z") and session_members(process.pid) == []
    process.wait(timeout=10)
    assert session_members(process.pid) == []


def test_an_orphaned_run_is_stopped_before_the_folder_is_reused(tmp_path):
    orphan = _start_tree("ray")  # what a SIGKILLed launcher leaves behind: Ray's processes
    (tmp_path / RUNNING).write_text(json.dumps({"session": orphan.pid}))
    _stop_orphan(str(tmp_path))
    orphan.wait(timeout=10)
    assert session_members(orphan.pid) == [] and not (tmp_path / RUNNING).exists()


def test_a_reused_session_id_of_something_else_is_left_alone(tmp_path):
    bystander = _start_tree("bystander")
    try:
        (tmp_path / RUNNING).write_text(json.dumps({"session": bystander.pid}))
        _stop_orphan(str(tmp_path))
        assert len(session_members(bystander.pid)) == 2 and not (tmp_path / RUNNING).exists()
    finally:
        kill_session(bystander.pid)
