"""A request's row as PostgreSQL can store it (`storable`): the usual row as it is, text
PostgreSQL refuses escaped, a long value cut; fast, without a database."""

from __future__ import annotations

from datetime import UTC, datetime

from llamaserve.store.requests import TEXT_LIMIT, RequestRow, storable, storable_text


def row(**values: object) -> RequestRow:
    made = RequestRow("id", datetime.now(UTC), "POST", "/v1/chat/completions", "127.0.0.1")
    made.__dict__.update(values)
    return made


def test_a_usual_row_is_stored_as_it_is() -> None:
    for usual in (row(), row(model="modèle-中", username="bob"), row(prompt_tokens=3)):
        assert storable(usual) is usual


def test_text_postgresql_refuses_is_escaped_as_backslashreplace_writes_it() -> None:
    stored = storable(row(path="/\x00x", model="a\ud800", error="\\x00 kept"))
    assert (stored.path, stored.model, stored.error) == ("/\\x00x", "a\\ud800", "\\x00 kept")


def test_a_long_value_is_cut_with_its_length_and_stays_so() -> None:
    for value in ("p" * 1_000_000, "\x00" * TEXT_LIMIT, "é" * (TEXT_LIMIT + 1)):
        text = storable_text(value)
        assert len(text) <= TEXT_LIMIT and text.endswith(f"...[cut: {len(value)} characters]")
        assert storable_text(text) is text  # made storable once, left as it is after
    assert storable(row(model=3)).model == 3  # not text: asyncpg's to refuse
