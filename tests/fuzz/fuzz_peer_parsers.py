"""Coverage-guided fuzz target (atheris, libFuzzer) for the readers of peer
answers: for any bytes, decode_json gives a value that encodes to JSON and
decodes again the same within the bounds, or BadJson; the error-message
readers give short text; the register reader a registration or BadResponse;
a webcam URL an http(s) URL or None. Nothing else may be raised. Run:
python tests/fuzz/fuzz_peer_parsers.py [libFuzzer flags], e.g. -runs=20000
-seed=1 (make fuzz does)."""

import json
import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

with atheris.instrument_imports():
    import connector

PRINTER = connector.PrinterConfig("http://127.0.0.1:7125")
CTYPES = ["application/json", "text/html", "", "application/json; charset=utf-8"]


def check_value(value) -> None:
    assert not connector.json_deeper_than(value, connector.MAX_JSON_DEPTH)
    text = json.dumps(value)
    assert connector.decode_json(text) == value, "does not decode again the same"


def test_one_input(raw: bytes) -> None:
    provider = atheris.FuzzedDataProvider(raw)
    ctype = CTYPES[provider.ConsumeIntInRange(0, len(CTYPES) - 1)]
    data = provider.ConsumeBytes(len(raw))
    try:
        value = connector.decode_json(data)
    except connector.BadJson:
        value = None
    else:
        check_value(value)
    response = connector.HttpResponse(500, {"Content-Type": ctype}, data)
    for describe in (connector.moonraker_error_message, connector.cloud_error_message):
        message = describe(response)
        assert isinstance(message, str) and len(message) <= 200
    text = data.decode("utf-8", "replace")
    reason = connector._traceback_reason(text)
    assert reason is None or len(reason) <= 200
    url = connector.resolve_snapshot_url(PRINTER, text.strip())
    assert url is None or connector._is_http_url(url)
    try:
        connector.read_registration(value)
    except connector.BadResponse:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
