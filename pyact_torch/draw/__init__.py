"""Pictures: matplotlib figures (loss curves, confusion matrices, detection timelines).

May import: ``errors`` and ``io``. Knows nothing of models, shards or training.
"""
