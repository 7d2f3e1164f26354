"""Fetching user-given URLs without letting them reach this server's own network (an SSRF guard).

Every URL is checked from scratch (the first and each redirect's): http(s) only, no credentials, the
host resolved once and every answer public (or inside the operator's ``trusted_networks``), and the
connection made to that very address, so a second DNS answer (DNS rebinding) is never used. The Host
header, TLS SNI and the certificate check still use the hostname. Bodies are read with a size cap and
the whole exchange, redirects included, with a time cap. Standard library only.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
# Cloud metadata endpoints: refused even inside trusted_networks (no image or webhook lives there, and
# trusting e.g. 100.64.0.0/10 for a Tailscale network must not open Alibaba's 100.100.100.200).
_METADATA_HOSTS = frozenset(
    {"metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal"}
)
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not global, not "private" either
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # embeds an IPv4 address that a NAT64 gateway reaches
_SENSITIVE_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})


class UrlRefused(ValueError):
    """A URL this server will not fetch (policy: off, scheme, credentials, address, size, redirects)."""


class UrlFailed(ValueError):
    """A fetch that was allowed but failed: DNS, connection, timeout, broken transfer, or (``fetch``) a
    non-2xx answer (``status``). Worth retrying, unlike :class:`UrlRefused`."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _default_resolve(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for ``host`` (in its order, without repeats)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class UrlPolicy:
    """What URL inputs may do. ``trusted_networks``: CIDRs an operator explicitly allows (an internal
    storage network); ``resolve(host, port)``: the resolver (``socket.getaddrinfo`` unless injected)."""

    allow: bool = False
    max_bytes: int = 50 * 2**20
    timeout_s: float = 20.0
    max_redirects: int = 3
    trusted_networks: tuple[str, ...] = ()
    resolve: Callable[[str, int], list[str]] | None = None

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.timeout_s <= 0 or self.max_redirects < 0:
            raise ValueError("UrlPolicy: max_bytes and timeout_s must be > 0, max_redirects >= 0")
        _networks(self.trusted_networks)  # a bad CIDR fails at startup, not at the first fetch


@functools.lru_cache(maxsize=32)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
    except ValueError as err:
        raise ValueError(f"trusted_networks: {err}") from None


def _shown(url: str) -> str:
    """The URL for messages: no query or fragment (presigned URLs carry credentials there), bounded."""
    parts = urlsplit(url)
    text = f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?..." if parts.query else "")
    return text if len(text) <= 200 else text[:197] + "..."


