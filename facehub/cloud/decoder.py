"""Decoding untrusted images in separate processes, each under a memory ceiling and a deadline.

The saver only stores an image that fully decodes, and decoding foreign bytes
is the riskiest thing it does: a decoder may allocate for whatever size the
image declares, spin on crafted data, or crash. So decoding never happens in
the saver's own process. A :class:`DecoderPool` keeps ``saver.decoders``
long-lived worker processes (``python -m facehub.cloud.decoder``); each

- loads OpenCV, decodes a sample of each format once, then caps its own
  address space with ``RLIMIT_AS`` at its size at that point plus
  ``saver.decode_memory``: an allocation past the cap fails inside the worker
  (the decode fails, or the worker dies), never in the saver;
- runs single-threaded (OpenCV, OpenMP and BLAS thread pools off), so the cap
  is not spent on idle thread arenas;
- points its stdout and stderr at a private file and reads it after every
  decode: libjpeg reports a truncated or corrupt JPEG only as a warning on
  stderr ("Premature end of JPEG file", "Corrupt JPEG data: premature end of
  data segment") and returns a grey-padded image, so any output during a decode
  refuses the image;
- speaks a framed protocol on private copies of its original stdin/stdout;
- inherits no open files and none of the saver's environment but the few
  variables Python needs, so a decoder bug an image exploits finds no
  broker password or storage key to steal.

The saver waits at most ``saver.decode_timeout`` for an answer; a worker that
is late or dies is killed and replaced, and the caller learns it as
:class:`DecoderCrashed` (the message may be a poison; the saver counts it).
An image that decodes with an error or a warning is :class:`DecodeRefused`.
A worker that cannot be started, or dies before it is ready (before it has
seen any image), is :class:`DecoderUnavailable`: no message's fault, so the
saver waits and tries again instead of counting it against the message.

JPEGs are decoded at 1/8 scale (every byte of the entropy-coded data is still
read and checked; only the inverse DCT is cheaper), the others in grey. The
decoded size must agree with the size the header declared.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import NamedTuple

log = logging.getLogger(__name__)

KINDS = {"image/jpeg": b"j", "image/png": b"p", "image/webp": b"w"}
REQUEST = struct.Struct(">cI")
REPLY = struct.Struct(">I")
MAX_REPLY = 1 << 16
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "OPENCV_FOR_THREADS_NUM": "1", "MALLOC_ARENA_MAX": "2"}
# All a worker inherits from the saver's environment: never its secrets (broker password, S3 keys).
WORKER_INHERITS = ("PATH", "PYTHONPATH", "PYTHONHOME", "LD_LIBRARY_PATH", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR")


class DecodeRefused(Exception):
    """The image does not decode cleanly (an error, a warning, or a size other than declared)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DecoderCrashed(Exception):
    """The decoder process died or did not answer in time; it has been replaced."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DecoderUnavailable(Exception):
    """No decoder could be started (or one died while starting): try again later."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Decoded(NamedTuple):
    width: int
    height: int


# -- in the saver -------------------------------------------------------------------------------


