"""Specifications of the transport the agent uses without a proxy (kept-alive
http.client connections), checked on the wire against a raw TCP server on
loopback that records every byte and can misbehave on cue. The layers above
it are specified in test_units.py."""

import io
import os
import re
import socket
import ssl
import subprocess
import time

import pytest

from harness import wait_until
from rawserver import RawServer, Trickle, reply

import connector


@pytest.fixture
def server():
    made = []

    def make(respond=lambda exchange: reply(), **kwargs):
        made.append(RawServer(respond, **kwargs))
        return made[-1]

    yield make
    for each in made:
        each.stop()


@pytest.fixture
def client():
    made = []

    def make(base_url, headers=None):
        log = connector.Logger("debug", stream=io.StringIO())
        made.append(connector.HttpClient(base_url, headers or {"User-Agent": "printer-connector/test"},
                                         connector.generic_error_message, log, "peer"))
        return made[-1]

    yield make
    for each in made:
        each.close()


# -- what goes out ----------------------------------------------------------

def test_a_poll_carries_only_the_protocol_headers_in_order(server, client):
    peer = server()
    protocol_headers = {"Authorization": "Bearer sk_live_x", "X-Connector-Id": "42",
                        "User-Agent": "printer-connector/1.0", "Accept": "application/json"}
    client(peer.url(), protocol_headers).request("GET", "/api/v1/connectors/42/commands",
                                                 params={"limit": 20})
    sent = peer.exchanges[0]
    assert sent.request_line == "GET /api/v1/connectors/42/commands?limit=20 HTTP/1.1"
    assert sent.header_lines == ["Host: 127.0.0.1:%d" % peer.port, "Authorization: Bearer sk_live_x",
                                 "X-Connector-Id: 42", "User-Agent: printer-connector/1.0",
                                 "Accept: application/json"]


def test_a_json_body_is_sent_compact_with_its_length(server, client):
    peer = server()
    client(peer.url()).request("POST", "/x", json_body={"a": [1, 2]})
    sent = peer.exchanges[0]
    assert sent.body == b'{"a":[1,2]}'
    assert sent.headers["content-length"] == "11" and sent.headers["content-type"] == "application/json"


def test_a_bodiless_post_says_its_length_is_zero(server, client):
    peer = server()
    client(peer.url()).request("POST", "/printer/print/pause")
    assert peer.exchanges[0].headers["content-length"] == "0"


def test_a_file_body_streams_with_the_given_length_not_chunked(server, client, tmp_path):
    peer = server()
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(os.urandom(100000))
    with open(str(archive), "rb") as body:
        client(peer.url()).request("PUT", "/upload", data=body, headers={"Content-Length": "100000"})
    sent = peer.exchanges[0]
    assert sent.body == archive.read_bytes()
    assert "transfer-encoding" not in sent.headers


def test_multipart_file_names_are_quoted_with_backslashes_and_line_breaks_escaped(server, client):
    peer = server()
    client(peer.url()).request("POST", "/server/files/upload", data={"root": "gcodes"},
                               files={"file": ('a"b\\c\r\n.gcode', b"G28\n")})
    body = peer.exchanges[0].body
    assert b'filename="a\\"b\\\\c%0D%0A.gcode"' in body and b"G28\n" in body
    assert peer.exchanges[0].headers["content-type"].startswith("multipart/form-data; boundary=")


# -- keep-alive ---------------------------------------------------------------

def test_successive_requests_share_one_connection(server, client):
    peer = server()
    http = client(peer.url())
    for _ in range(3):
        http.request("GET", "/poll")
    assert [e.connection for e in peer.exchanges] == [0, 0, 0]


def test_a_connection_the_peer_closed_while_idle_is_replaced_unnoticed(server, client):
    # The first answer is followed by the server closing its end, as a keep-alive timeout does.
    answers = iter([(reply(), RawServer.CLOSE), reply()])
    peer = server(lambda exchange: next(answers))
    http = client(peer.url())
    http.request("GET", "/poll")
    wait_until(peer.closed.is_set, message="the server closed the idle connection")
    # A streamed body cannot be sent a second time: it must find a live connection at once.
    http.request("PUT", "/upload", data=io.BytesIO(b"12345"), headers={"Content-Length": "5"})
    assert [e.connection for e in peer.exchanges] == [0, 1]


