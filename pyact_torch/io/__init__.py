"""The outside world: files and gs:// buckets (``storage``), outputs published whole
(``outputs``), locks, memory and disk (``resources``), TFRecord framing (``records``), worker
processes (``processes``), signals and how processes stop and die (``lifecycle``), and the
local GCS emulator.

May import: ``pyact_torch.errors`` only. Everything else builds on this folder.
"""
