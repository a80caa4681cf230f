"""Property-based specifications of how peers' answers are read: whatever a
cloud or a Moonraker answers (generated JSON of any shape, any bytes), the
readers give a value or one of the typed errors with a short message, never
another exception."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import connector

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30)
REGISTER_LIKE = st.fixed_dictionaries({}, optional={
    "connector": st.one_of(JSON, st.fixed_dictionaries({"id": JSON})),
    "credentials": st.one_of(JSON, st.fixed_dictionaries({"secret": JSON})),
    "printers": st.one_of(JSON, st.lists(st.fixed_dictionaries({}, optional={"id": JSON}), max_size=3)),
    "polling": st.one_of(JSON, st.dictionaries(st.sampled_from(["commands_seconds", "snapshots_seconds",
                                                                 "heartbeat_seconds"]), JSON)),
})
EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _response(body, ctype="application/json"):
    return connector.HttpResponse(200, {"Content-Type": ctype}, body)


@EXAMPLES
@given(st.one_of(JSON, REGISTER_LIKE))
def test_any_register_answer_is_a_registration_or_a_bad_response(answer):
    try:
        registration = connector.read_registration(answer)
    except connector.BadResponse as exc:
        assert str(exc).startswith("register: ") and len(str(exc)) < 300
        return
    assert registration.connector_id and registration.secret
    assert all(p is None or (isinstance(p, int) and p > 0) for p in registration.printer_ids)
    assert all(isinstance(v, float) and v > 0 for v in registration.polling.values())


@EXAMPLES
@given(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_any_body_is_json_or_a_bad_response(body):
    try:
        _response(body).json("x")
    except connector.BadResponse as exc:
        assert str(exc).startswith("x: expected JSON") and len(str(exc)) < 300


@EXAMPLES
@given(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()),
       st.sampled_from(["application/json", "text/html", ""]))
def test_any_error_body_gives_a_short_message(body, ctype):
    for describe in (connector.moonraker_error_message, connector.cloud_error_message):
        message = describe(connector.HttpResponse(500, {"Content-Type": ctype}, body))
        assert isinstance(message, str) and len(message) <= 200


def test_a_register_answer_nested_a_thousand_levels_is_a_bad_response():
    response = _response(b"[" * 1000 + b"]" * 1000)
    try:
        response.json("register")
    except connector.BadResponse as exc:
        assert "nested" in str(exc)
    else:
        raise AssertionError("accepted")


def test_a_printer_id_that_is_a_unicode_digit_is_a_bad_response_not_a_crash():
    answer = {"connector": {"id": 7}, "credentials": {"secret": "sk_live_0123456789"}, "printers": [{"id": "\u00b2"}]}
    try:
        connector.read_registration(answer)
    except connector.BadResponse as exc:
        assert "printers[0].id" in str(exc)
    else:
        raise AssertionError("accepted")
