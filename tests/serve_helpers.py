"""What the server tests share: an OpenAI client for a server process, /metrics samples, polling."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import openai


def client_for(server) -> openai.OpenAI:
    """No retries: a 5xx must reach the test as it came."""
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def get(server, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric(server, name: str) -> float:
    """The value of one sample of /metrics (``name`` with its labels, as printed)."""
    _, text = get(server, "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def wait_for(condition, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
