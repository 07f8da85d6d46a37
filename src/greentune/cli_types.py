"""Range-checked numbers for argparse `type=`: every number on the command line is validated.

    p.add_argument("--tokens", type=count(1, 10**15))
    p.add_argument("--deadline-h", type=real(0, 1e6, low_open=True))

A value that is not a number, not finite (nan, inf), not whole where a count is asked for, or
out of range is refused with the allowed range in the message; `OneLineParser` turns that
into a `UserError` (one line, exit 2), so no command ever starts on a number it cannot honour.
"""

from __future__ import annotations

import argparse
import math
import re

from greentune.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are `UserError`s (`greentune: error: ...`, exit 2, one line) like
    every other user mistake, instead of a usage block; `--help` still shows the usage."""

    def error(self, message: str):
        m = re.match(r"argument (\S+): (must .*)", message)
        raise UserError(f"{m.group(1)} {m.group(2)}" if m else message)


def _range_error(text: str, low, high, low_open: bool) -> argparse.ArgumentTypeError:
    if low == 0 and low_open and high is None:
        return argparse.ArgumentTypeError(f"must be positive, got {text}")
    if low == 0 and low_open:
        return argparse.ArgumentTypeError(f"must be positive and at most {high:g}, got {text}")
    if high is None:
        return argparse.ArgumentTypeError(f"must be at least {low:g}, got {text}")
    return argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}, got {text}")


def count(low: int = 1, high: int | None = None):
    """An integer in [low, high]; also accepts whole numbers written like 1e9 or 10_000_000."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            try:
                as_float = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
            if not math.isfinite(as_float) or as_float != int(as_float):
                raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
            value = int(as_float)
        if value < low or (high is not None and value > high):
            raise _range_error(text, low, high, False)
        return value

    parse.__name__ = "count"  # argparse names the type in its messages
    return parse


def real(low: float = 0.0, high: float | None = None, low_open: bool = False):
    """A finite float in [low, high] (or (low, high] with `low_open`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low or (low_open and value == low) or (high is not None and value > high):
            raise _range_error(text, low, high, low_open)
        return value

    parse.__name__ = "real"
    return parse
