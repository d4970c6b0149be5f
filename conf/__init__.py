"""Hydra configs, installed as ``sftdist.conf`` so that ``pkg://sftdist.conf`` finds them from anywhere."""
