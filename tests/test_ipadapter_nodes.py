"""The IP-Adapter nodes beyond Apply, run in the real host on tiny factory models: encode and EMBEDS files,
FaceID, regions, tiles, frame weights, and the FaceID unified loader."""
from __future__ import annotations

import os

import pytest
import torch

from support.images import random_image
from support.nodes import adapters_of, run_node
from support.pickles import Canary, write_pickle

pytestmark = pytest.mark.host

PLUS = "tiny_ip-adapter-plus_sd15.bin"
VIT_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.pt"
FILES = ("checkpoints/tiny_sd15.ckpt", f"ipadapter/{PLUS}", f"clip_vision/{VIT_H}",
         "ipadapter/tiny_ip-adapter-faceid_sd15.bin", "ipadapter/tiny_ip-adapter-faceid-plusv2_sd15.bin",
         "clip_vision/CLIP-ViT-bigG-14-laion2B-39B-b160k.pt")


@pytest.fixture(scope="module")
def parts(host, need_models):
    need_models(*FILES)
    model = host.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.ckpt")[0]
    (clip_vision,) = host.CLIPVisionLoader().load_clip(VIT_H)
    (adapter,) = run_node(host, "ImagePromptAdapterLoader", ipadapter_file=PLUS)
    return model, clip_vision, adapter


def forward(model, seed=0):
    """One UNet call on a fixed [uncond; cond] batch, through the model's patches."""
    g = torch.Generator().manual_seed(seed)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    options = dict(model.model_options["transformer_options"], cond_or_uncond=[1, 0], sigmas=torch.tensor([1.0]))
    return model.model.diffusion_model(x, timesteps=torch.tensor([421.0, 421.0]), context=context,
                                       transformer_options=options)


def test_encode_then_apply_embeds_equals_apply_with_the_image(host, parts):
    model, clip_vision, adapter = parts
    reference = random_image(1)
    pos, neg = run_node(host, "ImagePromptEncode", ipadapter=adapter, image=reference, weight=1.0,
                        crop_position="center", interpolation="bicubic", sharpening=0.0, clip_vision=clip_vision)
    assert pos.shape == (1, 257, 1280) and neg.shape == pos.shape
    (from_embeds,) = run_node(host, "ImagePromptApplyEmbeds", model=model, ipadapter=adapter, pos_embeds=pos,
                              neg_embeds=neg, weight=0.8, weight_type="linear", start_at=0.0, end_at=1.0,
                              embeds_scaling="V only")
    (from_image,) = run_node(host, "ImagePromptApply", model=model, ipadapter=adapter, clip_vision=clip_vision,
                             image=reference, weight=0.8)
    plain = forward(model)
    ours = forward(from_embeds)
    assert (ours - plain).abs().max() > 1e-3
    torch.testing.assert_close(ours, forward(from_image), rtol=0, atol=1e-4)


def test_half_precision_images_and_masks_work_as_their_float_values(host, parts):
    """Newer hosts can keep IMAGE and MASK in float16 (--fp16-intermediates); the CPU has no half
    antialiased resampling, and torch.lerp refuses mixed dtypes."""
    model, clip_vision, adapter = parts
    wide = random_image(20, 96, 160).half()
    mask = torch.rand(1, 96, 160, generator=torch.Generator().manual_seed(21)).half()
    common = dict(ipadapter=adapter, weight=1.0, crop_position="pad", interpolation="bicubic", sharpening=0.2,
                  clip_vision=clip_vision)
    half = run_node(host, "ImagePromptEncode", image=wide, mask=mask, image_negative=wide, **common)
    full = run_node(host, "ImagePromptEncode", image=wide.float(), mask=mask.float(), image_negative=wide.float(),
                    **common)
    for ours, reference in zip(half, full):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, reference)
    (prepared,) = run_node(host, "ImagePromptPrepImage", image=wide, interpolation="bilinear", crop_position="center",
                           sharpening=0.0)
    assert prepared.dtype == torch.float32 and prepared.shape == (1, 224, 224, 3)
    (patched,) = run_node(host, "ImagePromptClipVisionEnhancer", model=model, ipadapter=adapter, image=wide, weight=1.0,
                          weight_type="linear", start_at=0.0, end_at=1.0, combine_embeds="concat",
                          embeds_scaling="V only", composition_weight=1.0, enhance_tiles=2, enhance_ratio=1.0,
                          clip_vision=clip_vision, attn_mask=mask)
    assert adapters_of(patched)[0].cond_tokens.shape == (1, 32, 768)


