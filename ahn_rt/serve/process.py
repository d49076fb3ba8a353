"""Start ``python -m ahn_rt.serve`` as a child process and wait until it answers ``/health`` (tests and
bench/serve_load.py use this; only the standard library)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

_LISTENING = re.compile(r"listening on (http://\S+)")


class ServerProcess:
    """``with ServerProcess(["--weights", path, ...]) as srv: srv.url``. ``--port 0`` is added unless
    a port is given; the URL comes from the server's "listening on" line. ``lines`` holds its stderr."""

    def __init__(self, args, api_key: str | None = None, timeout: float = 120.0, env=None):
        args = list(args)
        if "--port" not in args:
            args += ["--port", "0"]
        if api_key is not None and "--api-key" not in args:
            args += ["--api-key", api_key]
        self.api_key = api_key
        self.lines: list[str] = []
        self.url = None
        self.proc = subprocess.Popen([sys.executable, "-m", "ahn_rt.serve", *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        found = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                m = _LISTENING.search(line)
                if m and self.url is None:
                    self.url = m.group(1)
                    found.set()
            found.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        deadline = time.monotonic() + timeout
        try:
            if not found.wait(timeout) or self.url is None:
                raise RuntimeError("the server did not start:\n" + "\n".join(self.lines[-20:]))
            while self.get("/health")[0] != 200:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the server does not answer /health:\n" + "\n".join(self.lines[-20:]))
                time.sleep(0.05)
        except BaseException:
            self.kill()
            raise

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, path: str, headers: dict | None = None):
        """(status, body text) of a GET; (0, error) when nothing answers."""
        req = urllib.request.Request(self.url + path, headers=self.headers() if headers is None else headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            return 0, str(e)

    def post(self, path: str, body, headers: dict | None = None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h = {"Content-Type": "application/json", **(self.headers() if headers is None else headers)}
        req = urllib.request.Request(self.url + path, data=data, headers=h, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read().decode(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), dict(e.headers)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        finally:
            self._pump.join(5)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill() if exc[0] is not None else self.stop()
