"""Cluster URL lists and password masking."""

from __future__ import annotations

import pytest

from rabbitflow import ConfigError
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
