"""rabbitflow's reaches into aiormq (`transport/amqp/internals.py`): each is there on the installed
aiormq, and with them switched off the contract suite still passes on aiormq's public paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import aiormq
import pytest

from rabbitflow.transport.amqp import broker as amqp
from rabbitflow.transport.amqp import decode, internals
from rabbitflow.urls import parse_urls

ROOT = Path(__file__).resolve().parents[2]
OFF = os.environ.get(internals.PATCHES_ENV, "on").lower() in {"off", "0", "false", "no"}


async def test_the_patches_are_what_the_environment_says(broker_url: str) -> None:
    transport = await amqp.connect(parse_urls(broker_url)[0], timeout=5, heartbeat=5, name="internals")
    try:
        channel = await transport.channel()
        assert isinstance(channel, amqp.AmqpChannel)
        assert internals.ENABLED is not OFF
        # The pipeline, the returns by order and the tolerant decoder: all on, or all off.
        assert (channel._pipeline is not None) is not OFF
        assert decode.install() is not OFF
        await channel.close()
    finally:
        await transport.close()


def test_every_private_field_is_there_on_this_aiormq(broker_url: str) -> None:
    """Fails on an aiormq release that dropped one: then pin below it or adapt internals.py."""
    assert aiormq.connection.FrameReceiver in (internals.FrameReceiver, decode._receiver)
    assert hasattr(internals.FrameReceiver, "get_frame")
    for name in internals._CHANNEL_NEEDS:
        assert hasattr(aiormq.Channel, name) or name in aiormq.Channel.__init__.__code__.co_names, name
    assert "_Channel__close_event" in aiormq.Channel.__init__.__code__.co_names or hasattr(
        aiormq.Channel, "_Channel__close_event"
    )


@pytest.mark.one_version  # aiormq's own paths, whatever the server
def test_the_contract_suite_passes_with_the_patches_off(broker_url: str) -> None:
    if OFF:
        return  # this run is the one with the patches off
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "rabbitmq or internals",
            "tests/transport/test_contract.py",
            "tests/transport/test_internals.py",
        ],
        cwd=ROOT,
        env={**os.environ, internals.PATCHES_ENV: "off", "RABBITFLOW_TEST_URL": broker_url},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
