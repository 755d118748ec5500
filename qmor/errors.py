"""User-facing errors: one line that says what is wrong and how to fix it."""


class QmorError(ValueError):
    """Bad input from the user. Scripts print it as one line and exit non-zero; everything else is a bug."""


class NotMergeable(QmorError):
    """The adapter's output depends on the token (routing), so no single dense delta weight exists."""
