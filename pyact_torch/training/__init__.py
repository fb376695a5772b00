"""Training: the device layer (``devices``: one ``Backend`` interface; ``xla``: xmp and SPMD on
TPU or XLA:CPU; ``distributed``: torch.distributed over gloo or NCCL; eager CPU and CUDA), the
training loop (``train``, ``pyact train``), checkpoints, the validation loop run every epoch
(``validation``), and the run's log, plots and TensorBoard events (``run_log``, ``events``).

May import: ``errors``, ``config``, ``model``, ``io``, ``draw`` and ``data``. Only ``xla``
imports torch_xla, and only ``distributed`` sets up torch.distributed's process group.
"""
