"""``python -m modelscope_llama2 serve`` as a child process on a free 127.0.0.1 port, ready once it answers ``/health``.

What benchmarks and end-to-end tests need to talk to a real server process
(signals, sockets, its memory) rather than an app in their own process.

Example (the demo checkpoint)::

    >>> served = start_serve(["--served-model-name", "demo"])
    >>> import urllib.request
    >>> urllib.request.urlopen(served.url + "/health").status
    200
    >>> served.process.kill(); served.process.wait(60) is not None
    True
"""

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Dict, NamedTuple, Optional, Sequence


class ServeProcess(NamedTuple):
    """A started server: its process, port and base URL (``http://127.0.0.1:PORT``)."""

    process: subprocess.Popen
    port: int
    url: str


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_serve(args: Sequence[str], env: Optional[Dict[str, str]] = None, timeout_s: float = 180,
                stderr: int = subprocess.DEVNULL) -> ServeProcess:
    """Start ``serve ARGS --port PORT`` (``env``: the child's whole environment, default this one's) and
    wait until ``/health`` answers 200; ``RuntimeError`` if it exits or does not within ``timeout_s``
    (then it is killed). The caller stops it (``process.terminate()`` drains, as SIGTERM does).

    ``stderr``: where its log goes (``subprocess.PIPE`` to read it; default: discarded).
    """
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "modelscope_llama2", "serve", *args, "--port", str(port)],
                               env=dict(os.environ) if env is None else env, stdout=subprocess.DEVNULL,
                               stderr=stderr, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while not _healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                process.kill()
            process.wait()
            raise RuntimeError(f"serve {' '.join(args)} did not start (exit status {process.returncode})")
        time.sleep(0.2)
    return ServeProcess(process, port, url)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
