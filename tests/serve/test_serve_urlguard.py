"""fluxfill_engine.serve.urlguard: which URLs are refused, and real fetches from a loopback server.

The loopback server is reached as ``files.example.test`` through an injected resolver and allowed by
``trusted_networks=("127.0.0.1/32",)``; every other private address stays refused.
"""

from __future__ import annotations

import http.server
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fluxfill_engine.serve import urlguard
from fluxfill_engine.serve.urlguard import UrlFailed, UrlPolicy, UrlRefused, check_url, fetch, request

BIG = 1000  # the size cap of the tests' policy


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes by path; every request is recorded as (method, path, Host header, body) on the server."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet test output
        pass

    def _send(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append((self.command, self.path, self.headers.get("Host"), body))  # type: ignore[attr-defined]
        port = self.server.server_address[1]
        path = self.path
        try:
            if path == "/ok":
                self._send(200, b"hello")
            elif path == "/echo":
                self._send(200, body, X_Method=self.command)
            elif path == "/big":
                self._send(200, b"x" * (BIG + 1))
            elif path == "/chunked":  # no Content-Length: the cap must count the bytes themselves
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for _ in range(10):
                    self.wfile.write(b"%x\r\n%s\r\n" % (300, b"y" * 300))
                self.wfile.write(b"0\r\n\r\n")
            elif path == "/stream":  # HTTP/1.0 style: the body ends when the connection does
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                for _ in range(10):
                    self.wfile.write(b"z" * 300)
            elif path == "/slow":
                time.sleep(3)
                self._send(200, b"late")
            elif path == "/trickle":  # each byte well within a socket timeout, the whole far over the cap
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b"t")
                    self.wfile.flush()
                    time.sleep(0.05)
            elif path == "/trickle-headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for byte in b"X-Slow: " + b"s" * 100:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.05)
            elif path == "/redirect-ok":
                self._send(302, Location="/ok")
            elif path == "/redirect-host":
                self._send(301, Location=f"http://files.example.test:{port}/ok")
            elif path == "/redirect-private":
                self._send(302, Location="http://10.1.2.3/x")
            elif path == "/redirect-private-host":
                self._send(302, Location="http://internal.example.test/x")
            elif path == "/redirect-loopback":
                self._send(302, Location=f"http://127.0.0.2:{port}/ok")
            elif path == "/redirect-file":
                self._send(302, Location="file:///etc/passwd")
            elif path == "/redirect-307":
                self._send(307, Location="/echo")
            elif path == "/redirect-303":
                self._send(303, Location="/echo")
            elif path.startswith("/loop/"):
                self._send(302, Location=f"/loop/{int(path[6:]) + 1}")
            elif path.startswith("/status/"):
                self._send(int(path[8:]), b"status")
            else:
                self._send(404, b"no such path")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True  # the client gave up (a cap or the deadline), as tests want


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.seen: list[tuple[str, str, str | None, bytes]] = []
        if context is not None:
            self.socket = context.wrap_socket(self.socket, server_side=True)

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up on purpose are not test failures


def serving(server: Server) -> Iterator[Server]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    yield from serving(Server())


@pytest.fixture(autouse=True)
def _fresh_log(server: Server) -> None:
    server.seen.clear()


class Resolver:
    """An injected resolver: ``table[host]`` is a list of answers, or a list of such lists given out one
    per call (to play a rebinding DNS server); every call is recorded."""

    def __init__(self, table: dict[str, list]) -> None:
        self.table, self.calls = table, []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        answer = self.table[host]
        if answer and isinstance(answer[0], list):
            return answer.pop(0) if len(answer) > 1 else answer[0]
        return answer


