"""fluxfill_engine.serve.webhooks: Standard Webhooks signatures, and delivery to a loopback receiver."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import queue
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from fluxfill_engine.serve import urlguard
from fluxfill_engine.serve.urlguard import UrlPolicy
from fluxfill_engine.serve.webhooks import WebhookSender, generate_secret, sign

# ---- signatures -----------------------------------------------------------------------------------------


def test_sign_is_the_hmac_of_id_timestamp_and_body() -> None:
    secret = generate_secret()
    body = b'{"type":"task.completed","data":{"id":"t1"}}'
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = hmac.new(key, b"msg_1.1700000000." + body, hashlib.sha256).digest()
    assert sign(secret, "msg_1", 1700000000, body) == "v1," + base64.b64encode(expected).decode()
    assert sign(secret, "msg_2", 1700000000, body) != sign(secret, "msg_1", 1700000000, body)


def test_sign_matches_the_specifications_example() -> None:
    """The example of the Standard Webhooks libraries' own tests."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_a_secret_without_the_prefix_is_raw_text() -> None:
    expected = hmac.new(b"my shared secret", b"msg_1.5.{}", hashlib.sha256).digest()
    assert sign("my shared secret", "msg_1", 5, b"{}") == "v1," + base64.b64encode(expected).decode()
    for bad in ("", "whsec_", "whsec_@@@@"):
        with pytest.raises(ValueError, match="webhook secret"):
            sign(bad, "msg_1", 5, b"{}")


def test_generated_secrets_are_32_random_bytes() -> None:
    first, second = generate_secret(), generate_secret()
    assert first.startswith("whsec_") and first != second
    assert len(base64.b64decode(first.removeprefix("whsec_"))) == 32


# ---- a loopback receiver --------------------------------------------------------------------------------


class Receiver(http.server.ThreadingHTTPServer):
    """Answers each POST with the next of ``answers`` (then 200) and records (headers, body)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.answers: list[int] = []
        self.received: list[tuple[dict[str, str], bytes]] = []

    @property
    def url(self) -> str:
        return f"http://hooks.example.test:{self.server_address[1]}/hook"


class ReceiverHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        server: Receiver = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        status = server.answers.pop(0) if server.answers else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def resolver(host: str, port: int) -> list[str]:
    table = {"hooks.example.test": ["127.0.0.1"], "internal.example.test": ["192.168.0.1"]}
    if host not in table:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return table[host]


POLICY = UrlPolicy(allow=True, timeout_s=5.0, trusted_networks=("127.0.0.1/32",), resolve=resolver)


class Results:
    """``on_result`` for the tests: every (msg_id, result) in a queue."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[str, dict]] = queue.Queue()

    def __call__(self, msg_id: str, result: dict) -> None:
        self.queue.put((msg_id, result))

    def one(self) -> tuple[str, dict]:
        return self.queue.get(timeout=10)


def sender(
    results: Results, policy: UrlPolicy = POLICY, delays: tuple[float, ...] = (0.01,) * 5
) -> WebhookSender:
    return WebhookSender(generate_secret(), policy, delays, on_result=results)


def test_a_delivery_is_signed_json(receiver: Receiver) -> None:
    results = Results()
    webhooks = sender(results)
    msg_id = webhooks.send(receiver.url, "task.completed", {"id": "t1", "outputs": ["/v1/files/t1/0.png"]})
    assert results.one() == (msg_id, {"delivered": True, "attempts": 1, "status": 200, "error": None})
    assert webhooks.close(5)
    [(headers, body)] = receiver.received
    assert msg_id.startswith("msg_") and headers["webhook-id"] == msg_id
    assert headers["content-type"] == "application/json"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert headers["webhook-signature"] == sign(
        webhooks.secret, msg_id, int(headers["webhook-timestamp"]), body
    )
    message = json.loads(body)
    assert message["type"] == "task.completed"
    assert message["data"] == {"id": "t1", "outputs": ["/v1/files/t1/0.png"]}
    assert message["timestamp"].endswith("Z") and "T" in message["timestamp"]


def test_a_delivery_verifies_with_the_standard_webhooks_library(receiver: Receiver) -> None:
    standardwebhooks = pytest.importorskip("standardwebhooks")
    results = Results()
    webhooks = sender(results)
    webhooks.send(receiver.url, "task.failed", {"id": "t2", "error": "out of memory"})
    assert results.one()[1]["delivered"]
    webhooks.close(5)
    [(headers, body)] = receiver.received
    verifier = standardwebhooks.Webhook(webhooks.secret)
    assert verifier.verify(body, headers)["data"] == {"id": "t2", "error": "out of memory"}
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verifier.verify(body.replace(b"t2", b"t3"), headers)


