"""Image headers read without decoding, and the memory-capped decoder processes."""

from __future__ import annotations

import os
import shutil
import signal
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hostile_images as hi
from hostile_images import vm_hwm
from facehub.cloud import images
from facehub.cloud.decoder import DecodeRefused, DecoderCrashed, DecoderPool, DecoderUnavailable
from facehub.cloud.images import ImageBomb, check_header, read_header
from facehub.dev.servers import wait_for
from facehub.messages import InvalidFace

LIMIT = 4096 * 4096
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def image(photo):
    return photo[:200, :300]


@pytest.fixture(scope="module")
def decoders():
    pool = DecoderPool(1, 256 * MiB, 10)
    yield pool
    pool.close()


# -- headers ------------------------------------------------------------------------------------


def test_real_images_report_their_size(image):
    cases = [
        ("image/jpeg", hi.jpeg(image), "JPEG", "baseline"),
        ("image/jpeg", hi.jpeg(image, progressive=True), "JPEG", "progressive"),
        ("image/jpeg", hi.jpeg(image[:, :, 0]), "JPEG", "baseline"),
        ("image/png", hi.png(image), "PNG", "colour type 2, 8 bits"),
        ("image/png", hi.png(image[:, :, 0]), "PNG", "colour type 0, 8 bits"),
        ("image/webp", hi.webp(image), "WebP", "lossy"),
        ("image/webp", hi.webp(image, lossless=True), "WebP", "lossless"),
    ]
    for content_type, data, fmt, detail in cases:
        assert read_header(content_type, data) == images.ImageInfo(fmt, 300, 200, detail), (fmt, detail)
        assert check_header(content_type, data, LIMIT).pixels == 60_000


def test_an_extended_webp_reports_its_image():
    [(_, body)] = hi.webp_chunks(hi.webp(hi_image(), lossless=True))
    canvas = bytes(4) + (63).to_bytes(3, "little") + (31).to_bytes(3, "little")
    data = hi.riff(hi.webp_chunk(b"VP8X", canvas), hi.webp_chunk(b"VP8L", body))
    assert read_header("image/webp", data) == images.ImageInfo("WebP", 64, 32, "lossless")


def hi_image():
    import numpy as np

    return np.full((32, 64, 3), 90, np.uint8)


@pytest.mark.parametrize("name, content_type, make, declared", [
    ("progressive JPEG 16384", "image/jpeg", lambda im: hi.jpeg_bomb(im, 16384), "16384x16384"),
    ("baseline JPEG 32768", "image/jpeg", lambda im: hi.jpeg_bomb(im, 32768, progressive=False), "32768x32768"),
    ("JPEG with a second huge frame", "image/jpeg", lambda im: hi.jpeg_second_frame(im, 30000), "30000x30000"),
    ("PNG 16384 (a valid image)", "image/png", lambda im: hi.png_bomb(16384), "16384x16384"),
    ("PNG with a lying IHDR", "image/png", lambda im: hi.png_with_size(hi.png(im[:32, :32]), 100_000, 100_000),
     "100000x100000"),
    ("WebP VP8L 16383", "image/webp", lambda im: hi.webp_vp8l_bomb(im, 16383), "16383x16383"),
    ("WebP VP8X 16383", "image/webp", lambda im: hi.webp_vp8x_bomb(im, 16383), "16383x16383"),
    ("WebP VP8X canvas 2^24", "image/webp", lambda im: hi.webp_vp8x_canvas_bomb(im), "16777216x16777216"),
])
def test_bombs_are_refused_from_their_headers(image, name, content_type, make, declared):
    data = make(image)
    assert len(data) < 64_000, f"{name} should be small ({len(data)} bytes)"
    with pytest.raises(ImageBomb) as refused:
        check_header(content_type, data, LIMIT)
    assert declared in refused.value.reason
    assert refused.value.keep_payload is False


def test_the_limit_is_the_configured_one(image):
    data = hi.jpeg(image)
    assert check_header("image/jpeg", data, 60_000).pixels == 60_000
    with pytest.raises(ImageBomb, match="300x200 pixels .60000., over the limit of 59999"):
        check_header("image/jpeg", data, 59_999)


