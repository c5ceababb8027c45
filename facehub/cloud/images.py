"""What an image says about itself, read from its bytes without decoding it.

A decoder allocates memory for the dimensions an image *declares*, before it
has read any pixel: a 1.8 KB JPEG whose frame header says 16384x16384 makes a
decoder reserve gigabytes, even one asked for a 1/8-scale result. So the
saver reads the declared dimensions here, in pure Python and from the bytes
alone, and refuses an image over ``saver.max_pixels`` before any decoder sees
it. Only then is the image decoded (in a separate, memory-capped process, see
``facehub.cloud.decoder``) to prove it is complete.

The parsers are strict: they walk the whole container and refuse anything a
camera's encoder would not produce, so the structure they checked is the
structure a decoder will see.

- **JPEG**: every marker segment from SOI to EOI, the entropy-coded data of
  every scan skipped byte-stuffing-aware, so *every* frame header (SOFn) is
  found, including those of progressive images and any placed after a scan.
  Exactly one frame, baseline, extended or progressive Huffman (SOF0-2),
  1-4 components, a height in the header (no DNL), at least one scan, nothing
  after EOI but padding.
- **PNG**: every chunk with its CRC, IHDR first with a valid depth and colour
  type, at least one IDAT, IEND last; animated PNG (acTL/fcTL) refused.
- **WebP**: the RIFF size, then every chunk: one image, lossy ``VP8 `` (key
  frame, start code) or lossless ``VP8L``; a ``VP8X`` canvas is checked too,
  and animation (``ANIM``/``ANMF``) is refused.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from facehub.messages import InvalidFace

JPEG_PADDING = b"\0\r\n "  # what may follow EOI (some writers pad); anything else is refused
# Frame headers of the coding processes a camera's encoder produces (Huffman): baseline,
# extended sequential, progressive. Lossless, hierarchical and arithmetic coding are refused.
JPEG_SOF_SUPPORTED = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}
JPEG_SOF_ALL = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}
PNG_ANIMATION = {b"acTL", b"fcTL", b"fdAT"}
WEBP_ANIMATION = {b"ANIM", b"ANMF"}


@dataclass(frozen=True)
class ImageInfo:
    """What the header declares: format, size in pixels, and (JPEG) the coding process."""

    format: str
    width: int
    height: int
    detail: str = ""

    @property
    def pixels(self) -> int:
        return self.width * self.height


class ImageBomb(InvalidFace):
    """An image whose header declares more pixels than allowed: its payload is not kept."""

    def __init__(self, reason: str):
        super().__init__(reason, keep_payload=False)


class _Refused(InvalidFace):
    """Refused for its structure, but declaring a size too: a bomb among the sizes is reported as one."""

    def __init__(self, reason: str, width: int, height: int):
        super().__init__(reason)
        self.width, self.height = width, height


def check_header(content_type: str, data: bytes, max_pixels: int) -> ImageInfo:
    """The image's declared size, or :class:`InvalidFace` (:class:`ImageBomb` when too large)."""
    try:
        info = read_header(content_type, data)
    except _Refused as refused:
        if refused.width * refused.height > max_pixels:
            raise ImageBomb(f"{refused.reason}; declares {refused.width}x{refused.height} pixels, "
                            f"over the limit of {max_pixels}") from None
        raise InvalidFace(refused.reason) from None
    if info.pixels > max_pixels:
        raise ImageBomb(f"{info.format} declares {info.width}x{info.height} pixels "
                        f"({info.pixels}), over the limit of {max_pixels}")
    return info


def read_header(content_type: str, data: bytes) -> ImageInfo:
    """Parse the container named by ``content_type``; raise :class:`InvalidFace` if malformed."""
    readers = {"image/jpeg": jpeg_info, "image/png": png_info, "image/webp": webp_info}
    reader = readers.get(content_type)
    if reader is None:
        raise InvalidFace(f"unsupported content type {content_type[:64]!r}")
    return reader(bytes(data))


# -- JPEG ---------------------------------------------------------------------------------------


