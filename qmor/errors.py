"""User-facing errors: one line that says what is wrong and how to fix it."""

import math


class QmorError(ValueError):
    """Bad input from the user. Scripts print it as one line and exit non-zero; everything else is a bug."""


class NotMergeable(QmorError):
    """The adapter has no single dense delta weight (its output depends on the token), so it cannot merge."""


def check_range(name: str, value, rule: str, low, high, example: str, integer: bool = False,
                open_low: bool = False, open_high: bool = False) -> None:
    """Refuse a setting outside [low, high] (open at either end on request), nan and infinity included."""
    ok = isinstance(value, int) if integer else isinstance(value, int | float) and math.isfinite(value)
    ok = ok and not isinstance(value, bool) and (low is None or (value > low if open_low else value >= low))
    ok = ok and (high is None or (value < high if open_high else value <= high))
    if not ok:
        raise QmorError(f"{name} must be {rule}, got {value!r}; pass e.g. {example}")
