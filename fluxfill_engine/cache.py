"""Step cache: skip the transformer's remaining blocks on steps where the first block barely changes.

Every step runs the first double-stream block; when its residual changed by less than the threshold
(relative L1) since the last full step, the cached residual of the remaining blocks is reused. The
rule, its guards and costs are described once, in ``docs/architecture.md`` ("Step cache"). Under
context parallel the change is summed over every rank's tokens (:meth:`StepCache.use_shard`), so every
rank skips the same steps. Several requests run as one pass (:class:`BatchStepCache`) keep one cache
each: every request decides its own steps, as alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .config import StepCachePolicy

if TYPE_CHECKING:
    from .conditioning import LatentGrid
    from .parallel import SequenceShard
    from .stats import StepCacheStats

# ``remaining(rows)``: the remaining blocks on the batch rows ``rows`` (``None``: every row).
Remaining = Callable[[torch.Tensor | None], torch.Tensor]


def mask_token_weights(
    packed_mask: torch.Tensor, latent_height: int, latent_width: int, dilation: int = 1
) -> torch.Tensor:
    """``[B, L]`` weights: 1 for image tokens whose patch touches the mask (dilated by ``dilation``
    tokens), else 0. ``packed_mask`` is the conditioning's mask part ``[B, L, 4*s*s]``. A batch row
    whose mask is empty gets uniform weights (nothing to focus on)."""
    grid_height, grid_width = latent_height // 2, latent_width // 2
    inside = (packed_mask.float().amax(dim=-1) > 0.5).float()
    grid = inside.view(-1, 1, grid_height, grid_width)
    if dilation > 0:
        grid = F.max_pool2d(grid, 2 * dilation + 1, stride=1, padding=dilation)
    weights = grid.flatten(1)
    empty = weights.sum(dim=1, keepdim=True) == 0
    return torch.where(empty, torch.ones_like(weights), weights)


class StepCache:
    """The cache state of one request; see the module docstring for the rule."""

    def __init__(
        self, policy: StepCachePolicy, num_steps: int, token_weights: torch.Tensor | None = None
    ) -> None:
        self.policy = policy
        self.num_steps = num_steps
        self.token_weights = None if token_weights is None else token_weights[..., None].float()
        self.shard: SequenceShard | None = None  # context parallel: residuals hold this rank's tokens
        self.reference_residual: torch.Tensor | None = None
        self.remaining_residual: torch.Tensor | None = None
        self.consecutive_skips = 0
        self._rel_l1: list[torch.Tensor | None] = []
        self._cached: list[bool] = []

    @classmethod
    def for_request(
        cls,
        policy: StepCachePolicy,
        num_steps: int,
        cond: torch.Tensor,
        noise_channels: int,
        grid: LatentGrid,
    ) -> StepCache:
        """The cache of one request; mask-aware policies weight tokens by the conditioning's mask part
        (``cond[..., noise_channels:]``)."""
        weights = None
        if policy.mask_aware:
            mask_part = cond[..., noise_channels:]
            weights = mask_token_weights(mask_part, grid.latent_height, grid.latent_width)
        return cls(policy, num_steps, weights)

    def use_shard(self, shard: SequenceShard, device: torch.device) -> None:
        """Under context parallel: residuals hold this rank's image tokens (padding included); the
        means run over every rank's real tokens, so all ranks measure, and decide, the same."""
        if self.shard is shard:
            return
        if self.shard is not None:
            raise ValueError("a StepCache serves one request; make a new one per request")
        self.shard = shard
        if self.token_weights is not None:
            self.token_weights = shard.split_image(self.token_weights)  # padding gets weight 0
        elif shard.image_local * shard.size != shard.image_len:
            self.token_weights = shard.image_token_weights(device)[None, :, None]

    def relative_change(self, residual: torch.Tensor) -> torch.Tensor:
        """``mean|r - r_ref| / mean|r_ref|`` (token-weighted when mask-aware), a 0-d fp32 tensor; only
        once a step has computed the reference."""
        reference = self.reference_residual
        assert reference is not None, "no full step has run yet"
        change = (residual.float() - reference.float()).abs()
        base = reference.float().abs()
        if self.token_weights is not None:
            change, base = change * self.token_weights, base * self.token_weights
        if self.shard is None:
            return change.mean() / base.mean().clamp_min(1e-12)
        count = residual.shape[0] * self.shard.image_len * residual.shape[-1]
        sums = self.shard.sum_over_ranks(torch.stack([change.double().sum(), base.double().sum()])) / count
        return (sums[0] / sums[1].clamp_min(1e-12)).float()

    def can_skip(self, step: int, residual: torch.Tensor) -> bool:
        """Whether step ``step`` may reuse the cached remaining-blocks residual."""
        policy = self.policy
        rel_l1 = None if self.reference_residual is None else self.relative_change(residual)
        self._rel_l1.append(rel_l1)
        forced = (
            step < policy.warmup
            or step >= self.num_steps - policy.final
            or self.consecutive_skips >= policy.max_skips
        )
        if rel_l1 is None or forced:
            return False
        return bool(rel_l1 < policy.threshold)  # the one host sync of the step

    def apply(
        self,
        step: int,
        img: torch.Tensor,
        first_img: torch.Tensor,
        remaining: Remaining,
        shard: SequenceShard | None = None,
    ) -> torch.Tensor:
        """The image tokens after every block at step ``step``: the first block's output
        ``first_img`` (its input ``img``) plus the remaining blocks' residual, cached or computed."""
        first_residual = first_img - img
        if shard is not None:
            self.use_shard(shard, first_residual.device)
        if self.can_skip(step, first_residual):
            return first_img + self.skipped()
        out = remaining(None)
        self.computed(first_residual, out - first_img)
        return out

    def skipped(self) -> torch.Tensor:
        """Count a skipped step; returns the cached residual of the remaining blocks."""
        assert self.remaining_residual is not None, "can_skip is False until a step has computed it"
        self.consecutive_skips += 1
        self._cached.append(True)
        return self.remaining_residual

    def computed(self, first_residual: torch.Tensor, remaining_residual: torch.Tensor) -> None:
        self.reference_residual = first_residual
        self.remaining_residual = remaining_residual
        self.consecutive_skips = 0
        self._cached.append(False)

    def stats_per_request(self) -> list[StepCacheStats]:
        """:meth:`stats` as :class:`BatchStepCache` gives them: one record (one request)."""
        return [self.stats()]

    def stats(self) -> StepCacheStats:
        """``steps_full``, ``steps_cached`` and ``rel_l1`` per step (``None`` before a reference exists)."""
        return {
            "steps_full": self._cached.count(False),
            "steps_cached": self._cached.count(True),
            "rel_l1": [None if value is None else float(value) for value in self._rel_l1],
            "cached": list(self._cached),
            "threshold": self.policy.threshold,
            "mask_aware": self.policy.mask_aware,
        }


