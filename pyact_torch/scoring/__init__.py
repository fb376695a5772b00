"""Scoring a checkpoint on a split of windows (``evaluate``: ``pyact evaluate``), its metrics
and confusion matrix (``metrics``), and the prediction video and contact sheet (``video``:
``pyact video``).

May import: everything below it: ``errors``, ``config``, ``model``, ``io``, ``draw``, ``data``
and ``training`` (the device layer, checkpoints and the validation loop).
"""
