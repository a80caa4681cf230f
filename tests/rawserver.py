"""A raw HTTP/1.1 server on loopback for tests that need to see every byte
a client sends, or an answer no real server would give."""

import socket
import ssl
import threading


class Exchange:
    def __init__(self, connection, head, body):
        self.connection, self.head, self.body = connection, head, body
        lines = head.decode("latin-1").split("\r\n")
        self.request_line = lines[0]
        self.method = self.request_line.split(" ")[0]
        self.header_lines = [line for line in lines[1:] if line]
        self.headers = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip()
                        for line in self.header_lines if ":" in line}


def reply(status=200, body=b"[]", headers=(("Content-Type", "application/json"),), length=None):
    head = "HTTP/1.1 %d X\r\n" % status
    for name, value in headers:
        head += "%s: %s\r\n" % (name, value)
    head += "Content-Length: %d\r\n\r\n" % (len(body) if length is None else length)
    return head.encode("latin-1") + body


class Trickle:
    """An answer sent one byte every `interval` seconds (a peer that never
    trips a read timeout but never finishes either)."""

    def __init__(self, data, interval=1.0, head=b""):
        self.data, self.interval, self.head = data, interval, head


class RawServer:
    """Answers each request with what `respond(exchange)` returns: bytes to
    send, CLOSE (drop the connection unanswered), HANG (say nothing),
    (bytes, CLOSE) to answer and then close, or a Trickle."""

    CLOSE, HANG = "close", "hang"

    def __init__(self, respond=lambda exchange: reply(), tls_context=None):
        self.respond, self.tls_context = respond, tls_context
        self.exchanges, self.connections = [], 0
        self.closed = threading.Event()
        self.stopping = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path="/", scheme="http", host="127.0.0.1"):
        return "%s://%s:%d%s" % (scheme, host, self.port, path)

    def _accept(self):
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            index, self.connections = self.connections, self.connections + 1
            threading.Thread(target=self._serve, args=(sock, index), daemon=True).start()

    def _serve(self, sock, index):
        reader = None
        try:
            if self.tls_context is not None:
                sock = self.tls_context.wrap_socket(sock, server_side=True)
            reader = sock.makefile("rb")
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline()
                    if not line:
                        return
                    head += line
                exchange = Exchange(index, head, b"")
                exchange.body = reader.read(int(exchange.headers.get("content-length", "0")))
                self.exchanges.append(exchange)
                answer = self.respond(exchange)
                if answer == self.HANG:
                    self.stopping.wait(30)
                    return
                if answer == self.CLOSE:
                    return
                if isinstance(answer, tuple):
                    sock.sendall(answer[0])
                    return
                if isinstance(answer, Trickle):
                    sock.sendall(answer.head)
                    for index in range(len(answer.data)):
                        sock.sendall(answer.data[index:index + 1])
                        if self.stopping.wait(answer.interval):
                            return
                    continue
                sock.sendall(answer)
        except (OSError, ssl.SSLError):
            return
        finally:
            # The reader holds a reference to the socket: until it is closed
            # too, sock.close() leaves the descriptor open and the client
            # would still find the connection alive after `closed` is set.
            if reader is not None:
                reader.close()
            sock.close()
            self.closed.set()

    def stop(self):
        self.stopping.set()
        self.listener.close()
