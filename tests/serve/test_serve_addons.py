"""The server's optional add-ons, each loaded from a local model folder: the prompt enhancer
(``--prompt-enhancer``, a causal LM) and the safety checker (``--safety-checker``, Stable Diffusion's
NSFW classifier). Tiny random models (:mod:`tests.support.addon_models`) are saved with
``save_pretrained`` and loaded back through ``from_folder``, the path the server takes; nothing is
downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from fluxfill_engine.serve import enhance as enhance_module
from fluxfill_engine.serve.enhance import INSTRUCTION, PLAIN_TEMPLATE, PromptEnhancer, clean_output
from fluxfill_engine.serve.safety import SafetyChecker, resolve_folders
from tests.support.addon_models import save_tiny_checker, save_tiny_lm, tiny_clip_config

PROMPT = "a red cat on the table"

# ---- the prompt enhancer ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("enhancer"))


@pytest.fixture(scope="module")
def enhancer(lm_folder) -> PromptEnhancer:
    return PromptEnhancer.from_folder(lm_folder, device="cpu", max_new_tokens=24)


def test_enhance_is_deterministic_and_not_an_echo(enhancer, lm_folder):
    out = enhancer.enhance(PROMPT)
    assert isinstance(out, str) and out.strip() == out and out
    assert out != PROMPT  # the model's rewrite, not the fallback
    assert enhancer.enhance(PROMPT) == out  # greedy: the same rewrite every time
    # ... and from a fresh load of the same folder.
    assert PromptEnhancer.from_folder(lm_folder, max_new_tokens=24).enhance(PROMPT) == out
    # The input is not echoed: not the instruction, not the template's labels.
    assert INSTRUCTION not in out and not out.startswith("Rewrite the short image prompt")
    assert not out.startswith(PROMPT)
    assert "<eos>" not in out and "<pad>" not in out
    # Another prompt, another rewrite.
    assert enhancer.enhance("a blue car on the road") != out


def test_enhance_input_is_the_template_without_a_trailing_eos(enhancer):
    assert enhancer.render(PROMPT) == PLAIN_TEMPLATE.format(prompt=PROMPT)
    ids = enhancer.input_ids(PROMPT)
    assert ids[0] == enhancer.tokenizer.bos_token_id  # the tokenizer's own BOS is kept
    assert ids[-1] != enhancer.tokenizer.eos_token_id  # its appended EOS is not: the model continues
    assert enhancer.tokenizer.decode(ids, skip_special_tokens=True).endswith("Detailed prompt :")


def test_enhance_output_is_bounded(enhancer, lm_folder):
    full = enhancer.enhance(PROMPT)
    short = PromptEnhancer.from_folder(lm_folder, max_new_tokens=24, max_chars=12)
    out = short.enhance(PROMPT)
    assert 0 < len(out) <= 12 and full.startswith(out)
    # Greedy: one new token is the first word of the longer rewrite (a word-level tokenizer).
    one = PromptEnhancer.from_folder(lm_folder, max_new_tokens=1)
    assert one.enhance(PROMPT) == full.split()[0]


def test_enhance_falls_back_on_no_generation(lm_folder):
    none = PromptEnhancer.from_folder(lm_folder, max_new_tokens=0)
    assert none.enhance(PROMPT) == PROMPT
    enhancer = PromptEnhancer.from_folder(lm_folder, max_new_tokens=8)
    assert enhancer.enhance("") == ""
    assert enhancer.enhance("   ") == "   "
    assert enhancer.enhance("x" * 5000) == "x" * 5000  # too long to rewrite: left as it is
    long = "a red cat " * 90  # 270 words + the template: over the model's 256 positions
    assert enhancer.enhance(long) == long


def test_enhance_is_greedy_whatever_the_model_ships(enhancer, tmp_path):
    """An instruct model's generation config asks for sampling: the enhancer decodes greedily anyway."""
    from transformers import GenerationConfig

    folder = save_tiny_lm(tmp_path / "sampling")
    generation = GenerationConfig.from_pretrained(folder)
    generation.update(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, max_length=30)
    generation.save_pretrained(folder)
    sampling = PromptEnhancer.from_folder(folder, max_new_tokens=24)
    assert sampling.model.generation_config.do_sample is False
    outs = {sampling.enhance(PROMPT) for _ in range(3)}
    assert outs == {enhancer.enhance(PROMPT)}  # the same model decoded greedily: the same rewrite