def test_embeds_of_the_wrong_encoder_are_refused_with_what_is_expected(host, parts):
    model, _, adapter = parts
    with pytest.raises(ValueError, match=r"embeds: tiny_ip-adapter-plus_sd15.bin \(plus_sd15\) takes penultimate "
                                         r"hidden states \[n, tokens, 1280\] of the CLIP vision ViT-H-14; got a tensor "
                                         r"of shape \(1, 1024\)"):
        run_node(host, "ImagePromptApplyEmbeds", model=model, ipadapter=adapter, pos_embeds=torch.zeros(1, 1024),
                 weight=1.0, weight_type="linear", start_at=0.0, end_at=1.0, embeds_scaling="V only")


def test_encode_with_the_wrong_clip_vision_names_the_one_needed(host, parts):
    _, _, adapter = parts
    (big_g,) = host.CLIPVisionLoader().load_clip("CLIP-ViT-bigG-14-laion2B-39B-b160k.pt")
    with pytest.raises(ValueError, match=r"needs the CLIP vision ViT-H-14 \(CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
                                         r".*the connected CLIP vision is ViT-bigG-14"):
        run_node(host, "ImagePromptEncode", ipadapter=adapter, image=random_image(2), weight=1.0, crop_position="pad",
                 interpolation="bilinear", sharpening=0.0, clip_vision=big_g)


def test_encode_mask_hides_the_rest_of_the_reference(host, parts):
    _, clip_vision, adapter = parts
    left, right = random_image(3), random_image(4)
    both = torch.cat([left[:, :, :112], right[:, :, 112:]], dim=2)
    mask = torch.zeros(1, 224, 224)
    mask[:, :, :112] = 1
    common = dict(ipadapter=adapter, weight=1.0, crop_position="center", interpolation="bicubic", sharpening=0.0,
                  clip_vision=clip_vision)
    masked = run_node(host, "ImagePromptEncode", image=both, mask=mask, **common)[0]
    other = torch.cat([left[:, :, :112], random_image(5)[:, :, 112:]], dim=2)
    torch.testing.assert_close(run_node(host, "ImagePromptEncode", image=other, mask=mask, **common)[0], masked)
    assert not torch.allclose(run_node(host, "ImagePromptEncode", image=both, **common)[0], masked)


def test_saved_embeds_load_back_and_names_cannot_leave_the_folders(host, parts, tmp_path):
    import folder_paths
    embeds = torch.randn(2, 257, 1280)
    run_node(host, "ImagePromptSaveEmbeds", embeds=embeds, filename_prefix="tests/saved")
    out_dir = os.path.join(folder_paths.get_output_directory(), "tests")
    name = sorted(f for f in os.listdir(out_dir) if f.startswith("saved_"))[-1]
    target = os.path.join(folder_paths.get_input_directory(), name)
    os.makedirs(folder_paths.get_input_directory(), exist_ok=True)
    os.replace(os.path.join(out_dir, name), target)
    node = host.NODE_CLASS_MAPPINGS["ImagePromptLoadEmbeds"]
    assert node.validate_inputs(embeds=name) is True
    assert torch.equal(run_node(host, "ImagePromptLoadEmbeds", embeds=name)[0], embeds)
    for bad in ("../escape", "/etc/passwd", "a/../../escape"):
        with pytest.raises(ValueError, match="filename_prefix: .* is outside the output folder"):
            run_node(host, "ImagePromptSaveEmbeds", embeds=embeds, filename_prefix=bad)
        assert "outside the input folder" in node.validate_inputs(embeds=bad)
    os.remove(target)


