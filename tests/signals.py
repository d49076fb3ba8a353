"""What the Ctrl-C / SIGTERM tests share: wait until a child process has mapped a library (so that the signal
lands mid-import), and signal it and check that it ends as the CLI promises (one line, exit 130)."""
from __future__ import annotations

import signal
import subprocess
import time

import pytest


def wait_for_mapped(pid: int, lib: str = "libtorch", timeout: float = 60.0):
    """Until the child has mapped ``lib`` (libtorch: it has started importing torch; NumPy's
    _multiarray_umath: its Python part is being imported, under torch's), or it ended, or ``timeout``."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            with open(f"/proc/{pid}/maps") as f:
                if lib in f.read():
                    return
        except OSError:
            return
        time.sleep(0.002)


def interrupt(p: subprocess.Popen, what: str, sig=signal.SIGINT, timeout: float = 60.0) -> str:
    """Send ``sig``; the child must exit 130 within ``timeout`` s with "interrupted" as its last line and no
    traceback. Returns its stderr."""
    p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail(f"{what} went on for {timeout:g} s after the signal")
    assert p.returncode == 130, (p.returncode, err[-2000:])
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err[-2000:]
    return err
