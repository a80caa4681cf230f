"""Stand-ins for the cloud and Moonraker in unit specifications, on either
transport, with one way to script them and one history to read:

- MockedPeers: requests-mock, behind RequestsTransport (the transport of a
  peer reached through a proxy);
- LoopbackPeers: one scripted raw HTTP server (rawserver.RawServer) per
  origin on 127.0.0.1, behind KeptConnections (the transport of every direct
  peer, the one that runs on printers). Names such as https://cloud.test
  are connected to their loopback server, over TLS with a certificate for
  that name, so the client's URLs, Host headers and certificate checks are
  the real ones.

A registration is `peers.get(url, json=..., content=..., text=...,
status_code=..., headers=..., fail=...)`, as requests-mock's; the last one
that matches a request answers it. `fail="close"` drops the connection
unanswered. A request nothing matches is dropped unanswered too (requests-mock
raises NoMockAddress: a transport error either way)."""

import http.client
import json
import ssl
import subprocess
import threading
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import requests_mock
import urllib3
from requests.structures import CaseInsensitiveDict

from rawserver import RawServer, reply

import connector

DEFAULT_PORTS = {"http": 80, "https": 443}


class Sent:
    """One request as its peer received it."""

    def __init__(self, method, target, headers, body):
        parts = urlsplit(target)
        self.method, self.path, self.body = method, parts.path, body or b""
        self.qs = parse_qs(parts.query)
        self.headers = CaseInsensitiveDict(headers)

    def json(self):
        return json.loads(self.body)


class Peers:
    def get(self, url, **answer):
        self.register("GET", url, **answer)

    def post(self, url, **answer):
        self.register("POST", url, **answer)

    def put(self, url, **answer):
        self.register("PUT", url, **answer)

    def delete(self, url, **answer):
        self.register("DELETE", url, **answer)

    @property
    def call_count(self):
        return len(self.request_history)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class MockedPeers(Peers):
    name = "requests"

    def __init__(self, monkeypatch):
        monkeypatch.setattr(connector, "direct_transport", lambda: connector.RequestsTransport(None))
        self.mocker = requests_mock.Mocker()
        self.mocker.start()

    def register(self, method, url, fail=None, **answer):
        if fail == "close":
            answer["exc"] = requests.exceptions.ConnectionError(
                http.client.RemoteDisconnected("Remote end closed connection without response"))
        self.mocker.register_uri(method, url, additional_matcher=self._capture_body, **answer)

    @staticmethod
    def _capture_body(request):
        """A file body is read while it is sent, as on the wire; afterwards
        the file may be gone."""
        if hasattr(request.body, "read") and not hasattr(request, "captured_body"):
            request.captured_body = request.body.read()
        return True

    @property
    def request_history(self):
        sent = []
        for request in self.mocker.request_history:
            # What http.client would put on the wire: SKIP_HEADER means "send nothing".
            headers = {name: value for name, value in request.headers.items() if value != urllib3.util.SKIP_HEADER}
            body = getattr(request, "captured_body", request.body)
            body = body.encode("utf-8") if isinstance(body, str) else body
            sent.append(Sent(request.method, request.path_url, headers, body))
        return sent

    def close(self):
        self.mocker.stop()


class LoopbackPeers(Peers):
    name = "kept_connections"

    def __init__(self, monkeypatch, certificate):
        self.certificate = certificate
        self.servers = {}  # (scheme, host, port) -> RawServer
        self.routes = []   # (method, origin, path, query, answer), newest last
        self.history = []
        self.lock = threading.Lock()
        connect = connector._watched_create_connection

        def to_loopback(address, timeout=None, source_address=None):
            server = next((s for origin, s in self.servers.items() if origin[1:] == (address[0], address[1])), None)
            if server is None:
                raise ConnectionRefusedError(111, "Connection refused")
            return connect(("127.0.0.1", server.port), timeout, source_address)

        monkeypatch.setattr(connector, "_watched_create_connection", to_loopback)
        trusted = ssl.create_default_context(cafile=certificate[0])
        monkeypatch.setattr(connector, "_TLS_CONTEXT", [trusted])

    def _server(self, origin):
        if origin not in self.servers:
            context = None
            if origin[0] == "https":
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(*self.certificate)
            self.servers[origin] = RawServer(lambda exchange, origin=origin: self._respond(origin, exchange),
                                             tls_context=context)
        return self.servers[origin]

    def register(self, method, url, **answer):
        parts = urlsplit(url)
        origin = (parts.scheme, parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme])
        self._server(origin)
        with self.lock:
            self.routes.append((method, origin, parts.path, parse_qs(parts.query), answer))

    def _respond(self, origin, exchange):
        target = exchange.request_line.split(" ")[1]
        sent = Sent(exchange.method, target, exchange.headers, exchange.body)
        with self.lock:
            self.history.append(sent)
            route = next((r for r in reversed(self.routes) if r[:3] == (sent.method, origin, sent.path)
                          and all(sent.qs.get(k) == v for k, v in r[3].items())), None)
        if route is None or route[4].get("fail") == "close":
            return RawServer.CLOSE
        return self._reply(route[4])

    @staticmethod
    def _reply(answer):
        headers = dict(answer.get("headers") or {})
        if "json" in answer:
            body = json.dumps(answer["json"]).encode("utf-8")
            headers.setdefault("Content-Type", "application/json")
        elif "text" in answer:
            body = answer["text"].encode("utf-8")
        else:
            body = answer.get("content", b"")
        length = headers.pop("Content-Length", None)
        return reply(answer.get("status_code", 200), body, tuple(headers.items()),
                     length=int(length) if length is not None else None)

    @property
    def request_history(self):
        with self.lock:
            return list(self.history)

    def close(self):
        for server in self.servers.values():
            server.stop()


def certificate_for(folder, *names):
    """(cert, key) paths of a self-signed certificate for the host names."""
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=%s" % names[0],
                    "-addext", "subjectAltName=" + ",".join("DNS:%s" % name for name in names)],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def peer_certificate(tmp_path_factory):
    return certificate_for(tmp_path_factory.mktemp("tls"), "cloud.test", "moonraker.test", "s3.test")


@pytest.fixture(params=["requests", "kept_connections"])
def peers(request, monkeypatch, peer_certificate):
    """The peers, on one transport and then the other (import this fixture
    into a test module to use it)."""
    made = MockedPeers(monkeypatch) if request.param == "requests" else LoopbackPeers(monkeypatch, peer_certificate)
    yield made
    made.close()
