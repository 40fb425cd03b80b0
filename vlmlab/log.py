"""Messages for people: warnings go to stderr in one line each, so a long run's bad inputs stay visible."""

from __future__ import annotations

import sys


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
