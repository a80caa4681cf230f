"""Property-based specifications (hypothesis) of what the guards read from
peers and the owner: transfer_allow_hosts entries in the config, addresses
a resolver gives for a transfer URL, and websocket frames from Moonraker.
Whatever they hold, nothing raises out but the typed errors, and no bound
is passed."""

import ipaddress
import socket

from hypothesis import HealthCheck, given, settings, strategies as st
import websocket

import connector

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

host_texts = st.one_of(st.text(max_size=40), st.from_regex(r"\[?[0-9a-fA-F:.%]{0,30}\]?(:[0-9]{0,6})?", fullmatch=True),
                       st.from_regex(r"[a-zA-Z0-9.-]{0,30}(:[0-9a-z]{0,6})?\.?", fullmatch=True))


@SETTINGS
@given(host_texts)
def test_an_allow_list_entry_is_a_host_and_an_optional_port_or_refused(text):
    parsed = connector.parse_host_port(text)
    if parsed is not None:
        host, port = parsed
        assert host and host == host.lower() and not host.endswith(".") and "*" not in host
        assert port is None or 0 < port < 65536


@SETTINGS
@given(st.lists(st.one_of(host_texts, st.integers(), st.none(), st.lists(st.text(max_size=3))), max_size=5))
def test_any_transfer_allow_hosts_loads_or_is_one_config_error(entries):
    data = {"connector_id": "1", "connector_secret": "secret-12345678", "moonraker": [{}],
            "transfer_allow_hosts": entries}
    try:
        config = connector.parse_config("/etc/c.json", data, environ={})
    except connector.ConfigError as exc:
        assert str(exc).startswith("/etc/c.json: transfer_allow_hosts: ") and "\n" not in str(exc)
        return
    assert len(config.transfer_allow_hosts) == len(entries)


addresses = st.one_of(st.ip_addresses().map(str), st.text(max_size=45),
                      st.ip_addresses(v=6).map(lambda ip: "%s%%%d" % (ip, 3)))


@SETTINGS
@given(addresses)
def test_whether_an_address_is_public_is_answered_for_any_text(address):
    public = connector.is_public_address(address)
    if public:
        ip = ipaddress.ip_address(connector.canonical_ip(address))
        assert not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified)


@SETTINGS
@given(st.lists(st.ip_addresses().map(str), min_size=1, max_size=4))
def test_a_transfer_url_whose_name_has_one_private_address_among_public_ones_is_refused(answers):
    infos = [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 443)) for a in answers]
    guard = connector.AddressGuard({}, {}, {}, allowed=())
    reason = guard._private("bucket.test", 443, infos)
    assert (reason is None) == all(connector.is_public_address(a) for a in answers)


frame_headers = st.builds(
    lambda fin, opcode, length: bytes([(0x80 if fin else 0) | opcode]) + (
        bytes([length]) if length < 126 else bytes([126]) + length.to_bytes(2, "big") if length < 65536
        else bytes([127]) + length.to_bytes(8, "big")),
    st.booleans(), st.sampled_from([0x0, 0x1, 0x2, 0x8, 0x9, 0xA, 0x3]),
    st.one_of(st.integers(0, 200), st.integers(0, 2 ** 21), st.integers(0, 2 ** 63)))


class _Wire:
    """Frames as a socket would give them: each header, then a payload of
    what the header claims, up to a budget (a hostile peer stops sending)."""

    def __init__(self, headers, budget=4 * 1024 * 1024):
        self.data = bytearray()
        for header in headers:
            self.data += header
            length = header[1] & 0x7F
            length = (int.from_bytes(header[2:4], "big") if length == 126 else
                      int.from_bytes(header[2:10], "big") if length == 127 else length)
            self.data += b"x" * min(length, budget)
            budget -= min(length, budget)
        self.at = 0
        self.read = 0

    def recv(self, size):
        if self.at >= len(self.data):
            raise websocket.WebSocketConnectionClosedException("end of what the peer sent")
        chunk = bytes(self.data[self.at:self.at + size])
        self.at += len(chunk)
        self.read += len(chunk)
        return chunk


@SETTINGS
@given(st.lists(frame_headers, min_size=1, max_size=8))
def test_frames_of_any_claimed_length_are_read_within_the_message_limit_or_refused(headers):
    wire = _Wire(headers)
    frames = connector.CappedFrames(wire.recv)
    message = 0
    try:
        while True:
            frame = frames.recv_frame()
            if frame.opcode in connector.CappedFrames.DATA_OPCODES:
                message += len(frame.data)
                assert message <= connector.WEBSOCKET_MESSAGE_MAX_BYTES
                if frame.fin:
                    message = 0
            else:
                assert len(frame.data) <= 125
    except websocket.WebSocketException:
        pass
    assert wire.read <= 8 * (10 + 125) + connector.WEBSOCKET_MESSAGE_MAX_BYTES + 16384
