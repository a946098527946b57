"""Logs: a line is one line, and the files are the operator's alone.

A log line: a request's path (percent-decoded: `%0d%0a` is CR LF), a model name or an
error message may hold any character; written as it is, a CR LF would forge the next
line of the log, a NUL or a terminal's escape sequence garble it. `OneLineFormatter`
escapes, in the line it formats, the C0 controls (CR, LF, tab, NUL...), DEL, the C1
controls, U+2028 and U+2029 (line breaks to some readers) and lone surrogates (which no
UTF-8 log can hold), as Python writes them in a repr: `\\r`, `\\n`, `\\t`, `\\x00`,
`\\x7f`, `\\x85`, `\\u2028`, `\\ud800`. A backslash is left as it is: the escapes are
for reading. A traceback appended after the line keeps its own lines.

Log files may name users, key ids, addresses and, when the operator turns it on,
prompts. Their directory is made 0700; when the private PostgreSQL cluster runs as
another user (the operator is root), 0750 with that user's group, so that its server can
write its own log there. The logs themselves are 0600, owned by the process that writes
them. Earlier versions made them 0755 and 0644: those are tightened where they are found.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

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


DIRECTORY = 0o700
SHARED_DIRECTORY = 0o750  # with the group of the cluster's server
LOG = 0o600


def private_log(path: Path, *, group: int | None = None) -> None:
    """Make `path` a log only its owner can read, in a directory others cannot enter (but
    `group`, when given); an existing log keeps what it holds."""
    private_directory(path.parent, group=group)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, LOG))
    if stat.S_IMODE(path.stat().st_mode) != LOG:
        path.chmod(LOG)


def private_directory(path: Path, *, group: int | None = None) -> None:
    """A directory others cannot enter. With `group`, that group may enter and list it;
    without, a group that was given it keeps it (the cluster's server writes there), but
    no more than that."""
    path.mkdir(DIRECTORY, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if group is not None:
        os.chown(path, -1, group)
        wanted = SHARED_DIRECTORY
    else:
        wanted = mode & SHARED_DIRECTORY
    if mode != wanted:
        path.chmod(wanted)
