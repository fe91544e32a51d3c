"""The outbox's and the inbox's tables, as SQLAlchemy Core objects and as the SQL that creates them.

`rabbitflow_outbox` holds one row per published message: `batch` names the transaction that
wrote it and `seq` its place there. A transaction's first row (`seq = 0`, its head) is what a
relay locks to own the whole batch, so replicas never split one transaction's messages.
`rabbitflow_inbox` holds one row per (consumer, message id) an `exactly_once` consumer handled.

On PostgreSQL a statement trigger on the outbox calls `pg_notify('rabbitflow_outbox', '')`;
PostgreSQL delivers it when the inserting transaction commits, which wakes every relay at once.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    event,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.schema import DDL, CreateIndex, CreateTable

__all__ = ["NOTIFY_CHANNEL", "create_tables", "inbox_table", "metadata", "outbox_table", "schema_sql"]

NOTIFY_CHANNEL = "rabbitflow_outbox"

metadata = MetaData()

# BIGINT identity on PostgreSQL; SQLite only auto-increments an INTEGER PRIMARY KEY.
_Id = BigInteger().with_variant(Integer(), "sqlite")

outbox_table = Table(
    "rabbitflow_outbox",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("batch", String(32), nullable=False),  # one per transaction (a uuid4 in hex)
    Column("seq", Integer, nullable=False),  # the message's place in its transaction, from 0
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("available_at", DateTime(timezone=True), nullable=False),  # later after a failed send
    Column("sent_at", DateTime(timezone=True)),  # set once the broker confirmed the whole batch
    Column("attempts", Integer, nullable=False, server_default=text("0")),  # failed sends (on the head)
    Column("error", Text),  # the last failed send's error (on the head)
    Column("exchange", String(255), nullable=False),
    Column("routing_key", String(255), nullable=False),
    Column("message_id", String(255), nullable=False),
    Column("content_type", String(255)),
    Column("headers", JSON(none_as_null=True)),
    Column("body", LargeBinary, nullable=False),
    Column("persistent", Boolean, nullable=False),
    Column("mandatory", Boolean, nullable=False),
    # What a relay scans: the heads of unsent batches, oldest first.
    Index(
        "rabbitflow_outbox_pending",
        "id",
        postgresql_where=text("sent_at IS NULL AND seq = 0"),
        sqlite_where=text("sent_at IS NULL AND seq = 0"),
    ),
    Index("rabbitflow_outbox_batch", "batch"),
    # What pruning deletes: sent rows by age.
    Index(
        "rabbitflow_outbox_sent",
        "sent_at",
        postgresql_where=text("sent_at IS NOT NULL"),
        sqlite_where=text("sent_at IS NOT NULL"),
    ),
)

inbox_table = Table(
    "rabbitflow_inbox",
    metadata,
    Column("consumer", String(255), primary_key=True),  # the consumer's queue
    Column("message_id", String(255), primary_key=True),
    Column("handled_at", DateTime(timezone=True), nullable=False),
    Index("rabbitflow_inbox_handled_at", "handled_at"),
)

_NOTIFY_DDL = (
    f"""CREATE OR REPLACE FUNCTION rabbitflow_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{NOTIFY_CHANNEL}', '');
    RETURN NULL;
END
$$""",
    "DROP TRIGGER IF EXISTS rabbitflow_outbox_notify ON rabbitflow_outbox",
    """CREATE TRIGGER rabbitflow_outbox_notify AFTER INSERT ON rabbitflow_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION rabbitflow_outbox_notify()""",
)

for _statement in _NOTIFY_DDL:
    event.listen(
        outbox_table,
        "after_create",
        DDL(_statement).execute_if(dialect="postgresql"),  # type: ignore[no-untyped-call]
    )


async def create_tables(engine: AsyncEngine) -> None:
    """Create the tables (and on PostgreSQL the notify trigger) that do not exist yet."""
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)


def _dialect(name: str | Dialect) -> Dialect:
    if not isinstance(name, str):
        return name
    from sqlalchemy.dialects import registry

    try:
        return registry.load(name)()  # type: ignore[no-any-return]
    except Exception:
        raise ValueError(f"unknown SQL dialect {name!r}; try 'postgresql' or 'sqlite'") from None


def schema_sql(dialect: str | Dialect = "postgresql") -> str:
    """The DDL that `create_tables` runs, as SQL for `dialect` ("postgresql", "sqlite", or a
    SQLAlchemy `Dialect`): for a migration tool, or to read before deploying."""
    target = _dialect(dialect)
    statements: list[str] = []
    for table in metadata.sorted_tables:
        statements.append(str(CreateTable(table).compile(dialect=target)).strip())
        statements.extend(
            str(CreateIndex(index).compile(dialect=target)).strip()
            for index in sorted(table.indexes, key=lambda i: i.name or "")
        )
        if table is outbox_table and target.name == "postgresql":
            statements.extend(_NOTIFY_DDL)
    return "".join(f"{statement};\n\n" for statement in statements)
