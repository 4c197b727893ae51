"""
tests/forkserver.py, on which the tests of kills, signals and several processes stand: a script
run forked from its server ends as it would in a fresh interpreter (output, exit code, signal), sees
the same arguments, directory, environment, import path and threads, and dies with its client.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import FORKED, run_forked

SCRIPT = """
import os, signal, sys
print(sys.argv[1:], os.getcwd(), os.environ.get("NANOLEX_TEST"), sys.path[0])
print("to stderr: \\u00a7 4.2", file=sys.stderr)
how = sys.argv[1]
if how == "done":  # torch's threads are set as it is imported, before the fork: they are set again after
    import torch
    print(torch.get_num_threads())
if how == "code":
    sys.exit(3)
if how == "error":
    sys.exit("error: a clear line")
if how == "raise":
    raise ValueError("a bug")
if how in ("SIGKILL", "SIGTERM", "SIGINT"):
    sys.stdout.flush()
    os.kill(os.getpid(), getattr(signal, how))
if how == "Ctrl-C":
    raise KeyboardInterrupt
"""


@pytest.mark.parametrize("how", ["done", "code", "error", "raise", "SIGKILL", "SIGTERM", "SIGINT", "Ctrl-C"])
def test_a_forked_script_ends_as_it_would_in_a_fresh_interpreter(how, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    threads = "2" if os.environ.get("OMP_NUM_THREADS") == "1" else "1"  # not the server's (it has this process's)
    env = {**os.environ, "NANOLEX_TEST": "seen", "OMP_NUM_THREADS": threads}
    fresh = subprocess.run([sys.executable, str(script), how, "x y"], capture_output=True, text=True, cwd=tmp_path,
                           env=env, timeout=120)
    forked = run_forked([script, how, "x y"], cwd=tmp_path, env=env)
    assert fresh.stdout == forked.stdout and f"['{how}', 'x y'] {tmp_path} seen {tmp_path}\n" in fresh.stdout
    assert forked.returncode == fresh.returncode
    if how in ("raise", "SIGINT", "Ctrl-C"):  # the traceback's last line; its frames differ (runpy's, the server's)
        assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1]
    else:
        assert forked.stderr == fresh.stderr


def ended(pid, seconds):
    """Whether process pid is gone (or a zombie: dead, not yet reaped) within seconds."""
    for _ in range(int(seconds * 10)):
        if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return False


def test_a_forked_script_dies_when_its_client_is_killed(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(f"import os, time\nopen({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid()))\n"
                      "time.sleep(600)\n")
    with pytest.raises(subprocess.TimeoutExpired):  # subprocess.run kills the client when its time is up
        run_forked([script], timeout=5)
    assert ended(int((tmp_path / "pid").read_text()), 10), "the forked script outlived its client"


def test_a_server_ends_when_the_test_process_that_started_it_is_gone(tmp_path):
    # a test process killed before its atexit (which kills its server) would otherwise leave it behind
    parent = "import os, subprocess, sys; print(subprocess.Popen([*sys.argv[1:], str(os.getpid())]).pid)"
    done = subprocess.run([sys.executable, "-c", parent, sys.executable, FORKED, "serve", str(tmp_path / "socket")],
                          capture_output=True, text=True, timeout=60)
    assert ended(int(done.stdout), 60), "the server outlived its test process"  # after importing torch (~5 s)
