"""softgrpo_jax: SofT-GRPO (Gumbel-reparameterised soft-thinking policy optimisation) in JAX / Flax NNX."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import softgrpo_jax` stays cheap
    if name in ("load_pretrained", "save_pretrained", "load_tokenizer"):
        from softgrpo_jax.checkpoint import api

        return getattr(api, name)
    raise AttributeError(name)
