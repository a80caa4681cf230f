"""What both simulators share: recording under a lock with wait_for, the fault
table, and the CLI's serve-until-signalled loop."""

import inspect
import re
import signal
import threading
import time


def recorded(attribute):
    """A read-only property: a copy of a recorded list, taken under the lock."""

    def copy_of(self):
        with self._lock:
            return list(getattr(self, attribute))

    return property(copy_of, doc="copy of %s, safe to read from any thread" % attribute)


class Recorder:
    """Base of the simulators. Every recorded event calls _notify() with the lock
    held; wait_for() wakes on those events (no sleeping loop)."""

    # A predicate may also look at things this object does not record (another
    # simulator, a file); it is re-checked at least this often as well.
    RECHECK_SECONDS = 0.5

    def __init__(self):
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._events = 0

    def _notify(self):
        """Call with self._lock held, after recording something."""
        self._events += 1
        self._cond.notify_all()

    def wait_for(self, predicate, timeout=10.0, message=None):
        """Returns predicate()'s first truthy value; AssertionError after timeout.

        The predicate runs without the lock held, so it may call anything
        (even make HTTP requests to this simulator)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                seen = self._events
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("%s not met within %.1fs; %s" % (
                    message or describe(predicate), timeout, self.summary()))
            with self._cond:
                if self._events == seen:
                    self._cond.wait(min(remaining, self.RECHECK_SECONDS))

    def summary(self):
        raise NotImplementedError


def describe(predicate):
    try:
        return "condition `%s`" % inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return "condition %r" % (predicate,)


class FaultTable:
    """Faults switched on by tests: key (an endpoint, or None for all) -> mode,
    for `count` requests (None: until cleared). Shares the owner's lock."""

    def __init__(self, lock, modes):
        self._lock = lock
        self._modes = modes
        self._faults = {}

    def set(self, mode, key=None, count=None):
        if not (mode in self._modes or re.fullmatch(r"(slow|late):\d+(\.\d+)?", mode)):
            raise ValueError("unknown fault mode %r" % mode)
        with self._lock:
            self._faults[key] = {"mode": mode, "count": count}

    def clear(self):
        with self._lock:
            self._faults.clear()

    def take(self, keys):
        """The mode of the first of `keys` that has a fault (using up one count)."""
        with self._lock:
            key = next((k for k in keys if k in self._faults), "no fault")
            fault = self._faults.get(key)
            if fault is None:
                return None
            if fault["count"] is not None:
                fault["count"] -= 1
                if fault["count"] <= 0:
                    del self._faults[key]
            return fault["mode"]

    def keys(self):
        with self._lock:
            return list(self._faults)


def serve_until_signalled(server, banner):
    """CLI main loop: start, print one line, run until SIGTERM or SIGINT, stop."""
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    server.start()
    print(banner(), flush=True)
    while not stopped.wait(1.0):
        pass
    server.stop()
    return 0
