"""`import rabbitflow` never pays for the SQL extra."""

from __future__ import annotations

import subprocess
import sys


def test_import_rabbitflow_does_not_import_sqlalchemy() -> None:
    code = (
        "import sys, rabbitflow, rabbitflow.testing, rabbitflow.cli\n"
        "app = rabbitflow.App('s', url='memory://')\n"
        "@app.consumer('q')\n"
        "async def h(body: dict) -> None: ...\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'asyncpg', 'aiosqlite')"
        " or m.startswith('rabbitflow.sql')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_schema_sql_prints_both_dialects() -> None:
    from rabbitflow.sql import schema_sql

    postgres, sqlite = schema_sql("postgresql"), schema_sql("sqlite")
    assert "CREATE TABLE rabbitflow_outbox" in postgres
    assert "CREATE TABLE rabbitflow_inbox" in postgres
    assert "FOR UPDATE" not in postgres
    assert "CREATE TRIGGER rabbitflow_outbox_notify" in postgres
    assert "BYTEA" in postgres
    assert "TRIGGER" not in sqlite
    assert "BLOB" in sqlite
