"""__main__ of the self-check build: the same launcher and archive as
printer-connector-linux-mipsle with this module in place of connector.py's
runner, so build-mipsle.sh can check the interpreter's parts under QEMU
without giving the shipped binary a way to run arbitrary code.

    selfcheck                  checks the modules and certifi's bundle
    selfcheck URL CAFILE       GETs URL over HTTPS trusting CAFILE (tests)
"""
import hashlib
import json
import socket
import ssl
import sys
import urllib.parse
import zlib

import certifi
import click
import requests
import websocket


def main():
    ctx = ssl.create_default_context(cafile=certifi.where())
    cas = ctx.cert_store_stats()["x509_ca"]
    assert cas > 100, "certifi bundle loaded %d CAs" % cas
    assert hashlib.sha256(b"").hexdigest().startswith("e3b0c442")
    assert zlib.decompress(zlib.compress(b"x" * 1000)) == b"x" * 1000
    assert json.loads(json.dumps({"a": [1.5, None]})) == {"a": [1.5, None]}
    assert float("nan") != float("nan") and 0.1 + 0.2 > 0.3
    socket.getaddrinfo("127.0.0.1", 80)
    print("ok %s, %d CAs, requests %s, click %s, websocket-client %s, Python %s" % (
        ssl.OPENSSL_VERSION, cas, requests.__version__, click.__version__,
        websocket.__version__, sys.version.split()[0]))


def fetch(url, cafile):
    parts = urllib.parse.urlsplit(url)
    context = ssl.create_default_context(cafile=cafile)
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as raw:
        with context.wrap_socket(raw, server_hostname=parts.hostname) as tls:
            version = tls.version()
    response = requests.get(url, verify=cafile, timeout=60)
    print("status %d %s" % (response.status_code, version))


if len(sys.argv) == 3:
    fetch(sys.argv[1], sys.argv[2])
else:
    main()
