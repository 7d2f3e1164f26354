"""Context parallel (:mod:`fluxfill_engine.parallel`): the Ulysses layout in one process (ranks as
threads), the configuration checks, and real runs under ``torchrun`` with gloo on the CPU whose images
must equal one process's (fp32, max abs difference <= 1e-4), step-cache decisions included.

Two ranks: the reference, a batch, the step cache plain and mask-aware (the same skipped steps), two calls
as one pass each deciding its own steps, int8, fused kernels, triton attention, diffusers'
``enable_parallelism``; ranks given different inputs refuse the request; a seedless engine request uses
rank 0's seed. Also three ranks, compiled blocks, the CLI under torchrun and the benchmark's dry run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from fluxfill_engine import EngineConfig, FluxFillPipeline
from fluxfill_engine.attention import JointQKV, sdpa_attention
from fluxfill_engine.cache import StepCache
from fluxfill_engine.cli import main
from fluxfill_engine.config import StepCachePolicy
from fluxfill_engine.parallel import TORCHRUN_ENV, SequenceShard, UlyssesAttention, check_degree
from fluxfill_engine.testing.tiny import tiny_components
from tests.support import cp_worker

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-4


# ---- the layout, with ranks as threads ----------------------------------------------------------------


class ThreadGroup:
    """``size`` threads exchanging tensors: what a process group does, in one process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots: list[Any] = [None] * size

    def exchange(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = tensor
        self.barrier.wait()
        every = list(self.slots)
        self.barrier.wait()
        return every


class ThreadRank:
    """Stands in for :class:`~fluxfill_engine.parallel.ContextParallel` on one thread."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.size = group, rank, group.size

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        return torch.stack([sent[self.rank] for sent in self.group.exchange(self.rank, send)])

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.group.exchange(self.rank, tensor))


def on_ranks(size: int, work: Any) -> list[Any]:
    """``work(rank_handle)`` on ``size`` threads; their results in rank order."""
    group = ThreadGroup(size)
    results: list[Any] = [None] * size
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = work(ThreadRank(group, rank))
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


# (ranks, text tokens, image tokens): padding in text, in image, in both, ranks holding only padding, none.
LAYOUTS = [(2, 47, 15), (3, 5, 20), (4, 3, 2), (2, 4, 6), (3, 7, 9)]


@pytest.mark.parametrize("streams", [1, 2], ids=["single-stream", "double-stream"])
@pytest.mark.parametrize(("size", "text_len", "image_len"), LAYOUTS)
def test_ulysses_attention_equals_attention_over_the_whole_sequence(size, text_len, image_len, streams):
    gen = torch.Generator().manual_seed(size * 100 + text_len)
    batch, heads, dim = 2, 2 * size, 8

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    text = [randn(batch, text_len, heads, dim) for _ in range(3)]  # q, k, v
    image = [randn(batch, image_len, heads, dim) for _ in range(3)]
    norms = [1 + 0.1 * randn(dim) for _ in range(4)]  # q text, q image, k text, k image
    rope = (randn(text_len + image_len, dim), randn(text_len + image_len, dim))
    attend = sdpa_attention(False)

    def joint(parts_text: list[torch.Tensor], parts_image: list[torch.Tensor]) -> JointQKV:
        if streams == 2:
            pairs = [[t, i] for t, i in zip(parts_text, parts_image, strict=True)]
            return JointQKV(*pairs, q_norm=norms[0:2], k_norm=norms[2:4], eps=1e-6)
        single = [[torch.cat([t, i], dim=1)] for t, i in zip(parts_text, parts_image, strict=True)]
        return JointQKV(*single, q_norm=norms[0:1], k_norm=norms[2:3], eps=1e-6)

    whole = attend(joint(text, image), rope)  # [B, S+L, H*D]

    def rank_work(rank: ThreadRank) -> tuple[torch.Tensor, torch.Tensor]:
        shard = SequenceShard(rank, text_len, image_len)
        local = joint([shard.split_text(x) for x in text], [shard.split_image(x) for x in image])
        out = UlyssesAttention(attend, shard)(local, rope)
        expected = torch.cat(
            [shard.split_text(whole[:, :text_len]), shard.split_image(whole[:, text_len:])], dim=1
        )
        return out, expected

    for out, expected in on_ranks(size, rank_work):
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("size", "text_len", "image_len"), LAYOUTS)
def test_split_and_gather_round_trip(size, text_len, image_len):
    image = torch.randn(2, image_len, 5)

    def rank_work(rank: ThreadRank) -> torch.Tensor:
        shard = SequenceShard(rank, text_len, image_len)
        local = shard.split_image(image)
        assert local.shape == (2, shard.image_local, 5)
        weights = shard.image_token_weights(torch.device("cpu"))
        assert int(weights.sum()) == max(0, min(shard.image_local, image_len - rank.rank * shard.image_local))
        return shard.gather_image(local)

    for gathered in on_ranks(size, rank_work):
        torch.testing.assert_close(gathered, image, atol=0, rtol=0)


def test_split_is_a_view_when_no_padding_reaches_the_rank():
    text = torch.randn(1, 8, 4)
    shard = SequenceShard(ThreadRank(ThreadGroup(2), 1), 8, 6)
    assert shard.split_text(text).data_ptr() == text[:, 4:].data_ptr()
    assert not shard.padded


@pytest.mark.parametrize("mask_aware", [False, True])
def test_step_cache_relative_change_summed_over_ranks_equals_one_process(mask_aware):
    """The relative change from every rank's partial sums equals the single-process mean ratio."""
    gen = torch.Generator().manual_seed(1)
    batch, tokens, width, size = 2, 15, 6, 2
    reference, residual = torch.randn(batch, tokens, width, generator=gen), torch.randn(batch, tokens, width)
    weights = (torch.rand(batch, tokens, generator=gen) > 0.5).float() if mask_aware else None
    policy = StepCachePolicy(threshold=0.5)
    alone = StepCache(policy, 4, weights)
    alone.reference_residual = reference
    expected = alone.relative_change(residual)

    def rank_work(rank: ThreadRank) -> torch.Tensor:
        shard = SequenceShard(rank, 3, tokens)
        cache = StepCache(policy, 4, weights)
        cache.use_shard(shard, torch.device("cpu"))
        cache.reference_residual = shard.split_image(reference)
        return cache.relative_change(shard.split_image(residual))

    for value in on_ranks(size, rank_work):
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-6)


