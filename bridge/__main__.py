"""``python -m bridge run|ask|status``."""

from bridge.cli import main

raise SystemExit(main())
