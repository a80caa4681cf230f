"""In-process stand-ins for the agent's peers, for specs that run the
command runner without HTTP: a cloud that takes completions and a Moonraker
that answers every call with one given value."""

import json

import connector


class FakeCloud:
    """Takes every completion; each must have an id the agent may send and a
    body that can be encoded."""

    def __init__(self):
        self.completed = []

    def complete(self, command_id, body):
        assert isinstance(command_id, str) and len(command_id) <= connector.COMMAND_ID_MAX_CHARS
        json.dumps(body)
        self.completed.append((command_id, body))
        return True

    def push_snapshots(self, batch):
        pass


class AnsweringMoonraker:
    """Answers every call with `answer`; has no status for snapshots."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = 0

    def call(self, method, path, **kwargs):
        self.calls += 1
        return self.answer

    def query_status(self):
        raise connector.HttpError("no status in this test")


class AnsweringClients:
    """The cloud and every printer's Moonraker, as the command runner asks for them."""

    def __init__(self, answer):
        self.cloud = FakeCloud()
        self.moonraker_fake = AnsweringMoonraker(answer)

    def moonraker(self, printer):
        return self.moonraker_fake
