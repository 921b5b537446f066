"""edge-m2kd: on-device class-incremental learning with M2KD (BMVC 2020)."""

__version__ = "0.1.0"
