"""aseanfl: federated medical imaging for hospitals across ASEAN."""

__version__ = "0.1.0"