def test_5xx_is_retried_until_delivered(receiver: Receiver) -> None:
    receiver.answers = [500, 500]
    results = Results()
    webhooks = sender(results)
    msg_id = webhooks.send(receiver.url, "task.completed", {"id": "t1"})
    assert results.one() == (msg_id, {"delivered": True, "attempts": 3, "status": 200, "error": None})
    assert webhooks.close(5)
    assert len(receiver.received) == 3
    assert {headers["webhook-id"] for headers, _ in receiver.received} == {msg_id}  # one id: receivers dedupe
    assert results.queue.empty()  # on_result once per message


def test_429_is_retried_and_the_retries_run_out(receiver: Receiver) -> None:
    receiver.answers = [429, 503, 503]
    results = Results()
    webhooks = sender(results, delays=(0.01, 0.01))
    webhooks.send(receiver.url, "task.completed", {"id": "t1"})
    assert results.one()[1] == {"delivered": False, "attempts": 3, "status": 503, "error": "HTTP 503"}
    assert webhooks.close(5)
    assert len(receiver.received) == 3


def test_a_4xx_answer_is_not_retried(receiver: Receiver) -> None:
    receiver.answers = [400]
    results = Results()
    webhooks = sender(results)
    webhooks.send(receiver.url, "task.completed", {"id": "t1"})
    assert results.one()[1] == {"delivered": False, "attempts": 1, "status": 400, "error": "HTTP 400"}
    assert webhooks.close(5)
    time.sleep(0.1)  # longer than the delays: a retry would have arrived
    assert len(receiver.received) == 1


def test_connection_errors_are_retried_with_the_delays() -> None:
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = Results()
    webhooks = sender(results, delays=(0.05, 0.1))
    start = time.monotonic()
    webhooks.send(f"http://hooks.example.test:{port}/hook", "task.completed", {})
    _, result = results.one()
    assert time.monotonic() - start >= 0.15  # it waited out both delays
    assert (result["delivered"], result["attempts"], result["status"]) == (False, 3, None)
    assert "failed" in result["error"]
    assert webhooks.close(5)


@pytest.mark.parametrize(
    "url", ["http://10.1.2.3/hook", "http://internal.example.test/hook", "http://169.254.169.254/latest"]
)
def test_a_private_url_is_refused_without_any_connection(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    monkeypatch.setattr(urlguard.socket, "create_connection", lambda *a, **k: made.append(a) or 1 / 0)
    results = Results()
    webhooks = sender(results)
    webhooks.send(url, "task.completed", {"id": "t1"})
    _, result = results.one()
    assert (result["delivered"], result["attempts"], result["status"]) == (False, 1, None)  # not retried
    assert "`webhook`: " in result["error"] and "refused" in result["error"]
    assert made == []
    assert webhooks.close(5)


def test_webhooks_are_refused_while_url_inputs_are_off(receiver: Receiver) -> None:
    results = Results()
    webhooks = sender(results, policy=UrlPolicy(trusted_networks=("127.0.0.1/32",), resolve=resolver))
    webhooks.send(receiver.url, "task.completed", {})
    assert "URL inputs are off" in results.one()[1]["error"]
    assert receiver.received == []


def test_close_drains_and_then_refuses_new_messages(receiver: Receiver) -> None:
    receiver.answers = [500, 500, 500]
    results = Results()
    webhooks = sender(results, delays=(0.1, 0.1, 0.1))
    for n in range(3):
        webhooks.send(receiver.url, "task.completed", {"n": n})
    assert webhooks.close(10)  # waits out the retries of all three
    assert results.queue.qsize() == 3
    with pytest.raises(RuntimeError, match="closed"):
        webhooks.send(receiver.url, "task.completed", {})


def test_close_times_out_on_a_delivery_still_waiting() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = Results()
    webhooks = sender(results, delays=(1.0,))
    webhooks.send(f"http://hooks.example.test:{port}/hook", "task.completed", {})
    start = time.monotonic()
    assert not webhooks.close(0.2)
    assert time.monotonic() - start < 0.9  # the retry is 1s away
    assert webhooks.close(5) and results.one()[1]["attempts"] == 2
