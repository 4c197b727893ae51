"""
Processes for the tests that start as `python script args` would but without paying for `import
torch` each time (~3 s on a slow CPU, and ~2 s more for torch._dynamo, which torch.optim imports at
its first step). A server imports them once; for each request it forks a child that takes the
request's stdin, stdout, stderr, directory, environment and threads and runs the script as its
__main__. The child is a process of its own, so kills, signals, exit codes and what is left on
disk are a real process's; only torch and numpy are loaded already when the script starts.

    python tests/forkserver.py serve SOCKET PID   serve until killed, or until PID, the process that
                                                  started it, is gone (conftest starts one per test process)
    python tests/forkserver.py SCRIPT ARGS        run SCRIPT in a child of the server at $FORKSERVER and
                                                  end as it ends (its exit code, or its signal); the
                                                  signals this process gets go to it. Without
                                                  $FORKSERVER: python SCRIPT ARGS itself. This side
                                                  imports no torch, so it starts in ~50 ms, under
                                                  torchrun too.

A request is one JSON message {"argv", "cwd", "env", "unbuffered"} after its length (8 bytes), with
three file descriptors (stdin, stdout, stderr); the server answers {"pid": N} at once and the exit
code (negative: the signal) at the end. A client that goes away first takes its process with it.
"""

import atexit
import io
import json
import os
import runpy
import select
import signal
import socket
import sys
import traceback


def serve(path, parent):
    """Answer requests until killed or until process parent, which started this one, is gone (given,
    not read here: it may be gone already); in each forked child, return its request and descriptors."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    running = {}  # pidfd -> (pid, the connection its exit code goes to)
    watched = {}  # connection -> pidfd, while its client is there
    while os.getppid() == parent:  # a test process that dies without killing its server takes it along
        for ready in select.select([listener, *running, *watched], [], [], 1.0)[0]:
            if ready is listener:
                conn = listener.accept()[0]
                message, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
                while len(message) < 8 + int.from_bytes(message[:8], "big") and (more := conn.recv(1 << 16)):
                    message += more
                if len(fds) != 3 or len(message) < 8 + int.from_bytes(message[:8], "big"):
                    for fd in fds:  # not a whole request: its client went away
                        os.close(fd)
                    conn.close()
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    for pidfd, (_, other) in running.items():
                        os.close(pidfd)
                        other.close()
                    conn.close()
                    return json.loads(message[8:]), fds
                for fd in fds:
                    os.close(fd)
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                pidfd = os.pidfd_open(pid)
                running[pidfd], watched[conn] = (pid, conn), pidfd
            elif ready in watched:  # the client went away (killed, say): so does its process
                pidfd = watched.pop(ready)
                if not ready.recv(1) and pidfd in running:
                    os.kill(running[pidfd][0], signal.SIGKILL)
            elif ready in running:
                pid, conn = running.pop(ready)
                os.close(ready)
                watched.pop(conn, None)
                code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                try:
                    conn.sendall(f"{code}\n".encode())
                except OSError:
                    pass  # nobody is waiting for it any more
                conn.close()


def become(request, fds):
    """This forked child turns into `python SCRIPT ARGS` started as the request says."""
    import torch
    for fd, std in zip(fds, (0, 1, 2)):
        os.dup2(fd, std)
        os.close(fd)
    if request["unbuffered"]:  # python -u, as torchrun starts its processes
        sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), write_through=True,
                                                   encoding=stream.encoding, errors=stream.errors)
                                  for fd, stream in ((1, sys.stdout), (2, sys.stderr)))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count())  # torch read it as it was imported
    torch.set_num_threads(min(threads, os.cpu_count()))  # where it also keeps to the cores there are
    sys.argv = request["argv"]
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    interrupted = []
    atexit.register(lambda: interrupted and os.kill(os.getpid(), signal.SIGINT))  # the last to run at exit
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")  # its SystemExit or exception ends this process too
    except KeyboardInterrupt:  # python's way out of a Ctrl-C nobody caught, which a forked child does not take
        traceback.print_exc()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        interrupted.append(True)


def run(argv):
    """Have the server run argv and end as that process ends."""
    env = dict(os.environ)
    path = env.pop("FORKSERVER", None)
    if not path:
        os.execv(sys.executable, [sys.executable, *(["-u"] if sys.stdout.write_through else []), *argv])
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": env,
                          "unbuffered": sys.stdout.write_through}).encode()
    socket.send_fds(conn, [len(request).to_bytes(8, "big") + request], [0, 1, 2])
    answers = conn.makefile()
    pid = json.loads(answers.readline())["pid"]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda sig, frame: os.kill(pid, sig))
    code = int(answers.readline())
    if code < 0:  # killed by a signal: so is this process
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    if sys.argv[1] != "serve":
        run(sys.argv[1:])
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401
    child = serve(sys.argv[2], int(sys.argv[3]))
    if child:
        become(*child)
