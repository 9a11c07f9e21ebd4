"""The exit statuses of every command.

* ``EXIT_OK`` (0): done; for ``ask``, the answer arrived.
* ``EXIT_ERROR_REPLY`` (1): ``ask`` got an ``error`` reply from the bridge.
* ``EXIT_USAGE`` (2): a bad flag or configuration (argparse exits 2 too).
* ``EXIT_NO_ANSWER`` (3): no broker, no reply in time, or ``run`` could not start.
"""

from __future__ import annotations

EXIT_OK, EXIT_ERROR_REPLY, EXIT_USAGE, EXIT_NO_ANSWER = 0, 1, 2, 3
