"""
Run one of the project's scripts with a fault injected into torch at a chosen moment, the way
the world would inject it: a kill, a signal, a full disk, a NaN. Our own code is not touched.

    python tests/inject.py FAULT[,FAULT...] train.py --key=value ...

FAULT is WHAT@WHEN, WHEN counting calls of one torch function (1 = the first call):

    kill@backward:N    SIGKILL just before the Nth backward pass (a micro-step)
    kill@argmax:N      SIGKILL at the Nth argmax (train.py's eval takes one per val batch)
    kill@save:N        SIGKILL halfway through writing the Nth torch.save
    kill@seconds:S     SIGKILL S seconds after the first torch.save (train.py's first checkpoint)
    TERM@backward:N    SIGTERM to itself just before the Nth backward pass (INT, INTx2: SIGINT, twice;
                       STOP: SIGSTOP, a process that hangs)
    INT@save:N         SIGINT just before the Nth torch.save writes
    full@save:N        the Nth torch.save fails as on a full disk (OSError ENOSPC)
    nan@loss:N+M       cross_entropy returns NaN for M calls from the Nth (M = 0: for ever)
    inf@backward:N     the Nth backward pass is of loss x inf: infinite gradients, the loss itself finite
    slow@backward:N    the Nth backward pass first sleeps 2 seconds (a first step that compiles, say)
"""

import errno
import io
import os
import runpy
import signal
import sys
import threading
import time

import torch
import torch.nn.functional as F

torch_save = torch.save  # the original, before any wrapper
SIGNALS = {"kill": [signal.SIGKILL], "TERM": [signal.SIGTERM], "INT": [signal.SIGINT],
           "INTx2": [signal.SIGINT, signal.SIGINT], "STOP": [signal.SIGSTOP]}


def send(what):
    for sig in SIGNALS[what]:
        os.kill(os.getpid(), sig)


def counting(owner, name, on_call):
    """Replace owner.name by a wrapper that calls on_call(n, call the original) on the nth call."""
    original, calls = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return on_call(calls[0], lambda: original(*args, **kwargs), args)
    setattr(owner, name, wrapper)


def inject(fault):
    what, _, when = fault.partition("@")
    point, _, n = when.partition(":")
    if point == "seconds":
        def arm(k, go, args):
            result = go()
            if k == 1:
                timer = threading.Timer(float(n), send, [what])
                timer.daemon = True  # a run that ends first is not kept waiting
                timer.start()
            return result
        counting(torch, "save", arm)
    elif what == "inf":
        original = torch.Tensor.backward

        def infinite(k, go, args):
            if k != int(n):
                return go()
            return original(args[0] * float("inf"))
        counting(torch.Tensor, "backward", infinite)
    elif point in ("backward", "argmax"):
        def at(k, go, args):
            if k == int(n) and what == "slow":
                time.sleep(2)
            elif k == int(n):
                send(what)
            return go()
        counting(torch.Tensor, point, at)
    elif point == "save":
        def save(k, go, args):
            if k != int(n):
                return go()
            if what == "full":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if what != "kill":
                send(what)
                return go()
            buffer = io.BytesIO()  # kill: half the bytes reach the file, then the process dies
            torch_save(args[0], buffer)
            f = args[1]
            f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            send(what)
        counting(torch, "save", save)
    elif point == "loss":
        first, _, count = n.partition("+")

        def nan(k, go, args):
            loss = go()
            if k >= int(first) and (int(count) == 0 or k < int(first) + int(count)):
                return loss * float("nan")
            return loss
        counting(F, "cross_entropy", nan)
    else:
        raise SystemExit(f"inject.py: unknown fault {fault!r}")


if __name__ == "__main__":
    faults, script = sys.argv[1], sys.argv[2]
    for fault in faults.split(","):
        inject(fault)
    sys.argv = sys.argv[2:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
