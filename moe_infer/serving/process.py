"""A `moe-infer serve` server in a child process, for the serving benchmark and the tests.

Starts ``python -m moe_infer serve MODEL --port 0 ...`` on loopback, waits for its ready line (the
port it got), and stops it with a signal, as a user would. Its stderr goes to a file, its stdout is
read line by line (``output``).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

__all__ = ["ServerProcess"]

_READY = re.compile(r"^moe-infer serve: .* on (http://\S+) ")


class ServerProcess:
    """``with ServerProcess("tiny-mixtral", "--max-batch-size", "4") as server: server.base_url``."""

    def __init__(self, model: str, *args: str, env: dict[str, str] | None = None, startup_timeout: float = 300.0):
        self.command = [sys.executable, "-m", "moe_infer", "serve", model, "--host", "127.0.0.1", "--port", "0",
                        *args]
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.output: list[str] = []  # stdout lines so far
        self._lines: queue.Queue = queue.Queue()
        self._stderr = tempfile.TemporaryFile(mode="w+")

    @property
    def base_url(self) -> str:
        """What an OpenAI client's ``base_url`` is."""
        return f"{self.url}/v1"

    def start(self) -> "ServerProcess":
        """Launch the server and wait until it is ready."""
        return self.launch().wait_ready()

    def launch(self) -> "ServerProcess":
        """Start the process without waiting (several servers can start at once); then `wait_ready`."""
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                        env=self.env, stdin=subprocess.DEVNULL)
        threading.Thread(target=self._read, daemon=True).start()
        self._deadline = time.monotonic() + self.startup_timeout
        return self

    def wait_ready(self) -> "ServerProcess":
        """Wait for the ready line (RuntimeError with the server's stderr if it exits or times out first)."""
        while not self.url:
            try:
                line = self._lines.get(timeout=max(0.0, min(1.0, self._deadline - time.monotonic())))
            except queue.Empty:
                line = None
            if line is not None:
                match = _READY.match(line)
                self.url = match.group(1) if match else ""
            elif self.process.poll() is not None or time.monotonic() > self._deadline:
                self.stop(signal.SIGKILL, timeout=10)
                raise RuntimeError(f"the server did not start ({' '.join(self.command)}); its stderr ends:\n"
                                   f"{self.stderr()[-3000:]}")
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line.rstrip("\n"))
            self._lines.put(line)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Send ``sig`` and wait for the exit status (SIGKILL after ``timeout`` seconds)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start() if self.process is None else self  # launched already: the caller waits

    def __exit__(self, *exc) -> None:
        self.stop()
        self._stderr.close()
