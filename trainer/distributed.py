"""Data parallelism over processes started by ``accelerate launch`` (or ``torchrun``).

Every process holds the whole model and the same global batch plan; process ``r`` trains slice ``r`` of each global
batch, with the noise, timesteps and caption dropout drawn for the global batch. Averaging the gradients of the
trainable parameters (a few million values) across processes then gives exactly the update of one process training
the whole global batch, so N GPUs reproduce a single-GPU run with an N times larger batch.

Only the main process prepares data, writes checkpoints, renders samples and builds the zip; the others wait.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rank_slice(self, global_batch: int) -> slice:
        if global_batch % self.world_size:
            raise ValueError(f"global batch {global_batch} does not split over {self.world_size} processes")
        size = global_batch // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast(self, value):
        """The main process's ``value`` on every process (any picklable object)."""
        if not self.enabled:
            return value
        payload = [value if self.is_main else None]
        torch.distributed.broadcast_object_list(payload, src=0)
        return payload[0]

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over processes in one collective call."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat.div_(self.world_size)
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(synced)

    def average(self, value: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return value
        value = value.clone()
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
        return value / self.world_size


def init_distributed(cpu: bool = False) -> Distributed:
    """Join the process group that the launcher set up the environment for (a no-op for a single process).

    ``cpu``: the run trains on CPUs (gloo); otherwise accelerate picks the GPU's collective library.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    if state.num_processes != world_size:
        raise ValueError(
            f"the launcher started {world_size} processes but accelerate set up {state.num_processes}; launch with "
            "`accelerate launch --multi_gpu --num_processes N -m trainer train CONFIG.json`"
        )
    info = Distributed(rank=state.process_index, world_size=state.num_processes, local_rank=state.local_process_index)
    logger.info("process %d of %d (local %d)", info.rank, info.world_size, info.local_rank)
    return info
