"""Webhook targets and deliveries (deskgen/jobs/webhooks.py) against a real HTTP receiver on 127.0.0.1:
the allow-list, signatures the receiver verifies, retries with backoff on 5xx, none on a final 4xx, and a
receiver that is down."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from deskgen.errors import InvalidParameter
from deskgen.jobs.webhooks import check_target, deliver
from deskgen.tools.redis import free_port
from deskgen_client.webhooks import new_secret, verify

pytestmark = pytest.mark.unit

SECRET = new_secret()


class Receiver:
    """A real HTTP server on loopback answering each POST with the next of ``statuses`` (then 200)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append((dict(self.headers.items()), body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    r = Receiver(getattr(request, "param", []))
    yield r
    r.close()


def test_targets_outside_the_allow_list_are_refused_naming_the_field() -> None:
    cases = {
        "ftp://example.com/x": "must be an http:// or https:// URL",
        "http://user:pw@example.com/": "must not carry credentials",
        "http://127.0.0.1:9/x": "resolves to 127.0.0.1, a loopback, private or reserved address",
        "http://10.1.2.3/x": "resolves to 10.1.2.3",
        "http://169.254.169.254/latest/meta-data": "resolves to 169.254.169.254",
        "http://[::1]/x": "resolves to ::1",
    }
    for url, message in cases.items():
        with pytest.raises(InvalidParameter) as info:
            check_target(url)
        assert info.value.field == "webhook" and message in info.value.message, (url, info.value.message)
    assert check_target("http://127.0.0.1:9/x", allow=["127.0.0.1"]) == "http://127.0.0.1:9/x"
    assert check_target("http://10.1.2.3/x", allow=["10.0.0.0/8"]) == "http://10.1.2.3/x"
    # A public address needs no allow-list (resolution injected: no network here).
    assert check_target("https://hooks.example.com/x", resolve=lambda host: ["93.184.216.34"])


@pytest.mark.parametrize("receiver", [[503, 500]], indirect=True)
def test_a_signed_event_is_retried_with_backoff_until_the_receiver_takes_it(receiver: Receiver) -> None:
    waits: list[float] = []
    result = deliver(receiver.url, SECRET, "msg_1", "job.completed", {"id": "job_1"}, allow=["127.0.0.1"],
                     base_delay_s=0.5, sleep=waits.append)  # fmt: skip
    assert result.delivered and [a.status for a in result.attempts] == [503, 500, 200]
    assert waits == [0.5, 1.0]  # exponential
    bodies = {body for _, body in receiver.received}
    assert len(bodies) == 1  # the same event each time
    for headers, body in receiver.received:
        assert verify(SECRET, body, headers) == {"type": "job.completed", "data": {"id": "job_1"}}
        assert headers["webhook-id"] == "msg_1"


@pytest.mark.parametrize("receiver", [[410]], indirect=True)
def test_a_final_4xx_is_not_retried(receiver: Receiver) -> None:
    result = deliver(receiver.url, SECRET, "msg_2", "job.started", {}, allow=["127.0.0.1"], sleep=lambda s: None)
    assert not result.delivered and [a.status for a in result.attempts] == [410]


def test_a_receiver_that_is_down_gets_every_attempt_then_the_delivery_fails() -> None:
    url = f"http://127.0.0.1:{free_port()}/hooks"
    waits: list[float] = []
    result = deliver(url, SECRET, "msg_3", "job.completed", {}, allow=["127.0.0.1"], max_attempts=4,
                     base_delay_s=1.0, max_total_s=60, sleep=waits.append)  # fmt: skip
    assert not result.delivered and len(result.attempts) == 4
    assert all(a.status is None and "ConnectError" in (a.error or "") for a in result.attempts)
    assert waits == [1.0, 2.0, 4.0]
    # Bounded in time too: with 5 s in all, the 4 s wait is not taken.
    short = deliver(url, SECRET, "msg_4", "job.completed", {}, allow=["127.0.0.1"], max_attempts=10,
                    base_delay_s=1.0, max_total_s=5, sleep=lambda s: None)  # fmt: skip
    assert len(short.attempts) == 3
    assert json.loads(json.dumps(short.as_dict()))["attempts"][0]["status"] is None
