"""Finding actions in whole sequences, videos and live streams: frame sources (``stream``),
models to run (``runners``: a checkpoint, ONNX or torch.export), segments from per-window
scores (``segments``), detection F1 and mAP (``metrics``), ``pyact detect`` (``detect``) and
``pyact export`` (``export``).

May import: ``errors``, ``config``, ``model``, ``io``, ``draw``, ``data`` and ``training``
(checkpoints and the CUDA device). With an exported model, nothing here imports torch.
"""
