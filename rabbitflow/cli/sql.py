"""`rabbitflow sql schema`: the outbox and inbox tables as SQL, for teams that migrate by hand or
with Alembic (`rabbitflow[sql]`)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_sql"]

DIALECTS = ("postgresql", "sqlite")


def add_sql(commands: Any) -> None:
    sql = commands.add_parser(
        "sql",
        help="the outbox and inbox tables of rabbitflow.sql",
        description="Print the SQL that creates rabbitflow.sql's tables (outbox, inbox and, on "
        "PostgreSQL, the trigger that wakes the relay on commit), for a migration.",
    )
    actions = sql.add_subparsers(dest="sql_action", required=True, metavar="ACTION")
    schema = actions.add_parser("schema", help="print the CREATE statements")
    schema.add_argument(
        "--dialect", choices=DIALECTS, default="postgresql", help="the database (default: %(default)s)"
    )
    schema.add_argument("--log-level", default="warning", help=argparse.SUPPRESS)
    schema.set_defaults(handler=_schema)


def _schema(args: argparse.Namespace) -> int:
    try:
        from rabbitflow.sql import schema_sql
    except ImportError as exc:
        raise SystemExit(
            f"rabbitflow: sql schema needs the sql extra: pip install 'rabbitflow[sql]' ({exc})"
        ) from None
    print(schema_sql(args.dialect))
    return 0
