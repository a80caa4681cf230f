"""What both simulators share: a lock around what they record, and wait_for."""

import inspect
import threading
import time


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
