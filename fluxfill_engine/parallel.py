"""Context parallel: one request's tokens over N processes (Ulysses sequence parallel on torch.distributed).

Every rank runs the same sampling loop with the same noise, weights and conditioning. Inside the
transformer each rank holds ``1/N`` of the text tokens and ``1/N`` of the image tokens (each stream padded
at its end to a multiple of N, the padding on the last ranks). Everything but attention is per token,
so blocks run unchanged on the local tokens. Attention (:class:`UlyssesAttention`, the wrapper around the
engine's attention backend) exchanges heads for tokens:

    q, k, v [B, T/N, H, Dh]  --all-to-all-->  [B, T, H/N, Dh]   (every token, this rank's heads)
    the backend's own QK-norm, RoPE and attention on full-length streams, padding stripped (exact)
    out [B, T, H/N * Dh]     --all-to-all-->  [B, T/N, H * Dh]

The exchange happens *before* QK-norm and RoPE, so the backend sees exactly what it sees on one process
(full text and image streams, the full RoPE table, fewer heads): ``sdpa``, ``xformers``, the fused
``qk_norm_rope`` op and the ``triton`` kernel (whose prologue norms and rotates) all run unchanged, and
the padding never reaches a softmax (no mask needed, flash kernels stay eligible). The RoPE work is
split by heads rather than by rows of the table.

The two all-to-alls are functional collectives (``torch.distributed._functional_collectives``) so they
trace into the regionally compiled blocks with ``fullgraph=True``; keeping them outside would mean
cutting every block into three compiled pieces. At the end of the transformer forward the velocity of
the local image tokens is all-gathered, so the Euler step runs on the full latents on every rank. The
step cache's relative change is a sum over all ranks' tokens (:meth:`SequenceShard.sum_over_ranks`: an
all-gather then the same ordered sum on every rank, so every rank takes the same decision bit for bit).

Configured by ``EngineConfig.context_parallel`` or diffusers' ``transformer.enable_parallelism(
config=ContextParallelConfig(ulysses_degree=N))`` (:func:`diffusers_context_parallel`).
"""

from __future__ import annotations

import atexit
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .attention import AttentionFn, AutoAttention, JointQKV, Rope

if dist.is_available():
    import torch.distributed._functional_collectives as funcol

    # all_gather_single is the newer name (torch >= 2.10); all_gather_tensor the older one.
    _all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel
    from torch.distributed.distributed_c10d import GroupName

FIELD = "EngineConfig.context_parallel"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def divisors(heads: int) -> list[int]:
    """The context-parallel degrees a model with ``heads`` attention heads allows."""
    return [n for n in range(1, heads + 1) if heads % n == 0]