def test_save_embeds_numbers_its_files_like_the_hosts_save_image(host, parts):
    """A second save never overwrites the first: name_00001_.safetensors, then name_00002_ (Save Image's form)."""
    import folder_paths
    out_dir = os.path.join(folder_paths.get_output_directory(), "numbered")
    for seed in (1, 2, 3):
        run_node(host, "ImagePromptSaveEmbeds",
                 embeds=torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(seed)),
                 filename_prefix="numbered/kept")
    assert sorted(os.listdir(out_dir)) == [f"kept_0000{i}_.safetensors" for i in (1, 2, 3)]
    images = host.SaveImage().save_images(torch.zeros(1, 4, 4, 3), filename_prefix="numbered/kept")
    assert images["ui"]["images"][0]["filename"] == "kept_00004_.png"  # one counter with the host's images


def test_a_pickle_with_code_in_an_embeds_file_runs_nothing(host, parts, tmp_path):
    import folder_paths
    canary = tmp_path / "canary"
    name = "crafted.ipadpt"
    path = os.path.join(folder_paths.get_input_directory(), name)
    write_pickle(path, {"embeds": Canary(canary)})
    try:
        with pytest.raises(ValueError, match=r"embeds: crafted.ipadpt: refused for safety: reading it would run io.open"):
            run_node(host, "ImagePromptLoadEmbeds", embeds=name)
    finally:
        os.remove(path)
    assert not canary.exists()


def test_combine_embeds_merges_and_refuses_other_encoders(host):
    a, b = torch.randn(1, 1024), torch.randn(2, 1024)
    (merged,) = run_node(host, "ImagePromptCombineEmbeds", embed1=a, method="average", embed2=b)
    torch.testing.assert_close(merged, torch.cat([a, b]).mean(0, keepdim=True))
    (kept,) = run_node(host, "ImagePromptCombineEmbeds", embed1=a, method="concat", embed3=b)
    assert kept.shape == (3, 1024)
    with pytest.raises(ValueError, match="same encoder"):
        run_node(host, "ImagePromptCombineEmbeds", embed1=a, method="add", embed2=torch.randn(1, 1280))


def test_faceid_from_an_embedding_and_what_happens_without_a_face(host, parts):
    model, _, _ = parts
    (faceid,) = run_node(host, "ImagePromptAdapterLoader", ipadapter_file="tiny_ip-adapter-faceid_sd15.bin")
    common = dict(model=model, ipadapter=faceid, image=random_image(6), weight=1.0, weight_faceidv2=1.0,
                  weight_type="linear", combine_embeds="concat", start_at=0.0, end_at=1.0, embeds_scaling="V only")
    face = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(7)), dim=-1)
    patched, face_image = run_node(host, "ImagePromptFaceID", on_no_face="error", face_embeds=face, **common)
    assert face_image.shape == (1, 224, 224, 3)
    assert adapters_of(patched)[0].cond_tokens.shape == (1, 4, 768)
    assert (forward(patched) - forward(model)).abs().max() > 1e-3
    skipped, _ = run_node(host, "ImagePromptFaceID", on_no_face="skip", face_embeds=torch.zeros(0, 512), **common)
    assert skipped is model
    with pytest.raises(ValueError, match="image: no face found"):
        run_node(host, "ImagePromptFaceID", on_no_face="error", face_embeds=torch.zeros(0, 512), **common)
    with pytest.raises(ValueError, match="insightface: connect Load InsightFace, or give face_embeds"):
        run_node(host, "ImagePromptFaceID", on_no_face="error", **common)
    with pytest.raises(ValueError, match="is not a FaceID adapter"):
        run_node(host, "ImagePromptFaceID", on_no_face="error", face_embeds=face, **{**common, "ipadapter": parts[2]})


