#!/usr/bin/env python3
"""How to read a commands answer holding a large base64 file (issue 15):
the measurement that chose connector.py's JsonSplitter.

Writes a commands answer with a file of --mb megabytes as base64 `content`
(a pause beside it) to a temp file, then has each candidate read it in
64 KiB chunks, as it would come off the socket, and write the decoded file
to disk, each in a fresh interpreter so that its peak RSS is its own:

  splitter    connector.py's JsonSplitter (stdlib: a regex search per chunk
              finds a long string's end; the string goes to disk as it comes)
  json-stream json-stream's pure-Python tokenizer (what a K1 gets: its Rust
              tokenizer has no MIPS build), transient mode
  ijson       ijson's pure-Python backend (its yajl C backends have no MIPS
              build either), parse events

json-stream and ijson hand over a string only whole, so they hold the base64
text in memory however they read it. Prints one line per candidate: wall
seconds, MB/s and peak RSS. Not a test; it asserts nothing.

    bench/json_split.py [--mb 8] [--python PY] [--libs DIR] [--only NAME,...]

--libs is a folder with json-stream and ijson installed for that Python
(pip install --target DIR json-stream ijson); without them those two are
reported as not installed. connector.py needs click and websocket-client
importable (the dev venv, or --libs).
"""

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CHUNK = 64 * 1024

# What each imports (not timed), then what it runs (timed), in a child whose
# argv is the answer's path and an output folder.
IMPORTS = {
    "splitter": "import connector",
    "json-stream": "import json_stream; from json_stream.tokenizer import tokenize  # the pure-Python tokenizer",
    "ijson": "import ijson.backends.python as ijson",
}
CANDIDATES = {
    "splitter": r'''
splitter = connector.JsonSplitter(out)
with open(answer, "rb") as handle:
    for chunk in iter(lambda: handle.read(CHUNK), b""):
        splitter.write(chunk)
commands = splitter.value()
decoder, size = connector.Base64Chunks(), 0
with open(out + "/file", "wb") as target:
    for piece in commands[0]["params"]["content"].utf8_chunks():
        target.write(decoder.feed(piece))
size = decoder.size
splitter.close()
''',
    "json-stream": r'''
size = 0
with open(answer, "rb") as handle, open(out + "/file", "wb") as target:
    for command in json_stream.load(handle, tokenizer=tokenize):
        for key, value in command.items():
            if key == "params":
                for name, param in value.items():
                    if name == "content":
                        data = base64.b64decode(param)
                        size += len(data)
                        target.write(data)
''',
    "ijson": r'''
size = 0
with open(answer, "rb") as handle, open(out + "/file", "wb") as target:
    for prefix, event, value in ijson.parse(handle, buf_size=CHUNK):
        if prefix == "item.params.content":
            data = base64.b64decode(value)
            size += len(data)
            target.write(data)
''',
}

CHILD = r'''
import base64, os, resource, sys, time
sys.path[:0] = [p for p in os.environ.get("SPLIT_PATH", "").split(os.pathsep) if p]
answer, out, CHUNK = sys.argv[1], sys.argv[2], %d
%s
started = time.monotonic()
%s
seconds = time.monotonic() - started
print("ok %%d %%.3f %%d" %% (size, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
'''


def write_answer(path, megabytes):
    data = os.urandom(3 * 1024 * 1024)  # a multiple of 3: the blocks' base64 joins up
    total = int(megabytes * 1000 * 1000)
    with open(path, "wb") as handle:
        handle.write(b'[{"id": 1, "printer_id": 1, "action": "upload_file", "params": {"filename": "big.gcode", '
                     b'"content": "')
        left = total
        while left > 0:
            take = min(left, len(data))
            handle.write(base64.b64encode(data[:take]))
            left -= take
        handle.write(b'"}}, ' + json.dumps({"id": 2, "printer_id": 1, "action": "pause", "params": {}}).encode()
                     + b"]")
    return total


def run(python, name, answer, libs):
    with tempfile.TemporaryDirectory(prefix="json-split-") as out:
        env = dict(os.environ, SPLIT_PATH=os.pathsep.join(p for p in (libs, ROOT) if p))
        code = CHILD % (CHUNK, IMPORTS[name], CANDIDATES[name])
        proc = subprocess.run([python, "-c", code, answer, out], capture_output=True, text=True, env=env)
    line = proc.stdout.strip().splitlines()[-1:] or [""]
    if proc.returncode != 0 or not line[0].startswith("ok "):
        error = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return None, error
    _, size, seconds, maxrss_kib = line[0].split()
    return (int(size), float(seconds), int(maxrss_kib) * 1024), None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=8.0, help="decoded size of the file (MB)")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--libs", default="", help="folder with json-stream and ijson for that Python")
    parser.add_argument("--only", default=",".join(CANDIDATES))
    args = parser.parse_args(argv)
    version = subprocess.run([args.python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="json-split-answer-") as folder:
        answer = os.path.join(folder, "answer.json")
        write_answer(answer, args.mb)
        wire = os.path.getsize(answer)
        print("answer: %.1f MB on the wire (a %.1f MB file as base64), Python %s" % (wire / 1e6, args.mb, version))
        for name in args.only.split(","):
            result, error = run(args.python, name, answer, args.libs)
            if result is None:
                print("  %-12s failed: %s" % (name, error))
                continue
            size, seconds, rss = result
            print("  %-12s %7.2f s  %6.1f MB/s  peak RSS %6.1f MiB  (decoded %d bytes)"
                  % (name, seconds, wire / 1e6 / seconds, rss / 1048576.0, size))


if __name__ == "__main__":
    main()
