"""`rabbitflow asyncapi MODULE:APP`: the service's AsyncAPI 3.0 document, as JSON or YAML."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from rabbitflow.asyncapi import document, markdown
from rabbitflow.cli.apps import load_app

__all__ = ["add_asyncapi", "dump"]


def dump(doc: dict[str, Any], fmt: str) -> str:
    if fmt == "markdown":
        return markdown(doc)
    if fmt == "yaml":
        try:
            import yaml
        except ImportError:
            raise SystemExit("rabbitflow: --format yaml needs PyYAML: pip install pyyaml") from None
        text: str = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
        return text
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"


def add_asyncapi(commands: Any, levels: Sequence[str]) -> None:
    def run(args: argparse.Namespace) -> int:
        text = dump(document(load_app(args.app), version=args.service_version), args.format)
        if args.out is None:
            sys.stdout.write(text)
            return 0
        try:
            Path(args.out).write_text(text)
        except OSError as exc:
            raise SystemExit(f"rabbitflow: cannot write {args.out}: {exc.strerror}") from None
        print(f"wrote {args.out}", file=sys.stderr)
        return 0

    sub = commands.add_parser(
        "asyncapi",
        help="print the service's AsyncAPI 3.0 document (no broker needed)",
        description="Describe the service as an AsyncAPI 3.0 document: its servers (passwords "
        "masked), a channel per consumed queue and per publish_to destination, receive, send and "
        "request-reply operations, message payloads as JSON Schema from the handlers' annotations, "
        "and each queue's retry and parking topology (x-rabbitflow). Render it with any AsyncAPI "
        "viewer (docs/asyncapi.md).",
    )
    sub.add_argument("app", metavar="MODULE:APP", help="the service: a module or file path, a colon, the App")
    sub.add_argument(
        "--format",
        choices=["json", "yaml", "markdown"],
        default="json",
        help="json, yaml (needs PyYAML), or markdown: a readable page for a docs site (default: json)",
    )
    sub.add_argument("--out", metavar="FILE", help="write the document to FILE instead of stdout")
    sub.add_argument(
        "--service-version",
        default="0.0.0",
        metavar="VERSION",
        help="the service's version, for info.version (default: %(default)s)",
    )
    sub.add_argument(
        "--log-level", default="warning", metavar="LEVEL", type=str.lower, choices=levels, help="log level"
    )
    sub.set_defaults(handler=run)