def test_unfold_batch_on_faceid_and_tiled_gives_frame_i_its_own_reference(host, parts):
    """Each node with unfold_batch: frame i's tokens are those the node gives image i alone. (Style &
    Composition needs the full block layout: test_migrate runs its batch node on it.)"""
    model, clip_vision, adapter = parts
    (faceid,) = run_node(host, "ImagePromptAdapterLoader", ipadapter_file="tiny_ip-adapter-faceid_sd15.bin")
    faces = torch.nn.functional.normalize(torch.randn(2, 512, generator=torch.Generator().manual_seed(9)), dim=-1)
    face = dict(model=model, ipadapter=faceid, image=random_image(6), weight=1.0, weight_faceidv2=1.0,
                weight_type="linear", combine_embeds="concat", start_at=0.0, end_at=1.0, embeds_scaling="V only",
                on_no_face="error")
    tiled = dict(model=model, ipadapter=adapter, weight=1.0, weight_type="linear", combine_embeds="concat",
                 start_at=0.0, end_at=1.0, sharpening=0.0, embeds_scaling="V only", clip_vision=clip_vision)
    references = [random_image(20 + i, 64, 128) for i in range(2)]
    cases = [("ImagePromptFaceID", face, "face_embeds", list(faces[:, None])),
             ("ImagePromptTiled", tiled, "image", references)]
    for node, common, name, frames in cases:
        unfolded = adapters_of(run_node(host, node, unfold_batch=True, **common, **{name: torch.cat(frames)})[0])
        alone = [adapters_of(run_node(host, node, **common, **{name: frame})[0]) for frame in frames]
        assert len(unfolded) == len(alone[0]), node
        for index, spec in enumerate(unfolded):  # one spec per tile for Tiled
            expected = torch.cat([specs[index].cond_tokens for specs in alone])
            assert spec.cond_tokens.shape[0] == 2, node
            torch.testing.assert_close(spec.cond_tokens, expected, rtol=1e-5, atol=1e-5)


def test_faceid_plus_v2_encodes_the_face_with_clip_and_weighs_the_shortcut(host, parts):
    model, clip_vision, _ = parts
    (plus,) = run_node(host, "ImagePromptAdapterLoader", ipadapter_file="tiny_ip-adapter-faceid-plusv2_sd15.bin")
    face = torch.randn(1, 512, generator=torch.Generator().manual_seed(8))
    common = dict(model=model, ipadapter=plus, image=random_image(9), weight=1.0, weight_type="linear",
                  combine_embeds="concat", start_at=0.0, end_at=1.0, embeds_scaling="V only", on_no_face="error",
                  face_embeds=face, clip_vision=clip_vision)
    low = adapters_of(run_node(host, "ImagePromptFaceID", weight_faceidv2=0.0, **common)[0])[0].cond_tokens
    high = adapters_of(run_node(host, "ImagePromptFaceID", weight_faceidv2=2.0, **common)[0])[0].cond_tokens
    assert low.shape == (1, 4, 768) and (high - low).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"clip_vision: tiny_ip-adapter-faceid-plusv2_sd15.bin needs the CLIP vision "
                                         r"ViT-H-14"):
        run_node(host, "ImagePromptFaceID", weight_faceidv2=1.0, **{**common, "clip_vision": None})


def test_faceid_unified_loader_finds_the_file_and_clip_vision_of_the_preset(host, parts):
    model = parts[0]
    out_model, adapter, clip_vision = run_node(host, "ImagePromptUnifiedLoaderFaceID", model=model,
                                               preset="FACEID PLUS V2", lora_strength=0.6, provider="CPU")
    assert adapter.file.variant.name == "faceid-plusv2_sd15" and clip_vision is not None
    assert out_model is model  # no LoRA file in models/loras: the model passes unchanged
    with pytest.raises(ValueError, match="'FACEID PORTRAIT UNNORM - SDXL only' has no SD15 IP-Adapter"):
        run_node(host, "ImagePromptUnifiedLoaderFaceID", model=model, preset="FACEID PORTRAIT UNNORM - SDXL only",
                 lora_strength=0.6, provider="CPU")


