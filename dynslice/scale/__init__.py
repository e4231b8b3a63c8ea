"""Scaling out: the cost model, deterministic shards, launchers and Slurm. Hands runs out to
:mod:`dynslice.experiment`; nothing below imports it."""