def jpeg_info(data: bytes) -> ImageInfo:
    if not data.startswith(b"\xff\xd8"):
        raise InvalidFace("payload is not JPEG data (no start-of-image marker)")
    frames: list[tuple[int, int, int, int]] = []  # (marker, width, height, components)
    scans = 0
    pos, end = 2, len(data)
    while True:
        if pos >= end:
            raise InvalidFace("JPEG is truncated (no end-of-image marker)")
        if data[pos] != 0xFF:
            raise InvalidFace(f"JPEG is malformed (no marker at byte {pos})")
        while pos < end and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= end:
            raise InvalidFace("JPEG is truncated (no end-of-image marker)")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI
            break
        if marker in (0x00, 0xD8) or 0xD0 <= marker <= 0xD7:
            raise InvalidFace(f"JPEG is malformed (marker FF{marker:02X} out of place at byte {pos - 2})")
        if marker == 0x01:  # TEM: no length
            continue
        if pos + 2 > end:
            raise InvalidFace("JPEG is truncated (no end-of-image marker)")
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2:
            raise InvalidFace(f"JPEG is malformed (segment FF{marker:02X} of length {length})")
        body_end = pos + length
        if body_end > end:
            raise InvalidFace("JPEG is truncated (no end-of-image marker)")
        body = data[pos + 2:body_end]
        if marker in JPEG_SOF_ALL:
            frames.append(_jpeg_frame(marker, body))
        elif marker == 0xDC:
            raise InvalidFace("JPEG defines its height later (DNL marker): not supported")
        elif marker == 0xDA:  # SOS: a scan header, then entropy-coded data up to the next marker
            if not frames:
                raise InvalidFace("JPEG is malformed (a scan before the frame header)")
            if not body or len(body) < 1 + 2 * body[0] + 3:
                raise InvalidFace("JPEG is malformed (short scan header)")
            scans += 1
            pos = _skip_entropy_coded(data, body_end)
            continue
        pos = body_end
    trailer = data[pos:]
    if trailer.strip(JPEG_PADDING):
        raise InvalidFace(f"JPEG has {len(trailer)} bytes after its end-of-image marker")
    if not frames:
        raise InvalidFace("JPEG has no frame header (SOF)")
    if len(frames) > 1:
        # Refused whatever the sizes, but a bomb among them is still reported as one.
        _, width, height, _ = max(frames, key=lambda f: f[1] * f[2])
        raise _Refused(f"JPEG has {len(frames)} frame headers (one expected)", width, height)
    marker, width, height, components = frames[0]
    if not scans:
        raise InvalidFace("JPEG has no image data (no scan)")
    return ImageInfo("JPEG", width, height, JPEG_SOF_SUPPORTED.get(marker, f"SOF{marker - 0xC0}"))


def _jpeg_frame(marker: int, body: bytes) -> tuple[int, int, int, int]:
    if len(body) < 6:
        raise InvalidFace("JPEG is malformed (short frame header)")
    height = int.from_bytes(body[1:3], "big")
    width = int.from_bytes(body[3:5], "big")
    components = body[5]
    if marker not in JPEG_SOF_SUPPORTED:
        raise _Refused(f"JPEG coding process SOF{marker - 0xC0} is not supported", width, height)
    if body[0] not in (8, 12):
        raise InvalidFace(f"JPEG sample precision {body[0]} is not supported")
    if width == 0 or height == 0:
        raise InvalidFace(f"JPEG declares {width}x{height} pixels")
    if not 1 <= components <= 4 or len(body) < 6 + 3 * components:
        raise InvalidFace(f"JPEG frame header is malformed ({components} components)")
    for index in range(components):
        sampling = body[6 + 3 * index + 1]
        if not (1 <= sampling >> 4 <= 4 and 1 <= sampling & 0x0F <= 4):
            raise InvalidFace("JPEG frame header is malformed (sampling factors)")
    return marker, width, height, components


