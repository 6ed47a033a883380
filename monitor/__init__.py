"""monitor: a real-time video monitoring daemon for field cameras."""

__version__ = "0.1.0"
