"""`efiqa` subcommands, one module each.

Every module defines NAME, HELP, `add_arguments(parser)` and `run(args) -> int`.
`run` is a thin shell: it parses nothing itself and calls one library function
that notebooks and Python users call directly. Heavy imports (jax, flax) stay
inside `run` so that `efiqa --help` is instant.
"""
