"""ferkit: facial expression recognition on FER-2013 — train, evaluate, detect emotions in photos and video."""

__version__ = "0.1.0"
