"""Pictures: matplotlib without a display and the detection timeline (``plots``); windows drawn
with their captions as videos and contact sheets (``panels``, shared by ``pyact video``,
``inspect`` and ``detect``).

May import: ``errors`` and ``io``. Knows nothing of models, shards or training.
"""
