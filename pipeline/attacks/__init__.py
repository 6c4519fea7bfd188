"""Empirical attacks. Each returns points inside the ε-ball and the data domain."""
from pipeline.attacks.base import Attack
from pipeline.attacks.fgsm import FGSM
from pipeline.attacks.pgd import PGD

__all__ = ["Attack", "FGSM", "PGD"]
