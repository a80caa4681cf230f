"""Runs connector.py with cProfile in every thread; writes merged stats on exit.

    python bench/profile_connector.py OUT.prof connector.py --config PATH ...

cProfile only sees the thread that enabled it, and the connector does its
work in loop threads, so each thread's run() gets a profiler of its own. The
connector's SIGTERM handling joins its threads, and their profiles are merged
with the main thread's into OUT.prof (a pstats file). The clock is each
thread's CPU time (time.thread_time), so time spent waiting -- on a socket, a
timer, a lock -- does not show: the figures are where the CPU goes.
"""

import cProfile
import os
import pstats
import runpy
import sys
import threading
import time

_lock = threading.Lock()
_profiles = []
_original_run = threading.Thread.run


def _profiled_run(self):
    profile = cProfile.Profile(time.thread_time)
    profile.enable()
    try:
        _original_run(self)
    finally:
        profile.disable()
        with _lock:
            _profiles.append(profile)


def main():
    if len(sys.argv) < 3:
        sys.stderr.write(__doc__)
        return 2
    out_path, script = sys.argv[1], sys.argv[2]
    sys.argv = [script] + sys.argv[3:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    threading.Thread.run = _profiled_run
    main_profile = cProfile.Profile(time.thread_time)
    code = 0
    main_profile.enable()
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        main_profile.disable()
        with _lock:
            stats = pstats.Stats(main_profile)
            for profile in _profiles:
                stats.add(profile)
        stats.dump_stats(out_path)
    return code


if __name__ == "__main__":
    sys.exit(main())