def _unmapped(ip: _IPAddress) -> _IPAddress:
    """The IPv4 address behind an IPv4-mapped IPv6 one (::ffff:a.b.c.d), else ``ip`` itself."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _non_public(ip: _IPAddress) -> str | None:
    """What kind of non-public address ``ip`` is ("a private address", ...), or None if it is public."""
    if ip in _METADATA_ADDRESSES:
        return "a cloud-metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        # Addresses that carry an IPv4 one reach it through a relay: judge the embedded address too.
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and (kind := _non_public(embedded)):
            return kind
    checks = (
        ("a loopback", ip.is_loopback),
        ("a link-local", ip.is_link_local),
        ("a multicast", ip.is_multicast),  # 224.0.0.0/4 counts as "global" to ipaddress
        ("an unspecified", ip.is_unspecified),
        ("a shared", ip in _SHARED),
        ("a reserved", ip.is_reserved),
        ("a private", ip.is_private),
        ("a site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),  # fec0::/10
        ("a non-public", not ip.is_global),
    )
    return next((f"{kind} address" for kind, hit in checks if hit), None)


def _check_address(address: str, url: str, policy: UrlPolicy, field: str) -> str:
    """``address`` as the string to connect to, or UrlRefused when it is not public nor trusted."""
    try:
        ip = _unmapped(ipaddress.ip_address(address))
    except ValueError:
        raise UrlRefused(
            f"`{field}`: {_shown(url)} resolves to {address!r}, not an IP address; refused"
        ) from None
    kind = _non_public(ip)
    if kind == "a cloud-metadata address" or (
        kind is not None and not any(ip in net for net in _networks(policy.trusted_networks))
    ):
        raise UrlRefused(f"`{field}`: {_shown(url)} resolves to {kind} ({ip}), refused")
    return str(ip)


def _parse(url: str, policy: UrlPolicy, field: str) -> tuple[str, str, int, str]:
    """(scheme, ASCII host, port, request target) of an allowed URL, or UrlRefused. No network."""
    if not policy.allow:
        raise UrlRefused(f"`{field}`: URL inputs are off (start the server with --allow-url-inputs)")
    # Whitespace, control characters and backslashes: parsers disagree on them (request smuggling, host
    # confusion), and a real URL has them percent-encoded.
    if any(c <= " " or c in "\x7f\\" for c in url):
        raise UrlRefused(f"`{field}`: the URL has spaces, control characters or backslashes; refused")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UrlRefused(f"`{field}`: only http and https URLs are fetched, not {scheme or 'no scheme'!r}")
    if "@" in parts.netloc:
        raise UrlRefused(f"`{field}`: URLs with credentials (user:password@) are refused")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
        host = (parts.hostname or "").rstrip(".")
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except (ValueError, UnicodeError) as err:
        raise UrlRefused(f"`{field}`: {_shown(url)} is not a valid URL ({err})") from None
    if not host:
        raise UrlRefused(f"`{field}`: {_shown(url)} has no host")
    if host in _METADATA_HOSTS:
        raise UrlRefused(f"`{field}`: {_shown(url)} is a cloud-metadata host, refused")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        _check_address(host, url, policy, field)  # a literal address is checked without any DNS
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    target = "".join(c if c.isascii() else quote(c) for c in target)  # http.client sends ASCII only
    return scheme, host, port, target


def check_url(url: str, policy: UrlPolicy, field: str) -> None:
    """Refuse (:class:`UrlRefused`) a URL that can never be fetched, without any network: URL inputs
    off, a scheme other than http(s), no host, credentials, a metadata host or a non-public literal
    address. For checking a request when it is submitted; :func:`request` does all the checks again."""
    _parse(url, policy, field)


class _Deadline:
    """The time left of the whole exchange (every redirect included)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _tls_context() -> ssl.SSLContext:
    """Certificates checked against the system's CAs and the URL's hostname (tests swap this)."""
    return ssl.create_default_context()


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP connection to ``host`` that connects to the already checked ``addresses`` (in order) and
    never resolves ``host`` again; ``abort()`` (from the watchdog thread) breaks a blocked read."""

    def __init__(self, host: str, port: int, addresses: list[str], deadline: _Deadline) -> None:
        super().__init__(host, port, timeout=max(deadline.left(), 0.001))
        self.addresses, self.deadline = addresses, deadline
        self.aborted = False
        self.raw: socket.socket | None = None

    def _tcp(self) -> socket.socket:
        error: OSError = OSError("no address to connect to")
        for address in self.addresses:
            left = self.deadline.left()
            if left <= 0:
                raise TimeoutError("timed out")
            try:
                sock = socket.create_connection((address, self.port), timeout=left)
            except OSError as err:
                error = err
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        raise error

    def _secure(self, sock: socket.socket) -> socket.socket:
        return sock

    def connect(self) -> None:
        self.raw = self.sock = self._secure(self._tcp())
        if self.aborted:
            self.abort()

    def abort(self) -> None:
        self.aborted = True
        if self.raw is not None:
            # The plain socket's shutdown, also under TLS (SSLSocket.shutdown is not thread safe).
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self.raw, socket.SHUT_RDWR)


class _PinnedTLSConnection(_PinnedConnection):
    """The HTTPS form: TLS over the pinned connection, SNI and the certificate check on ``host``."""

    default_port = http.client.HTTPS_PORT

    def _secure(self, sock: socket.socket) -> socket.socket:
        try:
            return _tls_context().wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def _resolve(
    host: str, port: int, url: str, policy: UrlPolicy, field: str, cache: dict[str, list[str]]
) -> list[str]:
    """The checked addresses of ``host``: resolved once per request (``cache``), every answer public."""
    if host not in cache:
        try:
            ipaddress.ip_address(host)
            answers = [host]
        except ValueError:
            try:
                answers = list((policy.resolve or _default_resolve)(host, port))
            except OSError as err:
                raise UrlFailed(f"`{field}`: cannot resolve {host}: {err}") from None
        if not answers:
            raise UrlFailed(f"`{field}`: {host} has no address")
        # All of them, not only the one used: a mix of public and private answers is refused outright.
        cache[host] = [_check_address(a, url, policy, field) for a in answers]
    return cache[host]


def _read_body(
    response: http.client.HTTPResponse, url: str, policy: UrlPolicy, field: str, deadline: _Deadline
) -> bytes:
    length = response.getheader("content-length")
    if length is not None and length.strip().isdigit() and int(length) > policy.max_bytes:
        raise UrlRefused(
            f"`{field}`: {_shown(url)} is {int(length)} bytes, over the {policy.max_bytes}-byte cap"
        )
    chunks, size = [], 0
    while True:
        if deadline.left() <= 0:
            raise TimeoutError("timed out")
        chunk = response.read(min(_CHUNK, policy.max_bytes + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > policy.max_bytes:
            raise UrlRefused(f"`{field}`: {_shown(url)} sent over the {policy.max_bytes}-byte cap")


def _exchange(
    method: str,
    url: str,
    addresses: list[str],
    parsed: tuple[str, str, int, str],
    body: bytes | None,
    headers: dict[str, str],
    policy: UrlPolicy,
    field: str,
    deadline: _Deadline,
) -> tuple[int, dict[str, str], bytes]:
    """One request and its answer over a pinned connection (a redirect's body is not read)."""
    scheme, host, port, target = parsed
    kind = _PinnedTLSConnection if scheme == "https" else _PinnedConnection
    conn = kind(host, port, addresses, deadline)
    # A watchdog, because socket timeouts bound each read, not the total: a server trickling a byte
    # at a time would otherwise hold the fetch for as long as it likes.
    watchdog = threading.Timer(max(deadline.left(), 0.0), conn.abort)
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.request(method, target, body=body, headers=headers)
        response = conn.getresponse()
        answer = {}
        for name, value in response.getheaders():
            name = name.lower()
            answer[name] = f"{answer[name]}, {value}" if name in answer else value
        redirect = response.status in _REDIRECTS and bool(answer.get("location"))
        data = b"" if redirect else _read_body(response, url, policy, field, deadline)
        return response.status, answer, data
    except (OSError, http.client.HTTPException) as err:
        if conn.aborted or deadline.left() <= 0 or isinstance(err, TimeoutError):
            raise UrlFailed(f"`{field}`: {_shown(url)} took over the {deadline.seconds:g}s limit") from None
        raise UrlFailed(f"`{field}`: {_shown(url)} failed: {err or type(err).__name__}") from None
    finally:
        watchdog.cancel()
        conn.close()


def request(
    method: str,
    url: str,
    policy: UrlPolicy,
    field: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """``(status, headers (lower-case names), body)`` of ``method url``, under every rule of the module.

    Redirects are followed (at most ``policy.max_redirects``), each new URL checked from scratch; 303
    (and 301/302 after a POST) continue as a GET without the body, 307/308 repeat the request, and
    credentials headers are dropped when the origin changes. Raises :class:`UrlRefused` for what the
    policy forbids, :class:`UrlFailed` for DNS, connection, timeout or transfer failures.
    """
    deadline = _Deadline(policy.timeout_s)
    sent = {"user-agent": "fluxfill-engine", "accept-encoding": "identity", "connection": "close"}
    sent.update({k.lower(): v for k, v in (headers or {}).items()})
    cache: dict[str, list[str]] = {}
    origin = None
    for hop in range(policy.max_redirects + 1):
        parsed = _parse(url, policy, field)
        scheme, host, port, _ = parsed
        if origin is not None and origin != (scheme, host, port):
            sent = {k: v for k, v in sent.items() if k not in _SENSITIVE_HEADERS}
        origin = (scheme, host, port)
        addresses = _resolve(host, port, url, policy, field, cache)
        status, answer, data = _exchange(method, url, addresses, parsed, body, sent, policy, field, deadline)
        location = answer.get("location")
        if status not in _REDIRECTS or not location:
            return status, answer, data
        if hop == policy.max_redirects:
            break
        url = urljoin(url, location.strip())
        if status == 303 or (status in (301, 302) and method == "POST"):
            method = "GET" if method != "HEAD" else method
            body = None
            sent = {k: v for k, v in sent.items() if k not in ("content-type", "content-length")}
    raise UrlRefused(f"`{field}`: more than {policy.max_redirects} redirects, refused")


def fetch(url: str, policy: UrlPolicy, field: str) -> bytes:
    """The body of ``GET url`` (a 2xx answer); :class:`UrlRefused` / :class:`UrlFailed` as :func:`request`,
    and :class:`UrlFailed` with ``status`` for any other answer."""
    status, _, data = request("GET", url, policy, field)
    if not 200 <= status < 300:
        raise UrlFailed(f"`{field}`: {_shown(url)} answered HTTP {status}", status)
    return data
