"""Every exchange has a deadline, its name lookup included: getaddrinfo
cannot be interrupted, and a slow or hostile resolver would hold it far past
the exchange's deadline (glibc: up to 150 s for one name server).

The unit specifications give socket.getaddrinfo (what every transport of the
connector calls) a resolver that really blocks until the test lets it go;
the integration test runs the connector as a real process whose resolver,
glibc's own, asks a DNS server on loopback that holds its queries."""

import io
import socket
import threading
import time

import pytest

import connector as agent
import harness
from dnsserver import FakeDns, isolated_command
from rawserver import RawServer, reply

SLACK = 1.5  # a loaded machine's scheduling


@pytest.fixture
def stuck_resolver(monkeypatch):
    """Names under .test get no answer until released; they resolve to
    127.0.0.1 then. Addresses are answered at once, as a resolver does."""
    real = socket.getaddrinfo
    released = threading.Event()
    asked = []

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if flags & socket.AI_NUMERICHOST or not str(host).endswith(".test"):
            return real(host, port, family, type, proto, flags)
        asked.append(host)
        released.wait()
        return real("127.0.0.1", port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    resolver = type("StuckResolver", (), {"asked": asked, "release": released.set})
    yield resolver
    released.set()
    harness.wait_until(lambda: not agent._LOOKUPS, timeout=5, message="the stuck lookups ended")


@pytest.fixture
def server():
    made = []

    def make(respond=lambda exchange: reply()):
        made.append(RawServer(respond))
        return made[-1]
    yield make
    for each in made:
        each.stop()


def client(base_url):
    return agent.HttpClient(base_url, {"User-Agent": "t"}, agent.generic_error_message,
                            agent.Logger("debug", stream=io.StringIO()), "cloud")


def test_a_lookup_without_an_answer_fails_the_exchange_at_its_connect_timeout(stuck_resolver, server):
    peer = server()
    started = time.monotonic()
    with pytest.raises(agent.ExchangeTimeout, match="name lookup of slow.test: no answer within 0.5 s") as failure:
        client("http://slow.test:%d" % peer.port).request("GET", "/", timeout=(0.5, 5.0))
    assert time.monotonic() - started < 0.5 + SLACK
    assert stuck_resolver.asked == ["slow.test"] and peer.connections == 0
    assert not agent.may_have_reached_the_cloud(failure.value)  # nothing was sent: a register may say so


def test_a_lookup_gets_no_more_than_what_is_left_of_the_exchanges_deadline(stuck_resolver, server):
    peer = server()
    started = time.monotonic()
    with pytest.raises(agent.ExchangeTimeout):
        client("http://slow.test:%d" % peer.port).request("GET", "/", timeout=(5.0, 5.0), deadline=0.4)
    assert time.monotonic() - started < 0.4 + SLACK


def test_after_a_lookup_timed_out_the_next_exchange_succeeds_once_the_resolver_answers(stuck_resolver, server):
    peer = server()
    http = client("http://slow.test:%d" % peer.port)
    with pytest.raises(agent.ExchangeTimeout):
        http.request("GET", "/", timeout=(0.2, 5.0))
    stuck_resolver.release()
    assert http.request("GET", "/", timeout=(2.0, 5.0)).status == 200


def test_callers_of_a_name_in_lookup_wait_on_that_lookup_instead_of_starting_another(stuck_resolver):
    for _ in range(3):
        with pytest.raises(agent.NameLookupTimeout):
            agent.resolve("slow.test", 80, 0.1)
    assert stuck_resolver.asked == ["slow.test"]


def stick_cloud_chosen_names(count):
    for index in range(count):
        with pytest.raises(agent.NameLookupTimeout):
            agent.resolve("stuck%d.test" % index, 80, 0.05, capped=True)


def test_while_several_names_a_cloud_chose_have_no_answer_a_new_one_fails_at_once_without_a_thread(stuck_resolver):
    stick_cloud_chosen_names(agent.MAX_STUCK_LOOKUPS)
    threads = threading.active_count()
    started = time.monotonic()
    with pytest.raises(agent.NameLookupTimeout, match="not tried, %d earlier lookups" % agent.MAX_STUCK_LOOKUPS):
        agent.resolve("another.test", 80, 5.0, capped=True)
    assert time.monotonic() - started < SLACK
    assert threading.active_count() == threads and "another.test" not in stuck_resolver.asked


def test_stuck_names_a_cloud_chose_do_not_stop_the_lookup_of_a_configured_name(stuck_resolver):
    stick_cloud_chosen_names(agent.MAX_STUCK_LOOKUPS)
    with pytest.raises(agent.NameLookupTimeout, match="no answer within"):
        agent.resolve("moonraker.test", 7125, 0.05)
    assert "moonraker.test" in stuck_resolver.asked


def test_transfer_urls_are_looked_up_as_names_a_cloud_chose(stuck_resolver):
    stick_cloud_chosen_names(agent.MAX_STUCK_LOOKUPS)
    guard = agent.AddressGuard({}, {}, {}, allowed=())
    with pytest.raises(agent.NameLookupTimeout, match="not tried"):
        guard.addresses("bucket.test", 443)


def test_an_address_is_connected_to_while_the_resolver_is_stuck(stuck_resolver, server):
    peer = server()
    with pytest.raises(agent.NameLookupTimeout):
        agent.resolve("stuck.test", peer.port, 0.05)
    assert client(peer.url("").rstrip("/")).request("GET", "/", timeout=(0.5, 5.0)).status == 200


def test_the_lookup_of_a_proxy_has_the_same_bound(stuck_resolver, server, monkeypatch):
    peer = server()
    monkeypatch.setenv("http_proxy", "http://proxy.test:%d" % peer.port)
    started = time.monotonic()
    with pytest.raises(agent.ExchangeTimeout, match="name lookup of proxy.test: no answer within 0.5 s"):
        client("http://cloud.example").request("GET", "/", timeout=(0.5, 5.0))
    assert time.monotonic() - started < 0.5 + SLACK
    assert peer.connections == 0


def test_the_lookup_of_moonrakers_websocket_has_the_handshakes_bound(stuck_resolver, monkeypatch):
    monkeypatch.setitem(agent.EXCHANGES, "websocket_handshake", agent.ExchangeLimits(0.5, 5.0, 15.0))
    started = time.monotonic()
    with pytest.raises(agent.ExchangeTimeout, match="name lookup of k1.test"):
        try:
            agent.open_websocket("http://k1.test:7125", ["User-Agent: t"])
        except OSError as exc:  # the watcher's loop maps nothing: it logs what it caught
            raise agent.http_error_of(exc, None) from None
    assert time.monotonic() - started < 0.5 + SLACK


def test_the_transfer_guard_of_a_printer_named_by_a_stuck_name_is_built_in_bounded_time(stuck_resolver, monkeypatch):
    monkeypatch.setattr(agent, "CONNECT_TIMEOUT", 0.3)
    config = agent.Config(path="/nonexistent/c.json", cloud_url="https://cloud.example",
                          moonraker=[agent.PrinterConfig(base_url="http://k1.test:7125", name="K1", ui_port=80)])
    started = time.monotonic()
    guard = agent.transfer_guard(config)
    assert time.monotonic() - started < 2 * 0.3 + SLACK
    with pytest.raises(agent.DestinationRefused):
        guard.addresses("k1.test", 7125)  # its name is refused even unresolved


# -- against the real process, with glibc's resolver ---------------------------------

def test_a_connector_whose_name_server_holds_its_queries_gives_up_at_the_connect_timeout_and_carries_on(
        cloud, printer, make_connector, tmp_path, monkeypatch):
    dns = FakeDns()
    try:
        command = harness.connector_cmd
        resolv = dns.resolv_conf(tmp_path)
        monkeypatch.setattr(harness, "connector_cmd", lambda: isolated_command(resolv, command()))
        config = harness.unpaired_config(cloud, printer, cloud_url=cloud.url.replace("127.0.0.1", "cloud.test"))
        running = make_connector(config).start()
        dns.wait_for_query("cloud.test", timeout=15)
        asked = time.monotonic()
        # Two waits on the one lookup: the register body's device address
        # (a second at most), then the register's connect.
        running.wait_log("pairing failed; retrying.*name lookup of cloud.test: no answer within %g s"
                         % agent.CONNECT_TIMEOUT, timeout=agent.CONNECT_TIMEOUT + 10)
        assert "may have reached the cloud" not in running.log
        assert time.monotonic() - asked < 1.0 + agent.CONNECT_TIMEOUT + 2 * SLACK
        dns.answer({"cloud.test": "127.0.0.1"})  # the held queries are answered too, late
        running.wait_log("Pairing successful", timeout=20)
    finally:
        dns.close()