class Decoder:
    """One worker process and its pipes. Not thread-safe: the pool hands it to one caller at a time."""

    def __init__(self, memory: int, startup_timeout: float = 60.0):
        self.memory = memory
        self.startup_timeout = startup_timeout
        env = {**{k: os.environ[k] for k in WORKER_INHERITS if k in os.environ}, **WORKER_ENV}
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "facehub.cloud.decoder", str(memory)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env,
                                         close_fds=True)
        except OSError as error:
            raise DecoderUnavailable(f"cannot start a decoder: {error}") from None
        os.set_blocking(self.proc.stdin.fileno(), False)
        self.started = time.monotonic()
        self.ready = False
        self.limit = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def decode(self, content_type: str, data: bytes, timeout: float) -> Decoded:
        if not self.ready:
            try:
                hello = self._read(self.started + self.startup_timeout, "start")
            except DecoderCrashed as error:
                raise DecoderUnavailable(error.reason) from None
            self.limit = int(hello.get("limit", 0))
            self.ready = True
        deadline = time.monotonic() + timeout
        self._write(REQUEST.pack(KINDS[content_type], len(data)) + data, deadline)
        reply = self._read(deadline, "answer")
        if not reply.get("ok"):
            raise DecodeRefused(str(reply.get("reason", "does not decode"))[:300])
        return Decoded(int(reply["width"]), int(reply["height"]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            log.error("decoder pid %d does not die", self.proc.pid)
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def close(self) -> None:
        """Ask the worker to exit (end of input), then make sure it has."""
        try:
            self.proc.stdin.close()
            self.proc.wait(2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def _write(self, data: bytes, deadline: float) -> None:
        """Write the request; the pipe usually takes it at once, so ``select`` only when it is full."""
        fd = self.proc.stdin.fileno()
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
                continue
            except BlockingIOError:
                pass
            except (BrokenPipeError, OSError):
                raise DecoderCrashed(self._death("while reading the image")) from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DecoderCrashed("decoder did not take the image in time")
            select.select([], [fd], [], remaining)

    def _read(self, deadline: float, what: str) -> dict:
        """One framed reply; the worker writes it in one piece, so it usually takes one read."""
        fd = self.proc.stdout.fileno()
        buffer = b""
        while True:
            if len(buffer) >= REPLY.size:
                (size,) = REPLY.unpack_from(buffer)
                if size > MAX_REPLY:
                    raise DecoderCrashed(f"decoder sent a {size}-byte {what}")
                if len(buffer) >= REPLY.size + size:
                    return json.loads(buffer[REPLY.size:REPLY.size + size])
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DecoderCrashed(f"decoder gave no {what} within its time limit")
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(fd, MAX_REPLY + REPLY.size)
            if not chunk:
                raise DecoderCrashed(self._death(f"before its {what}"))
            buffer += chunk

    def _death(self, when: str) -> str:
        try:
            code = self.proc.wait(1)
        except subprocess.TimeoutExpired:
            return f"decoder closed its pipe {when}"
        if code < 0:
            try:
                return f"decoder was killed by {signal.Signals(-code).name} {when}"
            except ValueError:
                return f"decoder was killed by signal {-code} {when}"
        return f"decoder exited with code {code} {when}"


class DecoderPool:
    """``size`` decoder processes shared by the saver's storage threads; dead or late ones are replaced."""

    def __init__(self, size: int, memory: int, timeout: float, startup_timeout: float = 60.0):
        self.size = size
        self.memory = memory
        self.timeout = timeout
        self.startup_timeout = startup_timeout
        self.replaced = 0
        self.answers = 0  # decodes a decoder answered (images decoded or refused): decoders work
        self._idle: queue.Queue[Decoder | None] = queue.Queue()
        self._all: set[Decoder] = set()
        self._lock = threading.Lock()
        self._closed = False
        for _ in range(size):
            try:
                self._idle.put(self._spawn())
            except DecoderUnavailable as error:
                log.error("%s; trying again when an image comes", error.reason)
                self._idle.put(None)

    def decode(self, content_type: str, data: bytes) -> Decoded:
        """Decode in a worker; raise DecodeRefused, DecoderCrashed or DecoderUnavailable."""
        decoder = self._idle.get()
        try:
            if decoder is None or not decoder.alive:
                self._forget(decoder)
                decoder = self._spawn()
            try:
                return decoder.decode(content_type, data, self.timeout)
            finally:
                if decoder.ready:
                    with self._lock:
                        self.answers += 1
        except DecoderCrashed:
            self._forget(decoder)
            decoder = None  # the next caller starts a fresh one
            with self._lock:
                self.replaced += 1
            raise
        except DecoderUnavailable:
            self._forget(decoder)
            decoder = None
            raise
        finally:
            self._idle.put(decoder)

    def pids(self) -> list[int]:
        with self._lock:
            return [d.pid for d in self._all if d.alive]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            decoders = list(self._all)
            self._all.clear()
        for decoder in decoders:
            decoder.close()

    def _spawn(self) -> Decoder:
        decoder = Decoder(self.memory, self.startup_timeout)
        with self._lock:
            self._all.add(decoder)
            closed = self._closed
        if closed:
            self._forget(decoder)
            raise DecoderUnavailable("the decoder pool is closed")
        return decoder

    def _forget(self, decoder: Decoder | None) -> None:
        if decoder is None:
            return
        decoder.kill()
        with self._lock:
            self._all.discard(decoder)


# -- in the worker process ----------------------------------------------------------------------


def worker_main(memory: int) -> int:
    """``python -m facehub.cloud.decoder MEMORY``: decode requests from stdin until it closes."""
    import resource
    import tempfile

    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    capture = tempfile.TemporaryFile()
    os.dup2(capture.fileno(), 1)  # anything a library prints goes to the capture file, never the protocol
    os.dup2(capture.fileno(), 2)

    import cv2
    import numpy as np

    cv2.setNumThreads(1)
    flags = {b"j": cv2.IMREAD_REDUCED_GRAYSCALE_8, b"p": cv2.IMREAD_GRAYSCALE, b"w": cv2.IMREAD_GRAYSCALE}
    sample = np.full((16, 16, 3), 128, np.uint8)
    for ext in (".jpg", ".png", ".webp"):  # load every codec before the cap
        cv2.imdecode(cv2.imencode(ext, sample)[1], cv2.IMREAD_GRAYSCALE)
    limit = _vm_size() + memory
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _captured(capture.fileno())  # what loading printed is no image's fault: the first decode starts clean
    _reply(proto_out, {"ready": True, "pid": os.getpid(), "limit": limit})
    while True:
        header = _read_exact(proto_in, REQUEST.size)
        if header is None:
            return 0
        kind, size = REQUEST.unpack(header)
        data = _read_exact(proto_in, size)
        if data is None or kind not in flags:
            return 1
        reply: dict = {"ok": False}
        try:
            image = cv2.imdecode(np.frombuffer(data, np.uint8), flags[kind])
            if image is None or image.size == 0:
                reply["reason"] = "does not decode"
            else:
                reply.update(ok=True, width=int(image.shape[1]), height=int(image.shape[0]))
            del image
        except MemoryError:
            reply["reason"] = "needs more memory than the decoder may use"
        except cv2.error as error:
            reply["reason"] = "decoder error: " + (str(error).strip().splitlines() or [""])[-1][:200]
        del data
        output = _captured(capture.fileno())
        if output:
            reply["ok"] = False
            reply["reason"] = (reply.get("reason", "decodes") + " with a warning: "
                               + output.splitlines()[0][:200])
        _reply(proto_out, reply)


def _captured(fd: int) -> str:
    """What libraries printed during the last decode, and the capture file emptied for the next.

    stdout and stderr share the capture file's offset, so an offset of 0 means nothing was printed
    and the usual decode costs one ``lseek`` here rather than a read, a seek and a truncate.
    """
    if os.lseek(fd, 0, os.SEEK_CUR) == 0:
        return ""
    os.lseek(fd, 0, os.SEEK_SET)
    output = os.read(fd, 4096).decode("utf-8", "replace").strip()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    return output


def _vm_size() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _read_exact(fd: int, size: int) -> bytes | None:
    chunks, missing = [], size
    while missing:
        chunk = os.read(fd, min(missing, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def _reply(fd: int, data: dict) -> None:
    body = json.dumps(data).encode()
    out = memoryview(REPLY.pack(len(body)) + body)
    while out:
        out = out[os.write(fd, out):]


if __name__ == "__main__":
    sys.exit(worker_main(int(sys.argv[1])))