def test_a_get_that_meets_a_dead_kept_connection_is_sent_again_once(server, client):
    answers = iter([reply(), RawServer.CLOSE, reply(body=b"[1]")])
    peer = server(lambda exchange: next(answers))
    http = client(peer.url())
    http.request("GET", "/poll")
    assert http.request("GET", "/poll").content == b"[1]"
    assert [e.connection for e in peer.exchanges] == [0, 0, 1]


def test_a_post_that_meets_a_dead_kept_connection_is_not_sent_again(server, client):
    answers = iter([reply(), RawServer.CLOSE, reply()])
    peer = server(lambda exchange: next(answers))
    http = client(peer.url())
    http.request("POST", "/snapshots", json_body={})
    with pytest.raises(connector.HttpError, match="peer connection closed without a response"):
        http.request("POST", "/snapshots", json_body={})
    assert len(peer.exchanges) == 2


def test_a_fresh_connection_that_dies_is_not_retried(server, client):
    peer = server(lambda exchange: RawServer.CLOSE)
    with pytest.raises(connector.TransportError, match="connection closed without a response"):
        client(peer.url()).request("GET", "/poll")
    assert len(peer.exchanges) == 1


# -- failures -------------------------------------------------------------------

def test_a_refused_connection_says_so(client):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(connector.TransportError, match="^peer connection refused$") as raised:
        client("http://127.0.0.1:%d" % port).request("GET", "/")
    assert raised.value.status is None


def test_a_silent_peer_times_out_after_the_read_timeout(server, client):
    peer = server(lambda exchange: RawServer.HANG)
    with pytest.raises(connector.ExchangeTimeout, match="read timed out"):
        client(peer.url()).request("GET", "/", timeout=(2.0, 0.3))


def test_a_declared_oversize_body_is_refused_unread_and_the_connection_dropped(server, client):
    peer = server(lambda exchange: reply(body=b"x" * 10))
    http = client(peer.url())
    with pytest.raises(connector.ResponseTooLarge, match="too large: 10 bytes") as raised:
        http.request("GET", "/", max_bytes=5)
    assert raised.value.status == 200
    http.request("GET", "/")
    assert [e.connection for e in peer.exchanges] == [0, 1]


def test_an_undeclared_oversize_body_is_refused(server, client):
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"a\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n")
    peer = server(lambda exchange: chunked)
    with pytest.raises(connector.ResponseTooLarge, match="too large: over 15 bytes"):
        client(peer.url()).request("GET", "/", max_bytes=15)


def test_a_chunked_answer_within_the_cap_is_read_and_the_connection_kept(server, client):
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]\r\n0\r\n\r\n"
    peer = server(lambda exchange: chunked)
    http = client(peer.url())
    assert http.request("GET", "/").content == b"[]"
    http.request("GET", "/")
    assert [e.connection for e in peer.exchanges] == [0, 0]


def test_garbage_instead_of_http_is_a_clear_error(server, client):
    peer = server(lambda exchange: b"SSH-2.0-OpenSSH_9.2\r\n")
    with pytest.raises(connector.TransportError, match="bad HTTP answer"):
        client(peer.url()).request("GET", "/")


def test_an_error_status_keeps_its_status_and_message(server, client):
    peer = server(lambda exchange: reply(503, b'{"error": "maintenance"}'))
    with pytest.raises(connector.HttpStatusError, match="peer http 503") as raised:
        client(peer.url()).request("GET", "/")
    assert raised.value.status == 503 and raised.value.response.content == b'{"error": "maintenance"}'


def test_response_headers_are_read_without_regard_to_case(server, client):
    peer = server(lambda exchange: reply(body=b"\xff\xd8", headers=(("content-TYPE", "image/jpeg"),)))
    assert client(peer.url()).request("GET", "/").headers.get("Content-Type") == "image/jpeg"


# -- TLS --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def localhost_cert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture
def tls_server(server, localhost_cert):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*localhost_cert)
    return server(tls_context=context)


