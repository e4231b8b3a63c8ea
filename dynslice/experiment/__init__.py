"""Running experiments: one frozen :class:`~dynslice.experiment.config.RunConfig` per run, the protocols and
profiles that produce them, the step functions of a run (LR, widths, slice, evaluate, save), the sweep and the
ablations. Writes run records; never reads tables or figures, and never knows which shard it runs in."""
