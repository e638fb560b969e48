"""Multi-process training helpers (``torchrun`` / ``accelerate launch``): sharding, gathering, reducing.

Every process draws the same global batch of prompts (same seed, same data order) and samples the
completions of its own contiguous shard. Group ids are global, so that advantages computed on the
gathered batch do not depend on how the processes split it.
"""

from __future__ import annotations

from typing import Any, Sequence

from rlctl.errors import RlctlError
from rlctl.rollouts import Rollouts

# metrics that add up over processes (the rest are averaged)
SUMMED = ("tokens", "samples", "tokens_per_s")


def shard(items: Sequence[Any], index: int, count: int) -> tuple[list[Any], int]:
    """This process's contiguous share of ``items`` and the position where it starts."""
    if len(items) % count:
        raise RlctlError(f"[train] prompts_per_step = {len(items)} must be a multiple of the number of "
                         f"processes ({count}) so that every process gets whole groups")
    size = len(items) // count
    return list(items[index * size:(index + 1) * size]), index * size


def gather_rollouts(accelerator: Any, local: Rollouts, pad_token_id: int) -> tuple[Rollouts, slice]:
    """The batch of all processes (in process order) and the rows that belong to this process."""
    from accelerate.utils import gather_object

    parts = gather_object([local.to("cpu")])
    start = sum(len(p) for p in parts[: accelerator.process_index])
    whole = Rollouts.concat(parts, pad_token_id=pad_token_id).to(accelerator.device)
    return whole, slice(start, start + len(local))


def reduce_metrics(accelerator: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """Average numeric metrics over processes (sums for counts and throughput)."""
    if accelerator.num_processes == 1:
        return metrics
    from accelerate.utils import gather_object

    everyone = gather_object([metrics])
    out = dict(metrics)
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            values = [m.get(key, 0.0) for m in everyone]
            total = float(sum(values))
            out[key] = total if key in SUMMED or key.endswith("/failed") else total / len(values)
    return out
