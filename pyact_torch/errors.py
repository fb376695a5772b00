"""The exception type for mistakes a user can fix (bad input, bad flags, bad paths), and who
prints it when torchrun runs several processes. Imports nothing heavy: every command uses it."""

import os

# what torchrun (torch.distributed.run) sets in every process it starts
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""


class ReplicaError(UserError):
    """A failure of one replica alone (its shards, a lost peer): every rank prints its own.
    Other UserErrors under torchrun come from settings and files every rank reads alike."""


class ExplainedElsewhere(UserError):
    """This replica stops because another one failed and said why: exit 2, print nothing."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here, without importing it (a bare GPU box's Python
    has neither torch_xla nor google-cloud-storage)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing (no ``google`` at all)
        return False


def under_torchrun() -> bool:
    """True in a process started by torchrun (or another launcher that sets its variables)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def launch_rank() -> int:
    """This process's rank in a torchrun launch (0 outside one), before any process group."""
    try:
        return int(os.environ["RANK"]) if under_torchrun() else 0
    except ValueError:
        return 0


def local_rank() -> int:
    """This process's rank on its machine in a torchrun launch (0 outside one)."""
    try:
        return int(os.environ["LOCAL_RANK"]) if under_torchrun() else 0
    except ValueError:
        return 0


def printed_here(exc: BaseException) -> bool:
    """Under torchrun an error every rank meets alike (settings, files) is printed by the first
    process of each machine (each machine reads its own files); one replica's own failure by
    that replica; a replica stopped by another's failure prints nothing."""
    if isinstance(exc, ExplainedElsewhere):
        return False
    return local_rank() == 0 or isinstance(exc, ReplicaError)
