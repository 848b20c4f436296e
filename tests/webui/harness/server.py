"""Starts an installed WebUI offline on this machine's loopback and stops it (with everything it started)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from host import log

READY_LINE = "Startup time:"  # printed once the UI and API are up (Forge: earlier requests miss script defaults)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder: Path, python: Path, flags: tuple[str, ...], hf_home: Path, log_path: Path,
                 env_changes: dict[str, str | None] | None = None):
        """``flags``: all of the WebUI's start flags but the port. ``env_changes``: variables set (a string) or
        removed (None) after the offline defaults."""
        self.folder, self.python, self.log_path = folder, python, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [str(python), "launch.py", "--port", str(self.port), *flags]
        self.env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
        for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "COMMANDLINE_ARGS"):
            self.env.pop(key, None)
        for key, value in (env_changes or {}).items():
            if value is None:
                self.env.pop(key, None)
            else:
                self.env[key] = value
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 900) -> float:
        """Starts the server and waits until it is ready; returns the seconds it took."""
        started = time.monotonic()
        log(f"starting {self.folder.name} on {self.url}: {' '.join(self.cmd)}")
        self.log_file = open(self.log_path, "w")
        self.process = subprocess.Popen(self.cmd, cwd=self.folder, env=self.env, stdout=self.log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.folder.name} exited with {self.process.returncode} while starting:\n"
                                   + self.tail())
            if READY_LINE in self.log_path.read_text(errors="replace") and self.answers():
                return time.monotonic() - started
            time.sleep(2)
        raise TimeoutError(f"{self.folder.name} was not ready after {timeout_s:.0f} s:\n" + self.tail())

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/sdapi/v1/options", timeout=10) as reply:
                return reply.status == 200
        except OSError:
            return False

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        self.log_file.close()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False
