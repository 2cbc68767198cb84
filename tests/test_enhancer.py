"""The CLIP-vision enhancer: a reference cut into a grid of tiles, the tiles' CLIP outputs merged back to
one image's, and joined to the whole image's; in pure torch, then through the host's CLIP vision."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ipadapter_core import prep
from ipadapter_core.embeds import enhance_embeds, merge_tile_embeds
from support.images import ramp, random_image
from support.nodes import adapters_of, run_node

PLUS, BASE = "tiny_ip-adapter-plus_sd15.bin", "tiny_ip-adapter_sd15.bin"
VIT_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.pt"


def pooled_mosaic(tiles: torch.Tensor) -> torch.Tensor:
    """The merge written another way: [g², 1 + s², E] of one image -> [1 + s², E], the patch grids
    stitched with torch.cat as the tiles lie, then adaptive average pooling back to s x s."""
    count, n, e = tiles.shape
    g, s = int(count ** 0.5), int((n - 1) ** 0.5)
    grids = [t[1:].reshape(s, s, e) for t in tiles]
    mosaic = torch.cat([torch.cat(grids[row * g:(row + 1) * g], dim=1) for row in range(g)], dim=0)
    pooled = F.adaptive_avg_pool2d(mosaic.permute(2, 0, 1)[None], (s, s))[0].permute(1, 2, 0).reshape(s * s, e)
    return torch.cat([tiles[:, 0].mean(dim=0, keepdim=True), pooled])


@pytest.mark.unit
def test_grid_tiles_cut_each_image_row_by_row_and_leave_the_remainder_out():
    image = torch.cat([ramp(7, 9), ramp(7, 9) + 100])
    tiles = prep.grid_tiles(image, 2)
    assert tiles.shape == (2, 4, 3, 4, 3)
    corners = [(t[0, 0, 0].item(), t[0, 0, 1].item()) for t in tiles[0]]
    assert corners == [(0, 0), (4, 0), (0, 3), (4, 3)]  # (column, row) of each tile's first pixel
    assert tiles[0, 3, -1, -1, :2].tolist() == [7, 5]  # row 6 and column 8 are in no tile
    assert tiles[1, 0, 0, 0, 0].item() == 100
    with pytest.raises(ValueError, match=r"enhance_tiles: 4 tiles per side of a 7x9 image are under 2 pixels"):
        prep.grid_tiles(image, 4)
    with pytest.raises(ValueError, match=r"enhance_tiles: expected 1 to 16 tiles per side, got 17"):
        prep.grid_tiles(ramp(64, 64), 17)


@pytest.mark.unit
def test_merged_hidden_states_put_each_tile_where_it_lies_at_one_images_grid():
    g, s = 2, 4
    constant = torch.arange(g * g, dtype=torch.float32).reshape(1, g * g, 1, 1).expand(1, g * g, 1 + s * s, 3)
    merged = merge_tile_embeds(constant)
    assert merged.shape == (1, 1 + s * s, 3)
    assert merged[0, 0, 0].item() == 1.5  # the class token: the mean of the tiles' (0, 1, 2, 3)
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]], dtype=torch.float32)
    assert torch.equal(merged[0, 1:, 0].reshape(s, s), expected)


@pytest.mark.unit
@pytest.mark.parametrize("g, s", [(2, 16), (3, 16), (4, 4), (2, 24)])
def test_merged_hidden_states_equal_the_stitched_and_pooled_tiles(g, s):
    tiles = torch.randn(2, g * g, 1 + s * s, 5, generator=torch.Generator().manual_seed(g * s))
    merged = merge_tile_embeds(tiles)
    torch.testing.assert_close(merged, torch.stack([pooled_mosaic(t) for t in tiles]))


@pytest.mark.unit
def test_merged_pooled_embeds_are_the_tiles_mean_and_odd_shapes_are_refused():
    tiles = torch.randn(3, 4, 1024)
    torch.testing.assert_close(merge_tile_embeds(tiles), tiles.mean(dim=1))
    with pytest.raises(ValueError, match=r"expected \[B, g², 1 \+ s², E\], got shape \(1, 4, 20, 8\)"):
        merge_tile_embeds(torch.zeros(1, 4, 20, 8))
    with pytest.raises(ValueError, match=r"got shape \(1, 3, 17, 8\)"):
        merge_tile_embeds(torch.zeros(1, 3, 17, 8))


@pytest.mark.unit
def test_one_image_becomes_two_references_and_several_are_blended():
    whole, merged = torch.full((1, 5, 2), 2.0), torch.full((1, 5, 2), 10.0)
    joined = enhance_embeds(whole, merged, 0.25)
    assert joined.shape == (2, 5, 2) and joined[0].unique().tolist() == [0.5] and joined[1].unique().tolist() == [10]
    blended = enhance_embeds(whole.expand(3, -1, -1), merged.expand(3, -1, -1), 0.25)
    assert blended.shape == (3, 5, 2) and blended.unique().tolist() == [0.25 * 2 + 0.75 * 10]
    with pytest.raises(ValueError, match=r"enhance_ratio: expected 0 to 1, got 1.5"):
        enhance_embeds(whole, merged, 1.5)


# --- through the host ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parts(host, need_models):
    need_models("checkpoints/tiny_sd15.ckpt", f"ipadapter/{PLUS}", f"ipadapter/{BASE}", f"clip_vision/{VIT_H}")
    model = host.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.ckpt")[0]
    (clip_vision,) = host.CLIPVisionLoader().load_clip(VIT_H)
    return model, clip_vision


def enhance(host, model, clip_vision, adapter, image, tiles, ratio, **more):
    options = dict(weight=1.0, weight_type="linear", start_at=0.0, end_at=1.0, combine_embeds="concat",
                   embeds_scaling="V only", composition_weight=1.0, clip_vision=clip_vision, **more)
    (patched,) = run_node(host, "ImagePromptClipVisionEnhancer", model=model, ipadapter=adapter, image=image,
                          enhance_tiles=tiles, enhance_ratio=ratio, **options)
    return adapters_of(patched)


@pytest.mark.host
def test_enhancer_tokens_are_the_projection_of_the_whole_image_and_its_pooled_tiles(host, parts):
    model, clip_vision = parts
    (adapter,) = run_node(host, "ImagePromptAdapterLoader", ipadapter_file=PLUS)
    image = random_image(1, 224, 336)
    (spec,) = enhance(host, model, clip_vision, adapter, image, 2, 0.6)
    whole = clip_vision.encode_image(image).penultimate_hidden_states
    crops = [image[:, r * 112:(r + 1) * 112, c * 168:(c + 1) * 168] for r in range(2) for c in range(2)]
    tiles = torch.cat([clip_vision.encode_image(crop).penultimate_hidden_states for crop in crops])
    expected = adapter.projection(torch.cat([whole * 0.6, pooled_mosaic(tiles)[None]]).float())
    assert spec.cond_tokens.shape == (1, 32, 768)
    torch.testing.assert_close(spec.cond_tokens, expected.reshape(1, 32, 768), rtol=1e-4, atol=1e-5)
    neutral = clip_vision.encode_image(torch.tensor(prep.CLIP_MEAN).expand(1, 224, 224, 3)).penultimate_hidden_states
    torch.testing.assert_close(spec.uncond_tokens, adapter.projection(neutral.float()).repeat(1, 2, 1),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.host
def test_enhancer_on_pooled_embeds_blends_several_images_one_per_latent(host, parts):
    model, clip_vision = parts
    (adapter,) = run_node(host, "ImagePromptAdapterLoader", ipadapter_file=BASE)
    images = torch.cat([random_image(2), random_image(3)])
    (spec,) = enhance(host, model, clip_vision, adapter, images, 2, 0.25, unfold_batch=True)
    whole = clip_vision.encode_image(images).image_embeds
    quarters = [images[:, r * 112:(r + 1) * 112, c * 112:(c + 1) * 112] for r in range(2) for c in range(2)]
    tiles = torch.stack([clip_vision.encode_image(q).image_embeds for q in quarters]).mean(dim=0)
    expected = adapter.projection((0.25 * whole + 0.75 * tiles).float())
    assert spec.cond_tokens.shape == (2, 4, 768)
    torch.testing.assert_close(spec.cond_tokens, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.host
def test_one_tile_is_the_advanced_node_and_a_too_fine_grid_is_named(host, parts):
    model, clip_vision = parts
    (adapter,) = run_node(host, "ImagePromptAdapterLoader", ipadapter_file=PLUS)
    image = random_image(4)
    (spec,) = enhance(host, model, clip_vision, adapter, image, 1, 0.3)
    (patched,) = run_node(host, "ImagePromptApplyAdvanced", model=model, ipadapter=adapter, image=image, weight=1.0,
                          weight_type="linear", start_at=0.0, end_at=1.0, combine_embeds="concat",
                          embeds_scaling="V only", composition_weight=1.0, clip_vision=clip_vision)
    (advanced,) = adapters_of(patched)
    assert torch.equal(spec.cond_tokens, advanced.cond_tokens)
    with pytest.raises(ValueError, match=r"enhance_tiles: 16 tiles per side of a 20x20 image are under 2 pixels"):
        enhance(host, model, clip_vision, adapter, random_image(5, 20, 20), 16, 1.0)
