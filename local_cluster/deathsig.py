"""Exec a command that dies with the process that started it.

    python -I -S deathsig.py PARENT_PID COMMAND [ARGS...]

Every child of the launcher runs in its own session (so a Ctrl-C in the terminal reaches only
the launcher, which then stops them in order). The price is that nothing kills them when the
launcher itself is SIGKILLed: they would stay up with PPID 1, holding the ports. Linux's
parent-death signal closes that gap: set here, in the child, right before ``exec``, it survives
the ``exec`` and fires when the launcher's spawning thread ends, however it ends.

Run by path with ``-I -S`` (stdlib only, no site-packages): it costs a few milliseconds and no
import of the project. Doing this in ``preexec_fn`` instead is unsafe in a process with threads.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
#: exit status when the launcher was already gone before the signal was armed (nothing to run for)
ORPHANED = 125


def arm(parent_pid: int) -> bool:
    """Ask the kernel for SIGKILL when our parent dies; False when the parent is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            error = ctypes.get_errno()
            print(f"deathsig: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(error)}", file=sys.stderr)
    # The parent may have died between our fork and the prctl: then no signal will ever come.
    return os.getppid() == parent_pid


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: deathsig.py PARENT_PID COMMAND [ARGS...]", file=sys.stderr)
        return 2
    if not arm(int(argv[0])):
        return ORPHANED
    try:
        os.execvp(argv[1], argv[1:])
    except OSError as exc:
        print(f"deathsig: cannot run {argv[1]}: {exc.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
