#!/usr/bin/env python3
"""Client CPU per request for the ways the connector could poll the cloud.

Starts the reference cloud in a process of its own (so its CPU is not
counted), pairs once, then times N keep-alive `GET .../commands?limit=20`
with the protocol's headers through: connector.py's HttpClient,
a bare requests.Session, a urllib3 connection pool, and http.client. Prints
the client CPU per request (process time, median of --repeat rounds) and the
bytes each sends per request, as counted by the cloud.

    http_cost.py [--requests N] [--repeat R]
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def start_cloud():
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "sim", "cloud.py"), "--port", "0",
                             "--pairing-token", "PAIR_http_cost"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    url = line.strip().rsplit(" ", 1)[-1]
    if not url.startswith("http://"):
        proc.kill()
        raise SystemExit("the reference cloud did not start: %r" % line)
    return proc, url


def control(url, method, path, body=None):
    host = url.split("//", 1)[1]
    conn = http.client.HTTPConnection(host, timeout=10)
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"Content-Type": "application/json"})
    answer = json.loads(conn.getresponse().read() or b"null")
    conn.close()
    return answer


def clients(url, headers):
    """name -> (setup, one request) pairs; each request returns the body bytes."""
    import connector
    import requests
    import urllib3

    host = url.split("//", 1)[1]

    def via_connector():
        client = connector.HttpClient(url, headers, connector.cloud_error_message, connector.Logger("info"), "cloud")
        return lambda p: client.request("GET", p, params={"limit": 20}).content

    def via_requests():
        session = requests.Session()
        session.trust_env = False
        session.headers.clear()
        session.headers.update(headers)
        return lambda p: session.get(url + p, params={"limit": 20}, timeout=(5, 15)).content

    def via_urllib3():
        pool = urllib3.HTTPConnectionPool(host.split(":")[0], int(host.split(":")[1]), maxsize=1,
                                          timeout=urllib3.Timeout(connect=5, read=15), retries=False)
        fixed = dict(headers, **{"Accept-Encoding": urllib3.util.SKIP_HEADER})
        return lambda p: pool.urlopen("GET", p + "?limit=20", headers=fixed, retries=False).data

    def via_http_client():
        conn = http.client.HTTPConnection(host, timeout=15)

        def get(p):
            conn.putrequest("GET", p + "?limit=20", skip_accept_encoding=True)
            for name, value in headers.items():
                conn.putheader(name, value)
            conn.endheaders()
            return conn.getresponse().read()
        return get

    return [("connector.HttpClient", via_connector), ("requests.Session", via_requests),
            ("urllib3 pool", via_urllib3), ("http.client", via_http_client)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    proc, url = start_cloud()
    try:
        host = url.split("//", 1)[1]
        conn = http.client.HTTPConnection(host, timeout=10)
        conn.request("POST", "/api/v1/connectors/register", body=json.dumps({"pairing_token": "PAIR_http_cost"}),
                     headers={"Content-Type": "application/json"})
        answer = json.loads(conn.getresponse().read())
        conn.close()
        cid, secret = answer["connector"]["id"], answer["credentials"]["secret"]
        headers = {"User-Agent": "printer-connector/0.1.0", "Accept": "application/json",
                   "Authorization": "Bearer %s" % secret, "X-Connector-Id": str(cid)}
        path = "/api/v1/connectors/%s/commands" % cid
        print("client CPU per keep-alive GET .../commands?limit=20 (%d requests x %d rounds, python %s)"
              % (args.requests, args.repeat, sys.version.split()[0]))
        for name, setup in clients(url, headers):
            get = setup()
            if get(path) != b"[]":
                raise SystemExit("%s: unexpected answer" % name)
            before = control(url, "GET", "/_control/state")["stats"]
            rounds = []
            for _ in range(args.repeat):
                started = time.process_time()
                for _ in range(args.requests):
                    get(path)
                rounds.append((time.process_time() - started) / args.requests)
            after = control(url, "GET", "/_control/state")["stats"]
            sent = (after["bytes_in"] - before["bytes_in"]) / (after["requests"] - before["requests"])
            print("  %-34s %.3f ms CPU  (rounds %s)  %.0f bytes sent per request" % (
                name, statistics.median(rounds) * 1000, ", ".join("%.3f" % (r * 1000) for r in rounds), sent))
    finally:
        proc.terminate()
        proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