def test_enhance_falls_back_when_the_model_ends_at_once(tmp_path):
    """A model whose first greedy token is an end-of-text token answers nothing: the prompt comes back."""
    folder = save_tiny_lm(tmp_path / "lm")
    enhancer = PromptEnhancer.from_folder(folder, max_new_tokens=8)
    assert enhancer.enhance(PROMPT) != PROMPT
    ids = enhancer.input_ids(PROMPT)
    with torch.no_grad():
        first = int(enhancer.model(torch.tensor([ids])).logits[0, -1].argmax())
    assert first != enhancer.tokenizer.eos_token_id
    # Make that token an end-of-text token of the model's generation config (an ordinary word for the
    # tokenizer, so only the enhancer's own cut at EOS makes the answer empty).
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(folder)
    generation.eos_token_id = [enhancer.tokenizer.eos_token_id, first]
    generation.save_pretrained(folder)
    ended = PromptEnhancer.from_folder(folder, max_new_tokens=8)
    assert ended.enhance(PROMPT) == PROMPT


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    + CHAT_TEMPLATE
)


def test_enhance_uses_the_chat_template(tmp_path):
    folder = save_tiny_lm(tmp_path / "chat", chat_template=CHAT_TEMPLATE)
    enhancer = PromptEnhancer.from_folder(folder, max_new_tokens=16)
    text = enhancer.render(PROMPT)
    assert text == f"<bos><|system|> {INSTRUCTION} <|user|> {PROMPT} <|assistant|>"
    ids = enhancer.input_ids(PROMPT)
    assert ids.count(enhancer.tokenizer.bos_token_id) == 1  # the template's BOS, not a second one
    out = enhancer.enhance(PROMPT)
    assert out and out == enhancer.enhance(PROMPT)
    assert INSTRUCTION not in out


def test_enhance_chat_template_without_a_system_role(tmp_path):
    folder = save_tiny_lm(tmp_path / "chat", chat_template=NO_SYSTEM_TEMPLATE)
    enhancer = PromptEnhancer.from_folder(folder, max_new_tokens=4)
    text = enhancer.render(PROMPT)
    assert "<|system|>" not in text
    assert text.startswith(f"<bos><|user|> {INSTRUCTION}") and PROMPT in text
    assert enhancer.enhance(PROMPT)


def test_enhance_is_thread_safe(enhancer):
    prompts = [PROMPT, "a blue car on the road", "a small bird in the sky"]
    expected = [enhancer.enhance(p) for p in prompts]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = enhancer.enhance(prompts[i % 3])
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert [results[i] for i in range(6)] == expected * 2


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  A red cat, soft light.  ", "A red cat, soft light."),
        ("Detailed prompt: a red cat", "a red cat"),
        ("Enhanced Prompt:  a red cat", "a red cat"),
        ('"a red cat on a wooden table"', "a red cat on a wooden table"),
        ("\u201ca red cat\u201d", "a red cat"),
        ("a red cat\non a table", "a red cat on a table"),
        ("a red cat\n\nThis prompt adds detail because ...", "a red cat"),
        ("a red cat\nPrompt: a dog\nDetailed prompt: a big dog", "a red cat"),
        ("<think>the user wants detail</think>\n\na red cat", "a red cat"),
        ("<think>never closed", ""),
        (INSTRUCTION + "\n\na red cat", "a red cat"),
        (INSTRUCTION, ""),
        ("", ""),
        ("  \n\n ", ""),
        ('""', ""),
        ("Rewrite", "Rewrite"),  # a short answer that merely starts like the instruction is kept
    ],
)
def test_clean_output(raw, clean):
    assert clean_output(raw) == clean


def test_clean_output_truncates_at_a_word():
    text = " ".join(["word"] * 400)
    out = clean_output(text, max_chars=100)
    assert len(out) <= 100 and out.endswith("word") and set(out.split()) == {"word"}
    assert clean_output("x" * 300, max_chars=50) == "x" * 50  # no space: a hard cut


def test_enhancer_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--prompt-enhancer"):
        PromptEnhancer.from_folder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--prompt-enhancer.*no config.json"):
        PromptEnhancer.from_folder(tmp_path)
    file = tmp_path / "model.bin"
    file.write_bytes(b"")
    with pytest.raises(ValueError, match="--prompt-enhancer.*not a folder"):
        PromptEnhancer.from_folder(file)
    with pytest.raises(ValueError, match="--prompt-enhancer"):
        PromptEnhancer.from_folder("")
    # A model without its tokenizer.
    folder = save_tiny_lm(tmp_path / "lm")
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(ValueError, match="--prompt-enhancer.*tokenizer"):
        PromptEnhancer.from_folder(no_tokenizer)
    # Configs but no weights.
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for path in folder.iterdir():
        if path.suffix != ".safetensors":
            (no_weights / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="--prompt-enhancer.*cannot load"):
        PromptEnhancer.from_folder(no_weights)
    # Not a causal language model (a CLIP safety checker's config).
    not_lm = tmp_path / "not_lm"
    save_tiny_checker(not_lm, layout="flat")
    (not_lm / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="--prompt-enhancer.*cannot load"):
        PromptEnhancer.from_folder(not_lm)
    with pytest.raises(ValueError, match="max_new_tokens"):
        PromptEnhancer.from_folder(folder, max_new_tokens=-1)
    enhancer = PromptEnhancer.from_folder(folder, max_new_tokens=2)
    with pytest.raises(TypeError):
        enhancer.enhance(None)  # type: ignore[arg-type]


