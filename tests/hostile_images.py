"""Hostile images made here, from a real small image: bombs (headers declaring huge sizes), truncations.

Each bomb is what an attacker would send: a few kilobytes whose header declares
a size a decoder would allocate gigabytes for. The PNG bomb is even a valid
image: 16384x16384 black pixels at one bit each, compressed to about 33 KB.
"""

from __future__ import annotations

import zlib

import cv2
import numpy as np

SOF_BASELINE, SOF_PROGRESSIVE = 0xC0, 0xC2


def jpeg(image: np.ndarray, progressive: bool = False, quality: int = 90) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] + ([cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if progressive else [])
    ok, data = cv2.imencode(".jpg", image, params)
    assert ok
    return data.tobytes()


def png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def webp(image: np.ndarray, lossless: bool = False) -> bytes:
    ok, data = cv2.imencode(".webp", image, [cv2.IMWRITE_WEBP_QUALITY, 101 if lossless else 80])
    assert ok
    return data.tobytes()


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, offset of FF, end of segment) of every header segment up to the first scan."""
    segments, pos = [], 2
    while pos < len(data):
        marker = data[pos + 1]
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        segments.append((marker, pos, pos + 2 + length))
        if marker == 0xDA:
            break
        pos += 2 + length
    return segments


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF) declaring ``width`` x ``height``."""
    (offset,) = [start for marker, start, _ in jpeg_segments(data) if marker in (SOF_BASELINE, SOF_PROGRESSIVE)]
    out = bytearray(data)
    out[offset + 5:offset + 7] = height.to_bytes(2, "big")
    out[offset + 7:offset + 9] = width.to_bytes(2, "big")
    return bytes(out)


def jpeg_bomb(image: np.ndarray, side: int, progressive: bool = True) -> bytes:
    return jpeg_with_size(jpeg(image[:64, :64], progressive, quality=30), side, side)


def jpeg_second_frame(image: np.ndarray, side: int) -> bytes:
    """A valid small JPEG followed, before its EOI, by a second frame header declaring ``side`` x ``side``."""
    data = jpeg(image[:64, :64], progressive=True, quality=30)
    (sof,) = [data[start:end] for marker, start, end in jpeg_segments(data) if marker == SOF_PROGRESSIVE]
    second = bytearray(sof)
    second[5:7] = side.to_bytes(2, "big")
    second[7:9] = side.to_bytes(2, "big")
    assert data.endswith(b"\xff\xd9")
    return data[:-2] + bytes(second) + b"\xff\xd9"


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def png_bomb(side: int = 16384) -> bytes:
    """A valid black PNG of ``side`` x ``side`` one-bit pixels: ~33 KB that decode to ``side``^2 bytes or more."""
    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    row = b"\x00" * (1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_with_size(data: bytes, width: int, height: int) -> bytes:
    """The PNG with its IHDR declaring ``width`` x ``height`` (CRC recomputed, so only the size lies)."""
    body = width.to_bytes(4, "big") + height.to_bytes(4, "big") + data[24:29]
    return data[:8] + png_chunk(b"IHDR", body) + data[33:]


def riff(*chunks: bytes) -> bytes:
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def webp_chunk(kind: bytes, body: bytes) -> bytes:
    return kind + len(body).to_bytes(4, "little") + body + (b"\0" if len(body) % 2 else b"")


def webp_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 12
    while pos < len(data):
        kind, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        chunks.append((kind, data[pos + 8:pos + 8 + size]))
        pos += 8 + size + (size & 1)
    return chunks


def vp8l_with_size(body: bytes, width: int, height: int) -> bytes:
    bits = int.from_bytes(body[1:5], "little")
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    return body[:1] + bits.to_bytes(4, "little") + body[5:]


def webp_vp8l_bomb(image: np.ndarray, side: int = 16383) -> bytes:
    """A small lossless WebP whose VP8L header declares ``side`` x ``side``."""
    [(kind, body)] = webp_chunks(webp(image[:64, :64], lossless=True))
    assert kind == b"VP8L"
    return riff(webp_chunk(b"VP8L", vp8l_with_size(body, side, side)))


def webp_vp8x_bomb(image: np.ndarray, side: int = 16383) -> bytes:
    """An extended WebP: a VP8X canvas of ``side`` x ``side`` around a VP8L image declaring the same."""
    [(kind, body)] = webp_chunks(webp(image[:64, :64], lossless=True))
    canvas = bytes(4) + (side - 1).to_bytes(3, "little") + (side - 1).to_bytes(3, "little")
    return riff(webp_chunk(b"VP8X", canvas), webp_chunk(b"VP8L", vp8l_with_size(body, side, side)))


def webp_vp8x_canvas_bomb(image: np.ndarray, side: int = 1 << 24) -> bytes:
    """A VP8X canvas of ``side`` x ``side`` (up to 2^24) around a small real lossy image."""
    [(kind, body)] = webp_chunks(webp(image[:64, :64]))
    assert kind == b"VP8 "
    canvas = bytes(4) + (side - 1).to_bytes(3, "little") + (side - 1).to_bytes(3, "little")
    return riff(webp_chunk(b"VP8X", canvas), webp_chunk(b"VP8 ", body))


def truncated_with_eoi(data: bytes) -> bytes:
    """The first half of a JPEG with an end-of-image marker appended: well-formed on the outside."""
    return data[: len(data) // 2] + b"\xff\xd9"


def truncated_webp(data: bytes) -> bytes:
    """A WebP cut short with its RIFF size made to agree, so only the image chunk is short."""
    cut = data[: len(data) * 2 // 3]
    return b"RIFF" + (len(cut) - 8).to_bytes(4, "little") + cut[8:]


def vm_hwm(pid: int) -> int:
    """Peak resident memory of a live process, bytes (VmHWM in /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")
