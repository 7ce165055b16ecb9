"""The policy contract: :class:`cgrpo.policy.Policy` is an abstract base class every policy implements."""

from __future__ import annotations

import contextlib
import inspect
import typing

import pytest
import torch

from cgrpo import policy as policies
from cgrpo.policy import Policy
from cgrpo.policy.flux import ReferenceFluxPolicy
from cgrpo.sde import flux_sigmas
from cgrpo.testing.policies import tiny_policy_for_tests
from cgrpo.train.sampling import schedule

ABSTRACT = sorted(Policy.__abstractmethods__)


def _stand_in(name: str):
    """A trivial implementation of the abstract member ``name`` (a property stays a property)."""
    member = inspect.getattr_static(Policy, name)
    if isinstance(member, property):
        return property(lambda self: None)
    if isinstance(member, classmethod):
        return classmethod(lambda cls, *args, **kwargs: None)
    return lambda self, *args, **kwargs: None


def _policy_class(missing: str | None = None) -> type[Policy]:
    members = {name: _stand_in(name) for name in ABSTRACT if name != missing}
    return type("HandWrittenPolicy", (Policy,), members)


def test_the_contract_names_what_every_policy_implements():
    assert inspect.isabstract(Policy)
    for name in ("encode_prompts", "encode_references", "velocity", "decode", "image_size", "has_lora"):
        assert name in ABSTRACT
    for default in ("condition", "sigmas", "guidance_tensor", "device", "initial_noise"):
        assert default not in ABSTRACT  # right for every policy: concrete in the base
    with pytest.raises(TypeError, match="abstract"):
        Policy()
    assert isinstance(_policy_class()(), Policy)  # implementing every abstract member is enough


@pytest.mark.parametrize("missing", ABSTRACT)
def test_a_policy_missing_a_member_cannot_be_built(missing):
    with pytest.raises(TypeError, match=rf"\b{missing}\b"):
        _policy_class(missing)()


def _all_subclasses(cls: type) -> set[type]:
    return {sub for direct in cls.__subclasses__() for sub in (direct, *_all_subclasses(direct))}


def test_every_registered_policy_is_a_concrete_policy():
    names = policies.names()  # imports the built-in policies
    assert {"mini", "uno", "flux-kontext", "flux2-klein"} <= set(names)
    for name in names:
        built = typing.get_type_hints(policies.POLICIES.get(name))["return"]
        assert issubclass(built, Policy), name
        assert not inspect.isabstract(built), f"{name}: {sorted(built.__abstractmethods__)}"
    # Intermediate bases (FluxBackbonePolicy) included: no policy class of the library is left abstract.
    for cls in _all_subclasses(Policy):
        if cls.__module__.startswith("cgrpo."):
            assert not inspect.isabstract(cls), f"{cls.__qualname__}: {sorted(cls.__abstractmethods__)}"


def test_the_base_defaults_on_the_mini_policy():
    policy = tiny_policy_for_tests()
    n = policy.latent_shape[0]
    # No own schedule: FLUX's dynamic shift at the token count, 28 steps by default; a static shift if asked.
    assert torch.equal(policy.sigmas(5), flux_sigmas(5, image_seq_len=n))
    assert torch.equal(schedule(policy, None), flux_sigmas(28, image_seq_len=n))
    assert torch.equal(schedule(policy, 5, shift=3.0), flux_sigmas(5, image_seq_len=n, shift=3.0))
    assert policy.device == torch.device("cpu") and policy.dtype == torch.float32
    assert policy.image_size == (16, 16) and policy.guidance_tensor(2) is None
    assert policy.pipeline_class.__name__ == "FluxPipeline"  # what `cgrpo export` writes for it


def test_guidance_override_is_temporary():
    policy = tiny_policy_for_tests()
    assert isinstance(policy, ReferenceFluxPolicy) and policy.guidance is None
    with policy.override_guidance(2.5):
        assert policy.guidance == 2.5
    assert policy.guidance is None
    with contextlib.suppress(RuntimeError), policy.override_guidance(7.0):
        raise RuntimeError("sampling failed")
    assert policy.guidance is None  # restored after an error too
