"""Sweeps: many runs of one base config, resumable, on a process pool, a Ray cluster or SLURM.

- :mod:`~metarep.sweeps.spec`: the sweep file, its runs and their names;
- :mod:`~metarep.sweeps.driver`: running and resuming (:func:`run_sweep`, :class:`SweepOptions`);
- :mod:`~metarep.sweeps.executors`: where the runs execute (local processes, Ray);
- :mod:`~metarep.sweeps.slurm`: SLURM job arrays through submitit;
- :mod:`~metarep.sweeps.manifest`: ``sweep.json``;
- :mod:`~metarep.sweeps.collect`: one table and a figure from a sweep directory (:func:`collect`).
"""
