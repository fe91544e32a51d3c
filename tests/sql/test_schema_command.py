"""`rabbitflow sql schema`: the tables as SQL, the same that `Outbox.create_tables()` makes."""

from __future__ import annotations

import subprocess
import sys

import asyncpg

from rabbitflow.sql import schema_sql


def sql(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rabbitflow", "sql", *args], capture_output=True, text=True, timeout=60
    )


def test_it_prints_the_schema_of_each_dialect() -> None:
    for dialect in ("postgresql", "sqlite"):
        printed = sql("schema", "--dialect", dialect)
        assert printed.returncode == 0, printed.stderr
        assert printed.stdout.strip() == schema_sql(dialect).strip()
        assert "CREATE TABLE rabbitflow_outbox" in printed.stdout
        assert "CREATE TABLE rabbitflow_inbox" in printed.stdout
    assert "pg_notify" in sql("schema").stdout  # postgresql by default: the relay's wake-up


async def test_what_it_prints_creates_the_tables_on_postgresql(pg_database: str) -> None:
    url = pg_database.replace("postgresql+asyncpg://", "postgresql://", 1)
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(sql("schema").stdout)
        tables = {r["tablename"] for r in await connection.fetch("SELECT tablename FROM pg_tables")}
    finally:
        await connection.close()
    assert {"rabbitflow_outbox", "rabbitflow_inbox"} <= tables


def test_an_unknown_dialect_is_refused_in_one_line() -> None:
    refused = sql("schema", "--dialect", "oracle")
    assert refused.returncode == 2
    assert "invalid choice: 'oracle'" in refused.stderr
