"""The outside world: files and gs:// buckets (``storage``), outputs published whole
(``outputs``), locks, memory and disk (``resources``), worker processes (``processes``),
signals (``interrupts``) and the local GCS emulator.

May import: ``pyact_torch.errors`` only. Everything else builds on this folder.
"""