# ---- the safety checker ----------------------------------------------------------------------------


def _images() -> list[PIL.Image.Image]:
    rng = np.random.default_rng(0)
    noise = PIL.Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), mode="RGB")
    gradient = PIL.Image.fromarray(np.tile(np.arange(0, 250, 10, dtype=np.uint8), (20, 1)), mode="L")
    rgba = PIL.Image.new("RGBA", (33, 17), (250, 250, 250, 128))
    checks = np.kron(np.indices((6, 6)).sum(axis=0) % 2, np.ones((4, 4), dtype=np.int64)).astype(np.uint8)
    palette = PIL.Image.fromarray(np.stack([checks * 255, checks * 40, 255 - checks * 255], axis=-1)).convert(
        "P"
    )
    return [noise, gradient, rgba, palette]


def _pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image)


@pytest.mark.parametrize("layout", ["sd", "flat"])
def test_safety_flags_all_and_blacks_them_out(tmp_path, layout):
    checker = SafetyChecker.from_folder(
        save_tiny_checker(tmp_path, concept=-2.0, layout=layout), device="cpu"
    )
    assert checker.model.concept_embeds_weights[0].item() == -2.0  # the saved thresholds were loaded
    images = _images()
    before = [_pixels(image).copy() for image in images]
    out, flags = checker.check(images)
    assert flags == [True] * len(images) and all(type(flag) is bool for flag in flags)
    assert len(out) == len(images)
    for image, black in zip(images, out, strict=True):
        assert black is not image and black.size == image.size
        rgb = np.asarray(black.convert("RGB"))
        assert rgb.max() == 0  # black
    assert out[1].mode == "L" and out[0].mode == "RGB"
    assert out[2].mode == "RGBA" and np.asarray(out[2])[..., 3].min() == 255  # opaque black
    # The images given are left as they were.
    assert all(np.array_equal(_pixels(image), b) for image, b in zip(images, before, strict=True))


def test_safety_flags_none_and_leaves_images(tmp_path):
    checker = SafetyChecker.from_folder(save_tiny_checker(tmp_path, concept=2.0, special=2.0))
    images = _images()
    out, flags = checker.check(images)
    assert flags == [False] * len(images)
    assert all(o is i for o, i in zip(out, images, strict=True))
    assert checker.check([]) == ([], [])
    # A tuple (any sequence) of images works too.
    assert checker.check(tuple(images[:1]))[1] == [False]


def test_safety_flags_per_image(tmp_path):
    """Every concept set to the first image's embedding, with a threshold halfway between its
    similarity (1) and the others': the first image only is flagged, as the CLIP check decides."""
    checker = SafetyChecker.from_folder(save_tiny_checker(tmp_path))
    images = _images()
    model = checker.model
    with torch.no_grad():
        pixels = checker.processor(images=[i.convert("RGB") for i in images], return_tensors="pt")[
            "pixel_values"
        ]
        embeds = model.visual_projection(model.vision_model(pixels)[1])
        embeds = torch.nn.functional.normalize(embeds, dim=-1)
        similarity = embeds[1:] @ embeds[0]
    assert float(similarity.max()) < 0.99, "the tiny CLIP cannot tell the test images apart"
    model.concept_embeds.data[:] = embeds[0]
    model.concept_embeds_weights.data.fill_((1.0 + float(similarity.max())) / 2)
    out, flags = checker.check(images)
    assert flags == [True, False, False, False]
    assert np.asarray(out[0]).max() == 0 and out[0].size == images[0].size
    assert all(o is i for o, i in zip(out[1:], images[1:], strict=True))
    # Order and batching: the flagged image last, and more images than one chunk.
    from fluxfill_engine.serve import safety

    many = images[1:] * 6 + images[:1]
    assert len(many) > safety.CHUNK
    _, flags = checker.check(many)
    assert flags == [False] * (len(many) - 1) + [True]


