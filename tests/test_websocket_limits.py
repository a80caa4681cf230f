"""What Moonraker's websocket may cost the connector. One message: websocket-client
takes a frame of any length its header claims, in memory (twice, as it
joins the pieces), so a broken or hostile Moonraker could exhaust a K1's
~200 MB with one frame. The connector refuses a message over
WEBSOCKET_MESSAGE_MAX_BYTES as soon as its header says so, before reading
it, drops the connection and carries on (HTTP polling, reconnects). The
upgrade's answer: websocket-client reads it a byte at a time into a list,
with no bound, so it is capped at WEBSOCKET_HANDSHAKE_MAX_BYTES; and a
redirect is refused, since websocket-client would follow it itself, with
the API key.

Checked on a raw websocket server on loopback, and with the connector as a
real process whose peak RSS (VmHWM) is read from /proc."""

import threading
import time

import pytest
import websocket

import connector as agent
from harness import unpaired_config, wait_until
from wsserver import WebSocketServer, frame, frame_header

TEXT, CONT, PING = 0x1, 0x0, 0x9
LIMIT = agent.WEBSOCKET_MESSAGE_MAX_BYTES
HANDSHAKE_LIMIT = agent.WEBSOCKET_HANDSHAKE_MAX_BYTES


@pytest.fixture
def serve():
    made = []

    def make(script):
        made.append(WebSocketServer(script))
        return made[-1]
    yield make
    for server in made:
        server.stop()


