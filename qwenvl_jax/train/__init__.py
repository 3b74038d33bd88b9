"""Training: staged freezing, the sharded train step, Orbax checkpoints and the loop behind
`qwenvl-jax train` (see loop.py for the whole flow)."""
