"""Loading saved folders, and the engine transformer's weight sharing (no second copy).

Tiny components saved with ``save_pretrained`` load through the engine and the drop-in; a diffusers-format
single-file transformer loads with its base folder (diffusers' BFL key conversion hard-codes the 3072
width, so it cannot run on tiny models and is not tested here)."""

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

from fluxfill_engine import EngineConfig, FillRequest, FluxFillEngine, FluxFillPipeline
from fluxfill_engine.model import FillTransformer
from fluxfill_engine.testing.tiny import save_tiny_model, tiny_components
from tests.support import helpers


def storage_bytes(tensors):
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_conversion_keeps_one_copy_of_the_weights():
    transformer = tiny_components()["transformer"]
    before = storage_bytes(transformer.parameters())
    fill = FillTransformer.from_diffusers(transformer)
    after = storage_bytes([*transformer.parameters(), *fill.parameters(), *fill.buffers()])
    assert after == before
    assert fill.is_in_sync()


def test_moving_the_diffusers_module_is_detected_and_the_engine_rebuilt():
    components = tiny_components()
    pipe = FluxFillPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1

    def run():
        return pipe(
            prompt="a cup",
            image=image,
            mask_image=mask,
            height=32,
            width=32,
            num_inference_steps=2,
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    first = run()
    fill = pipe.engine_transformer()
    pipe.transformer.to(torch.float64).to(torch.float32)  # fresh tensors, same values
    assert not fill.is_in_sync()
    second = run()
    assert pipe.engine_transformer() is not fill and pipe.engine_transformer().is_in_sync()
    np.testing.assert_array_equal(first, second)


def fill_request(seed=0):
    gen = torch.Generator().manual_seed(1)
    image = PIL.Image.fromarray((torch.rand(256, 256, 3, generator=gen).numpy() * 255).astype(np.uint8))
    mask = np.zeros((256, 256), np.float32)
    mask[64:160, 96:200] = 1
    return FillRequest(
        prompt="a red bird", image=image, mask=mask, num_inference_steps=2, seed=seed, max_megapixels=0.065
    )


@pytest.mark.slow
def test_saved_folder_loads_through_engine_and_pipeline(tmp_path):
    path = save_tiny_model(tmp_path / "tiny")
    in_memory = helpers.tiny_engine().run(fill_request()).images[0]
    loaded = FluxFillEngine.from_pretrained(path, config=EngineConfig.preset("reference")).run(fill_request())
    # Same weights bit for bit, but freshly loaded tensors can take other BLAS paths (~1e-7 apart),
    # which may flip the rounding of a uint8 pixel: allow one level.
    difference = np.abs(np.asarray(in_memory, np.int16) - np.asarray(loaded.images[0], np.int16))
    assert difference.max() <= 1

    pipe = FluxFillPipeline.from_pretrained(path)
    assert type(pipe) is FluxFillPipeline
    reference = diffusers.FluxFillPipeline.from_pretrained(path)
    for p in (pipe, reference):
        p.set_progress_bar_config(disable=True)
    request = fill_request()
    kwargs = dict(
        prompt=request.prompt,
        image=request.image,
        mask_image=PIL.Image.fromarray((request.mask * 255).astype(np.uint8)),
        height=256,
        width=256,
        num_inference_steps=2,
        output_type="np",
    )
    ours = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    theirs = reference(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(ours - theirs).max() <= 1e-4


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        FluxFillEngine.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="torch_dtype"):
        FluxFillEngine.from_pretrained(tmp_path, torch_dtype="int8")


def test_single_file_transformer_with_base_folder(tmp_path):
    import safetensors.torch

    from fluxfill_engine.engine import load_pipeline

    base = save_tiny_model(tmp_path / "base")
    transformer = tiny_components(seed=5)["transformer"]  # different weights from the base folder's
    checkpoint = tmp_path / "fill.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, checkpoint)

    pipe = load_pipeline(checkpoint, base=base, dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16
    for name, value in transformer.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[name], value.to(torch.bfloat16)), name

    with pytest.raises(ValueError, match="base"):
        load_pipeline(checkpoint)
    with pytest.raises(FileNotFoundError, match="base"):
        load_pipeline(checkpoint, base=tmp_path)
    with pytest.raises(FileNotFoundError, match="model"):
        load_pipeline(tmp_path / "missing.safetensors", base=base)


def test_pipelines_sharing_a_transformer_share_one_engine_transformer():
    first = FluxFillPipeline(**tiny_components())
    second = FluxFillPipeline.from_pipe(first)
    assert second.transformer is first.transformer
    params = list(first.transformer.parameters())
    before = storage_bytes(params)
    fill = first.engine_transformer()
    assert second.engine_transformer() is fill
    assert first.engine_transformer() is fill and fill.is_in_sync()
    assert storage_bytes([*params, *fill.parameters(), *fill.buffers()]) == before
    assert "fluxfill" not in " ".join(name for name, _ in first.transformer.named_modules())
