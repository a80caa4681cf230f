"""A DNS server on a loopback address of its own (port 53, UDP), for tests
that need the real resolver (glibc's getaddrinfo) to meet a slow or
hostile name server: it holds every query unanswered until told to answer,
and then answers the held ones too, as a slow server's late replies.

A process sees it through a resolv.conf bind-mounted over /etc/resolv.conf
in a mount namespace of its own (`isolated_command`), so nothing else on the
machine is touched."""

import os
import random
import shutil
import socket
import struct
import threading

A, AAAA = 1, 28


def _question(packet):
    """(name, qtype, end of the question) of a query."""
    labels, at = [], 12
    while packet[at]:
        length = packet[at]
        labels.append(packet[at + 1:at + 1 + length].decode("ascii", "replace"))
        at += 1 + length
    qtype = struct.unpack("!H", packet[at + 1:at + 3])[0]
    return ".".join(labels).lower(), qtype, at + 5


def answer(packet, names):
    """The reply to a query: the A record names gives, no record for AAAA
    (NOERROR, empty), NXDOMAIN for a name it does not know."""
    name, qtype, end = _question(packet)
    address = names.get(name)
    records = b""
    count = 0
    if address is not None and qtype == A:
        records = b"\xc0\x0c" + struct.pack("!HHIH", A, 1, 5, 4) + socket.inet_aton(address)
        count = 1
    flags = 0x8180 if address is not None else 0x8183
    return packet[:2] + struct.pack("!HHHHH", flags, 1, count, 0, 0) + packet[12:end] + records


class FakeDns:
    """Holds queries while `holding`; answer(names) answers them all, held
    and later, from names ({name: IPv4 address})."""

    def __init__(self):
        self.address = "127.%d.%d.%d" % (random.randint(1, 254), random.randint(1, 254), random.randint(2, 254))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.address, 53))
        self.queries = []  # (name, qtype), in arrival order
        self.held = []  # (packet, peer)
        self.names = None  # type: dict  # None while holding
        self.lock = threading.Lock()
        self.asked = threading.Condition(self.lock)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                packet, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            with self.lock:
                self.queries.append(_question(packet)[:2])
                self.asked.notify_all()
                if self.names is None:
                    self.held.append((packet, peer))
                    continue
            self._send(answer(packet, self.names), peer)

    def _send(self, packet, peer):
        try:
            self.sock.sendto(packet, peer)
        except OSError:
            pass  # closed at the end of the test

    def wait_for_query(self, name, timeout):
        with self.lock:
            if not self.asked.wait_for(lambda: any(q[0] == name for q in self.queries), timeout):
                raise AssertionError("no query for %s within %.1fs (saw %r)" % (name, timeout, self.queries))

    def answer(self, names):
        with self.lock:
            self.names, held, self.held = dict(names), self.held, []
        for packet, peer in held:
            self._send(answer(packet, self.names), peer)

    def resolv_conf(self, folder):
        """A resolv.conf naming only this server, with glibc's longest waits:
        30 s a try, five tries (a lookup it holds takes 150 s to fail)."""
        path = os.path.join(str(folder), "resolv.conf")
        with open(path, "w") as handle:
            handle.write("nameserver %s\noptions timeout:30 attempts:5\n" % self.address)
        return path

    def close(self):
        self.sock.close()


def isolated_command(resolv_conf, command):
    """command, run in a mount namespace of its own (a user namespace too when
    not root) that sees resolv_conf as /etc/resolv.conf."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise AssertionError("util-linux's unshare is needed to give a process a resolver of its own")
    flags = ["--mount"] if os.geteuid() == 0 else ["--map-root-user", "--mount"]
    script = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
    return [unshare] + flags + ["sh", "-c", script, "sh", resolv_conf] + list(command)
