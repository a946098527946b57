"""The store's error family. Every message is one line saying what is wrong and what to do.

StoreError
├── DatabaseUnavailable   the server cannot be reached, or refuses us
├── SchemaMismatch        the database is not initialised, outdated, or newer than this code
├── InvalidValue          a username, limit or key state the store does not accept
├── UserExists            a duplicate username
├── NoSuchUser            an unknown username
└── NoSuchKey             an unknown key id
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of the store's errors; str(error) is the message for the operator."""


class DatabaseUnavailable(StoreError):
    pass


class SchemaMismatch(StoreError):
    def __init__(self, message: str, *, found: int | None, expected: int) -> None:
        super().__init__(message)
        self.found = found  # None: the database has never been initialised
        self.expected = expected

    @property
    def too_new(self) -> bool:
        return self.found is not None and self.found > self.expected


class InvalidValue(StoreError):
    pass


class UserExists(StoreError):
    pass


class NoSuchUser(StoreError):
    pass


class NoSuchKey(StoreError):
    pass