def test_regions_patch_each_reference_on_its_mask_and_mask_the_prompts(host, parts):
    model, clip_vision, adapter = parts
    left = torch.zeros(1, 64, 64)
    left[:, :, :32] = 1
    text = [[torch.zeros(1, 77, 768), {}]]
    common = dict(prompt_weight=0.7, weight_type="linear", start_at=0.0, end_at=1.0)
    first, positive, _ = run_node(host, "ImagePromptRegion", image=random_image(10), image_weight=0.9, mask=left,
                                  positive=text, **common)
    second, _, _ = run_node(host, "ImagePromptRegion", image=random_image(11), image_weight=0.5, mask=1 - left,
                            **common)
    assert positive[0][1]["mask_strength"] == 0.7 and torch.equal(positive[0][1]["mask"], left)
    (params,) = run_node(host, "ImagePromptCombineRegions", params_1=first, params_2=second)
    (patched,) = run_node(host, "ImagePromptApplyRegions", model=model, ipadapter=adapter, ipadapter_params=params,
                          combine_embeds="concat", embeds_scaling="V only", clip_vision=clip_vision)
    specs = adapters_of(patched)
    assert [s.layer_weights[0] for s in specs] == [0.9, 0.5]
    assert torch.equal(specs[0].mask, left) and torch.equal(specs[1].mask, 1 - left)


def test_tiled_reference_gives_each_tile_its_share_of_the_image(host, parts):
    model, clip_vision, adapter = parts
    patched, tiles, masks = run_node(host, "ImagePromptTiled", model=model, ipadapter=adapter,
                                     image=random_image(12, 100, 300), weight=1.0, weight_type="linear",
                                     combine_embeds="concat", start_at=0.0, end_at=1.0, sharpening=0.0,
                                     embeds_scaling="V only", clip_vision=clip_vision)
    assert tiles.shape == (3, 224, 224, 3) and masks.shape == (3, 100, 300)
    specs = adapters_of(patched)
    assert len(specs) == 3 and [torch.equal(s.mask, m[None]) for s, m in zip(specs, masks)] == [True] * 3
    # a mask per frame, at another size: each tile's mask on each frame
    frames = torch.stack([torch.ones(50, 150), torch.full((50, 150), 0.5)])
    patched, _, masks = run_node(host, "ImagePromptTiled", model=model, ipadapter=adapter,
                                 image=random_image(12, 100, 300), weight=1.0, weight_type="linear",
                                 combine_embeds="concat", start_at=0.0, end_at=1.0, sharpening=0.0,
                                 embeds_scaling="V only", clip_vision=clip_vision, attn_mask=frames)
    for spec, tile in zip(adapters_of(patched), masks):
        assert spec.mask.shape == (2, 100, 300)
        assert torch.equal(spec.mask[0], tile) and torch.allclose(spec.mask[1], 0.5 * tile)


def test_block_maps_need_a_known_layout_and_say_so(host, parts):
    model, clip_vision, adapter = parts
    with pytest.raises(ValueError, match=r"weight_type: 'style transfer' addresses the attention blocks of SD1.5 \(16\) "
                                         r"or SDXL \(11\); this model has 4"):
        run_node(host, "ImagePromptStyleComposition", model=model, ipadapter=adapter, image_style=random_image(13),
                 image_composition=random_image(14), weight_style=1.0, weight_composition=1.0, expand_style=False,
                 combine_embeds="concat", start_at=0.0, end_at=1.0, embeds_scaling="V only", clip_vision=clip_vision)


