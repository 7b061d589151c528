"""kubetrain: the TrainingJob API, its CRD and the `kubetrain` CLI (no torch, no kopf here)."""

__version__ = "0.1.0"
