"""Experiments that measure what efiqa_jax computes (not how fast): each a
script with a `main` and library-level functions that tests call at tiny
sizes. Speed harnesses live in bench/."""