def test_malformed_containers_are_refused_with_a_reason(image):
    jpeg = hi.jpeg(image)
    png = hi.png(image)
    lossy = hi.webp(image)
    sof = next(start for marker, start, _ in hi.jpeg_segments(jpeg) if marker == hi.SOF_BASELINE)
    arithmetic = jpeg[:sof + 1] + b"\xc9" + jpeg[sof + 2:]
    no_height = hi.jpeg_with_size(jpeg, 300, 0)
    sos = next(start for marker, start, _ in hi.jpeg_segments(jpeg) if marker == 0xDA)
    idat = png.index(b"IDAT") - 4
    cases = [
        ("image/jpeg", jpeg[:-2], "no end-of-image marker"),
        ("image/jpeg", jpeg[: len(jpeg) // 2], "no end-of-image marker"),
        ("image/jpeg", jpeg + b"trailing junk", "bytes after its end-of-image marker"),
        ("image/jpeg", jpeg[:sof] + b"\xff\xd9", "no frame header"),
        ("image/jpeg", jpeg[:sos] + b"\xff\xd9", "no image data"),
        ("image/jpeg", arithmetic, "SOF9 is not supported"),
        ("image/jpeg", no_height, "declares 300x0 pixels"),
        ("image/jpeg", hi.jpeg_second_frame(image, 16), "2 frame headers"),
        ("image/jpeg", jpeg[:20] + b"\x00" + jpeg[21:], "malformed"),
        ("image/png", png[:-12], "no IEND chunk"),
        ("image/png", png + b"\x00", "bytes after its IEND chunk"),
        ("image/png", png[:idat + 10] + bytes([png[idat + 10] ^ 1]) + png[idat + 11:], "bad CRC"),
        ("image/png", png[:33] + hi.png_chunk(b"acTL", bytes(8)) + png[33:], "animated PNG"),
        ("image/png", png[:33] + png[-12:], "no image data"),
        ("image/webp", lossy[:-10], "RIFF size mismatch"),
        ("image/webp", hi.truncated_webp(lossy), "truncated"),
        ("image/webp", hi.riff(hi.webp_chunk(b"ANIM", bytes(6))), "animated WebP"),
        ("image/webp", hi.riff(hi.webp_chunk(b"EXIF", b"x")), "no image chunk"),
    ]
    for content_type, data, reason in cases:
        with pytest.raises(InvalidFace, match=reason) as refused:
            check_header(content_type, data, LIMIT)
        assert not isinstance(refused.value, ImageBomb), reason


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_damage_gives_a_size_or_a_reason(image, data):
    """Flipped, cut or inserted bytes anywhere: the parsers answer or refuse, never fail otherwise."""
    kind = data.draw(st.sampled_from(["jpeg", "progressive", "png", "webp", "lossless"]))
    original = {"jpeg": lambda: hi.jpeg(image[:40, :40]), "progressive": lambda: hi.jpeg(image[:40, :40], True),
                "png": lambda: hi.png(image[:40, :40]), "webp": lambda: hi.webp(image[:40, :40]),
                "lossless": lambda: hi.webp(image[:40, :40], lossless=True)}[kind]()
    content_type = {"jpeg": "image/jpeg", "progressive": "image/jpeg", "png": "image/png"}.get(kind, "image/webp")
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(damaged) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            damaged[at] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del damaged[at:at + data.draw(st.integers(1, 64))]
        else:
            damaged[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    try:
        info = read_header(content_type, bytes(damaged))
    except InvalidFace as refused:
        assert refused.reason
    else:
        assert info.width >= 1 and info.height >= 1


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["image/jpeg", "image/png", "image/webp"]), st.binary(max_size=300),
       st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF", b""]))
def test_any_bytes_give_a_size_or_a_reason(content_type, tail, head):
    try:
        read_header(content_type, head + tail)
    except InvalidFace as refused:
        assert refused.reason


# -- decoder processes --------------------------------------------------------------------------


def test_real_images_decode(image, decoders):
    assert decoders.decode("image/jpeg", hi.jpeg(image)) == (38, 25)  # JPEGs at 1/8 scale
    assert decoders.decode("image/jpeg", hi.jpeg(image, progressive=True)) == (38, 25)
    assert decoders.decode("image/png", hi.png(image)) == (300, 200)
    assert decoders.decode("image/webp", hi.webp(image)) == (300, 200)
    assert decoders.decode("image/webp", hi.webp(image, lossless=True)) == (300, 200)


def test_a_truncated_jpeg_with_an_end_marker_is_refused_for_its_warning(image, decoders):
    for data in (hi.jpeg(image), hi.jpeg(image, progressive=True)):
        damaged = hi.truncated_with_eoi(data)
        assert read_header("image/jpeg", damaged).pixels == 60_000  # well-formed on the outside
        with pytest.raises(DecodeRefused, match="Corrupt JPEG data|Premature end"):
            decoders.decode("image/jpeg", damaged)
    assert decoders.decode("image/jpeg", hi.jpeg(image)) == (38, 25)  # nothing left over from before


@pytest.mark.parametrize("content_type, make", [
    ("image/jpeg", lambda im: hi.jpeg_bomb(im, 16384)),
    ("image/jpeg", lambda im: hi.jpeg_bomb(im, 32768)),
    ("image/png", lambda im: hi.png_bomb(16384)),
    ("image/webp", lambda im: hi.webp_vp8l_bomb(im, 16383)),
])
def test_a_bomb_that_reaches_a_decoder_stays_within_its_memory_cap(image, content_type, make):
    """Behind the header check, the decoder's own cap: a bomb fed straight to it fails inside it."""
    pool = DecoderPool(1, 128 * MiB, 20)
    try:
        pool.decode("image/jpeg", hi.jpeg(image))  # started and capped
        (pid,) = pool.pids()
        with pytest.raises((DecodeRefused, DecoderCrashed)):
            pool.decode(content_type, make(image))
        if pid in pool.pids():
            assert vm_hwm(pid) < 300 * MiB, f"decoder peaked at {vm_hwm(pid) / MiB:.0f} MiB"
        assert pool.decode("image/png", hi.png(image)) == (300, 200)  # the pool goes on
    finally:
        pool.close()


def test_a_frozen_decoder_is_replaced_after_its_timeout(image):
    pool = DecoderPool(1, 128 * MiB, 2)
    try:
        pool.decode("image/jpeg", hi.jpeg(image))
        (frozen,) = pool.pids()
        os.kill(frozen, signal.SIGSTOP)
        with pytest.raises(DecoderCrashed, match="no answer within its time limit"):
            pool.decode("image/jpeg", hi.jpeg(image))
        assert pool.decode("image/jpeg", hi.jpeg(image)) == (38, 25)
        assert frozen not in pool.pids() and pool.replaced == 1
        wait_for(lambda: not os.path.exists(f"/proc/{frozen}"), 10, message="frozen decoder reaped")
    finally:
        pool.close()


def test_a_killed_decoder_is_replaced(image):
    pool = DecoderPool(1, 128 * MiB, 10)
    try:
        pool.decode("image/png", hi.png(image))
        (first,) = pool.pids()
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: first not in pool.pids(), 10, message="decoder gone")
        # The pool notices a dead worker before handing it out, so no decode is lost to it.
        assert pool.decode("image/png", hi.png(image)) == (300, 200)
        assert pool.pids() and first not in pool.pids()
    finally:
        pool.close()


def test_closing_the_pool_ends_its_processes(image):
    pool = DecoderPool(2, 128 * MiB, 10)
    pool.decode("image/jpeg", hi.jpeg(image))
    pids = pool.pids()
    assert len(pids) == 2
    pool.close()
    for pid in pids:
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, message=f"decoder {pid} ended")


