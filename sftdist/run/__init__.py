"""The run directory and what makes a run survive its process: every file it writes (``layout``), the typed trainer
state (``state``), checkpoints (``checkpoint``), what a resume must share with its checkpoint (``identity``), stop
signals (``signals``), one run per directory (``lock``), writes the file system refuses (``storage``) and the
Hugging Face export (``export``)."""