def flood(send, claimed, total, ready=None):
    """A text frame whose header claims `claimed` bytes, then up to `total`
    bytes of it, a MiB at a time, for as long as the client reads."""
    if ready is not None:
        ready.wait()
    if not send(frame_header(TEXT, claimed)):
        return
    chunk = b"a" * (1024 * 1024)
    for _ in range(total // len(chunk)):
        if not send(chunk):
            return


def receive(server):
    ws = agent.open_websocket(server.url, ["User-Agent: t"])
    try:
        return ws.recv()
    finally:
        ws.close()


def test_a_frame_whose_header_claims_more_than_the_limit_is_refused_before_it_is_read(serve):
    server = serve(lambda send: flood(send, 1 << 40, 64 * 1024 * 1024))
    with pytest.raises(agent.WebSocketMessageTooLarge, match="message of %d bytes or more" % (1 << 40)):
        receive(server)
    assert server.done.wait(10)
    assert server.sent < 16 * 1024 * 1024  # what the socket buffers took before the close, not the 64 MiB


def test_a_message_of_the_limit_exactly_is_received(serve):
    server = serve(lambda send: send(frame(TEXT, b"x" * LIMIT)))
    assert len(receive(server)) == LIMIT


def test_a_message_in_fragments_is_refused_once_its_fragments_pass_the_limit(serve):
    piece = b"y" * (LIMIT // 4)
    server = serve(lambda send: all(send(frame(TEXT if i == 0 else CONT, piece, fin=False)) for i in range(8)))
    with pytest.raises(agent.WebSocketMessageTooLarge, match="message of %d bytes or more" % (5 * len(piece))):
        receive(server)


def test_the_limit_is_per_message_so_many_small_messages_pass(serve):
    piece = b'{"jsonrpc": "2.0", "method": "notify_proc_stat_update", "params": [%s]}' % (b"1" * 1000)

    def script(send):
        for _ in range(2 * LIMIT // len(piece)):
            send(frame(TEXT, piece))
        send(frame(TEXT, b"last"))
    server = serve(script)
    ws = agent.open_websocket(server.url, ["User-Agent: t"])
    try:
        while True:
            message = ws.recv()
            if message == "last":
                break
            assert message == piece.decode()
    finally:
        ws.close()


def test_a_control_frame_longer_than_the_protocol_allows_is_refused(serve):
    server = serve(lambda send: send(frame_header(PING, 1 << 30)))
    with pytest.raises(websocket.WebSocketProtocolException, match="control frame of %d bytes" % (1 << 30)):
        receive(server)


def endless_header(send):
    """An upgrade answer whose one header line never ends."""
    if send(b"HTTP/1.1 101 Switching Protocols\r\nX-Padding: "):
        chunk = b"a" * 65536
        while send(chunk):
            pass


def test_an_upgrade_answer_over_its_budget_is_refused_at_once(serve):
    server = WebSocketServer(upgrade=endless_header)
    try:
        started = time.monotonic()
        with pytest.raises(websocket.WebSocketException, match="answer is over %d bytes" % HANDSHAKE_LIMIT):
            agent.open_websocket(server.url, ["User-Agent: t"])
        assert time.monotonic() - started < 2.0
    finally:
        server.stop()


def test_a_redirect_of_the_upgrade_is_refused_and_its_target_never_gets_the_api_key(serve):
    elsewhere = serve(lambda send: None)
    moved = "HTTP/1.1 301 Moved\r\nLocation: ws://127.0.0.1:%d/websocket\r\nContent-Length: 0\r\n\r\n" % elsewhere.port
    moonraker = WebSocketServer(upgrade=lambda send: send(moved.encode("ascii")))
    try:
        with pytest.raises(websocket.WebSocketException, match="answered 301, not 101"):
            agent.open_websocket(moonraker.url, ["User-Agent: t", "X-Api-Key: MOONRAKER_KEY_123"])
    finally:
        moonraker.stop()
    assert moonraker.requests[0]["x-api-key"] == "MOONRAKER_KEY_123"
    assert elsewhere.requests == []


# -- against the real process ---------------------------------------------------------

def peak_rss(pid):
    """VmHWM of a process, in bytes."""
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM for %d" % pid)


def worker_pid(running):
    """The process that runs the agent (a onefile binary's launcher has it as its child)."""
    children = "/proc/%d/task/%d/children" % (running.proc.pid, running.proc.pid)
    with open(children) as handle:
        found = handle.read().split()
    return int(found[-1]) if found else running.proc.pid


def test_a_moonraker_sending_a_huge_frame_costs_the_connector_no_memory_and_it_carries_on(
        cloud, make_connector):
    go = threading.Event()
    moonraker = WebSocketServer(lambda send: flood(send, 1 << 30, 256 * 1024 * 1024, ready=go))
    try:
        running = make_connector(unpaired_config(cloud, moonraker)).start()
        running.wait_log("Connector running")
        wait_until(lambda: moonraker.upgrades == 1, timeout=15, message="the connector's websocket")
        pid = worker_pid(running)
        before = peak_rss(pid)
        go.set()
        running.wait_log("message of %d bytes or more from Moonraker, over the %d-byte limit" % (1 << 30, LIMIT))
        assert moonraker.done.wait(10)
        rise = peak_rss(pid) - before
        print("peak RSS before the frame %.1f MiB, rise %.1f MiB, bytes Moonraker got out %d"
              % (before / 1048576.0, rise / 1048576.0, moonraker.sent))
        assert rise < 4 * 1024 * 1024
        wait_until(lambda: moonraker.upgrades >= 2, timeout=15, message="the connector's next websocket")
        assert running.proc.poll() is None
    finally:
        moonraker.stop()


def test_a_moonraker_whose_upgrade_answer_never_ends_costs_the_connector_no_memory(cloud, make_connector):
    moonraker = WebSocketServer(upgrade=endless_header)
    try:
        running = make_connector(unpaired_config(cloud, moonraker)).start()
        running.wait_log("Connector running")
        running.wait_log("answer is over %d bytes" % HANDSHAKE_LIMIT)
        pid = worker_pid(running)
        with open("/proc/%d/status" % pid) as status:
            rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
        peak = peak_rss(pid)
        print("peak RSS %.1f MiB, RSS now %.1f MiB" % (peak / 1048576.0, rss / 1048576.0))
        assert peak - rss < 4 * 1024 * 1024  # no 15 s of header bytes held at 40 bytes each
        assert running.proc.poll() is None
    finally:
        moonraker.stop()