def check_degree(degree: int, heads: int, name: str = FIELD) -> None:
    """``degree`` must divide the head count: Ulysses gives every rank ``heads / degree`` heads."""
    if degree not in divisors(heads):
        allowed = ", ".join(map(str, divisors(heads)))
        raise ValueError(
            f"{name} must be 1 or a divisor of the model's {heads} attention heads ({allowed}), got {degree}"
        )


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed() -> bool:
    """Initialise the default process group from torchrun's environment (once; a no-op when it is
    initialised already). Gloo serves CPU tensors, NCCL CUDA tensors. False when not under torchrun."""
    if dist.is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        dist.init_process_group(backend="cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group(backend="gloo")
    atexit.register(_leave)  # the group this module made, it also takes down
    return True


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0, or a process that is not part of a distributed run."""
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_seed(seed: int) -> int:
    """Rank 0's seed on every rank (a seed drawn per process would give every rank other noise)."""
    if not dist.is_initialized():
        return seed
    holder = [seed]
    dist.broadcast_object_list(holder, src=0)
    return int(holder[0])


def _waited(tensor: torch.Tensor) -> torch.Tensor:
    """Eager functional collectives return a tensor subclass that waits on first use; nothing of it
    should leak to callers (the pipeline, ``torch.save``). Traced, they return plain tensors."""
    return tensor.wait() if isinstance(tensor, funcol.AsyncCollectiveTensor) else tensor


@dataclass(frozen=True, eq=False)
class ContextParallel:
    """The ranks one request is split over. ``group_name`` is what functional collectives take (a
    string: it traces as a constant into compiled blocks)."""

    size: int
    rank: int
    group: dist.ProcessGroup
    group_name: GroupName
    source: str = FIELD
    _shards: dict[tuple[int, int], SequenceShard] = field(default_factory=dict, repr=False)

    def same_as(self, other: ContextParallel | None) -> bool:
        return other is not None and (self.size, self.group, self.source) == (
            other.size,
            other.group,
            other.source,
        )

    def shard(self, text_len: int, image_len: int) -> SequenceShard:
        """The layout of a request with these stream lengths (one object per lengths, so compiled
        blocks see the same attention wrapper for the same shapes)."""
        key = (text_len, image_len)
        if key not in self._shards:
            self._shards[key] = SequenceShard(self, text_len, image_len)
        return self._shards[key]

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        """Chunk ``i`` of ``send`` (dim 0, ``size`` equal chunks) goes to rank ``i``; chunk ``i`` of the
        result came from rank ``i``."""
        return _waited(funcol.all_to_all_single(send.contiguous(), None, None, self.group_name))

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[size, *tensor.shape]``: every rank's ``tensor``, in rank order."""
        gathered = _waited(_all_gather(tensor.contiguous(), 0, self.group_name))
        return gathered.view(self.size, *tensor.shape)

    def agree_on_backend(self, attention: AttentionFn, chosen: AttentionFn) -> AttentionFn:
        """``auto`` attention times its candidates on each rank; all ranks take rank 0's choice."""
        if not isinstance(attention, AutoAttention) or len(attention.candidates) == 1:
            return chosen
        name = next(n for n, fn in attention.candidates.items() if fn is chosen)
        holder = [name]
        dist.broadcast_object_list(holder, src=dist.get_global_rank(self.group, 0), group=self.group)
        return attention.candidates[holder[0]]


def _padded_chunk(x: torch.Tensor, length: int, local: int, rank: int) -> torch.Tensor:
    """Rows ``[rank * local, (rank + 1) * local)`` of ``x``'s dim 1, zero rows past ``length``."""
    start, end = rank * local, (rank + 1) * local
    if end <= length:
        return x[:, start:end]
    real = x[:, min(start, length) : length]
    padding = x.new_zeros(x.shape[0], end - max(start, length), *x.shape[2:])
    return torch.cat([real, padding], dim=1)


@dataclass(frozen=True, eq=False)
class SequenceShard:
    """How one request's ``text_len`` text and ``image_len`` image tokens are split: rank ``r`` holds
    text rows ``[r*s, (r+1)*s)`` and image rows ``[r*l, (r+1)*l)`` (``s, l`` rounded up), each stream
    zero-padded at its end. The local joint sequence is ``[text chunk, image chunk]``."""

    parallel: ContextParallel
    text_len: int
    image_len: int

    @property
    def size(self) -> int:
        return self.parallel.size

    @property
    def text_local(self) -> int:
        return math.ceil(self.text_len / self.size)

    @property
    def image_local(self) -> int:
        return math.ceil(self.image_len / self.size)

    @property
    def padded(self) -> bool:
        return self.text_local * self.size != self.text_len or self.image_local * self.size != self.image_len

    def split_text(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's text rows of ``x [B, S, ...]`` (a view when no padding reaches them)."""
        return _padded_chunk(x, self.text_len, self.text_local, self.parallel.rank)

    def split_image(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's image rows of ``x [B, L, ...]``."""
        return _padded_chunk(x, self.image_len, self.image_local, self.parallel.rank)

    def image_token_weights(self, device: torch.device) -> torch.Tensor:
        """``[image_local]`` float32: 1 for this rank's real image tokens, 0 for padding."""
        positions = self.parallel.rank * self.image_local + torch.arange(self.image_local, device=device)
        return (positions < self.image_len).float()

    def gather_image(self, local: torch.Tensor) -> torch.Tensor:
        """``[B, L, ...]`` from every rank's ``local [B, l, ...]`` (padding stripped)."""
        gathered = self.parallel.all_gather(local)  # [N, B, l, ...]
        full = gathered.transpose(0, 1).flatten(1, 2)
        return full[:, : self.image_len]

    def sum_over_ranks(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's ``partial``, added in rank order on every rank: bit-identical
        everywhere (an all-reduce need not be), so decisions taken from it agree."""
        return self.parallel.all_gather(partial).sum(dim=0)

    def check_same_inputs(self, fingerprint: torch.Tensor) -> None:
        """Refuse a request whose inputs differ between ranks (a seed drawn per process, another
        image): every rank's tokens would come from a different request. One host sync per request."""
        gathered = self.parallel.all_gather(fingerprint)
        if not bool((gathered == gathered[0]).all()):
            raise ValueError(
                f"context parallel over {self.size} ranks: the ranks were given different inputs (latents, "
                "conditioning or prompt); every rank must run the same request with the same seed "
                "(broadcast_seed) and the same images"
            )

    # ---- the Ulysses exchange, as layout steps (single-process tests simulate the collectives) ----

    def heads_to_send(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Local ``[B, s, H, D]`` text and ``[B, l, H, D]`` image parts (or one joint ``[B, s+l, H, D]``)
        of q, k and v stacked -> ``[N, 3, B, s+l, H/N, D]``: chunk ``j`` holds head group ``j``."""
        packed = torch.stack(parts)  # [3, B, s+l, H, D]
        three, batch, tokens, heads, dim = packed.shape
        grouped = packed.view(three, batch, tokens, self.size, heads // self.size, dim)
        return grouped.permute(3, 0, 1, 2, 4, 5)

    def received_to_streams(self, received: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, 3, B, s+l, h, D]`` (chunk ``i`` from rank ``i``) -> full text ``[3, B, S, h, D]`` and
        image ``[3, B, L, h, D]`` streams of this rank's heads, padding stripped."""
        s = self.text_local
        text = received[:, :, :, :s].permute(1, 2, 0, 3, 4, 5).flatten(2, 3)[:, :, : self.text_len]
        image = received[:, :, :, s:].permute(1, 2, 0, 3, 4, 5).flatten(2, 3)[:, :, : self.image_len]
        return text, image

    def output_to_send(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output ``[B, S+L, h*D]`` of this rank's heads -> ``[N, B, s+l, h*D]``: chunk ``j``
        holds rank ``j``'s tokens."""
        text, image = out.split([self.text_len, self.image_len], dim=1)
        if self.text_local * self.size != self.text_len:
            text = F.pad(text, (0, 0, 0, self.text_local * self.size - self.text_len))
        if self.image_local * self.size != self.image_len:
            image = F.pad(image, (0, 0, 0, self.image_local * self.size - self.image_len))
        batch, width = out.shape[0], out.shape[2]
        text = text.view(batch, self.size, self.text_local, width)
        image = image.view(batch, self.size, self.image_local, width)
        return torch.cat([text, image], dim=2).transpose(0, 1)

    @staticmethod
    def received_to_local(received: torch.Tensor) -> torch.Tensor:
        """``[N, B, s+l, h*D]`` (chunk ``i``: head group ``i`` of this rank's tokens) -> ``[B, s+l, H*D]``."""
        return received.permute(1, 2, 0, 3).flatten(2)


class UlyssesAttention:
    """An attention backend run over every token on this rank's ``H/N`` heads (see the module
    docstring). Takes and returns the local layout, so the blocks do not know they are sharded."""

    def __init__(self, inner: AttentionFn, shard: SequenceShard) -> None:
        self.inner = inner
        self.shard = shard

    def __call__(self, qkv: JointQKV, rope: Rope) -> torch.Tensor:
        shard = self.shard
        local = [parts[0] if len(parts) == 1 else torch.cat(parts, dim=1) for parts in (qkv.q, qkv.k, qkv.v)]
        received = shard.parallel.all_to_all(shard.heads_to_send(local))
        text, image = shard.received_to_streams(received)
        if len(qkv.q) == 2:  # double-stream: text and image keep their own norm weights
            streams = JointQKV(
                q=[text[0], image[0]],
                k=[text[1], image[1]],
                v=[text[2], image[2]],
                q_norm=qkv.q_norm,
                k_norm=qkv.k_norm,
                eps=qkv.eps,
            )
        else:
            joint = torch.cat([text, image], dim=2)
            streams = JointQKV([joint[0]], [joint[1]], [joint[2]], qkv.q_norm, qkv.k_norm, qkv.eps)
        out = self.inner(streams, rope)
        back = shard.parallel.all_to_all(shard.output_to_send(out))
        return shard.received_to_local(back)


def fingerprint(*tensors: torch.Tensor) -> torch.Tensor:
    """Sum and sum of absolute values of each tensor (float64): equal inputs give equal values."""
    values = []
    for tensor in tensors:
        wide = tensor.detach().double()
        values += [wide.sum(), wide.abs().sum()]
    return torch.stack(values)


# ---- configuration ------------------------------------------------------------------------------------


def diffusers_context_parallel(transformer: FluxTransformer2DModel) -> tuple[int, dist.ProcessGroup] | None:
    """``(ulysses_degree, its process group)`` when diffusers' ``enable_parallelism`` set a context-parallel
    configuration the engine runs itself: Ulysses only (``ring_degree`` 1) over a divisor of the head
    count. Otherwise ``None`` (ring attention stays on diffusers' own forward)."""
    config = getattr(transformer, "_parallel_config", None)
    context = getattr(config, "context_parallel_config", None)
    if context is None:
        return None
    degree = int(context.ulysses_degree or 1)
    heads = _heads(transformer)
    if int(context.ring_degree or 1) != 1 or degree <= 1 or heads % degree:
        return None
    mesh = getattr(context, "_ulysses_mesh", None)
    if mesh is None:
        return None
    return degree, mesh.get_group()


def _heads(transformer: FluxTransformer2DModel) -> int:
    config: Any = transformer.config  # diffusers' FrozenDict, read by attribute
    return int(config.num_attention_heads)


def engine_runs_diffusers_parallelism(transformer: FluxTransformer2DModel) -> bool:
    """Whether the engine honours the transformer's ``enable_parallelism`` configuration itself."""
    return diffusers_context_parallel(transformer) is not None


def resolve_context_parallel(degree: int, transformer: FluxTransformer2DModel) -> ContextParallel | None:
    """The ranks to split requests over, from ``EngineConfig.context_parallel`` or diffusers'
    ``enable_parallelism``; ``None`` for one process. Initialises the default process group when
    started by torchrun; otherwise says how to launch."""
    heads = _heads(transformer)
    from_diffusers = diffusers_context_parallel(transformer)
    if from_diffusers is not None:
        size, group = from_diffusers
        if degree not in (1, size):
            raise ValueError(
                f"{FIELD}={degree}, but transformer.enable_parallelism(...) set ulysses_degree={size}; "
                f"set one of them (or both to {size})"
            )
        source = f"enable_parallelism(ContextParallelConfig(ulysses_degree={size}))"
        return ContextParallel(size, dist.get_rank(group), group, group.group_name, source)
    if degree == 1:
        return None
    check_degree(degree, heads)
    launch = (
        f"torchrun --nproc-per-node {degree} -m fluxfill_engine.cli inpaint --context-parallel {degree} ..."
    )
    if not dist.is_available():
        raise ValueError(f"{FIELD}={degree} needs torch.distributed, which this torch build lacks")
    if not init_distributed():
        raise ValueError(
            f"{FIELD}={degree} splits each request over {degree} processes, but this process was not started "
            f"by torchrun and torch.distributed is not initialized: launch it with `{launch}` (or run your "
            f"script under `torchrun --nproc-per-node {degree}`)"
        )
    group = dist.group.WORLD
    if group is None:  # set once the default process group is initialized, as it is here
        raise RuntimeError("torch.distributed has no default process group")
    world = dist.get_world_size(group)
    if world != degree:
        raise ValueError(
            f"{FIELD}={degree}, but the process group has {world} processes: launch with "
            f"`torchrun --nproc-per-node {degree}` (or set {FIELD}={world})"
        )
    return ContextParallel(degree, dist.get_rank(group), group, group.group_name)
