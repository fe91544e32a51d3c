"""Cluster URL lists and password masking."""

from __future__ import annotations

import logging

import pytest

from rabbitflow import App, ConfigError, ConnectionFailed
from rabbitflow.urls import DEFAULT_URL, mask, parse_urls


def test_semicolon_list_and_list_give_the_same_nodes() -> None:
    text = "amqp://u:p@rmq1:5672/;amqps://v:q@rmq2/prod ; amqp://rmq3"
    nodes = parse_urls(text)
    assert [(n.scheme, n.host, n.port, n.vhost) for n in nodes] == [
        ("amqp", "rmq1", 5672, "/"),
        ("amqps", "rmq2", 5671, "prod"),
        ("amqp", "rmq3", 5672, "/"),
    ]
    assert parse_urls([part.strip() for part in text.split(";")]) == nodes


def test_environment_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RABBITFLOW_URL", raising=False)
    assert parse_urls(None)[0].url == DEFAULT_URL
    monkeypatch.setenv("RABBITFLOW_URL", "amqp://a:b@envhost:5673/")
    assert parse_urls(None)[0].host == "envhost"


def test_vhost_is_unquoted() -> None:
    assert parse_urls("amqp://h/%2Fstaging")[0].vhost == "/staging"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://u:s3cret@h/", "unknown scheme 'http'"),
        ("amqp://u:s3cret@h:port/", "bad host or port"),
        ("amqp://u:s3cret@:5672/", "no host"),
        ("", "no broker URL"),
        ("memory://;amqp://h", "cannot be mixed"),
    ],
)
def test_malformed_urls_name_the_entry_without_its_password(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_urls(url)
    assert "s3cret" not in str(info.value)


def test_mask_hides_every_password() -> None:
    masked = mask("tried amqp://admin:pw@rmq1:5672/ and amqps://bob:x@rmq2/")
    assert masked == "tried amqp://admin:**@rmq1:5672/ and amqps://bob:**@rmq2/"
    assert "pw" not in masked


def test_endpoint_repr_and_str_are_masked() -> None:
    node = parse_urls("amqp://guest:topsecret@rmq1/")[0]
    assert "topsecret" not in repr(node)
    assert "topsecret" not in str(node)
    assert str(node) == "amqp://guest:**@rmq1/"


def test_tls_options_stay_with_their_entry() -> None:
    node = parse_urls("amqps://app:pw@rmq1:5671/prod?cafile=/etc/ca.pem&certfile=/etc/c.pem;amqp://rmq2")[0]
    assert (node.scheme, node.port, node.vhost) == ("amqps", 5671, "prod")
    assert node.url.endswith("?cafile=/etc/ca.pem&certfile=/etc/c.pem")
    assert str(node) == "amqps://app:**@rmq1:5671/prod?cafile=/etc/ca.pem&certfile=/etc/c.pem"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("amqp://rf:p@ss;w0rd@127.0.0.1:1/", "amqp://rf:**@127.0.0.1:1/"),
        ("amqp://u:at@the@end@@h/", "amqp://u:**@h/"),
        ("amqp://u:sl/ash@h/", "amqp://u:**@h/"),
        ("amqp://u:p;x@h1;amqps://v:q@h2", "amqp://u:**@h1;amqps://v:**@h2"),
        ("amqp://rmq1:5672/;amqp://v:p@h/", "amqp://rmq1:5672/;amqp://v:**@h/"),
        ("failed: Endpoint('amqp://u:s;e@cret@h') (refused)", "failed: Endpoint('amqp://u:**@h') (refused)"),
    ],
)
def test_mask_hides_passwords_holding_at_semicolon_and_slash(text: str, masked: str) -> None:
    assert mask(text) == masked


def test_a_semicolon_inside_a_password_does_not_split_the_list() -> None:
    nodes = parse_urls("amqp://rf:p@ss;w0rd@rmq1/;amqp://v:q;r@rmq2:5673/")
    assert [(n.host, n.port, n.user) for n in nodes] == [("rmq1", 5672, "rf"), ("rmq2", 5673, "v")]
    assert str(nodes[0]) == "amqp://rf:**@rmq1/"
    with pytest.raises(ConfigError, match="';' in the host; give every node of a list its own scheme"):
        parse_urls("amqp://rmq1;rmq2")


# Pieces of one password, each checked on its own: a mask that stops at its "@" or ";" leaks the rest.
PIECES = ("PWa", "PWb", "PWc")


@pytest.mark.parametrize("password", ["PWa@PWb;PWc", "PWa;PWb@PWc@", "PWa@PWb@PWc"])
@pytest.mark.parametrize("as_list", [True, False], ids=["list", "string"])
async def test_no_password_in_repr_errors_or_debug_logs_of_a_failed_connect(
    caplog: pytest.LogCaptureFixture, broker_url: str, password: str, as_list: bool
) -> None:
    broker = parse_urls(broker_url)[0]
    urls = [
        f"amqp://rf:{password}@127.0.0.1:1/",  # nothing listens: connection refused
        f"amqp://{broker.user}:{password}@{broker.host}:{broker.port}/",  # the login is refused
    ]
    caplog.set_level(logging.DEBUG)
    for name in ("rabbitflow", "aiormq", "aio_pika"):
        caplog.set_level(logging.DEBUG, logger=name)
    app = App("svc", url=urls if as_list else ";".join(urls), connect_timeout=1, connect_budget=1.5)
    assert len(app.endpoints) == 2
    with pytest.raises(ConnectionFailed) as info:
        await app.start()

    assert "refused" in str(info.value)
    assert any(r.name.startswith("aiormq") and r.levelno == logging.DEBUG for r in caplog.records)
    shown = [repr(app), str(info.value), repr(info.value), caplog.text]
    shown += [record.getMessage() for record in caplog.records]
    for text in shown:
        for piece in PIECES:
            assert piece not in text, text
