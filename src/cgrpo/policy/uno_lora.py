"""UNO's released DiT LoRA (``dit_lora.safetensors``) in diffusers / peft terms.

UNO (bytedance/UNO) trains its LoRA on the original Black Forest Labs FLUX layout, as attention-processor
modules of ``DoubleStreamBlockLoraProcessor`` / ``SingleStreamBlockLoraProcessor``. The file's keys are::

    double_blocks.{i}.processor.qkv_lora1.{down,up}.weight    image stream, fused q|k|v projection
    double_blocks.{i}.processor.proj_lora1.{down,up}.weight   image stream, attention output projection
    double_blocks.{i}.processor.qkv_lora2.{down,up}.weight    text stream, fused q|k|v projection
    double_blocks.{i}.processor.proj_lora2.{down,up}.weight   text stream, attention output projection
    single_blocks.{i}.processor.qkv_lora.{down,up}.weight     fused q|k|v part of ``linear1``
    single_blocks.{i}.processor.proj_lora.{down,up}.weight    ``linear2`` (attention | MLP -> hidden)

``down`` is ``[r, in]`` and ``up`` is ``[out, r]``; a layer adds ``up(down(x)) * lora_weight`` to the
frozen projection, with no ``alpha / r`` factor (UNO's ``network_alpha`` is None, ``lora_weight`` 1).

diffusers' :class:`~diffusers.FluxTransformer2DModel` keeps q, k and v as separate linears. A fused LoRA on
``qkv`` maps onto them *exactly*: the fused update is ``delta W_qkv = U @ D`` with ``U = [U_q; U_k; U_v]``
(the up matrix's rows split in thirds, the ``(K H D)`` order UNO's ``rearrange`` uses), so
``delta W_q = U_q @ D``, ``delta W_k = U_k @ D``, ``delta W_v = U_v @ D``: each of to_q/to_k/to_v gets a
rank-r LoRA whose A is the shared down matrix and whose B is its third of the up matrix. No approximation
is involved (the rank of each third is at most r). The target modules are:

==============================  ===========================================================
UNO key                         diffusers module (``FluxTransformer2DModel``)
==============================  ===========================================================
``double_blocks.i ... qkv_lora1``  ``transformer_blocks.i.attn.{to_q,to_k,to_v}``
``double_blocks.i ... proj_lora1`` ``transformer_blocks.i.attn.to_out.0``
``double_blocks.i ... qkv_lora2``  ``transformer_blocks.i.attn.{add_q_proj,add_k_proj,add_v_proj}``
``double_blocks.i ... proj_lora2`` ``transformer_blocks.i.attn.to_add_out``
``single_blocks.i ... qkv_lora``   ``single_transformer_blocks.i.attn.{to_q,to_k,to_v}``
``single_blocks.i ... proj_lora``  ``single_transformer_blocks.i.proj_out``
==============================  ===========================================================

(diffusers' ``proj_out`` of a single block is BFL's ``linear2``: it takes ``cat(attention, gelu(mlp))``, the
same input UNO's ``proj_lora`` sees.) The converted state dict uses peft's key names
(``<module>.lora_A.weight`` / ``<module>.lora_B.weight``); with a ``transformer.`` prefix it is the diffusers
LoRA format that ``FluxPipeline.load_lora_weights`` reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

_UNO_KEY = re.compile(
    r"^(?:module\.|diffusion_model\.|model\.)?(?P<kind>double|single)_blocks\.(?P<index>\d+)\.processor\."
    r"(?P<layer>qkv_lora1|qkv_lora2|proj_lora1|proj_lora2|qkv_lora|proj_lora)\.(?P<part>down|up)\.weight$"
)
_DOUBLE_TARGETS = {
    "qkv_lora1": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "qkv_lora2": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "proj_lora1": ("attn.to_out.0",),
    "proj_lora2": ("attn.to_add_out",),
}
_SINGLE_TARGETS = {
    "qkv_lora": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "proj_lora": ("proj_out",),
}


def is_uno_lora(state_dict: Mapping[str, Any]) -> bool:
    """Whether every key of ``state_dict`` is a UNO (BFL-layout processor) LoRA key."""
    return bool(state_dict) and all(_UNO_KEY.match(key) for key in state_dict)


def _group(state_dict: Mapping[str, torch.Tensor]) -> dict[tuple[str, int, str], dict[str, torch.Tensor]]:
    """``{(kind, block, layer): {"down": D, "up": U}}``; unknown keys and lone halves are errors."""
    groups: dict[tuple[str, int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        match = _UNO_KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        kind, layer = match["kind"], match["layer"]
        if (kind == "double") != (layer[-1] in "12"):
            unknown.append(key)
            continue
        groups.setdefault((kind, int(match["index"]), layer), {})[match["part"]] = value
    if unknown:
        raise ValueError(
            f"not a UNO LoRA: {len(unknown)} key(s) are not double_blocks.N.processor.(qkv|proj)_lora{{1,2}}"
            f" or single_blocks.N.processor.(qkv|proj)_lora .(down|up).weight, e.g. {unknown[0]!r}"
        )
    for (kind, index, layer), parts in groups.items():
        if set(parts) != {"down", "up"}:
            raise ValueError(f"UNO LoRA {kind}_blocks.{index}.processor.{layer} lacks its down or up matrix")
        down, up = parts["down"], parts["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"UNO LoRA {kind}_blocks.{index}.processor.{layer}: down {tuple(down.shape)} and up "
                f"{tuple(up.shape)} are not [r, in] and [out, r]"
            )
        if layer.startswith("qkv") and up.shape[0] % 3:
            raise ValueError(
                f"UNO LoRA {kind}_blocks.{index}.processor.{layer}: fused qkv output {up.shape[0]} "
                "is not 3 * dim"
            )
    return groups


def convert_uno_lora(state_dict: Mapping[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """UNO's LoRA state dict -> peft key names on ``FluxTransformer2DModel`` (see the module docstring).

    Returns ``{"transformer_blocks.0.attn.to_q.lora_A.weight": [r, in], "...lora_B.weight": [out, r], ...}``.
    A fused qkv LoRA becomes three LoRAs sharing the down matrix as ``lora_A``, each with a third of the
    up matrix as ``lora_B`` (exact). ``scale`` (UNO's ``lora_weight``) multiplies the up matrices only, so the
    update is scaled linearly. Use peft ``lora_alpha = r`` (scaling 1) with these weights.
    """
    out: dict[str, torch.Tensor] = {}
    for (kind, index, layer), parts in sorted(_group(state_dict).items()):
        prefix = f"transformer_blocks.{index}" if kind == "double" else f"single_transformer_blocks.{index}"
        targets = (_DOUBLE_TARGETS if kind == "double" else _SINGLE_TARGETS)[layer]
        down, up = parts["down"], parts["up"] * scale if scale != 1.0 else parts["up"]
        for target, up_part in zip(targets, up.chunk(len(targets), dim=0), strict=True):
            out[f"{prefix}.{target}.lora_A.weight"] = down.clone()
            out[f"{prefix}.{target}.lora_B.weight"] = up_part.contiguous().clone()
    return out


def to_diffusers_format(peft_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft key names -> diffusers' LoRA file format (``transformer.`` prefix) for ``load_lora_weights``."""
    return {f"transformer.{key}": value for key, value in peft_state_dict.items()}


def lora_modules(peft_state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (A [r, in], B [out, r])}`` of a peft-named LoRA state dict."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in peft_state_dict.items():
        name, _, part = key.rpartition(".lora_")
        modules.setdefault(name, {})[part.split(".")[0]] = value
    return {name: (parts["A"], parts["B"]) for name, parts in modules.items()}


def uno_lora_rank(state_dict: Mapping[str, torch.Tensor]) -> int:
    """The LoRA rank r (UNO releases rank 512); a file mixing ranks is an error."""
    ranks = {parts["down"].shape[0] for parts in _group(state_dict).values()}
    if len(ranks) != 1:
        raise ValueError(f"UNO LoRA with mixed ranks {sorted(ranks)}: expected one rank")
    return ranks.pop()


def load_uno_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a UNO LoRA (``.safetensors``, or a ``.pt``/``.bin`` torch file as UNO also accepts)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected UNO's dit_lora.safetensors")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not is_uno_lora(state):
        _group(state)  # raises with the offending key
    return state


def _check_targets(transformer: nn.Module, peft_state: Mapping[str, torch.Tensor]) -> dict[str, nn.Linear]:
    modules = dict(transformer.named_modules())
    found = {}
    for name, (a, b) in lora_modules(peft_state).items():
        module = modules.get(name)
        if module is not None and hasattr(module, "base_layer"):
            module = module.base_layer  # already wrapped by peft
        if not isinstance(module, nn.Linear):
            raise ValueError(f"UNO LoRA targets {name}, which is not a linear layer of this transformer")
        if (b.shape[0], a.shape[1]) != tuple(module.weight.shape):
            raise ValueError(
                f"UNO LoRA for {name} is {b.shape[0]}x{a.shape[1]} but the layer is "
                f"{tuple(module.weight.shape)}: the LoRA was made for another model size"
            )
        found[name] = module
    return found


@torch.no_grad()
def merge_uno_lora(transformer: nn.Module, state_dict: Mapping[str, torch.Tensor], scale: float = 1.0) -> int:
    """Add UNO's LoRA into the transformer's weights in place: ``W += scale * B @ A`` (computed in float32 on
    the weight's device, then cast to the weight's dtype). Returns the number of updated layers."""
    peft_state = convert_uno_lora(state_dict, scale=scale)
    targets = _check_targets(transformer, peft_state)
    for name, (a, b) in lora_modules(peft_state).items():
        weight = targets[name].weight
        delta = b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)
        weight.copy_((weight.float() + delta).to(weight.dtype))
    return len(targets)


