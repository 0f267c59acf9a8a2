"""--start-server: a ComfyUI of our own for the batch, started from a ComfyUI folder on a free local port and
stopped (its whole process group) when the batch ends."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import aiohttp

from .errors import RunnerError

STOP_GRACE_S = 30
LOG_TAIL_LINES = 30
TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")  # ANSI colours and cursor moves in ComfyUI's log
# What a ComfyUI without --cpu prints on a machine without a usable CUDA GPU (torch's and the driver's words)
NO_GPU_SIGNS = ("Torch not compiled with CUDA enabled", "Found no NVIDIA driver", "no CUDA GPUs are available",
                "CUDA driver version is insufficient")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalComfyUI:
    def __init__(self, comfyui_dir: Path, python: str, extra_args: list[str], log_path: Path):
        if not (comfyui_dir / "main.py").is_file():
            raise RunnerError(f"--start-server: {comfyui_dir} is not a ComfyUI folder (no main.py); set COMFYUI_DIR or "
                              "pass --comfyui-dir")
        self.comfyui_dir = comfyui_dir
        self.python = python
        self.extra_args = extra_args
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def log_text(self) -> str:
        try:
            return TERMINAL_CODES.sub("", self.log_path.read_text(errors="replace"))
        except OSError:
            return ""

    def log_tail(self) -> str:
        """The end of ComfyUI's log as plain text, and what to do when it says there is no GPU."""
        text = self.log_text()
        tail = "\n".join(text.splitlines()[-LOG_TAIL_LINES:]) or "(no log)"
        if "--cpu" not in self.extra_args and any(sign in text for sign in NO_GPU_SIGNS):
            tail += ("\nComfyUI found no usable CUDA GPU. On a machine without one, start it on the CPU: add "
                     "--comfyui-args=--cpu (or --comfyui-args \"--cpu\")")
        return tail

    async def start(self, timeout: float) -> None:
        """Start ComfyUI and wait until GET /system_stats answers."""
        command = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), *self.extra_args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            try:
                # its own process group, so that stop() reaches whatever ComfyUI starts
                self.process = subprocess.Popen(command, cwd=self.comfyui_dir, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as error:
                raise RunnerError(f"--start-server: cannot run {self.python} ({error.strerror or error})") from error
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.process.poll() is not None:
                    raise RunnerError(f"--start-server: ComfyUI exited with code {self.process.returncode} while starting; "
                                      f"the end of its log ({self.log_path}):\n{self.log_tail()}")
                try:
                    async with session.get(self.url + "/system_stats", timeout=aiohttp.ClientTimeout(total=5)) as response:
                        if response.status == 200:
                            return
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RunnerError(f"--start-server: ComfyUI did not answer within {timeout:g} s (--start-timeout); "
                                      f"the end of its log ({self.log_path}):\n{self.log_tail()}")
                await asyncio.sleep(0.5)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass
