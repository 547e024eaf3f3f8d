"""The bundled ml_collections configs (installed as `efiqa_jax.configs`).

Each module defines `get_config(variant=None)`, `VARIANTS` and usually
`check(config)`; load them with `efiqa_jax.config_util.load_config("NAME[:VARIANT]")`
or `--config NAME[:VARIANT]` on any command.
"""