# ---- configuration -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (-2, ValueError), ("2", TypeError), (True, TypeError)]
)
def test_config_rejects_what_is_not_a_process_count(value, error):
    with pytest.raises(
        error, match=r"EngineConfig\.context_parallel .*divisor of the model's attention heads"
    ):
        EngineConfig(context_parallel=value)


def test_degree_must_divide_the_head_count():
    with pytest.raises(ValueError, match=r"24 attention heads \(1, 2, 3, 4, 6, 8, 12, 24\), got 5"):
        check_degree(5, 24)
    check_degree(6, 24)


@pytest.fixture
def not_under_torchrun(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def test_configure_names_the_allowed_degrees_of_the_model(not_under_torchrun):
    pipe = FluxFillPipeline(**tiny_components())
    with pytest.raises(
        ValueError, match=r"EngineConfig\.context_parallel .* 2 attention heads \(1, 2\), got 4"
    ):
        pipe.configure(EngineConfig(context_parallel=4))


def test_configure_outside_torchrun_says_how_to_launch(not_under_torchrun):
    pipe = FluxFillPipeline(**tiny_components())
    with pytest.raises(ValueError, match=r"not started by torchrun.*torchrun --nproc-per-node 2"):
        pipe.configure(EngineConfig(context_parallel=2))


def test_cli_outside_torchrun_says_how_to_launch(not_under_torchrun, tmp_path, capsys):
    assert main(["inpaint", "--context-parallel", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err


# ---- real ranks under torchrun (gloo, CPU) ---------------------------------------------------------------


def torchrun(nproc: int, args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in TORCHRUN_ENV}
    paths = [str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    result = subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def run_worker(nproc: int, names: list[str], out: Path) -> Path:
    torchrun(nproc, [str(ROOT / "tests" / "support" / "cp_worker.py"), str(out), *names], cwd=out)
    return out


def read_rank(out: Path, name: str, rank: int) -> tuple[np.ndarray, dict[str, Any]]:
    images = np.load(out / f"{name}-rank{rank}.npz")["images"]
    return images, json.loads((out / f"{name}-rank{rank}.json").read_text())


def check_against_one_process(out: Path, name: str, ranks: int) -> float:
    """Every rank's images equal rank 0's; rank 0's equal one process's (within 1e-4); the step cache
    skipped the same steps. Returns the max abs difference."""
    alone, alone_stats = cp_worker.run_scenario(name, 1)
    images, stats = read_rank(out, name, 0)
    for rank in range(1, ranks):
        other, other_stats = read_rank(out, name, rank)
        np.testing.assert_array_equal(other, images)
        assert other_stats["step_cache"] == stats["step_cache"]
    assert stats["context_parallel"] == ranks and stats["transformer_path"] == "engine"
    assert images.shape == alone.shape
    difference = float(np.abs(images.astype(np.float64) - alone).max())
    assert difference <= ATOL, f"{name}: max abs difference {difference:.3g} > {ATOL}"
    if alone_stats["step_cache"] is not None:
        # One record per call (a list when several calls ran as one pass).
        theirs_all = alone_stats["step_cache"]
        theirs_all = theirs_all if isinstance(theirs_all, list) else [theirs_all]
        mine_all = stats["step_cache"] if isinstance(stats["step_cache"], list) else [stats["step_cache"]]
        assert len(mine_all) == len(theirs_all)
        for mine, theirs in zip(mine_all, theirs_all, strict=True):
            assert mine["cached"] == theirs["cached"]
            assert 0 < mine["cached"].count(True) < len(mine["cached"]) - 2  # skips and full steps both
            values = [v for v in mine["rel_l1"] if v is not None]
            expected = [v for v in theirs["rel_l1"] if v is not None]
            np.testing.assert_allclose(values, expected, rtol=1e-5)
        if len(mine_all) > 1:  # some step where one call skipped and another computed
            assert any(len(set(flags)) > 1 for flags in zip(*(m["cached"] for m in mine_all), strict=True))
    return difference


TWO_RANKS = [
    "reference",  # 15 image + 47 text tokens: both streams padded on 2 ranks
    "batch",
    "step_cache",
    "step_cache_masked",
    "step_cache_calls",  # two calls as one pass, each deciding its own steps
    "int8",
    "fused_kernels",
    "triton",
    "diffusers_enable_parallelism",
]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    """One torchrun of 2 ranks over every scenario (one start-up for all of them)."""
    return run_worker(
        2, [*TWO_RANKS, "different_seeds", "engine_random_seed"], tmp_path_factory.mktemp("cp2")
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", TWO_RANKS)
def test_two_ranks_give_the_single_process_images(two_rank_run, name):
    check_against_one_process(two_rank_run, name, 2)


@pytest.mark.slow
def test_ranks_given_different_seeds_refuse_the_request(two_rank_run):
    for rank in range(2):
        outcome = json.loads((two_rank_run / f"different_seeds-rank{rank}.json").read_text())
        assert outcome["error"] and "different inputs" in outcome["error"]


@pytest.mark.slow
def test_an_engine_request_without_a_seed_uses_rank_0s_seed_everywhere(two_rank_run):
    seeds = [
        json.loads((two_rank_run / f"engine_random_seed-rank{rank}.json").read_text())["seed"]
        for rank in range(2)
    ]
    images = [np.load(two_rank_run / f"engine_random_seed-rank{rank}.npz")["images"] for rank in range(2)]
    assert seeds[0] == seeds[1]
    np.testing.assert_array_equal(images[0], images[1])


@pytest.mark.slow
def test_three_ranks_on_a_six_head_model(tmp_path):
    out = run_worker(3, ["heads6", "heads6_step_cache"], tmp_path)
    for name in ("heads6", "heads6_step_cache"):
        check_against_one_process(out, name, 3)


@pytest.mark.slow
def test_two_ranks_with_compiled_blocks(tmp_path):
    """The all-to-alls are functional collectives inside the compiled blocks (fullgraph=True)."""
    out = run_worker(2, ["compile"], tmp_path)
    check_against_one_process(out, "compile", 2)


@pytest.mark.slow
def test_cli_under_torchrun_writes_once_what_one_process_writes(tmp_path):
    """No --seed: rank 0's seed reaches every rank; only rank 0 prints and writes."""
    out = tmp_path / "cp.png"
    args = ["-m", "fluxfill_engine.cli", "inpaint", "--steps", "2", "--width", "272", "--height", "272"]
    result = torchrun(2, [*args, "--out", str(out)], cwd=tmp_path)
    assert result.stdout.count("wrote ") == 1 and "context parallel over 2 processes" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cp.png"]
    seed = re.search(r"seed (\d+)", result.stdout).group(1)
    single = tmp_path / "single.png"
    assert main([*args[2:], "--seed", seed, "--out", str(single)]) == 0
    mine, theirs = (np.asarray(PIL.Image.open(path), dtype=np.int16) for path in (out, single))
    assert np.abs(mine - theirs).max() <= 1  # 8-bit rounding of values equal to ~1e-6


@pytest.mark.slow
def test_benchmark_dry_run(tmp_path):
    out = tmp_path / "cp.json"
    command = [sys.executable, "-m", "fluxfill_engine", "bench", "context-parallel", "--dry-run"]
    result = subprocess.run(
        [*command, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={key: value for key, value in os.environ.items() if key not in TORCHRUN_ENV},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads(out.read_text())
    rows = {row["size"]: row for row in record["results"]}
    assert set(rows) == {1, 2} and rows[1]["efficiency"] == 1.0
    assert rows[2]["ms_per_step"] > 0 and rows[2]["all_to_all_bytes_per_rank_per_step"] > 0
    assert rows[2]["vs_size_1"]["max_abs_diff"] <= ATOL
    assert "| 2 |" in record["table"]
