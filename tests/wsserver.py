"""A raw websocket server on loopback (RFC 6455 on a bare socket), for
tests that need frames no real server sends: a header that claims a frame
of gigabytes, a message in thousands of fragments. Every other HTTP request
gets a 503, as from a Moonraker whose Klippy is still starting."""

import base64
import hashlib
import socket
import struct
import threading

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def frame_header(opcode, length, fin=True):
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        return struct.pack("!BB", first, length)
    if length < 1 << 16:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def frame(opcode, payload, fin=True):
    return frame_header(opcode, len(payload), fin) + payload


class WebSocketServer:
    """After the handshake, `script(send)` runs: send(bytes) sends on the
    connection and returns False once the client has gone. `sent` counts the
    bytes the script got out; `done` is set when it ended. With `upgrade`,
    upgrade(send) answers the upgrade request instead (no 101 of ours, no
    script). `requests` holds each request's headers."""

    def __init__(self, script=lambda send: None, upgrade=None):
        self.script, self.upgrade = script, upgrade
        self.requests = []
        self.sent = 0
        self.upgrades = 0
        self.done = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.ui_port = self.port  # its web UI answers 503 too
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock):
        with sock:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    return
                head += chunk
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            headers = {line.split(":", 1)[0].strip().lower(): line.split(":", 1)[1].strip()
                       for line in lines[1:] if ":" in line}
            self.requests.append(headers)
            if " /websocket " not in lines[0] or "sec-websocket-key" not in headers:
                sock.sendall(b"HTTP/1.1 503 X\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                             b"Connection: close\r\n\r\n{}")
                return
            if self.upgrade is not None:
                self._run(self.upgrade, sock)
                return
            accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode("ascii") + GUID).digest())
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            self.upgrades += 1
            self._run(self.script, sock)

    def _run(self, script, sock):
        def send(data):
            try:
                sock.sendall(data)
            except OSError:
                return False
            self.sent += len(data)
            return True
        try:
            script(send)
        finally:
            self.done.set()

    def stop(self):
        self.listener.close()
