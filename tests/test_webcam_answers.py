"""What a camera's answer must be to go to the cloud as a picture. A camera
URL comes from Moonraker's webcam list, which any LAN client Moonraker
trusts may edit, so a URL may lead to another service of the owner's
network: an answer typed as something else is refused, and so is one
without a Content-Type that does not start like a picture. Checked against
a raw HTTP server on loopback."""

import io

import pytest

import connector
from rawserver import RawServer, reply

JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 64


def fetch(body, headers=()):
    camera = RawServer(lambda exchange: reply(200, body, headers))
    moonraker = connector.Moonraker(connector.PrinterConfig(base_url="http://127.0.0.1:1"),
                                    connector.Logger("error", stream=io.StringIO()), "test")
    try:
        return connector.fetch_webcam_image(moonraker, camera.url("/snapshot"))
    finally:
        moonraker.close()
        camera.stop()


@pytest.mark.parametrize("body, ctype", [(JPEG, "image/jpeg"), (PNG, "image/png"), (WEBP, "image/webp"),
                                         (b"GIF89a" + b"\x00" * 16, "image/gif")])
def test_an_untyped_answer_that_starts_like_a_picture_is_taken_as_one(body, ctype):
    assert fetch(body) == (body, ctype)


@pytest.mark.parametrize("body", [b'{"admin_password": "hunter2"}', b"<html>router</html>", b"\x00\x01"])
def test_an_untyped_answer_that_does_not_start_like_a_picture_is_refused(body):
    with pytest.raises(connector.BadResponse, match="not an image .no Content-Type"):
        fetch(body)


def test_a_typed_picture_keeps_its_type():
    assert fetch(JPEG, (("Content-Type", "image/x-custom; q=1"),)) == (JPEG, "image/x-custom")


def test_an_answer_typed_as_something_else_is_refused():
    with pytest.raises(connector.BadResponse, match=r"not an image \(application/json\)"):
        fetch(JPEG, (("Content-Type", "application/json"),))