class BatchStepCache:
    """The step caches of several requests run as one pass, one :class:`StepCache` per request (its
    rows of the batch): each request decides its own steps from its own rows, as it would alone, and
    the remaining blocks run only on the rows of the requests that compute the step."""

    def __init__(self, caches: Sequence[StepCache], sizes: Sequence[int]) -> None:
        if len(caches) != len(sizes):
            raise ValueError("one StepCache per request")
        self.caches = list(caches)
        self.rows = _row_slices(sizes)

    @classmethod
    def for_requests(
        cls,
        policy: StepCachePolicy,
        num_steps: int,
        cond: torch.Tensor,
        noise_channels: int,
        grid: LatentGrid,
        sizes: Sequence[int],
    ) -> StepCache | BatchStepCache:
        """One request's :class:`StepCache`, or the requests' (``sizes``: each one's images, in batch
        order) when there are several."""
        if len(sizes) == 1:
            return StepCache.for_request(policy, num_steps, cond, noise_channels, grid)
        caches = [
            StepCache.for_request(policy, num_steps, cond[rows], noise_channels, grid)
            for rows in _row_slices(sizes)
        ]
        return cls(caches, sizes)

    def apply(
        self,
        step: int,
        img: torch.Tensor,
        first_img: torch.Tensor,
        remaining: Remaining,
        shard: SequenceShard | None = None,
    ) -> torch.Tensor:
        """:meth:`StepCache.apply` for each request's rows; one pass of the remaining blocks over the
        rows of the requests that compute (all of them: the whole batch, no gather)."""
        first_residual = first_img - img
        skips = []
        for cache, rows in zip(self.caches, self.rows, strict=True):
            if shard is not None:
                cache.use_shard(shard, first_residual.device)
            skips.append(cache.can_skip(step, first_residual[rows]))
        computing = [rows for rows, skip in zip(self.rows, skips, strict=True) if not skip]
        if len(computing) == len(self.rows):
            computed = remaining(None)
        elif computing:
            index = torch.cat([torch.arange(r.start, r.stop, device=first_img.device) for r in computing])
            computed = remaining(index)
        parts, offset = [], 0
        for cache, rows, skip in zip(self.caches, self.rows, skips, strict=True):
            if skip:
                parts.append(first_img[rows] + cache.skipped())
                continue
            size = rows.stop - rows.start
            out = computed[offset : offset + size]
            offset += size
            cache.computed(first_residual[rows], out - first_img[rows])
            parts.append(out)
        return torch.cat(parts)

    def stats_per_request(self) -> list[StepCacheStats]:
        """Each request's :meth:`StepCache.stats`, in batch order."""
        return [cache.stats() for cache in self.caches]


def _row_slices(sizes: Sequence[int]) -> list[slice]:
    """Consecutive batch rows of the given sizes: ``[2, 1]`` -> rows 0-1, row 2."""
    slices, start = [], 0
    for size in sizes:
        slices.append(slice(start, start + size))
        start += size
    return slices