def test_an_untrusted_certificate_is_a_tls_error(tls_server, client):
    with pytest.raises(connector.TlsError, match="TLS error") as raised:
        client(tls_server.url(scheme="https", host="localhost")).request("GET", "/")
    assert raised.value.status is None


def test_a_trusted_certificate_for_another_name_is_a_tls_error(tls_server, client, localhost_cert, monkeypatch):
    monkeypatch.setattr(connector, "_TLS_CONTEXT", [ssl.create_default_context(cafile=localhost_cert[0])])
    with pytest.raises(connector.TlsError, match="TLS error"):
        client(tls_server.url(scheme="https")).request("GET", "/")  # 127.0.0.1 is not in the certificate


def test_a_trusted_certificate_carries_requests_over_one_connection(tls_server, client, localhost_cert,
                                                                    monkeypatch):
    monkeypatch.setattr(connector, "_TLS_CONTEXT", [ssl.create_default_context(cafile=localhost_cert[0])])
    http = client(tls_server.url(scheme="https", host="localhost"))
    for _ in range(2):
        assert http.request("GET", "/poll").content == b"[]"
    assert [e.connection for e in tls_server.exchanges] == [0, 0]


def test_the_default_context_verifies_against_certifis_authorities():
    context = connector.tls_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] > 50


# -- proxies from the environment -------------------------------------------------

@pytest.mark.parametrize("environ, url, proxy", [
    ({}, "https://cloud.test/x", None),
    ({"https_proxy": "http://p:3128"}, "https://cloud.test/x", "http://p:3128"),
    ({"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2"}, "https://cloud.test/", "http://lower:2"),
    ({"https_proxy": "http://p:3128"}, "http://127.0.0.1:7125/", None),
    ({"http_proxy": "http://p:3128", "no_proxy": "127.0.0.1,localhost"}, "http://127.0.0.1:7125/", None),
    ({"all_proxy": "http://p:1", "NO_PROXY": ".test"}, "https://cloud.test/", None),
    ({"all_proxy": "http://p:1"}, "https://cloud.test/", "http://p:1"),
])
def test_the_proxy_is_read_from_the_environment_as_curl_reads_it(environ, url, proxy):
    assert connector.environ_proxy(url, environ) == proxy


def test_a_peer_behind_a_proxy_is_reached_through_it(server, client, monkeypatch):
    proxy = server(lambda exchange: reply(body=b'["via proxy"]'))
    monkeypatch.setenv("http_proxy", proxy.url())
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    answer = client("http://printer.invalid:7125").request("GET", "/server/info")
    assert answer.content == b'["via proxy"]'
    assert proxy.exchanges[0].request_line == "GET http://printer.invalid:7125/server/info HTTP/1.1"


def test_a_body_of_unknown_length_is_read_a_chunk_at_a_time_up_to_one_byte_past_the_cap():
    # One read of the whole cap would make Python 3.8 zero a buffer that large first.
    source, asked = io.BytesIO(b"x" * 200000), []

    def read(size):
        asked.append(size)
        return source.read(size)

    assert len(connector.read_capped(read, 150000)) == 150001
    assert max(asked) <= connector.READ_CHUNK


# -- on both transports: typed errors, deadlines, streamed bodies ------------------

@pytest.fixture(params=["kept_connections", "requests"])
def any_client(request, client, monkeypatch):
    """The client on each transport in turn: KeptConnections (direct peers)
    and RequestsTransport (peers behind a proxy)."""
    if request.param == "requests":
        monkeypatch.setattr(connector, "direct_transport", lambda: connector.RequestsTransport(None))
    return client


def _free_port():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def test_a_refused_connection_is_a_transport_error(any_client):
    with pytest.raises(connector.TransportError, match="^peer connection refused$") as raised:
        any_client("http://127.0.0.1:%d" % _free_port()).request("GET", "/")
    assert raised.value.status is None and not isinstance(raised.value, connector.ExchangeTimeout)


