"""What every script shares: user errors become one `error: ...` line and exit status 2."""

from __future__ import annotations

import sys
from typing import Callable

from .errors import TTLError


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a script's `main(argv)` and exit with its status; a `TTLError` prints one line, no traceback."""
    try:
        status = main(argv)
    except TTLError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(status or 0)
