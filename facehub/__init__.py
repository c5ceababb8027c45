"""FaceHub: every face a camera sees lands, once, in object storage, through MQTT."""

__version__ = "0.1.0"
