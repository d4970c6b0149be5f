"""The commands, one module each: ``check`` (``sftdist-train --check``), ``prepare``, ``inspect``, ``export``,
``report``, and ``phases`` (one job per curriculum phase, behind slurm/curriculum.sh); ``common`` is what they share."""
