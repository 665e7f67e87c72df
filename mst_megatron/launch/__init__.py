"""Starting MST runs on clusters: the logic behind the files in ``cluster/``.

- :mod:`.plan`: suggest a TP/PP/CP/SP layout with MST counts and the per-GPU memory it expects
- :mod:`.torchrun`: build the multi-node ``torchrun`` command from flags or the scheduler's environment
"""


class LaunchError(ValueError):
    """Bad launch input (flags or scheduler environment); the CLIs print it as one line and exit 2."""
