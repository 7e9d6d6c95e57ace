"""One exception type for every user-facing failure, and the one rule every entry point applies to it: print its
message on one line and exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


class SarmergeError(Exception):
    """A bad input or configuration, described so the user can fix it (names the file/tensor/field/value)."""


def run_cli(name: str, body: Callable[[], int | None], *, hint: str = "") -> int:
    """Run a command's body: its return value is the exit status (None = 0); a SarmergeError prints
    `<name>: error: <message>` (plus `hint`) to stderr and exits 2."""
    try:
        return int(body() or 0)
    except SarmergeError as e:
        print(f"{name}: error: {e}{hint}", file=sys.stderr)
        return 2
