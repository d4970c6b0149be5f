"""The difficulty curriculum: the phase sampler (``sampler``), the difficulty bucket of every sample
(``difficulty``), and the base model's loss of each sample for ``curriculum.difficulty=model_loss`` (``model_loss``)."""