def _skip_entropy_coded(data: bytes, pos: int) -> int:
    """The position of the marker that ends the entropy-coded data starting at ``pos``.

    Inside it, FF 00 is a stuffed FF byte and FF D0-D7 are restart markers;
    the first other FF xx is the next marker (xx = FF is fill, so look again).
    """
    end = len(data)
    while True:
        found = data.find(b"\xff", pos)
        if found < 0 or found + 1 >= end:
            return end  # no marker before the end: the caller reports truncation
        following = data[found + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7:
            pos = found + 2
        elif following == 0xFF:
            pos = found + 1
        else:
            return found


# -- PNG ----------------------------------------------------------------------------------------


def png_info(data: bytes) -> ImageInfo:
    if not data.startswith(PNG_SIGNATURE):
        raise InvalidFace("payload is not PNG data (bad signature)")
    pos, end = len(PNG_SIGNATURE), len(data)
    info: ImageInfo | None = None
    idat = False
    while True:
        if pos + 12 > end:
            raise InvalidFace("PNG is truncated (no IEND chunk)")
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        if length > 0x7FFFFFFF:
            raise InvalidFace("PNG is malformed (chunk length over 2^31-1)")
        body_end = pos + 8 + length
        if body_end + 4 > end:
            raise InvalidFace("PNG is truncated (no IEND chunk)")
        body = data[pos + 8:body_end]
        if zlib.crc32(data[pos + 4:body_end]) != int.from_bytes(data[body_end:body_end + 4], "big"):
            raise InvalidFace(f"PNG chunk {_kind(kind)} has a bad CRC")
        if info is None:
            if kind != b"IHDR":
                raise InvalidFace("PNG is malformed (first chunk is not IHDR)")
            info = _png_header(body)
        elif kind == b"IHDR":
            raise InvalidFace("PNG has more than one IHDR chunk")
        elif kind in PNG_ANIMATION:
            raise InvalidFace("animated PNG is not a face")
        elif kind == b"IDAT":
            idat = True
        elif kind == b"IEND":
            pos = body_end + 4
            break
        pos = body_end + 4
    if pos != end:
        raise InvalidFace(f"PNG has {end - pos} bytes after its IEND chunk")
    if not idat:
        raise InvalidFace("PNG has no image data (no IDAT chunk)")
    return info


def _png_header(body: bytes) -> ImageInfo:
    if len(body) != 13:
        raise InvalidFace("PNG IHDR chunk is malformed")
    width, height = int.from_bytes(body[0:4], "big"), int.from_bytes(body[4:8], "big")
    depth, colour, compression, filtering, interlace = body[8:13]
    if not (0 < width <= 0x7FFFFFFF and 0 < height <= 0x7FFFFFFF):
        raise InvalidFace(f"PNG declares {width}x{height} pixels")
    if depth not in PNG_DEPTHS.get(colour, ()):
        raise InvalidFace(f"PNG bit depth {depth} with colour type {colour} is invalid")
    if compression or filtering or interlace > 1:
        raise InvalidFace("PNG IHDR chunk is malformed (compression, filter or interlace method)")
    return ImageInfo("PNG", width, height, f"colour type {colour}, {depth} bits")


# -- WebP ---------------------------------------------------------------------------------------


def webp_info(data: bytes) -> ImageInfo:
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise InvalidFace("payload is not WebP data (no RIFF/WEBP header)")
    if int.from_bytes(data[4:8], "little") + 8 != len(data):
        raise InvalidFace("WebP is truncated or malformed (RIFF size mismatch)")
    pos, end = 12, len(data)
    canvas: tuple[int, int] | None = None
    images: list[ImageInfo] = []
    first = True
    while pos < end:
        if pos + 8 > end:
            raise InvalidFace("WebP is truncated (chunk header)")
        kind = data[pos:pos + 4]
        size = int.from_bytes(data[pos + 4:pos + 8], "little")
        body_end = pos + 8 + size
        if body_end > end:
            raise InvalidFace(f"WebP is truncated (chunk {_kind(kind)})")
        body = data[pos + 8:body_end]
        if kind == b"VP8X":
            if not first:
                raise InvalidFace("WebP is malformed (VP8X is not the first chunk)")
            canvas = _webp_canvas(body)
        elif kind in WEBP_ANIMATION:
            raise InvalidFace("animated WebP is not a face")
        elif kind == b"VP8 ":
            images.append(_webp_lossy(body))
        elif kind == b"VP8L":
            images.append(_webp_lossless(body))
        first = False
        pos = body_end + (size & 1)  # chunks are padded to an even size
    if pos != end:
        raise InvalidFace("WebP is malformed (chunk padding past the end)")
    declared = images + ([ImageInfo("WebP", *canvas, "VP8X canvas")] if canvas else [])
    largest = max(declared, key=lambda i: i.pixels, default=None)
    if len(images) != 1:
        reason = "WebP has no image chunk" if not images else f"WebP has {len(images)} image chunks"
        if largest is not None:
            raise _Refused(reason, largest.width, largest.height)
        raise InvalidFace(reason)
    image = images[0]
    if canvas and canvas != (image.width, image.height):
        raise _Refused(f"WebP canvas {canvas[0]}x{canvas[1]} disagrees with its image "
                       f"{image.width}x{image.height}", largest.width, largest.height)
    return image


def _webp_canvas(body: bytes) -> tuple[int, int]:
    if len(body) < 10:
        raise InvalidFace("WebP VP8X chunk is malformed")
    if body[0] & 0x02:
        raise InvalidFace("animated WebP is not a face")
    return int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1


def _webp_lossy(body: bytes) -> ImageInfo:
    if len(body) < 10:
        raise InvalidFace("WebP VP8 chunk is truncated")
    if body[0] & 0x01:
        raise InvalidFace("WebP VP8 data does not start with a key frame")
    if body[3:6] != b"\x9d\x01\x2a":
        raise InvalidFace("WebP VP8 data has no start code")
    width = int.from_bytes(body[6:8], "little") & 0x3FFF
    height = int.from_bytes(body[8:10], "little") & 0x3FFF
    if not width or not height:
        raise InvalidFace(f"WebP declares {width}x{height} pixels")
    return ImageInfo("WebP", width, height, "lossy")


def _webp_lossless(body: bytes) -> ImageInfo:
    if len(body) < 5 or body[0] != 0x2F:
        raise InvalidFace("WebP VP8L data has no signature")
    bits = int.from_bytes(body[1:5], "little")
    if bits >> 29:
        raise InvalidFace("WebP VP8L version is not 0")
    return ImageInfo("WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, "lossless")


def _kind(kind: bytes) -> str:
    return repr(kind.decode("latin-1"))
