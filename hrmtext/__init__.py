"""hrmtext: HRM-Text language models in JAX/Flax."""
