from softgrpo_jax.checkpoint.hf import CheckpointError, load_hf, save_hf

__all__ = ["CheckpointError", "load_hf", "save_hf"]