@pytest.fixture
def resolver() -> Resolver:
    return Resolver({"files.example.test": ["127.0.0.1"], "internal.example.test": ["192.168.0.1"]})


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every address urlguard connects to (the connections still happen)."""
    made: list[tuple[str, int]] = []
    real = socket.create_connection

    def spy(address: tuple[str, int], *args: object, **kwargs: object) -> socket.socket:
        made.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(urlguard.socket, "create_connection", spy)
    return made


def policy(resolver: Resolver, **changes: object) -> UrlPolicy:
    settings: dict = {
        "allow": True,
        "max_bytes": BIG,
        "timeout_s": 5.0,
        "trusted_networks": ("127.0.0.1/32",),
        "resolve": resolver,
    }
    return UrlPolicy(**(settings | changes))


def url(server: Server, path: str, host: str = "files.example.test") -> str:
    return f"http://{host}:{server.server_address[1]}{path}"


# ---- refusals without a server ------------------------------------------------------------------------

NON_PUBLIC = [
    "127.0.0.1",
    "127.8.9.10",
    "10.0.0.1",
    "172.16.5.4",
    "172.31.255.255",
    "192.168.1.1",
    "169.254.169.254",
    "169.254.1.1",
    "100.64.0.1",
    "0.0.0.0",
    "224.0.0.251",
    "240.0.0.1",
    "255.255.255.255",
    "::1",
    "::",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "ff02::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "2002:a00:1::1",  # 6to4 around 10.0.0.1
    "64:ff9b::c0a8:1",  # NAT64 around 192.168.0.1
]


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_non_public_literal_addresses_are_refused_without_dns(address: str) -> None:
    resolver = Resolver({})
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(UrlRefused, match=r"`image`: .*refused"):
        check_url(f"http://{host}/a.png", policy(resolver, trusted_networks=()), "image")
    assert resolver.calls == []


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_a_hostname_resolving_to_a_non_public_address_is_refused_before_connecting(
    address: str, connections: list
) -> None:
    resolver = Resolver({"victim.example.test": [address]})
    with pytest.raises(UrlRefused, match=r"`mask_image`: http://victim.example.test/x resolves to .*refused"):
        request("GET", "http://victim.example.test/x", policy(resolver, trusted_networks=()), "mask_image")
    assert resolver.calls == ["victim.example.test"]
    assert connections == []


def test_the_message_names_the_field_the_url_and_the_address(connections: list) -> None:
    with pytest.raises(UrlRefused) as caught:
        fetch("http://10.0.0.1/x", policy(Resolver({})), "mask_image")
    assert (
        str(caught.value)
        == "`mask_image`: http://10.0.0.1/x resolves to a private address (10.0.0.1), refused"
    )
    assert connections == []


def test_mixed_public_and_private_answers_are_refused(connections: list) -> None:
    resolver = Resolver({"mixed.example.test": ["93.184.216.34", "10.0.0.5"]})
    with pytest.raises(UrlRefused, match=r"10\.0\.0\.5"):
        request("GET", "http://mixed.example.test/", policy(resolver), "image")
    assert connections == []


def test_a_public_answer_is_connected_to_by_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control for the refusals: a public answer passes every check and is connected to directly."""
    made = []

    def refuse(address: tuple[str, int], *args: object, **kwargs: object) -> socket.socket:
        made.append(address)
        raise ConnectionRefusedError("no network in tests")

    monkeypatch.setattr(urlguard.socket, "create_connection", refuse)
    resolver = Resolver({"cdn.example.test": ["93.184.216.34", "2606:2800:220:1::1"]})
    with pytest.raises(UrlFailed, match="`image`: .* failed"):
        fetch("https://cdn.example.test/a.png", policy(resolver), "image")
    assert made == [("93.184.216.34", 443), ("2606:2800:220:1::1", 443)]  # each checked answer, in order


@pytest.mark.parametrize(
    "bad",
    [
        "file:///etc/passwd",
        "ftp://files.example.test/a.png",
        "gopher://files.example.test:70/_x",
        "javascript:alert(1)",
        "//files.example.test/a.png",
        "http:///a.png",
        "http://user:secret@files.example.test/a.png",
        "http://user@files.example.test/a.png",
        "http://files.example.test/a b.png",
        "http://files.example.test/a\r\nX-Injected: 1",
        "http://files.example.test\\@10.0.0.1/",
        "http://files.example.test:99999/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://METADATA.google.internal./computeMetadata/v1/",
    ],
)
def test_urls_refused_by_their_form(bad: str, resolver: Resolver, connections: list) -> None:
    with pytest.raises(UrlRefused, match="^`image`: "):
        check_url(bad, policy(resolver), "image")
    with pytest.raises(UrlRefused):
        request("GET", bad, policy(resolver), "image")
    assert resolver.calls == [] and connections == []


