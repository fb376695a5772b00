"""From the raw dataset to batches: label files and the class list (``labels``), windows
(``windows``), frame decoding (``frames``), the shard format (``shards``), preprocessing
(``pyact preprocess``), the synthetic dataset (``pyact synth``), checking shards
(``pyact inspect``), and reading shards back as batches with augmentation (``loader``,
``augment``).

May import: ``errors``, ``config``, ``io`` and ``draw``. Nothing here imports torch_xla or
sets up torch.distributed; the loader's workers run in the training process's loader.
"""
