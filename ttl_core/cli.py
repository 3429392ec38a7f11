"""What every script shares: user errors become one `error: ...` line and exit status 2."""

from __future__ import annotations

import sys
from typing import Callable

from ttl_kernels.dispatch import BackendError

from .errors import TTLError


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a script's `main(argv)` and exit with its status. A `TTLError` (or a kernel backend that cannot
    run) prints one line, no traceback; so does a file-system error (an output path that is a file, a
    directory given for a file, a full disk), which names the path."""
    try:
        status = main(argv)
    except (TTLError, BackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        # a failed rename names its destination second: the path the user gave, not the temporary written first
        path = e.filename2 or e.filename
        print(f"error: {path or ''}{': ' if path else ''}{e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(status or 0)
