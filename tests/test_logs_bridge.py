"""aio-pika/aiormq (stdlib ``logging``) records go through structlog: one JSON line per
event, tracebacks folded into it, their DEBUG never shown, nothing left behind by a test."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.broker import needs_broker

from maildefer import logs

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# A real client: a connection refused by a port with nothing listening, then a connection
# of our own (named, so the test closes this one only) closed by the broker.
SCRIPT = textwrap.dedent(
    """
    import asyncio, subprocess, sys, uuid
    import aio_pika
    from maildefer import logs

    logs.configure(level=sys.argv[1], fmt="json")
    NAME = f"maildefer-test-logs-{uuid.uuid4().hex[:8]}"

    async def main():
        try:
            await aio_pika.connect_robust("amqp://guest:guest@127.0.0.1:1/", timeout=2)
        except Exception as exc:
            print("refused", type(exc).__name__, file=sys.stdout)
        connection = await aio_pika.connect_robust(
            "amqp://guest:guest@127.0.0.1:5672/", client_properties={"connection_name": NAME}
        )
        await connection.channel()
        listing = subprocess.run(
            ["rabbitmqctl", "-q", "list_connections", "name", "client_properties", "pid"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout
        pids = [line.split("\\t")[-1] for line in listing.splitlines() if NAME in line]
        assert len(pids) == 1, listing
        subprocess.run(
            ["rabbitmqctl", "close_connection", pids[0], "closed by the test"],
            capture_output=True, check=True, timeout=30,
        )
        await asyncio.sleep(2)  # the loss is noticed, logged, and the robust client retries
        await connection.close()

    asyncio.run(main())
    """
)


@pytest.fixture
def buffer() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.configure(level="info", fmt="json", stream=out)
    yield out
    logs.reset()


def bridges(name: str) -> list[logging.Handler]:
    return [h for h in logging.getLogger(name).handlers if isinstance(h, logs.StdlibBridge)]


@needs_broker
@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="rabbitmqctl not installed")
@pytest.mark.slow
def test_a_lost_connection_is_json_lines_without_raw_tracebacks(tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run(
        [sys.executable, str(script), "info"],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "refused" in result.stdout
    lines = result.stderr.splitlines()
    # Every line of standard error is one whole JSON event: no raw traceback line.
    events = [json.loads(line) for line in lines]
    assert not [line for line in lines if line.startswith(("Traceback", "  File "))]
    by_logger = [e for e in events if e.get("logger", "").startswith(("aiormq", "aio_pika"))]
    assert by_logger, lines
    assert all(e["level"] in ("info", "warning", "error", "critical") for e in by_logger)
    refused = [e for e in by_logger if "error when creating transport" in e["event"]]
    assert len(refused) == 1, by_logger
    forced = [e for e in by_logger if "CONNECTION_FORCED" in e["event"] + e.get("exception", "")]
    assert forced, by_logger
    folded = [e for e in by_logger if "exception" in e]
    assert folded and all("Traceback (most recent call last)" in e["exception"] for e in folded)


def test_library_records_are_level_filtered(buffer: io.StringIO) -> None:
    library = logging.getLogger("aiormq.connection")
    library.debug("Sending frame %r", b"x")  # per-frame chatter: never shown
    library.info("connected to %s", "node1")
    library.warning("blocked by %s", "disk alarm")
    events = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert [(e["event"], e["level"], e["logger"]) for e in events] == [
        ("connected to node1", "info", "aiormq.connection"),
        ("blocked by disk alarm", "warning", "aiormq.connection"),
    ]

    quiet = io.StringIO()
    logs.configure(level="warning", fmt="json", stream=quiet)
    logging.getLogger("aio_pika.robust_connection").info("reconnecting")
    logging.getLogger("aio_pika.robust_connection").error("gave up")
    assert [json.loads(line)["event"] for line in quiet.getvalue().splitlines()] == ["gave up"]

    # Even at debug, the libraries' DEBUG (one line per frame) stays out.
    chatty = io.StringIO()
    logs.configure(level="debug", fmt="json", stream=chatty)
    library.debug("Sending frame %r", b"x")
    assert chatty.getvalue() == ""


def test_a_traceback_is_one_field_of_one_line(buffer: io.StringIO) -> None:
    try:
        raise ConnectionResetError("peer went away")
    except ConnectionResetError:
        logging.getLogger("aiormq.connection").exception("Cancelling cause reader exited")
    [line] = buffer.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "Cancelling cause reader exited"
    assert event["exception"].startswith("Traceback (most recent call last)")
    assert "ConnectionResetError: peer went away" in event["exception"]


def test_configuring_again_replaces_the_bridge_and_reset_removes_it() -> None:
    for _ in range(3):
        logs.configure(level="info", fmt="json", stream=io.StringIO())
    assert all(len(bridges(name)) == 1 for name in logs.BRIDGED_LOGGERS)
    logs.reset()
    assert all(bridges(name) == [] for name in logs.BRIDGED_LOGGERS)
    assert logging.getLogger("aiormq").propagate is True


def test_without_structlog_configured_warnings_still_reach_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure(level="info", fmt="json", stream=io.StringIO())
    import structlog

    structlog.reset_defaults()  # what other tests' fixtures do: the bridge stays
    try:
        logging.getLogger("aiormq.connection").info("not shown")
        logging.getLogger("aiormq.connection").warning("shown as without the bridge")
    finally:
        logs.reset()
    err = capsys.readouterr().err
    assert "shown as without the bridge" in err and "not shown" not in err