def add_uno_lora_adapter(
    transformer: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    adapter_name: str = "uno",
    scale: float = 1.0,
) -> None:
    """Inject UNO's LoRA as a (frozen) peft adapter named ``adapter_name`` instead of merging it."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    peft_state = convert_uno_lora(state_dict, scale=scale)
    _check_targets(transformer, peft_state)
    rank = uno_lora_rank(state_dict)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(lora_modules(peft_state)))
    transformer.add_adapter(config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(transformer, peft_state, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"UNO LoRA keys that match no module: {result.unexpected_keys[:5]}")
    for name, param in transformer.named_parameters():
        if f".{adapter_name}." in name:
            param.requires_grad_(False)


def save_uno_lora_as_diffusers(src: str | Path, directory: str | Path, scale: float = 1.0) -> Path:
    """Convert a UNO LoRA file into ``directory/pytorch_lora_weights.safetensors`` (diffusers format) that
    ``FluxPipeline.load_lora_weights(directory)`` loads (alpha = rank, i.e. scaling 1, as UNO)."""
    from diffusers import FluxPipeline

    state = load_uno_lora_file(src)
    rank = uno_lora_rank(state)
    peft_state = convert_uno_lora(state, scale=scale)
    metadata = {"r": rank, "lora_alpha": rank, "target_modules": sorted(lora_modules(peft_state))}
    FluxPipeline.save_lora_weights(
        directory,
        transformer_lora_layers={k: v.contiguous() for k, v in peft_state.items()},
        transformer_lora_adapter_metadata=metadata,
    )
    return Path(directory) / "pytorch_lora_weights.safetensors"


def random_uno_lora(
    transformer_config: Mapping[str, Any], rank: int = 4, std: float = 0.05, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random LoRA in UNO's file layout for a ``FluxTransformer2DModel`` config (tests, the tiny world).

    Both matrices are random (UNO initialises ``up`` to zero; a zero update would test nothing)."""
    generator = torch.Generator().manual_seed(seed)
    dim = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    mlp = int(dim * transformer_config.get("mlp_ratio", 4.0))

    def pair(in_features: int, out_features: int) -> dict[str, torch.Tensor]:
        return {
            "down": torch.randn(rank, in_features, generator=generator) * std,
            "up": torch.randn(out_features, rank, generator=generator) * std,
        }

    state: dict[str, torch.Tensor] = {}
    for i in range(transformer_config["num_layers"]):
        for layer, shape in (
            ("qkv_lora1", (dim, 3 * dim)),
            ("proj_lora1", (dim, dim)),
            ("qkv_lora2", (dim, 3 * dim)),
            ("proj_lora2", (dim, dim)),
        ):
            for part, value in pair(*shape).items():
                state[f"double_blocks.{i}.processor.{layer}.{part}.weight"] = value
    for i in range(transformer_config["num_single_layers"]):
        for layer, shape in (("qkv_lora", (dim, 3 * dim)), ("proj_lora", (dim + mlp, dim))):
            for part, value in pair(*shape).items():
                state[f"single_blocks.{i}.processor.{layer}.{part}.weight"] = value
    return state
