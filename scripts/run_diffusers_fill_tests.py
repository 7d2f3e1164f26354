"""Run diffusers' own FluxFill pipeline tests against ``fluxfill_engine.FluxFillPipeline``, offline.

    python scripts/run_diffusers_fill_tests.py /path/to/diffusers-checkout [pytest arguments]

What it runs: ``tests/pipelines/flux/test_pipeline_flux_fill.py`` of the checkout (``PipelineTesterMixin``
and the Fill cases, unchanged), with ``diffusers.FluxFillPipeline`` swapped for ours by a pytest plugin
before the test module imports it. Everything else, the checks included, is diffusers'.

Offline: those tests build their T5 from ``AutoConfig.from_pretrained("hf-internal-testing/tiny-random-t5")``
and their tokenizers from ``CLIPTokenizer.from_pretrained("hf-internal-testing/tiny-random-clip")`` and
``AutoTokenizer.from_pretrained("hf-internal-testing/tiny-random-t5")``: Hugging Face Hub repositories.
The plugin builds stand-ins in code and saves them to a temporary folder (a T5 config with the tiny
sizes, d_model 32 to match the test's ``joint_attention_dim``; a BPE ``CLIPTokenizer`` over single
characters, ids < 1000 as the test's CLIP config needs; a ``T5Tokenizer`` over single characters with the
100 ``<extra_id_*>`` tokens), then makes ``from_pretrained`` of transformers' configs and tokenizers
read ``hf-internal-testing/<name>`` from that folder, and sets ``HF_HUB_OFFLINE=1``. Any other
``hf-internal-testing`` id fails, naming it. The stand-ins are not the Hub's files: the weights are random
either way and the Fill tests compare our pipeline with itself (saved and loaded, batched and single,
offloaded and not), never with stored numbers, so only the sizes matter. ``--hub`` skips the stand-ins
and loads the real ones (needs the Hub or a filled Hugging Face cache).

Requirements: a checkout whose ``tests/`` match the installed diffusers (``pip show diffusers``; a
release tag, or ``git archive <tag> tests | tar -x -C DIR`` of one), pytest, and diffusers' test-only
packages that ``test_pipelines_common.py`` imports: ``parameterized`` and ``requests-mock``
(``pip install parameterized requests-mock``). Tests that diffusers marks for an accelerator skip
without one.

Last run here (CPU only, diffusers 0.42.1 installed, the ``tests/`` of diffusers' main branch of
2026-08, offline): 24 passed, 11 skipped (accelerator or xformers), none failed; the run's header line
says which class was tested. ``tests/pipeline/test_diffusers_fill_cases.py`` runs this script when
``FLUXFILL_DIFFUSERS_CHECKOUT`` names a checkout, and checks the stand-ins load offline either way.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

TEST_FILE = Path("tests/pipelines/flux/test_pipeline_flux_fill.py")
HUB_PREFIX = "hf-internal-testing/"
LOCAL_HUB_ENV = "FLUXFILL_LOCAL_HUB"  # the folder of stand-ins, set for the plugin

TEST_REQUIREMENTS = {"parameterized": "parameterized", "requests_mock": "requests-mock"}

PLUGIN = """
import run_diffusers_fill_tests as runner

runner.swap_pipeline()
runner.redirect_hub()


def pytest_report_header(config):
    return runner.report_header()
"""


# ---- inside the pytest process (the plugin) ----------------------------------------------------------


def swap_pipeline() -> None:
    """``diffusers.FluxFillPipeline`` becomes ours wherever the test module may import it from."""
    import diffusers
    import diffusers.pipelines.flux as flux

    from fluxfill_engine import FluxFillPipeline

    diffusers.FluxFillPipeline = FluxFillPipeline
    flux.FluxFillPipeline = FluxFillPipeline


def report_header() -> str:
    import diffusers

    cls = diffusers.FluxFillPipeline
    hub = os.environ.get(LOCAL_HUB_ENV)
    return (
        f"fluxfill: diffusers.FluxFillPipeline is {cls.__module__}.{cls.__qualname__}; "
        f"hf-internal-testing models: {'stand-ins in ' + hub if hub else 'the Hub'}"
    )


def build_local_hub(folder: Path) -> dict[str, Path]:
    """Stand-ins for the Hub repositories the Fill tests load, saved under ``folder``; id -> folder."""
    import string

    from transformers import CLIPTokenizer, T5Config, T5Tokenizer

    characters = list(string.ascii_letters + string.digits + string.punctuation)
    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in characters + [c + "</w>" for c in characters]:
        clip_vocab[token] = len(clip_vocab)
    clip = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in characters] + [("\u2581" + c, -3.0) for c in characters]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))]
    t5_tokenizer = T5Tokenizer(vocab=pieces, extra_ids=100, model_max_length=512)
    t5_config = T5Config(
        vocab_size=len(t5_tokenizer),
        d_model=32,  # the Fill test's transformer has joint_attention_dim=32
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
    )

    repos = {f"{HUB_PREFIX}tiny-random-clip": folder / "tiny-random-clip"}
    repos[f"{HUB_PREFIX}tiny-random-t5"] = folder / "tiny-random-t5"
    clip.save_pretrained(repos[f"{HUB_PREFIX}tiny-random-clip"])
    t5_tokenizer.save_pretrained(repos[f"{HUB_PREFIX}tiny-random-t5"])
    t5_config.save_pretrained(repos[f"{HUB_PREFIX}tiny-random-t5"])
    return repos


def _redirected(cls: type, repos: dict[str, Path]) -> None:
    function = cls.__dict__["from_pretrained"].__func__

    def from_pretrained(klass: type, name: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(name, str) and name.startswith(HUB_PREFIX):
            if name not in repos:
                raise OSError(f"{name} is on the Hub, and run_diffusers_fill_tests.py has no stand-in for it")
            name = str(repos[name])
        return function(klass, name, *args, **kwargs)

    cls.from_pretrained = classmethod(from_pretrained)


def redirect_hub() -> None:
    """Make transformers' ``from_pretrained`` read ``hf-internal-testing/*`` from the stand-ins."""
    folder = os.environ.get(LOCAL_HUB_ENV)
    if not folder:
        return
    from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

    repos = build_local_hub(Path(folder))
    for cls in (AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase):
        _redirected(cls, repos)


# ---- the command -------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    checkout = Path(argv[0]).resolve()
    arguments = argv[1:]
    hub = "--hub" in arguments
    arguments = [a for a in arguments if a != "--hub"]
    if not (checkout / TEST_FILE).is_file():
        print(f"error: {checkout} has no {TEST_FILE}: give a diffusers checkout", file=sys.stderr)
        return 2
    missing = [
        package for module, package in TEST_REQUIREMENTS.items() if importlib.util.find_spec(module) is None
    ]
    if missing:
        print(
            f"error: diffusers' tests import {', '.join(missing)}: pip install {' '.join(missing)}",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "fluxfill_swap.py").write_text(PLUGIN)
        scripts = str(Path(__file__).resolve().parent)
        path = os.pathsep.join([folder, scripts, str(checkout), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "PYTHONPATH": path}
        if not hub:
            env.update({LOCAL_HUB_ENV: str(Path(folder) / "hub"), "HF_HUB_OFFLINE": "1"})
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "fluxfill_swap",
            str(checkout / TEST_FILE),
            *arguments,
        ]
        return subprocess.call(command, cwd=checkout, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
