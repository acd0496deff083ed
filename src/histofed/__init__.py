"""histofed: privacy-preserving federated learning for computational pathology."""

__version__ = "0.1.0"
