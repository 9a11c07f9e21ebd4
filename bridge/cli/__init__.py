"""Command line: ``llamacpp-mqtt-bridge run | ask | status`` (README, *Configuration*).

One module per concept:

* :mod:`bridge.cli.parser`: the flags of every command (:func:`build_parser`) and the
  configuration they make (``_config``: flags over environment over file).
* :mod:`bridge.cli.serve`: ``run``, the bridge in the foreground (:func:`run`), and its
  SIGHUP profile reload (:func:`reload_profiles`).
* :mod:`bridge.cli.device`: ``ask`` and ``status``, which talk to a bridge as a device.
* :mod:`bridge.cli.exits`: the exit statuses.

This package holds :func:`main`, the entry point of ``llamacpp-mqtt-bridge`` and
``python -m bridge``, and re-exports the names above.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from bridge.cli.device import ask, status
from bridge.cli.exits import EXIT_ERROR_REPLY, EXIT_NO_ANSWER, EXIT_OK, EXIT_USAGE
from bridge.cli.parser import _config as _config
from bridge.cli.parser import build_parser
from bridge.cli.serve import reload_profiles, run

__all__ = ["EXIT_ERROR_REPLY", "EXIT_NO_ANSWER", "EXIT_OK", "EXIT_USAGE", "ask", "build_parser",
           "main", "reload_profiles", "run", "status"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status (:mod:`bridge.cli.exits`).
    """
    args = build_parser().parse_args(argv)
    try:
        cfg = _config(args)
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "run":
        return run(cfg, reload=lambda: _config(args))
    try:
        if args.command == "ask":
            return ask(cfg, args)
        return status(cfg, args.timeout)
    except BrokenPipeError:
        # The reader went away (`ask ... | head`): stop quietly, as other tools do. stdout
        # goes to /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
