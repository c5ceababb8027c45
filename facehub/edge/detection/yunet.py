"""YuNet backend: OpenCV's small CNN face detector (``cv2.FaceDetectorYN``).

Far better than Haar on turned, tilted, small or badly lit faces, at a
lower cost per frame; it needs the ONNX model file (``detector.model_path``,
the OpenCV model zoo's ``face_detection_yunet_2023mar.onnx``, which the image
and the edge role put where ``backend = "auto"`` looks for it). Its score is
sent with each face. ``score_threshold`` 0.8 keeps every face in the labelled
test photos (their lowest score is about 0.86) and drops the dog faces in
``dogs.jpg`` (up to about 0.77); the model zoo's own demo uses 0.9.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from facehub.config import DetectorConfig
from facehub.edge.detection.base import Backend, resize

TOP_K = 5000


class YuNetBackend(Backend):
    name = "yunet"
    follow_face = 48  # YuNet's boxes from a 32-pixel face are loose; 48 re-finds every face, boxes as tight

    def __init__(self, cfg: DetectorConfig):
        super().__init__(cfg.detect_width, cfg.upscale)
        path = cfg.yunet_model
        if not Path(path).is_file():
            raise ValueError(f"YuNet model not found: {path!r} (set detector.model_path)")
        try:
            self.net = cv2.FaceDetectorYN.create(path, "", (320, 320), cfg.score_threshold,
                                                 cfg.nms_threshold, TOP_K)
        except cv2.error as error:
            raise ValueError(f"cannot load YuNet model {path}: {error}") from None
        self.input_size = (320, 320)

    def prepare(self, frame: np.ndarray, factor: float) -> np.ndarray:
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        elif frame.shape[2] == 4:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
        return resize(frame, factor)

    def find(self, image: np.ndarray, min_size: int = 0, max_size: int = 0) -> list[tuple]:
        """YuNet boxes ``(x, y, w, h, score)``; the size bounds filter its output."""
        size = (image.shape[1], image.shape[0])
        if size != self.input_size:
            self.net.setInputSize(size)
            self.input_size = size
        _, faces = self.net.detect(image)
        if faces is None:
            return []
        found = []
        for row in faces:
            x, y, w, h = (float(v) for v in row[:4])
            if (min_size and max(w, h) < min_size) or (max_size and max(w, h) > max_size):
                continue
            found.append((x, y, w, h, float(row[14])))
        return found
