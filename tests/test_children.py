"""Child processes never outlive a killed edgestar (no converter left writing into a run)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

PARENT = textwrap.dedent('''
    import subprocess, sys, time
    from edgestar.children import child_env
    child = subprocess.Popen([sys.executable, "-c",
        "from edgestar.children import die_with_parent; die_with_parent(); import time; time.sleep(60)"],
        env=child_env())
    print(child.pid, flush=True)
    time.sleep(60)
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_child_dies_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    time.sleep(0.5)  # let the child reach die_with_parent
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child), "the child outlived its SIGKILLed parent"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has ended (init reaps it)
    except FileNotFoundError:
        return False


def test_a_tool_and_what_it_started_stop_with_edgestar(tmp_path):
    """run_tool: Ctrl-C while a tool (here a shell that started a sleep) runs ends the whole
    process group, and the KeyboardInterrupt reaches the caller."""
    import threading
    import time

    from processes import alive

    from edgestar.children import run_tool

    pid_file = tmp_path / "sleep.pid"
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        run_tool(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"])
    time.sleep(0.2)
    assert not alive(int(pid_file.read_text()))
