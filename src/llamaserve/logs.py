"""A log line is one line: what a client chose cannot start another.

A request's path (percent-decoded: `%0d%0a` is CR LF), a model name or an error message
may hold any character; written as it is, a CR LF would forge the next line of the log,
a NUL or a terminal's escape sequence garble it. `OneLineFormatter` escapes, in the line
it formats, the C0 controls (CR, LF, tab, NUL...), DEL, the C1 controls, U+2028 and
U+2029 (line breaks to some readers) and lone surrogates (which no UTF-8 log can hold),
as Python writes them in a repr: `\\r`, `\\n`, `\\t`, `\\x00`, `\\x7f`, `\\x85`,
`\\u2028`, `\\ud800`. A backslash is left as it is: the escapes are for reading. A
traceback appended after the line keeps its own lines.
"""

from __future__ import annotations

import logging
import re

FORMAT = "%(asctime)s %(name)s %(message)s"
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def escape(text: str) -> str:
    """`text` with every character that could break or garble a line escaped."""
    return _CONTROL.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


class OneLineFormatter(logging.Formatter):
    """A formatter whose line (before any traceback) has its control characters escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape(super().formatMessage(record))


def configure(level: int = logging.INFO) -> None:
    """The process's logging: its root logger writes to stderr, every line escaped."""
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