def test_everything_is_refused_while_url_inputs_are_off(resolver: Resolver, connections: list) -> None:
    off = policy(resolver, allow=False)
    for call in (
        lambda: check_url("https://example.com/a.png", off, "image"),
        lambda: fetch("https://example.com/a.png", off, "image"),
    ):
        with pytest.raises(
            UrlRefused, match=r"`image`: URL inputs are off \(start the server with --allow-url-inputs\)"
        ):
            call()
    assert resolver.calls == [] and connections == []


def test_trusted_networks_open_only_what_they_name() -> None:
    resolver = Resolver({})
    trusting = policy(resolver, trusted_networks=("127.0.0.1/32", "169.254.0.0/16"))
    check_url("http://127.0.0.1:8000/", trusting, "image")
    check_url("http://[::ffff:127.0.0.1]:8000/", trusting, "image")  # the same address, IPv4-mapped
    with pytest.raises(UrlRefused, match="loopback"):
        check_url("http://127.0.0.2/", trusting, "image")
    check_url("http://169.254.1.1/", trusting, "image")
    with pytest.raises(UrlRefused, match="cloud-metadata"):  # never, whatever is trusted
        check_url("http://169.254.169.254/latest/meta-data/", trusting, "image")
    with pytest.raises(ValueError, match="trusted_networks"):
        UrlPolicy(trusted_networks=("not-a-network",))


# ---- fetches from the loopback server -------------------------------------------------------------------


def test_fetch_returns_the_body(server: Server, resolver: Resolver) -> None:
    assert fetch(url(server, "/ok"), policy(resolver), "image") == b"hello"
    port = server.server_address[1]
    assert server.seen == [("GET", "/ok", f"files.example.test:{port}", b"")]


def test_request_posts_and_returns_status_and_lower_case_headers(server: Server, resolver: Resolver) -> None:
    status, headers, body = request(
        "POST", url(server, "/echo"), policy(resolver), "webhook", body=b'{"a":1}'
    )
    assert (status, headers["x-method"], body) == (200, "POST", b'{"a":1}')


def test_a_non_2xx_answer_fails_with_its_status(server: Server, resolver: Resolver) -> None:
    with pytest.raises(UrlFailed, match=r"`image`: .*/status/404 answered HTTP 404") as caught:
        fetch(url(server, "/status/404"), policy(resolver), "image")
    assert caught.value.status == 404
    assert request("GET", url(server, "/status/503"), policy(resolver), "image")[0] == 503


def test_dns_is_asked_once_and_the_connection_goes_to_that_answer(
    server: Server, connections: list, resolver: Resolver
) -> None:
    """A rebinding DNS server (loopback first, then a private address): one lookup per request, even over
    a redirect back to the same host, and every connection to the first answer."""
    resolver.table["files.example.test"] = [["127.0.0.1"], ["10.0.0.1"]]
    port = server.server_address[1]
    assert fetch(url(server, "/redirect-host"), policy(resolver), "image") == b"hello"
    assert resolver.calls == ["files.example.test"]
    assert connections == [("127.0.0.1", port), ("127.0.0.1", port)]
    assert [(path, host) for _, path, host, _ in server.seen] == [
        ("/redirect-host", f"files.example.test:{port}"),
        ("/ok", f"files.example.test:{port}"),
    ]


