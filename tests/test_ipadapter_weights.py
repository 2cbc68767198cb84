"""Weight types, embeds combining and mask grids, against the definitions of the most-used pack
(ComfyUI_IPAdapter_plus, as recorded in the reference notes §3.2) written out here by hand."""
from __future__ import annotations

import pytest
import torch

from ipadapter_core.image_factor import mask_grid
from ipadapter_core.embeds import combine_embeds
from ipadapter_core.weights import WEIGHT_TYPES, layer_weights

pytestmark = pytest.mark.unit

# (block name, transformer index) of each cross-attention layer, in adapter-file order.
SD15 = [("input", t) for t in range(6)] + [("output", t) for t in range(7, 16)] + [("middle", 6)]
SDXL = ([("input", 0)] * 2 + [("input", 1)] * 2 + [("input", 2)] * 10 + [("input", 3)] * 10
        + [("output", t) for t in (5, 6, 7) for _ in range(10)] + [("output", t) for t in (8, 9, 10) for _ in range(2)]
        + [("middle", 4)] * 10)


def by_block(layers, weights):
    out = {}
    for (_, t), w in zip(layers, weights):
        out.setdefault(t, w)
    return out


def test_sdxl_style_and_composition_blocks_are_the_instantstyle_ones():
    assert by_block(SDXL, layer_weights("style transfer", 0.8, SDXL, 11).weights) == {
        t: (0.8 if t == 6 else 0.0) for t in range(11)}
    assert by_block(SDXL, layer_weights("composition", 0.8, SDXL, 11).weights) == {
        t: (0.8 if t == 3 else 0.0) for t in range(11)}
    both = layer_weights("style and composition", 0.8, SDXL, 11, composition=0.3)
    assert by_block(SDXL, both.weights) == {t: {3: 0.3, 6: 0.8}.get(t, 0.0) for t in range(11)}


def test_sd15_maps():
    style = by_block(SD15, layer_weights("style transfer", 1.0, SD15, 16).weights)
    assert [t for t, w in style.items() if w] == [0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15]
    assert by_block(SD15, layer_weights("composition", 1.0, SD15, 16).weights) == {
        t: {4: 0.25, 5: 1.0}.get(t, 0.0) for t in range(16)}
    strong = by_block(SD15, layer_weights("strong style transfer", 1.0, SD15, 16).weights)
    assert [t for t, w in strong.items() if not w] == [4, 5]


def test_precise_types_swap_the_layout_blocks_or_all_others():
    style = layer_weights("style transfer precise", 1.0, SDXL, 11, composition=2.0)
    assert {t for (_, t), s in zip(SDXL, style.swapped) if s} == {3}
    assert by_block(SDXL, style.weights)[3] == 2.0
    comp = layer_weights("composition precise", 1.0, SDXL, 11, composition=1.0)
    assert {t for (_, t), s in zip(SDXL, comp.swapped) if s} == set(range(11)) - {3}
    assert by_block(SDXL, comp.weights) == {t: {3: 1.0, 6: 1.0}.get(t, 0.1) for t in range(11)}
    sd15 = layer_weights("composition precise", 1.0, SD15, 16)
    assert by_block(SD15, sd15.weights) == {t: {4: 0.25, 6: 0.1, 7: 0.1, 8: 0.1}.get(t, 1.0) for t in range(16)}


def test_curves_follow_the_transformer_index():
    ease_in = by_block(SD15, layer_weights("ease in", 2.0, SD15, 16).weights)
    assert ease_in[0] == pytest.approx(2.0) and ease_in[8] == pytest.approx(2.0 * (0.05 + 0.95 * 0.5))
    ease_out = by_block(SD15, layer_weights("ease out", 2.0, SD15, 16).weights)
    assert ease_out[0] == pytest.approx(0.1) and ease_out[15] == pytest.approx(2.0 * (0.05 + 0.95 * 15 / 16))
    in_out = by_block(SD15, layer_weights("ease in-out", 1.0, SD15, 16).weights)
    assert in_out[8] == pytest.approx(1.0) and in_out[0] == pytest.approx(0.05)
    weak = layer_weights("weak input", 1.0, SD15, 16).weights
    assert [w for (b, _), w in zip(SD15, weak) if b == "input"] == pytest.approx([0.2] * 6)
    assert {w for (b, _), w in zip(SD15, weak) if b != "input"} == {1.0}
    strong_middle = layer_weights("strong middle", 1.0, SD15, 16).weights
    assert {b for (b, _), w in zip(SD15, strong_middle) if w == 1.0} == {"middle"}


def test_block_maps_on_other_unets_name_the_problem():
    tiny = [("input", 0), ("output", 2), ("output", 3), ("middle", 1)]
    assert len(layer_weights("ease out", 1.0, tiny, 4).weights) == 4
    with pytest.raises(ValueError, match=r"'style transfer' addresses the attention blocks of SD1.5 \(16\) or SDXL "
                                         r"\(11\); this model has 4"):
        layer_weights("style transfer", 1.0, tiny, 4)
    with pytest.raises(ValueError, match="weight_type: 'sideways' is not one of"):
        layer_weights("sideways", 1.0, tiny, 4)
    assert len(WEIGHT_TYPES) == 16


def test_combine_modes():
    e = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]])
    assert torch.equal(combine_embeds(e, "concat"), e)
    assert torch.equal(combine_embeds(e, "add"), torch.tensor([[9.0, 9.0]]))
    assert torch.equal(combine_embeds(e, "average"), torch.tensor([[3.0, 3.0]]))
    assert torch.equal(combine_embeds(e, "subtract"), torch.tensor([[-3.0, -1.5]]))
    assert torch.equal(combine_embeds(e, "max"), torch.tensor([[5.0, 6.0]]))
    assert torch.equal(combine_embeds(e, "min"), torch.tensor([[1.0, 1.0]]))
    pair = torch.tensor([[3.0, 4.0], [0.0, 10.0]])  # norms 5 and 10: unit vectors averaged, times 7.5
    torch.testing.assert_close(combine_embeds(pair, "norm average"), torch.tensor([[0.3, 0.9]]) * 7.5)


@pytest.mark.parametrize("latent, tokens, grid", [((8, 8), 64, (8, 8)), ((8, 8), 16, (4, 4)), ((9, 13), 117, (9, 13)),
                                                  ((9, 13), 35, (5, 7)), ((9, 13), 12, (3, 4)), ((9, 13), 4, (2, 2)),
                                                  ((128, 96), 768, (32, 24))])
def test_mask_grid_matches_each_unet_level_at_any_aspect_ratio(latent, tokens, grid):
    masks = torch.zeros(2, 90, 130)
    masks[0, :, :65] = 1.0  # frame 0: the left half; frame 1: the right half
    masks[1, :, 65:] = 1.0
    rows = mask_grid(masks, tokens, latent)
    assert rows.shape == (2, tokens, 1)
    left, right = rows[0].reshape(grid)[:, : grid[1] // 2], rows[1].reshape(grid)[:, (grid[1] + 1) // 2:]
    assert torch.all(left > 0.4) and torch.all(right > 0.4)


def test_mask_grid_refuses_a_token_count_no_level_has():
    with pytest.raises(ValueError, match="no token grid of 50 positions fits a latent of 8x8"):
        mask_grid(torch.ones(1, 8, 8), 50, (8, 8))
