"""Prompt-embedding caching: an in-memory LRU keyed by prompt, and precomputed embeddings on disk.

On FLUX the T5-XXL encoder is ~4.7B parameters; in GRPO every prompt is encoded once per iteration and again
for evaluation, and a dataset's prompts repeat across epochs. Caching the (sequence, pooled) embeddings on
the CPU avoids both the compute and, with ``offload``, the transfer of the encoders to the GPU. Precomputing
them once for a whole dataset (:func:`precompute_prompt_embeddings`) lets a run keep the encoders off the GPU
altogether.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

Embedding = tuple[torch.Tensor, torch.Tensor]  # (sequence [L, D], pooled [P])
Encoder = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]


class PromptCache:
    """LRU cache ``prompt -> (sequence [L, D], pooled [P])`` kept on the CPU.

    ``capacity`` 0 disables caching (every call encodes). Entries are stored detached in the encoder's dtype,
    so a cached embedding is bit-identical to a fresh one.
    """

    def __init__(self, capacity: int = 256) -> None:
        if capacity < 0:
            raise ValueError(f"prompt cache capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[str, Embedding] = OrderedDict()
        self._pinned: set[str] = set()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._entries

    def clear(self) -> None:
        self._entries.clear()
        self._pinned.clear()

    def put(self, prompt: str, sequence: torch.Tensor, pooled: torch.Tensor, pinned: bool = False) -> None:
        """Store one prompt's embeddings; ``pinned`` entries (precomputed files) are never evicted."""
        if self.capacity == 0 and not pinned:
            return
        self._entries[prompt] = (sequence.detach().cpu(), pooled.detach().cpu())
        self._entries.move_to_end(prompt)
        if pinned:
            self._pinned.add(prompt)
        self._evict()

    def _evict(self) -> None:
        evictable = [p for p in self._entries if p not in self._pinned]
        while len(evictable) > self.capacity:
            del self._entries[evictable.pop(0)]

    def encode(
        self, prompts: Sequence[str], encoder: Encoder, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sequence [B, L, D], pooled [B, P])`` for ``prompts``; misses are encoded in one batch by
        ``encoder`` (which returns batched tensors) and stored."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._entries))
        self.hits += len(prompts) - sum(1 for p in prompts if p in missing)
        self.misses += len(missing)
        fresh: dict[str, Embedding] = {}
        if missing:
            sequence, pooled = encoder(missing)
            for i, prompt in enumerate(missing):
                fresh[prompt] = (sequence[i].detach().cpu(), pooled[i].detach().cpu())
                self.put(prompt, *fresh[prompt])
        for prompt in prompts:
            if prompt in self._entries:
                self._entries.move_to_end(prompt)
        entries = [fresh.get(p) or self._entries[p] for p in prompts]
        sequence = torch.stack([e[0] for e in entries]).to(device)
        pooled = torch.stack([e[1] for e in entries]).to(device)
        return sequence, pooled


def _key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]


def precompute_prompt_embeddings(
    policy, prompts: Iterable[str], path: str | Path, batch_size: int = 8
) -> Path:
    """Encode every distinct prompt with ``policy.encode_prompts`` and write ``path`` (safetensors).

    The file maps ``sha256(prompt)[:32] + ".seq" / ".pooled"`` to the embeddings; its metadata holds the
    prompt list. Written atomically (temp file + rename).
    """
    import os
    import tempfile

    from safetensors.torch import save_file

    unique = list(dict.fromkeys(prompts))
    tensors: dict[str, torch.Tensor] = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        sequence, pooled, _ = policy.encode_prompts(chunk)
        for i, prompt in enumerate(chunk):
            tensors[f"{_key(prompt)}.seq"] = sequence[i].detach().cpu().contiguous()
            tensors[f"{_key(prompt)}.pooled"] = pooled[i].detach().cpu().contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"prompts": json.dumps(unique)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_prompt_embeddings(cache: PromptCache, path: str | Path) -> int:
    """Fill ``cache`` with a file of :func:`precompute_prompt_embeddings` (pinned: never evicted).
    Returns the number of prompts loaded."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: expected a file written by precompute_prompt_embeddings"
        )
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if "prompts" not in metadata:
            raise ValueError(f"{path} has no 'prompts' metadata: not written by precompute_prompt_embeddings")
        prompts = json.loads(metadata["prompts"])
        for prompt in prompts:
            key = _key(prompt)
            cache.put(
                prompt, handle.get_tensor(f"{key}.seq"), handle.get_tensor(f"{key}.pooled"), pinned=True
            )
    return len(prompts)


class OffloadedTextMixin:
    """For policies with a ``text_encoder`` submodule: prompt caching and CPU offload of the text encoder.

    With ``offload`` the text encoder stays on the CPU when the policy is moved (``policy.to("cuda")`` leaves
    it alone) and visits the transformer's device only while it encodes a batch of cache misses. The class
    using this mixin sets ``self.offload`` and ``self.prompt_cache`` and calls :meth:`_encode_text`.
    """

    offload: bool = False
    prompt_cache: PromptCache

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        modules = self._modules  # type: ignore[attr-defined]
        if not self.offload or "text_encoder" not in modules:
            return super()._apply(fn, recurse)  # type: ignore[misc]
        # Park the text encoder outside the module tree so that .to()/.cuda() skip it; keep the order.
        order = list(modules)
        parked = modules.pop("text_encoder")
        try:
            return super()._apply(fn, recurse)  # type: ignore[misc]
        finally:
            rest = dict(modules)
            modules.clear()
            for name in order:
                modules[name] = parked if name == "text_encoder" else rest[name]

    def _encode_text(self, prompts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sequence [B, L, D], pooled [B, P])`` on ``device``, through the cache."""
        text_encoder = self.text_encoder  # type: ignore[attr-defined]

        def encode(batch: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.offload:
                return text_encoder(batch)
            home = next(text_encoder.parameters()).device
            text_encoder.to(device)
            try:
                return text_encoder(batch)
            finally:
                text_encoder.to(home)
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()

        with torch.no_grad():
            return self.prompt_cache.encode(prompts, encode, device)