def test_content_length_over_the_cap_is_refused_before_reading(
    server: Server, resolver: Resolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = []
    real_read = urlguard.http.client.HTTPResponse.read

    def read(self: object, amt: int | None = None) -> bytes:
        reads.append(amt)
        return real_read(self, amt)

    monkeypatch.setattr(urlguard.http.client.HTTPResponse, "read", read)
    with pytest.raises(UrlRefused, match=rf"`image`: .*/big is {BIG + 1} bytes, over the {BIG}-byte cap"):
        fetch(url(server, "/big"), policy(resolver), "image")
    assert reads == []
    assert fetch(url(server, "/big"), policy(resolver, max_bytes=BIG + 1), "image") == b"x" * (BIG + 1)


@pytest.mark.parametrize("path", ["/chunked", "/stream"])
def test_a_body_without_length_is_cut_at_the_cap(path: str, server: Server, resolver: Resolver) -> None:
    with pytest.raises(UrlRefused, match=rf"sent over the {BIG}-byte cap"):
        fetch(url(server, path), policy(resolver), "image")
    assert len(fetch(url(server, path), policy(resolver, max_bytes=3000), "image")) == 3000


@pytest.mark.parametrize("path", ["/slow", "/trickle", "/trickle-headers"])
def test_the_whole_exchange_has_a_time_cap(path: str, server: Server, resolver: Resolver) -> None:
    """A silent server, and ones trickling the body or the headers (every read within a socket timeout)."""
    start = time.monotonic()
    with pytest.raises(UrlFailed, match=r"`image`: .* took over the 0.4s limit"):
        fetch(url(server, path), policy(resolver, timeout_s=0.4), "image")
    assert time.monotonic() - start < 2.0  # /slow answers after 3s, the trickles take 5s


def test_redirects_within_the_rules_are_followed(server: Server, resolver: Resolver) -> None:
    assert fetch(url(server, "/redirect-ok"), policy(resolver), "image") == b"hello"
    assert [path for _, path, _, _ in server.seen] == ["/redirect-ok", "/ok"]


def test_307_repeats_the_post_and_303_continues_as_a_get(server: Server, resolver: Resolver) -> None:
    status, headers, body = request(
        "POST", url(server, "/redirect-307"), policy(resolver), "webhook", body=b"data"
    )
    assert (status, headers["x-method"], body) == (200, "POST", b"data")
    status, headers, body = request(
        "POST", url(server, "/redirect-303"), policy(resolver), "webhook", body=b"data"
    )
    assert (status, headers["x-method"], body) == (200, "GET", b"")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/redirect-private", r"http://10.1.2.3/x resolves to a private address \(10.1.2.3\)"),
        (
            "/redirect-private-host",
            r"http://internal.example.test/x resolves to a private address \(192.168.0.1\)",
        ),
        ("/redirect-loopback", r"resolves to a loopback address \(127.0.0.2\)"),
        ("/redirect-file", "only http and https"),
    ],
)
def test_each_redirect_is_checked_from_scratch(
    path: str, message: str, server: Server, resolver: Resolver, connections: list
) -> None:
    with pytest.raises(UrlRefused, match=message):
        fetch(url(server, path), policy(resolver), "image")
    assert connections == [("127.0.0.1", server.server_address[1])]  # only the first hop connected


def test_too_many_redirects_are_refused(server: Server, resolver: Resolver) -> None:
    with pytest.raises(UrlRefused, match="more than 3 redirects"):
        fetch(url(server, "/loop/0"), policy(resolver), "image")
    assert [path for _, path, _, _ in server.seen] == ["/loop/0", "/loop/1", "/loop/2", "/loop/3"]
    with pytest.raises(UrlRefused, match="more than 0 redirects"):
        fetch(url(server, "/redirect-ok"), policy(resolver, max_redirects=0), "image")


def test_a_connection_failure_is_a_failure_not_a_refusal(resolver: Resolver) -> None:
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(UrlFailed, match="`image`: .* failed"):
        fetch(f"http://files.example.test:{port}/", policy(resolver), "image")
    with pytest.raises(UrlFailed, match="cannot resolve nowhere.example.test"):
        fetch("http://nowhere.example.test/", policy(resolver), "image")


# ---- TLS over the pinned address ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=files.example.test"]
        + ["-addext", "subjectAltName=DNS:files.example.test"],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_checks_the_certificate_and_sends_sni_for_the_hostname(
    tls_files: tuple[Path, Path], resolver: Resolver, connections: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tls_files
    names: list[str | None] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    client = ssl.create_default_context(cafile=str(cert))
    monkeypatch.setattr(urlguard, "_tls_context", lambda: client)
    resolver.table["other.example.test"] = ["127.0.0.1"]
    for tls_server in serving(Server(context)):
        port = tls_server.server_address[1]
        assert fetch(f"https://files.example.test:{port}/ok", policy(resolver), "image") == b"hello"
        assert names == ["files.example.test"]
        assert connections == [("127.0.0.1", port)]
        # The same address under a name the certificate does not carry: the check is on the name.
        with pytest.raises(UrlFailed, match="CERTIFICATE_VERIFY_FAILED|doesn't match|mismatch"):
            fetch(f"https://other.example.test:{port}/ok", policy(resolver), "image")


def test_the_system_resolver_is_the_default(connections: list) -> None:
    """``localhost`` through getaddrinfo (the hosts file; no network): loopback, refused."""
    with pytest.raises(UrlRefused, match=r"http://localhost:8080/ resolves to a loopback address"):
        fetch("http://localhost:8080/", UrlPolicy(allow=True), "image")
    assert connections == []
