"""Log files and their directory, for the operator alone: a log may name users, key ids,
addresses and, when the operator turns it on, prompts.

The directory is made 0700; when the private PostgreSQL cluster runs as another user
(the operator is root), 0750 with that user's group, so that its server can write its
own log there. The logs themselves are 0600, owned by the process that writes them.
Earlier versions made them 0755 and 0644: those are tightened where they are found.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

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
