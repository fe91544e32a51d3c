"""Fixtures for rabbitflow.sql: a SQLite engine per test, and a PostgreSQL database per test on
the project's own cluster (scripts/postgres.sh), which fails the test loudly when it is not up."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

PG_URL = os.environ.get("RABBITFLOW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5433/postgres")


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The server's URL, after checking it answers: a missing server fails the test."""

    async def probe() -> None:
        connection = await asyncio.wait_for(asyncpg.connect(PG_URL), 10)
        await connection.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_URL.split('@')[-1]} ({exc!r}); start the project's "
            "own cluster with `scripts/postgres.sh start` (or set RABBITFLOW_TEST_PG_URL)",
            pytrace=False,
        )
    return PG_URL


@pytest.fixture
async def pg_database(pg_url: str) -> AsyncIterator[str]:
    """A fresh database for one test (dropped afterwards); yields its SQLAlchemy asyncpg URL."""
    name = f"rf_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = pg_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    yield f"{base}/{name}"
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def pg_engine(pg_database: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(pg_database, pool_size=10)
    yield engine
    await engine.dispose()


@pytest.fixture
async def sqlite_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    yield engine
    await engine.dispose()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgres: needs the project's PostgreSQL (scripts/postgres.sh)")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test on PostgreSQL is `postgres`, not `unit` (the root conftest marks every test that
    needs no broker `unit`: `make test-unit` must not need a database either)."""
    for item in items:
        if "pg_url" in getattr(item, "fixturenames", ()):
            item.own_markers = [m for m in item.own_markers if m.name != "unit"]
            item.add_marker(pytest.mark.postgres)
