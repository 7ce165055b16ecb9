"""Multi-process GRPO with accelerate: one process per device (``accelerate launch`` or ``torchrun``).

How one iteration is split over W processes (ranks), so that W processes compute what one process would:

- every rank draws the same B (reference, prompt) pairs and the same trained steps (same seeds);
- the N = B * G samples of the iteration are cut into W contiguous slices of N / W rows; rank r rolls out
  and scores rows ``local_rows(N)`` only. The noise is drawn for all N rows and sliced
  (:func:`cgrpo.train.sampling.rollout`'s ``shard``), so 1 and W processes see the same samples;
- rewards are all-gathered before group normalisation: a group may span ranks and its statistics still
  cover all G samples;
- each rank back-propagates the mean loss over its rows; DDP (LoRA) or FSDP (full fine-tuning) average
  the gradients over ranks, which is the mean over all rows. Micro-batches inside one optimiser step run
  without gradient synchronisation (``sync_gradients(False)``);
- logging, sample images and checkpoint files are written by rank 0; every rank takes part in gathering
  the state and waits at a barrier after the write.

With one process (no ``WORLD_SIZE`` > 1 and ``distributed.enabled: false``) :class:`Distributed` is a
pass-through and the trainer runs exactly as a plain single-process loop.

FSDP is applied with torch's ``fully_shard`` (FSDP2) on every transformer block and then the transformer
itself. accelerate's own FSDP path is GPU-only (on CPU ``Accelerator`` falls back to DDP, measured with
accelerate 1.15), and using ``fully_shard`` directly keeps one code path that the CPU tests exercise.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

STRATEGIES = ("none", "ddp", "fsdp")


def launched_world_size() -> int:
    """Number of processes of the launcher (``torchrun`` / ``accelerate launch`` set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


class _VelocityModule(nn.Module):
    """The policy's velocity as a module ``forward``: DDP prepares its gradient hooks in ``forward``."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        return self.policy.velocity(latents, sigma, cond)


class Distributed:
    """The collective operations the trainer needs; with one process each is a no-op or the identity."""

    def __init__(self, accelerator: Any | None = None, strategy: str = "none") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        self.accelerator = accelerator
        self.strategy = strategy if accelerator is not None else "none"
        self._ddp: nn.Module | None = None
        self._sharded: nn.Module | None = None

    # --------------------------------------------------------------------------------------------- setup
    @classmethod
    def setup(cls, config: Any, full_finetune: bool, device: str = "cpu") -> Distributed:
        """From a :class:`~cgrpo.train.config.DistributedConfig`: accelerate when launched with several
        processes or when ``enabled``; DDP for LoRA, FSDP for full fine-tuning unless ``strategy`` says."""
        if not (config.enabled or launched_world_size() > 1):
            return cls()
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        handlers = [
            InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=config.timeout_s)),
            DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters),
        ]
        accelerator = Accelerator(cpu=str(device).startswith("cpu"), kwargs_handlers=handlers)
        if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"):
            raise ValueError(
                f"accelerate is configured for {accelerator.distributed_type.value}; launch with plain "
                "multi-process settings and choose sharding with distributed.strategy=fsdp instead"
            )
        strategy = config.strategy if config.strategy != "auto" else ("fsdp" if full_finetune else "ddp")
        return cls(accelerator, strategy)

    @property
    def enabled(self) -> bool:
        return self.accelerator is not None

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.enabled else 0

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes if self.enabled else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, configured: str) -> torch.device:
        """The device of this process: accelerate's (``cuda:LOCAL_RANK``) when distributed."""
        if self.enabled and not str(configured).startswith("cpu"):
            return self.accelerator.device
        return torch.device(configured)

    # ------------------------------------------------------------------------------------------ the data
    def local_rows(self, total: int) -> slice:
        """This rank's contiguous rows of a batch of ``total`` samples (divisible by the world size)."""
        if total % self.world_size:
            raise ValueError(f"{total} samples cannot be split evenly over {self.world_size} processes")
        size = total // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``[n, ...]`` tensor along dim 0, in rank order (all ranks get it)."""
        if not self.enabled:
            return tensor
        device = tensor.device
        return self.accelerator.gather(tensor.contiguous().to(self.accelerator.device)).to(device)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar diagnostics over ranks (each rank's are means over equally many rows)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        reduced = self.accelerator.reduce(stacked.to(self.accelerator.device), reduction="mean").cpu()
        return {k: float(v) for k, v in zip(keys, reduced, strict=True)}

    def all_true(self, flag: bool) -> bool:
        """True on every rank iff ``flag`` is true on every rank (agreeing on failures avoids hangs)."""
        if not self.enabled:
            return flag
        count = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return int(self.accelerator.reduce(count, reduction="sum").item()) == self.world_size

    def barrier(self) -> None:
        if self.enabled:
            self.accelerator.wait_for_everyone()

    # ----------------------------------------------------------------------------------------- the model
    def wrap(self, policy: nn.Module) -> Callable[..., torch.Tensor]:
        """Prepare ``policy`` for synchronised training; returns the velocity function to train through.

        DDP wraps a module whose forward is ``policy.velocity``; frozen weights and buffers are excluded
        from DDP's broadcast and gradient buckets, so only the trainable (LoRA) parameters are synchronised.
        FSDP shards ``policy.transformer`` in place; the policy keeps working as before.
        Call it before creating the optimiser (FSDP replaces the parameters by sharded ones).
        """
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            module = _VelocityModule(policy)
            ignore = [n for n, p in module.named_parameters() if not p.requires_grad]
            ignore += [n for n, _ in module.named_buffers()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignore)
            self._ddp = self.accelerator.prepare_model(module)
            return self._ddp
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            transformer = policy.transformer
            for block in _blocks(transformer):
                fully_shard(block)
            fully_shard(transformer)
            self._sharded = transformer
        return policy.velocity

    @contextlib.contextmanager
    def sync_gradients(self, enabled: bool) -> Iterator[None]:
        """Around forward + backward: synchronise gradients only on the micro-batch that ends a step."""
        if self._ddp is not None and not enabled:
            with self._ddp.no_sync():
                yield
        elif self._sharded is not None:
            self._sharded.set_requires_gradient_sync(enabled)
            try:
                yield
            finally:
                self._sharded.set_requires_gradient_sync(True)
        else:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        if self.enabled:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def clip_grad_norm_(self, parameters: list[nn.Parameter], max_norm: float) -> float:
        """Clip the (already synchronised) gradients; returns the total norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP: a sharded norm
            norm = norm.full_tensor()
        return float(norm)

    # ------------------------------------------------------------------------------------------- state
    def trainable_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Full trainable weights on CPU (collective under FSDP: call on every rank; rank 0 gets them)."""
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        if self._sharded is None:
            params = dict(module.named_parameters())
            return {n: params[n].detach().cpu().contiguous() for n in names}
        full = self._full_model_state_dict(module)
        return {n: full[n] for n in names if n in full}

    def _full_model_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_trainable(self, module: nn.Module, weights: dict[str, torch.Tensor], source: Any = "") -> None:
        from cgrpo.train.checkpoint import load_weights

        if self._sharded is None:
            load_weights(module, weights, source)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        missing = sorted(set(weights) - {n for n, _ in module.named_parameters()})
        if missing:
            raise ValueError(f"checkpoint {source} has weights the model lacks: {missing[:5]}")
        set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, strict=False))

    def optimizer_state_dict(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimiser state (collective under FSDP, keyed by parameter name there)."""
        if self._sharded is None:
            return {"format": "torch", "state": optimizer.state_dict()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {"format": "fsdp", "state": get_optimizer_state_dict(module, optimizer, options=options)}

    def load_optimizer_state_dict(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]
    ) -> None:
        if "format" not in saved:  # checkpoints written before the format tag: a plain torch state dict
            saved = {"format": "torch", "state": saved}
        expected = "fsdp" if self._sharded is not None else "torch"
        if saved["format"] != expected:
            raise ValueError(
                f"the checkpoint's optimiser state was written with {saved['format']!r} training and this "
                f"run uses {expected!r}; resume with the same distributed.strategy"
            )
        if self._sharded is None:
            optimizer.load_state_dict(saved["state"])
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            module, optimizer, optim_state_dict=saved["state"], options=StateDictOptions(full_state_dict=True)
        )

    @contextlib.contextmanager
    def full_weights(self, module: nn.Module) -> Iterator[None]:
        """Inside, ``module.state_dict()`` gives full tensors (FSDP: gathered, on rank 0) so that
        ``save_pretrained`` writes an ordinary checkpoint. Collective under FSDP: enter on every rank."""
        if self._sharded is None:
            yield
            return
        full = self._full_model_state_dict(module)
        module.state_dict = lambda *args, **kwargs: dict(full)  # instance attribute shadows the method
        try:
            yield
        finally:
            del module.state_dict

    def close(self) -> None:
        if self.enabled:
            # Let gloo's worker threads drop the finished collectives before anything tears the group down:
            # a worker frees a finished work's tensors under the group's lock and needs the GIL for it, while
            # the group's destructor (run when the DDP wrapper is freed) joins the workers holding the GIL.
            # Freed in that order, a worker waiting for the GIL deadlocks the exit (seen on loaded 2-core
            # machines: rank 1 hung in ~ProcessGroupGloo). Sleeping releases the GIL to them. No barrier
            # here: close() also runs after a failure on one rank.
            time.sleep(0.2)
            self.accelerator.end_training()


def _blocks(transformer: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: elements of every ``*blocks`` ModuleList (FLUX's
    ``transformer_blocks`` and ``single_transformer_blocks``)."""
    found = []
    for name, child in transformer.named_children():
        if isinstance(child, nn.ModuleList) and name.endswith("blocks"):
            found.extend(child)
    return found
