"""``auto`` attention drops a candidate that fails to compile or launch, records why, and chooses among
the rest (one broken kernel must not take down every preset that uses ``auto``)."""

import pytest
import torch

from fluxfill_engine.attention import AutoAttention, JointQKV, resolve_attention, sdpa_attention
from fluxfill_engine.layers import rope_table


def random_qkv(txt: int = 5, img: int = 7, heads: int = 2, dim: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def parts():
        return [torch.randn(1, n, heads, dim, generator=gen) for n in (txt, img)]

    weights = [torch.rand(dim, generator=gen) + 0.5 for _ in range(4)]
    qkv = JointQKV(parts(), parts(), parts(), weights[:2], weights[2:], eps=1e-6)
    ids = torch.stack([torch.zeros(txt + img), torch.arange(txt + img).float(), torch.zeros(txt + img)], -1)
    return qkv, rope_table(ids, (4, 6, 6))


class CompileError(Exception):
    """Stands in for a kernel compiler's error (Triton raises its own classes)."""


def broken(qkv: JointQKV, rope) -> torch.Tensor:
    raise CompileError("only 0-dimensional arrays can be converted to Python scalars")


def wall_timer(calls: list[str]):
    """A timer that runs the candidate (as the CUDA timer does) and ranks the candidates by name."""
    rank = {"sdpa": 2.0, "triton": 1.0, "xformers": 3.0}

    def timer(attend, qkv, rope) -> float:
        name = next(n for n, fn in candidates.items() if fn is attend)
        calls.append(name)
        attend(qkv, rope)
        return rank[name]

    candidates: dict = {}
    return timer, candidates


def test_a_failing_candidate_is_dropped_with_its_reason_and_the_rest_are_chosen_from():
    calls: list[str] = []
    timer, candidates = wall_timer(calls)
    working = sdpa_attention(fused_kernels=False)
    # triton would win on time but raises; xformers works but is slower than sdpa.
    candidates.update({"sdpa": working, "triton": broken, "xformers": sdpa_attention(fused_kernels=False)})
    auto = AutoAttention(candidates, timer=timer)
    qkv, rope = random_qkv()
    out = auto(qkv, rope)
    torch.testing.assert_close(out, working(qkv, rope), rtol=0, atol=0)
    assert set(auto.choices.values()) == {"sdpa"}
    assert list(auto.dropped) == ["triton"]
    assert auto.dropped["triton"].startswith("CompileError: only 0-dimensional arrays")
    # A new shape is timed again, without the dropped candidate.
    auto(*random_qkv(img=9))
    assert calls.count("triton") == 1 and calls.count("sdpa") == 2 and len(auto.choices) == 2


def test_resolve_attention_returns_a_working_backend_when_one_fails():
    calls: list[str] = []
    timer, candidates = wall_timer(calls)
    candidates.update({"triton": broken, "sdpa": sdpa_attention(fused_kernels=False)})
    auto = AutoAttention(candidates, timer=timer)
    chosen = resolve_attention(auto, [5, 7], 1, 2, 16, torch.float32, torch.device("cpu"))
    assert chosen is candidates["sdpa"] and "triton" in auto.dropped


def test_when_every_candidate_fails_the_error_names_each_reason():
    calls: list[str] = []
    timer, candidates = wall_timer(calls)
    candidates.update({"triton": broken, "sdpa": broken})
    auto = AutoAttention(candidates, timer=timer)
    with pytest.raises(RuntimeError, match=r"every candidate failed \(triton: CompileError.*; sdpa: "):
        auto(*random_qkv())