def test_a_silent_peer_is_an_exchange_timeout_naming_the_read(server, any_client):
    peer = server(lambda exchange: RawServer.HANG)
    with pytest.raises(connector.ExchangeTimeout, match="^peer read timed out$"):
        any_client(peer.url()).request("GET", "/", timeout=(2.0, 0.3))


def test_garbage_instead_of_http_is_a_transport_error(server, any_client):
    peer = server(lambda exchange: (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", RawServer.CLOSE))
    with pytest.raises(connector.TransportError):
        any_client(peer.url()).request("GET", "/")


def test_an_error_status_is_a_status_error_with_the_response(server, any_client):
    peer = server(lambda exchange: reply(404, b'{"error": "gone"}'))
    with pytest.raises(connector.HttpStatusError, match="peer http 404") as raised:
        any_client(peer.url()).request("GET", "/")
    assert raised.value.status == 404 and raised.value.response.content == b'{"error": "gone"}'


def test_an_untrusted_certificate_is_a_tls_error_on_both_transports(tls_server, any_client):
    with pytest.raises(connector.TlsError):
        any_client(tls_server.url(scheme="https", host="localhost")).request("GET", "/")


def test_an_answer_over_the_cap_is_response_too_large(server, any_client):
    peer = server(lambda exchange: reply(body=b"x" * 100))
    with pytest.raises(connector.ResponseTooLarge, match="too large"):
        any_client(peer.url()).request("GET", "/", max_bytes=50)


def test_a_peer_trickling_its_headers_is_cut_off_at_the_deadline(server, any_client):
    peer = server(lambda exchange: Trickle(reply(body=b"[]"), interval=0.2))
    started = time.monotonic()
    with pytest.raises(connector.ExchangeTimeout, match="within the 1 s deadline"):
        any_client(peer.url()).request("GET", "/", timeout=(2.0, 5.0), deadline=1.0)
    assert time.monotonic() - started < 3.0


def test_a_peer_trickling_its_body_is_cut_off_at_the_deadline(server, any_client):
    body = b"x" * 100
    peer = server(lambda exchange: Trickle(body, interval=0.2, head=reply(body=b"", length=len(body))))
    started = time.monotonic()
    with pytest.raises(connector.ExchangeTimeout, match="deadline"):
        any_client(peer.url()).request("GET", "/", timeout=(2.0, 5.0), deadline=1.0)
    assert time.monotonic() - started < 3.0


def test_a_proxy_that_trickles_is_cut_off_at_the_deadline(server, client, monkeypatch):
    proxy = server(lambda exchange: Trickle(reply(body=b"[]"), interval=0.2))
    monkeypatch.setenv("http_proxy", proxy.url())
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    started = time.monotonic()
    with pytest.raises(connector.ExchangeTimeout, match="deadline"):
        client("http://printer.invalid:7125").request("GET", "/server/info", timeout=(2.0, 5.0), deadline=1.0)
    assert time.monotonic() - started < 3.0


def test_an_exchange_within_its_deadline_keeps_its_connection(server, any_client):
    peer = server()
    http = any_client(peer.url())
    for _ in range(3):
        assert http.request("GET", "/", deadline=5.0).content == b"[]"
    assert [e.connection for e in peer.exchanges] == [0, 0, 0]


def test_a_body_goes_into_the_sink_in_chunks_with_progress(server, any_client):
    body = os.urandom(3 * connector.READ_CHUNK + 5)
    peer = server(lambda exchange: reply(body=body, headers=(("Content-Type", "application/octet-stream"),)))
    sink, seen = io.BytesIO(), []
    answer = any_client(peer.url()).request("GET", "/f", sink=sink, progress=seen.append, max_bytes=len(body))
    assert sink.getvalue() == body and answer.content == b"" and answer.size == len(body)
    assert seen == sorted(seen) and seen[-1] == len(body) and len(seen) <= 8


def test_a_sink_body_over_the_cap_is_response_too_large(server, any_client):
    peer = server(lambda exchange: reply(body=b"x" * 1000, length=None))
    with pytest.raises(connector.ResponseTooLarge):
        any_client(peer.url()).request("GET", "/f", sink=io.BytesIO(), max_bytes=999)


def test_a_failing_sink_raises_its_own_error_not_a_transport_error(server, any_client):
    class FullDisk(io.RawIOBase):
        def write(self, data):
            raise OSError(28, "No space left on device")

    peer = server(lambda exchange: reply(body=b"x" * 10))
    with pytest.raises(OSError, match="No space left") as raised:
        any_client(peer.url()).request("GET", "/f", sink=FullDisk())
    assert not isinstance(raised.value, connector.HttpError)


def test_a_file_body_streams_with_progress_and_its_length(server, any_client, tmp_path):
    peer = server(lambda exchange: reply(204, b""))
    data = os.urandom(2 * connector.READ_CHUNK + 17)
    (tmp_path / "a.bin").write_bytes(data)
    seen = []
    with open(str(tmp_path / "a.bin"), "rb") as body:
        any_client(peer.url()).request("PUT", "/up", data=body, headers={"Content-Length": str(len(data))},
                                       progress=seen.append)
    sent = peer.exchanges[0]
    assert sent.body == data and sent.headers["content-length"] == str(len(data))
    assert "transfer-encoding" not in sent.headers
    assert seen[-1] == len(data) and seen == sorted(seen)


def test_a_transfer_deadline_grows_with_the_size_at_the_minimum_rate():
    assert connector.transfer_deadline(0) == connector.TRANSFER_BASE_SECONDS
    assert connector.transfer_deadline(connector.MIN_TRANSFER_RATE * 100) == connector.TRANSFER_BASE_SECONDS + 100


def test_an_ordinary_call_gets_the_exchange_deadline_and_a_long_one_its_timeouts():
    assert connector.default_deadline((connector.CONNECT_TIMEOUT, connector.READ_TIMEOUT)) == \
        connector.EXCHANGES["call"].deadline
    assert connector.default_deadline((5.0, 120.0)) == 125.0


# -- the table of exchange limits ---------------------------------------------------

@pytest.mark.parametrize("kind", sorted(connector.EXCHANGES))
def test_every_kind_of_exchange_has_a_finite_deadline_no_shorter_than_its_connect(kind):
    limits = connector.exchange_limits(kind, size=10 ** 6)
    connect, read = limits["timeout"]
    assert 0 < connect <= limits["deadline"] < 3600 and 0 < read


def test_a_held_poll_gets_its_hold_on_its_read_timeout_and_its_deadline():
    plain, held = connector.exchange_limits("held_poll"), connector.exchange_limits("held_poll", hold=25)
    assert held["timeout"][1] == plain["timeout"][1] + 25 and held["deadline"] == plain["deadline"] + 25


def test_a_transfer_gets_the_deadline_of_its_size():
    assert connector.exchange_limits("transfer", size=5 * 10 ** 6)["deadline"] == connector.transfer_deadline(5 * 10 ** 6)
    assert connector.exchange_limits("webcam_upload", size=0)["deadline"] == connector.TRANSFER_BASE_SECONDS


def test_no_exchange_outside_the_table_names_its_own_timeouts():
    """One place says how long each kind of exchange may take (EXCHANGES)."""
    with open(connector.__file__, encoding="utf-8") as handle:
        source = handle.read()
    assert re.findall(r"timeout=\((?!min\()", source) == ["timeout=("]  # HttpClient.request's default only
    assert not re.findall(r"deadline=(?!None|deadline)[a-z_]+\(", source)


# -- credentials stay with their origin -------------------------------------------

def test_credentials_go_only_to_the_clients_own_origin(server, any_client):
    own, other = server(), server(lambda exchange: reply(body=b"\xff\xd8", headers=(("Content-Type", "image/jpeg"),)))
    http = any_client(own.url(), {"User-Agent": "printer-connector/test", "X-Api-Key": "moonraker-key-123",
                                  "Authorization": "Bearer sk_live_x", "X-Connector-Id": "42"})
    http.request("GET", "/server/info")
    http.request("GET", own.url("/webcam/snapshot"))
    http.request("GET", other.url("/webcam/snapshot"))
    http.request("GET", other.url("/x", host="localhost"))
    for exchange in own.exchanges:
        assert exchange.headers["x-api-key"] == "moonraker-key-123"
        assert exchange.headers["authorization"] == "Bearer sk_live_x"
    for exchange in other.exchanges:
        assert not {"x-api-key", "authorization", "x-connector-id"} & set(exchange.headers)
        assert exchange.headers["user-agent"] == "printer-connector/test"
    assert len(other.exchanges) == 2


def test_another_scheme_on_the_same_host_and_port_is_another_origin():
    assert connector.url_origin("http://h:80/a") == connector.url_origin("http://H/b")
    assert connector.url_origin("https://h:443/") != connector.url_origin("http://h:443/")
    assert connector.url_origin("http://h:x/")[0] == ""


def test_a_body_cut_short_on_its_way_into_the_sink_is_a_transport_error(server, any_client):
    peer = server(lambda exchange: (reply(body=b"x" * 10, length=100), RawServer.CLOSE))
    with pytest.raises(connector.TransportError):
        any_client(peer.url()).request("GET", "/f", sink=io.BytesIO())


def test_headers_cut_off_by_the_deadline_are_not_taken_for_a_complete_answer(server, any_client):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    peer = server(lambda exchange: Trickle(b"Content-Length: 2\r\n\r\n[]", interval=0.3, head=head))
    with pytest.raises(connector.ExchangeTimeout):
        any_client(peer.url()).request("GET", "/", sink=io.BytesIO(), deadline=1.0)


def test_an_interrupt_from_another_thread_ends_a_tls_read_as_a_transport_error(tls_server, client, localhost_cert,
                                                                               monkeypatch):
    import threading
    monkeypatch.setattr(connector, "_TLS_CONTEXT", [ssl.create_default_context(cafile=localhost_cert[0])])
    tls_server.respond = lambda exchange: RawServer.HANG
    http = client(tls_server.url(scheme="https", host="localhost"))
    raised = []

    def poll():
        try:
            http.request("GET", "/held", timeout=(2.0, 20.0))
        except Exception as exc:  # what escapes is the point of this test
            raised.append(exc)

    thread = threading.Thread(target=poll)
    thread.start()
    wait_until(lambda: tls_server.exchanges, timeout=5, message="the request arrived")
    http.interrupt()
    thread.join(5)
    assert not thread.is_alive() and len(raised) == 1
    assert isinstance(raised[0], connector.TransportError), repr(raised[0])


def test_an_interrupted_exchange_on_a_kept_connection_is_not_sent_again(server, client):
    """The interrupt looks like a dead kept connection to the reading thread;
    sent again, a held poll would hold up the stop."""
    import threading
    peer = server(lambda exchange: RawServer.HANG if exchange.request_line.startswith("GET /held") else reply())
    http = client(peer.url())
    http.request("GET", "/quick")
    raised = []

    def poll():
        try:
            http.request("GET", "/held", timeout=(2.0, 20.0))
        except connector.HttpError as exc:
            raised.append(exc)

    thread = threading.Thread(target=poll)
    thread.start()
    wait_until(lambda: len(peer.exchanges) == 2, timeout=5, message="the held request arrived")
    http.interrupt()
    thread.join(5)
    assert not thread.is_alive() and len(raised) == 1
    assert isinstance(raised[0], connector.TransportError), repr(raised[0])
    assert [e.request_line.split()[1] for e in peer.exchanges] == ["/quick", "/held"]
    assert peer.connections == 1


# -- whether a failed exchange can have reached its peer ------------------------------

def test_an_exchange_refused_at_the_connect_never_reached_its_peer(client):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    with pytest.raises(connector.TransportError, match="connection refused") as failure:
        client("http://127.0.0.1:%d" % port).request("POST", "/api/v1/connectors/register")
    assert not failure.value.connected and not connector.may_have_reached_the_cloud(failure.value)


def test_an_exchange_whose_answer_did_not_come_may_have_reached_its_peer(server, client):
    peer = server(lambda exchange: RawServer.HANG)
    with pytest.raises(connector.AnswerTimeout) as failure:
        client(peer.url()).request("POST", "/api/v1/connectors/register", timeout=(1.0, 0.3))
    assert failure.value.connected and connector.may_have_reached_the_cloud(failure.value)
