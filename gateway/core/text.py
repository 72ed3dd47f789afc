"""Text a client controls: identifiers checked before they reach the store, and log lines kept to one line.

A NUL is a valid character of a Python string and of a URL (`%00`), but PostgreSQL's text type
refuses it (the query fails: a 500 where a 400 belongs), and a CR or LF written into a log line
lets a client forge whole lines (`%0A2026-01-01 00:00:00 CRITICAL ...`). So every identifier,
cursor and name a client sends is checked here (`check_text`: a 400 naming the parameter, the value
never echoed), and every log line goes through `SafeFormatter`, which escapes what got through.
"""

from __future__ import annotations

import logging
import re

from gateway.core.errors import invalid

MAX_ID = 256  # ids, cursors and names; ours are far shorter

# C0 and C1 controls (CR, LF, NUL, ESC, NEL, ...), the Unicode line and paragraph separators
# (str.splitlines and some log viewers break lines there) and lone surrogates (not encodable as
# UTF-8: PostgreSQL and most files refuse them).
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def has_control(text: str) -> bool:
    return CONTROL.search(text) is not None


def escape_controls(text: str) -> str:
    """Each control character as a visible escape (`\\x0a`, `\\u2028`); other text as it is."""
    return CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def check_text(value: str, param: str, max_chars: int = MAX_ID) -> str:
    """The value, if it is 1 to `max_chars` characters without control characters; else a 400
    naming `param`. The value is not repeated in the message: it is hostile by assumption."""
    if not value or len(value) > max_chars or has_control(value):
        raise invalid(
            f"'{escape_controls(param)}' must be 1 to {max_chars} characters without control characters.",
            param=escape_controls(param),
        )
    return value


class SafeFormatter(logging.Formatter):
    """A Formatter whose every record stays recognisable as one record: control characters in the
    message (and so in its arguments, which may hold client values) are escaped, and each line of
    a traceback is indented, so no text can pass for a record of its own."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: logging._SysExcInfoType) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("  " + escape_controls(line) for line in text.split("\n"))