def test_unfold_batch_through_the_advanced_node_gives_one_image_per_latent(host, parts):
    model, clip_vision, adapter = parts
    (patched,) = run_node(host, "ImagePromptApplyAdvanced", model=model, ipadapter=adapter,
                          image=torch.cat([random_image(15), random_image(16), random_image(17)]),
                          weight=[1.0, 0.5, 0.0], weight_type="linear", start_at=0.0, end_at=1.0,
                          combine_embeds="concat", embeds_scaling="V only", composition_weight=1.0, unfold_batch=True,
                          clip_vision=clip_vision)
    (spec,) = adapters_of(patched)
    assert spec.cond_tokens.shape == (3, 16, 768) and spec.image_weights == (1.0, 0.5, 0.0)


def test_frame_weights_make_one_transition_per_image(host):
    frames_of = torch.arange(2.0).reshape(2, 1, 1, 1).expand(2, 2, 2, 3)  # image i is all i
    common = dict(weights="1.0, 0.0", timing="linear", frames=5, start_frame=0, end_frame=9999, image=frames_of)
    weights, invert, total, first, second, _ = run_node(host, "ImagePromptFrameWeights", add_starting_frames=1,
                                                        add_ending_frames=0, method="full batch", **common)
    ramp = [1.0, 0.75, 0.5, 0.25, 0.0]
    assert weights == pytest.approx([1.0] + ramp * 2) and total == 11 and invert == weights[::-1]
    assert first[:, 0, 0, 0].tolist() == [0.0] * 6 + [1.0] * 5 and second is None
    weights, _, _, first, second, _ = run_node(host, "ImagePromptFrameWeights", add_starting_frames=0,
                                               add_ending_frames=0, method="shift batches", **common)
    assert weights == pytest.approx(ramp)  # image 0 fades out while image 1 comes in
    assert first[:, 0, 0, 0].tolist() == [0.0] * 5 and second[:, 0, 0, 0].tolist() == [1.0] * 5
    held, *_ = run_node(host, "ImagePromptFrameWeights", weights="0.2, 0.8", timing="ease_in_out", frames=6,
                        start_frame=2, end_frame=4, add_starting_frames=0, add_ending_frames=0, method="full batch")
    assert held == pytest.approx([0.2, 0.2, 0.2, 0.8, 0.8, 0.8])  # first value before the span, last after
    with pytest.raises(ValueError, match="weights: expected numbers"):
        run_node(host, "ImagePromptFrameWeights", weights="1, x", timing="custom", frames=0, start_frame=0, end_frame=9,
                 add_starting_frames=0, add_ending_frames=0, method="full batch")


def test_a_weights_strategy_lays_the_same_schedule_over_other_images_and_writes_its_prompts(host):
    settings = dict(weights="0.0, 1.0", timing="ease_in", frames=3, start_frame=0, end_frame=9999,
                    add_starting_frames=2, add_ending_frames=0, method="shift batches")
    two, four = (torch.rand(n, 8, 8, 3, generator=torch.Generator().manual_seed(n)) for n in (2, 4))
    *_, strategy = run_node(host, "ImagePromptFrameWeights", image=two, **settings)
    from_strategy = run_node(host, "ImagePromptFrameWeightsFromStrategy", weights_strategy=strategy, image=four)
    direct = run_node(host, "ImagePromptFrameWeights", image=four, **settings)
    assert from_strategy[:3] == direct[:3] and from_strategy[5] is strategy
    assert all(torch.equal(a, b) for a, b in zip(from_strategy[3:5], direct[3:5]))
    # two images, 3 frames a transition after 2 starting frames: the prompts start at 0, 2 and 5
    (text,) = run_node(host, "ImagePromptScheduleFromStrategy", weights_strategy=strategy, prompt="dawn\ndusk")
    assert text == '"0": "dawn",\n"2": "dawn",\n"5": "dusk",\n'


def test_combine_weights_joins_weights_and_lists(host):
    assert run_node(host, "ImagePromptCombineWeights", weights_1=[1.0, 0.5], weights_2=0.25) == ([1.0, 0.5, 0.25], 3)
    assert run_node(host, "ImagePromptCombineWeights", weights_1=0.3, weights_2=[0.0, 1.0]) == ([0.3, 0.0, 1.0], 3)
