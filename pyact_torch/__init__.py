"""pyact-torch: hand-action recognition from ego-centric depth-camera sequences (PyTorch/XLA port of pyACT)."""

__version__ = "0.1.0"
