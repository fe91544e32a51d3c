"""Effectively once on SQL databases: a transactional outbox and an idempotent inbox.

Needs the `sql` extra (`pip install 'rabbitflow[sql]'`: SQLAlchemy 2 asyncio, asyncpg for
PostgreSQL, aiosqlite for tests). `import rabbitflow` never imports this package.
docs/effectively-once.md says what it guarantees and what not.
"""

from rabbitflow.sql.inbox import Inbox as Inbox
from rabbitflow.sql.inbox import Verdict as Verdict
from rabbitflow.sql.outbox import Outbox as Outbox
from rabbitflow.sql.schema import schema_sql as schema_sql
from rabbitflow.sql.transaction import Transaction as Transaction

__all__ = ["Inbox", "Outbox", "Transaction", "Verdict", "schema_sql"]