def test_safety_is_thread_safe(tmp_path):
    checker = SafetyChecker.from_folder(save_tiny_checker(tmp_path, concept=-2.0))
    images = _images()
    results: list[list[bool]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(checker.check(images)[1])
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [[True] * len(images)] * 4


def test_safety_folder_layouts(tmp_path):
    sd = save_tiny_checker(tmp_path / "sd")
    (sd / "model_index.json").write_text("{}")  # a whole SD checkpoint folder: its two subfolders are used
    assert resolve_folders(sd) == (sd / "safety_checker", sd / "feature_extractor")
    flat = save_tiny_checker(tmp_path / "flat", layout="flat")
    assert resolve_folders(flat) == (flat, flat)
    assert resolve_folders(str(flat)) == (flat, flat)


def test_safety_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--safety-checker"):
        SafetyChecker.from_folder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--safety-checker.*no safety checker"):
        SafetyChecker.from_folder(tmp_path)
    with pytest.raises(ValueError, match="--safety-checker"):
        SafetyChecker.from_folder("")
    file = tmp_path / "checker.bin"
    file.write_bytes(b"")
    with pytest.raises(ValueError, match="--safety-checker.*not a folder"):
        SafetyChecker.from_folder(file)
    # No feature extractor.
    folder = save_tiny_checker(tmp_path / "sd")
    (folder / "feature_extractor" / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="--safety-checker.*no feature extractor"):
        SafetyChecker.from_folder(folder)
    # Configs but no weights.
    folder = save_tiny_checker(tmp_path / "no_weights")
    (folder / "safety_checker" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="--safety-checker.*cannot load"):
        SafetyChecker.from_folder(folder)
    # A language model's config.
    lm = save_tiny_lm(tmp_path / "lm")
    (lm / "preprocessor_config.json").write_text("{}")
    with pytest.raises(ValueError, match="--safety-checker.*'gpt2'"):
        SafetyChecker.from_folder(lm)
    # A config that is not JSON.
    broken = save_tiny_checker(tmp_path / "broken")
    (broken / "safety_checker" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="--safety-checker.*cannot load"):
        SafetyChecker.from_folder(broken)


def test_safety_refuses_missing_weights(tmp_path):
    """A CLIP model's weights in a safety checker folder load the vision tower but not the concept
    embeddings and thresholds: a checker that would silently pass everything is refused."""
    from transformers import CLIPImageProcessor, CLIPModel

    folder = tmp_path / "clip"
    CLIPModel(tiny_clip_config()).save_pretrained(folder / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor"
    )
    with pytest.raises(ValueError, match="--safety-checker.*lacks.*concept_embeds"):
        SafetyChecker.from_folder(folder)


@pytest.mark.parametrize("api", ["wavespeed", "openai"])
def test_safety_asked_without_a_checker_runs_unchecked_and_says_so(api):
    """WaveSpeed's clients ask for the check by default: a server without one runs the request, checks
    nothing and says so; the native API refuses a check it cannot make."""
    from fluxfill_engine.serve.inputs import RequestError, ServerOptions, parse_task
    from tests.support.serve import body

    request = body(enable_safety_checker=True)
    spec = parse_task(request, ServerOptions(has_safety_checker=False), api)
    assert spec.safety_checker is False  # the service runs no checker for it
    assert spec.public["safety_checker"] == "not configured" and spec.public["enable_safety_checker"] is False
    with pytest.raises(RequestError, match="--safety-checker") as refused:
        parse_task(request, ServerOptions(has_safety_checker=False), "native")
    assert refused.value.status == 422 and refused.value.field == "enable_safety_checker"
    checked = parse_task(request, ServerOptions(has_safety_checker=True), api)
    assert checked.safety_checker is True and checked.public["safety_checker"] == "on"
    assert parse_task(body(), ServerOptions(), api).public["safety_checker"] == "off"


def test_jpg_is_jpeg():
    from fluxfill_engine.serve.inputs import ServerOptions, parse_task
    from tests.support.serve import body

    assert parse_task(body(output_format="jpg"), ServerOptions(), "wavespeed").output_format == "jpeg"


# ---- both ------------------------------------------------------------------------------------------


def test_addons_import_without_torch():
    """The server imports these modules at start; the heavy libraries load with a model only."""
    code = (
        "import json, sys, fluxfill_engine.serve.enhance, fluxfill_engine.serve.safety; "
        "print(json.dumps(sorted({'torch', 'transformers', 'diffusers', 'PIL'} & set(sys.modules))))"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    assert enhance_module.FLAG == "--prompt-enhancer"
