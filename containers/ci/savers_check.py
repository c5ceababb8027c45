#!/usr/bin/env python3
"""The cloud savers' check in test-containers.sh: faces in through the broker, objects out in S3.

Runs with the project's venv (paho, OpenCV, boto3, moto's server).

    savers_check.py bucket ENDPOINT BUCKET                 # make the bucket in moto's S3
    savers_check.py publish PORT CA USER PASSWORD_FILE DEVICE COUNT
    savers_check.py count ENDPOINT BUCKET PREFIX          # prints how many .jpg objects are there

``publish`` sends COUNT real faces (a JPEG the savers' decoder accepts, each with its own face id)
over TLS at QoS 1 and returns once each one was accepted. A face published before any saver
has subscribed is answered "no matching subscribers" and dropped by the broker: the first
face is repeated until a saver takes it (60 s at most), so COUNT faces reach the savers.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

NO_MATCHING_SUBSCRIBERS = 16


def a_jpeg() -> bytes:
    import cv2
    import numpy

    image = numpy.zeros((96, 96, 3), numpy.uint8)
    cv2.circle(image, (48, 48), 30, (180, 200, 230), -1)
    ok, encoded = cv2.imencode(".jpg", image)
    assert ok
    return encoded.tobytes()


def publish(port: int, ca: str, user: str, password_file: str, device: str, count: int) -> None:
    from facehub import messages, mqtt
    from facehub.config import BrokerConfig

    broker = BrokerConfig(host="127.0.0.1", port=port, tls=True, ca_file=ca, username=user,
                          password=Path(password_file).read_text().strip())
    client = mqtt.make_client(broker, f"ci-publisher-{device}")
    answers: dict[int, int] = {}
    answered = threading.Condition()

    def on_publish(client, userdata, mid, reason_code, properties):
        with answered:
            answers[mid] = reason_code.value
            answered.notify_all()

    connected = threading.Event()
    client.on_publish = on_publish
    client.on_connect = lambda client, userdata, flags, reason_code, properties: \
        reason_code.is_failure or connected.set()
    mqtt.start(client, broker, persistent=False)
    if not connected.wait(30):
        sys.exit(f"could not connect to 127.0.0.1:{port} as {user} within 30 s")
    payload = a_jpeg()

    def send() -> int:
        face = messages.Face(payload, device)
        info = client.publish(f"faces/{device}", payload, 1, properties=face.properties())
        with answered:
            if not answered.wait_for(lambda: info.mid in answers, timeout=30):
                sys.exit(f"no PUBACK for a face within 30 s (mid {info.mid})")
            return answers[info.mid]

    deadline = time.monotonic() + 60
    while (code := send()) == NO_MATCHING_SUBSCRIBERS:
        if time.monotonic() > deadline:
            sys.exit("no saver subscribed within 60 s")
        time.sleep(0.5)
    if code != 0:
        sys.exit(f"the broker refused a face: reason code {code}")
    for _ in range(count - 1):
        if (code := send()) != 0:
            sys.exit(f"the broker refused a face: reason code {code}")
    mqtt.stop(client)
    print(f"published {count} faces as {device}, every one accepted")


def count(endpoint: str, bucket: str, prefix: str) -> None:
    from facehub.dev.servers import list_objects

    print(sum(key.endswith(".jpg") for key in list_objects(endpoint, bucket, prefix)))


def main(argv: list[str]) -> int:
    if argv[:1] == ["bucket"] and len(argv) == 3:
        from facehub.dev.servers import make_bucket

        make_bucket(argv[1], argv[2])
    elif argv[:1] == ["publish"] and len(argv) == 7:
        publish(int(argv[1]), argv[2], argv[3], argv[4], argv[5], int(argv[6]))
    elif argv[:1] == ["count"] and len(argv) == 4:
        count(argv[1], argv[2], argv[3])
    else:
        sys.exit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