def test_a_decoder_inherits_none_of_the_savers_secrets(image, monkeypatch):
    monkeypatch.setenv("FACEHUB_CLOUD_PASSWORD", "broker-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "storage-secret")
    pool = DecoderPool(1, 128 * MiB, 10)
    try:
        pool.decode("image/png", hi.png(image))
        (pid,) = pool.pids()
        with open(f"/proc/{pid}/environ", "rb") as environ:
            variables = environ.read()
        assert b"broker-secret" not in variables and b"storage-secret" not in variables
        assert b"OMP_NUM_THREADS=1" in variables
        assert sorted(os.listdir(f"/proc/{pid}/fd")) == ["0", "1", "2", "3", "4", "5"]  # no saver sockets
    finally:
        pool.close()


def test_a_decoder_that_cannot_start_is_unavailable_not_crashed(image, monkeypatch):
    """A decoder that cannot be started, or dies before it is ready, has seen no image: no message is blamed."""
    for program in ("/nonexistent/python", shutil.which("false")):  # not there; exits at once
        monkeypatch.setattr(sys, "executable", program)
        pool = DecoderPool(1, 128 * MiB, 10)
        try:
            with pytest.raises(DecoderUnavailable):
                pool.decode("image/png", hi.png(image))
            assert pool.replaced == 0 and pool.answers == 0
        finally:
            pool.close()
    monkeypatch.undo()
    pool = DecoderPool(1, 128 * MiB, 10)
    try:
        assert pool.decode("image/png", hi.png(image)) == (300, 200) and pool.answers == 1
    finally:
        pool.close()
