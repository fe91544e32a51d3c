"""Settings from the environment: every App option and `run` flag from RABBITFLOW_* variables;
code arguments win over the environment, flags over both; `--env-file FILE` (docs/operations.md)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rabbitflow import App
from rabbitflow.cli.main import load_env_file, parser
from rabbitflow.errors import ConfigError
from rabbitflow.settings import ENV_OPTIONS, read_env_file

from .helpers import Admin, unique

ROOT = Path(__file__).resolve().parent.parent

BEFORE = dict(os.environ)  # as the tests of this module found it

ENVIRONMENT = {
    "RABBITFLOW_FAILOVER": "shuffle",
    "RABBITFLOW_PREFETCH": "7",
    "RABBITFLOW_CONCURRENCY": "3",
    "RABBITFLOW_HANDLER_TIMEOUT": "2.5",
    "RABBITFLOW_GRACEFUL_TIMEOUT": "4",
    "RABBITFLOW_HEARTBEAT": "11",
    "RABBITFLOW_CONNECT_TIMEOUT": "1.5",
    "RABBITFLOW_CONNECT_BUDGET": "9",
    "RABBITFLOW_PUBLISH_TIMEOUT": "6",
    "RABBITFLOW_URL": "amqp://u:secret@envhost:5672/",
}


@pytest.mark.unit
def test_every_app_option_comes_from_the_environment_and_code_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {f"RABBITFLOW_{o.upper()}" for o in ENV_OPTIONS} | {"RABBITFLOW_URL"} == set(ENVIRONMENT)
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    s = App("envsvc").settings
    assert (s.failover, s.prefetch, s.concurrency, s.handler_timeout) == ("shuffle", 7, 3, 2.5)
    assert (s.graceful_timeout, s.heartbeat, s.connect_timeout) == (4.0, 11, 1.5)
    assert (s.connect_budget, s.publish_timeout) == (9.0, 6.0)
    assert [e.host for e in s.endpoints] == ["envhost"]
    assert type(s.prefetch) is int  # a plain value, whatever marked the default

    # an argument given in code wins, also when it equals the default
    s = App("envsvc", "amqp://codehost", prefetch=64, failover="round-robin", handler_timeout=1).settings
    assert (s.prefetch, s.failover, s.handler_timeout) == (64, "round-robin", 1.0)
    assert [e.host for e in s.endpoints] == ["codehost"]
    assert s.concurrency == 3  # the others still come from the environment


@pytest.mark.unit
def test_a_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITFLOW_PREFETCH", "lots")
    with pytest.raises(ConfigError, match=r"RABBITFLOW_PREFETCH='lots': expected a whole number"):
        App("envsvc")
    monkeypatch.setenv("RABBITFLOW_PREFETCH", "0")
    with pytest.raises(ConfigError, match=r"prefetch=0"):  # checked as if given in code
        App("envsvc")
    monkeypatch.delenv("RABBITFLOW_PREFETCH")
    assert App("envsvc").settings.prefetch == 64  # nothing set: the default


@pytest.mark.unit
def test_run_flags_come_from_the_environment_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITFLOW_WORKERS", "3")
    monkeypatch.setenv("RABBITFLOW_HTTP_PORT", "9100")
    monkeypatch.setenv("RABBITFLOW_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("RABBITFLOW_LOG_FORMAT", "json")
    monkeypatch.setenv("RABBITFLOW_RELOAD", "false")
    args = parser().parse_args(["run", "svc:app"])
    assert (args.workers, args.http_port, args.log_level, args.log_format, args.reload) == (
        3,
        9100,
        "debug",
        "json",
        False,
    )
    args = parser().parse_args(
        ["run", "svc:app", "--workers", "2", "--log-format", "text", "--log-level", "error"]
    )
    assert (args.workers, args.log_format, args.log_level, args.http_port) == (2, "text", "error", 9100)
    monkeypatch.setenv("RABBITFLOW_WORKERS", "many")
    with pytest.raises(SystemExit, match="RABBITFLOW_WORKERS='many'"):
        parser()


@pytest.mark.unit
def test_env_files_are_read_and_the_real_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = tmp_path / "prod.env"
    env.write_text(
        "# the production settings\n\nRABBITFLOW_PREFETCH=12\nexport RABBITFLOW_CONCURRENCY='5'\n"
        'RABBITFLOW_FAILOVER="shuffle"\n'
    )
    assert read_env_file(env) == {
        "RABBITFLOW_PREFETCH": "12",
        "RABBITFLOW_CONCURRENCY": "5",
        "RABBITFLOW_FAILOVER": "shuffle",
    }
    for name in ("RABBITFLOW_PREFETCH", "RABBITFLOW_FAILOVER"):
        # Recorded as it is now (set or not), so that what the env file sets is undone after the
        # test: a RABBITFLOW_FAILOVER=shuffle left behind reorders every later test's nodes.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("RABBITFLOW_CONCURRENCY", "9")
    load_env_file(["run", "svc:app", "--env-file", str(env)])
    s = App("envsvc").settings
    assert (s.prefetch, s.concurrency, s.failover) == (12, 9, "shuffle")
    (tmp_path / "bad.env").write_text("RABBITFLOW_PREFETCH 12\n")
    with pytest.raises(ConfigError, match=r"bad\.env, line 1: expected NAME=value"):
        read_env_file(tmp_path / "bad.env")


async def test_env_file_gives_a_command_its_broker_url(broker_url: str, admin: Admin, tmp_path: Path) -> None:
    queue = unique("envfile")
    admin.queues.add(queue)
    await admin.channel.queue_declare(queue)
    (tmp_path / "local.env").write_text(f"RABBITFLOW_URL={broker_url}\n")
    environ = {k: v for k, v in os.environ.items() if k != "RABBITFLOW_URL"}
    ran = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "rabbitflow", "publish", "--env-file", "local.env", "--queue", queue, "hi"],
        cwd=tmp_path,
        env={**environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert [m.body for m in await admin.drain(queue)] == [b"hi"]
    missing = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "rabbitflow", "publish", "--env-file", "nope.env", "--queue", queue, "hi"],
        cwd=tmp_path,
        env={**environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (missing.returncode, missing.stderr) == (
        1,
        "rabbitflow: --env-file nope.env: No such file or directory\n",
    )


def test_no_rabbitflow_setting_is_left_in_the_environment_by_these_tests() -> None:
    """Runs after the others of this module: a RABBITFLOW_* variable one of them set and left
    (an env file read in-process) would change every later test's apps."""
    changed = {k: os.environ.get(k) for k in ENVIRONMENT if os.environ.get(k) != BEFORE.get(k)}
    assert not changed, changed
