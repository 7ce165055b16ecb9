"""Policies: reference-conditioned flow transformers behind one interface (see :mod:`cgrpo.policy.base`)."""

from cgrpo.policy.base import POLICIES, Conditioning, Policy, build, check, describe, names, register

__all__ = ["POLICIES", "Conditioning", "Policy", "build", "check", "describe", "names", "register"]
