"""Coverage-guided fuzz target (atheris, libFuzzer): the commands answer is
read by JsonSplitter a chunk at a time; for any bytes, cut into chunks of
any size, it must say what decode_json says of the whole: the same value, or
BadJson. Only UTF-8 counts: the splitter looks for quote bytes, so it refuses
a UTF-16 or UTF-32 body that decode_json would read (RFC 8259 8.1: JSON
between systems is UTF-8). Run: python tests/fuzz/fuzz_json_splitter.py [libFuzzer flags],
e.g. -runs=20000 -seed=1 (make fuzz does)."""

import json
import os
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

with atheris.instrument_imports():
    import connector

FOLDER = tempfile.mkdtemp(prefix="fuzz-splitter-")


def read(data: bytes, chunk: int):
    splitter = connector.JsonSplitter(FOLDER)
    try:
        for start in range(0, len(data), chunk):
            splitter.write(data[start:start + chunk])
        return splitter.value()
    except connector.BadJson:
        return connector.BadJson
    finally:
        splitter.close()


def whole(data: bytes):
    try:
        return connector.decode_json(data)
    except connector.BadJson:
        return connector.BadJson


def test_one_input(raw: bytes) -> None:
    provider = atheris.FuzzedDataProvider(raw)
    chunk = provider.ConsumeIntInRange(1, 64)
    data = provider.ConsumeBytes(len(raw))
    if json.detect_encoding(data) != "utf-8":
        return
    expected, got = whole(data), read(data, chunk)
    if expected != got:
        raise AssertionError("JsonSplitter (chunks of %d) gave %r, decode_json %r, for %r"
                             % (chunk, got, expected, data[:200]))


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
