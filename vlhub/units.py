"""Byte sizes as people write them ("5GB", "500MiB") and as vlhub prints them, counts with their nouns ("1 entry",
"2 entries"); timestamps as it records them."""

from __future__ import annotations

import datetime
import re

from vlhub.errors import UserError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes in "5GB" (decimal, as Hugging Face counts), "10GiB" (binary) or a plain number."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise UserError(f"cannot read size {text!r}: write it like 5GB, 500MB or 2GiB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise UserError(f"size {text!r} must be positive")
    return size


def format_size(n: int | float) -> str:
    """Decimal units, three significant figures: 16.6 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def plural(count: int, noun: str, many: str | None = None) -> str:
    """`1 entry`, `2 entries`, `0 files`: the count and its noun agreeing (`many`: an irregular plural)."""
    if count == 1:
        return f"{count} {noun}"
    if many is None:
        many = noun[:-1] + "ies" if noun.endswith("y") and noun[-2:-1] not in "aeiou" else noun + "s"
    return f"{count} {many}"


def format_count(n: int) -> str:
    """Parameter counts: 8.29B, 1.54M."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def now_iso() -> str:
    """The current UTC time as manifests and records store it: 2026-11-24T06:44:42+00:00."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
