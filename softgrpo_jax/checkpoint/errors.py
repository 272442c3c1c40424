"""The checkpoint package's user error (its own module, so the readers can raise it without import cycles)."""

from softgrpo_jax.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not match the model (missing, extra or mis-shaped tensors), cannot be read, or a
    destination that cannot be written; the message names the file or folder and what to do."""


__all__ = ["CheckpointError"]
