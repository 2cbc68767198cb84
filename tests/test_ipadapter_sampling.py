"""The IP-Adapter nodes inside the host's samplers: cond/uncond image tokens by conditioning, under every guider."""
from __future__ import annotations

import pytest
import torch

from support.attention_forms import forced_plan
from support.context_windows import context_window
from support.nodes import run_node
from tools.comfy_host import pack_module

pytestmark = pytest.mark.host

ADAPTER = "tiny_ip-adapter-plus_sd15.bin"
FILES = ("checkpoints/tiny_sd15.ckpt", f"ipadapter/{ADAPTER}", "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.pt")


@pytest.fixture(scope="module")
def patched(host, need_models):
    """(patched model, clip) with the node path a user takes: load adapter and CLIP vision, apply."""
    need_models(*FILES)
    model, clip, _ = host.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.ckpt")
    (clip_vision,) = host.CLIPVisionLoader().load_clip("CLIP-ViT-H-14-laion2B-s32B-b79K.pt")
    (adapter,) = run_node(host, "ImagePromptAdapterLoader", ipadapter_file=ADAPTER)
    image = torch.rand(1, 96, 128, 3, generator=torch.Generator().manual_seed(0))
    (result,) = run_node(host, "ImagePromptApply", model=model, ipadapter=adapter, clip_vision=clip_vision,
                         image=image, weight=1.0)
    return result, clip


def record_chunks(model):
    """Wrap the patch's chunk classifier; returns the list it appends (cond_or_uncond, uncond flags) to."""
    patch = next(iter(model.model_options["transformer_options"]["patches_replace"]["attn2"].values()))
    calls, classify = [], patch.uncond_chunks

    def recording(options):
        flags = classify(options)
        calls.append((tuple(options["cond_or_uncond"]), flags))
        return flags
    patch.uncond_chunks = recording
    return calls, lambda: setattr(patch, "uncond_chunks", classify)


def encode(host, clip, text):
    return host.CLIPTextEncode().encode(clip, text)[0]


def sample_with(guider, steps=2):
    import comfy.samplers
    sigmas = guider.model_patcher.get_model_object("model_sampling").sigma_max.reshape(1) * torch.tensor([1.0, 0.5, 0.0])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return guider.sample(noise, torch.zeros(1, 4, 8, 8), comfy.samplers.sampler_object("euler"), sigmas[: steps + 1],
                         seed=1)


def test_cfg_guider_gives_the_negative_chunk_the_uncond_tokens(host, patched):
    import comfy.samplers
    model, clip = patched
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(encode(host, clip, "a house"), encode(host, clip, "blurry"))
    guider.set_cfg(5.0)
    calls, restore = record_chunks(model)
    try:
        out = sample_with(guider)
    finally:
        restore()
    assert torch.isfinite(out).all() and calls
    for order, flags in calls:  # conds list of CFGGuider: 0 = positive, 1 = negative
        assert flags == tuple(index == 1 for index in order)


def test_dual_cfg_guider_gives_only_the_positive_chunk_the_cond_tokens(host, patched):
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG
    model, clip = patched
    guider = Guider_DualCFG(model)
    guider.set_conds(encode(host, clip, "a house"), encode(host, clip, "a building"), encode(host, clip, "blurry"))
    guider.set_cfg(5.0, 1.5)
    calls, restore = record_chunks(model)
    try:
        out = sample_with(guider)
    finally:
        restore()
    assert torch.isfinite(out).all()
    assert {len(order) for order, _ in calls} == {3}
    for order, flags in calls:  # conds list of DualCFGGuider: 0 = negative, 1 = middle, 2 = positive
        assert flags == tuple(index != 2 for index in order)


def test_ksampler_with_the_patched_model_changes_the_result_and_leaves_the_input_model_alone(host, patched, need_models):
    model, clip = patched
    plain = host.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.ckpt")[0]
    positive, negative = encode(host, clip, "a house"), encode(host, clip, "blurry")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    before = host.KSampler().sample(plain, 3, 2, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    steered = host.KSampler().sample(model, 3, 2, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    after = host.KSampler().sample(plain, 3, 2, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert not torch.equal(before, steered)
    assert torch.equal(before, after)


def test_wrong_clip_vision_is_named_before_sampling(host, patched, need_models):
    need_models("clip_vision/clip-vit-large-patch14-336.pt")
    model, _ = patched
    (adapter,) = run_node(host, "ImagePromptAdapterLoader", ipadapter_file=ADAPTER)
    (wrong,) = host.CLIPVisionLoader().load_clip("clip-vit-large-patch14-336.pt")
    with pytest.raises(ValueError, match=r"needs the CLIP vision ViT-H-14 \(CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors, "
                                         r"hidden width 1280, 224 px\); the connected CLIP vision is ViT-L-14-336"):
        run_node(host, "ImagePromptApply", model=model, ipadapter=adapter, clip_vision=wrong,
                 image=torch.rand(1, 64, 64, 3), weight=1.0)


def test_unified_loader_finds_the_preset_file_that_fits_the_model(host, patched, need_models):
    need_models("ipadapter/ip-adapter-plus_sd15.bin")  # named like the preset's file, made for the full UNet
    model = host.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.ckpt")[0]
    same, adapter, clip_vision = run_node(host, "ImagePromptUnifiedLoader", model=model, preset="PLUS")
    assert same is model
    assert adapter.file.name == ADAPTER and adapter.file.variant.name == "plus_sd15"
    assert clip_vision.encode_image(torch.rand(1, 32, 32, 3)).image_embeds.shape == (1, 1024)
    with pytest.raises(FileNotFoundError, match=r"preset 'COMPOSITION' on an SD15 model needs "
                                                r"ip_plus_composition_sd15.safetensors in .*ipadapter"):
        run_node(host, "ImagePromptUnifiedLoader", model=model, preset="COMPOSITION")


def test_advanced_node_combines_images_and_takes_a_negative_image(host, patched):
    model = host.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.ckpt")[0]
    (clip_vision,) = host.CLIPVisionLoader().load_clip("CLIP-ViT-H-14-laion2B-s32B-b79K.pt")
    (adapter,) = run_node(host, "ImagePromptAdapterLoader", ipadapter_file=ADAPTER)
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    common = dict(model=model, ipadapter=adapter, clip_vision=clip_vision, image=images, weight=1.0,
                  weight_type="linear", start_at=0.0, end_at=1.0, embeds_scaling="K+V", composition_weight=1.0)

    def spec(**inputs):
        (result,) = run_node(host, "ImagePromptApplyAdvanced", **common, **inputs)
        return next(iter(result.model_options["transformer_options"]["patches_replace"]["attn2"].values())).adapters[0]
    concat, average = spec(combine_embeds="concat"), spec(combine_embeds="average")
    assert concat.cond_tokens.shape[1] == 32 and average.cond_tokens.shape[1] == 16  # 16 tokens per image
    negative = spec(combine_embeds="average", image_negative=torch.zeros(1, 64, 64, 3))
    assert torch.equal(negative.cond_tokens, average.cond_tokens)
    assert not torch.equal(negative.uncond_tokens, average.uncond_tokens)
    assert average.kv_scaling == "K+V"


WINDOWS = ((0, 1, 2, 3), (2, 3, 4, 5), (4, 5, 6, 7))  # 8 frames, windows of 4 with a stride of 2


def run_in_windows(source: str):
    """A CALC_COND_BATCH wrapper that runs the UNet on WINDOWS of the frames, one after the other, as
    AnimateDiff-Evolved's context windows (``source`` "ad_params") or the host's (``source`` "context_window")
    do, with the window in the transformer options; later windows overwrite the frames they share."""
    def wrapper(executor, model, conds, x_in, timestep, model_options):
        outputs = [torch.zeros_like(x_in) for _ in conds]
        for frames in WINDOWS:
            window = ({"sub_idxs": list(frames), "full_length": x_in.shape[0]} if source == "ad_params"
                      else context_window(frames, total=x_in.shape[0]))
            options = {**model_options, "transformer_options": {**model_options["transformer_options"],
                                                                source: window}}
            index = torch.tensor(frames)
            for output, part in zip(outputs, executor(model, conds, x_in[index], timestep[index], options)):
                output[index] = part
        return outputs
    return wrapper


@pytest.mark.parametrize("source, form", [("context_window", "head products"), *(
    ("ad_params", form) for form in ("extra heads", "per adapter", "key-major products", "head products"))])
def test_an_unfolded_batch_keeps_each_frames_image_when_the_unet_runs_on_windows_of_the_frames(
        host, patched, monkeypatch, source, form):
    """8 latents with 3 images cycled (a weight per image) and 5 masks (the last held), run in overlapping
    windows of 4 frames, give what one pass over the whole batch gives: the UNet has no temporal layers, so a
    frame's prediction depends only on its latent, its image and its mask, whichever window computes it. In each
    form of the image attention (the GPU's too: forced here)."""
    import comfy.patcher_extension
    plan = forced_plan(pack_module("ipadapter_core.attention_forms"), form)
    monkeypatch.setattr(pack_module("ipadapter_core.attention"), "attention_plan", lambda *_: plan)
    _, clip = patched
    model = host.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.ckpt")[0]
    (clip_vision,) = host.CLIPVisionLoader().load_clip("CLIP-ViT-H-14-laion2B-s32B-b79K.pt")
    (adapter,) = run_node(host, "ImagePromptAdapterLoader", ipadapter_file=ADAPTER)
    images = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    masks = torch.rand(5, 16, 16, generator=torch.Generator().manual_seed(5)).round()
    (unfolded,) = run_node(host, "ImagePromptApplyAdvanced", model=model, ipadapter=adapter, clip_vision=clip_vision,
                           image=images, weight=[1.0, 0.4, 1.6], weight_type="linear", start_at=0.0, end_at=1.0,
                           combine_embeds="concat", embeds_scaling="V only", composition_weight=1.0,
                           unfold_batch=True, attn_mask=masks)
    windowed = unfolded.clone()
    windowed.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test_windows",
                                  run_in_windows(source))
    positive, negative = encode(host, clip, "a house"), encode(host, clip, "blurry")
    latent = {"samples": torch.zeros(8, 4, 8, 8)}
    whole, in_windows = (host.KSampler().sample(m, 5, 2, 5.0, "euler", "normal", positive, negative, latent)[0]
                         ["samples"] for m in (unfolded, windowed))
    torch.testing.assert_close(in_windows, whole, rtol=1e-4, atol=1e-4)


def host_context_windows(host) -> tuple[bool, ...]:
    """The causal_window_fix settings the host's Context Windows node takes: (True, False) where it has the option
    (0.28 and newer: each window after the first also gets the frame before it, first), () where the node cannot
    sample an image model (0.3.75 looks up the step among the sigmas of a video model's schedule and fails)."""
    inputs = {spec.id for spec in host.NODE_CLASS_MAPPINGS["ContextWindowsManual"].define_schema().inputs}
    return (True, False) if "causal_window_fix" in inputs else ()


@pytest.mark.parametrize("causal_fix", (True, False))
def test_an_unfolded_batch_under_the_hosts_context_windows_node_equals_one_pass(host, patched, causal_fix):
    """8 latents with one reference image, weight and mask each, sampled with the host's own Context Windows node
    (windows of 4 overlapping by 2) with its causal fix on and off, equal one pass over the whole batch: the patch
    gives each row of a window the image, weight and mask of the frame the host put there, the anchor included."""
    if causal_fix not in host_context_windows(host):
        pytest.skip("this host's Context Windows node has no causal_window_fix" if host_context_windows(host) else
                    "this host's Context Windows node cannot sample an image model")
    _, clip = patched
    model = host.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.ckpt")[0]
    (clip_vision,) = host.CLIPVisionLoader().load_clip("CLIP-ViT-H-14-laion2B-s32B-b79K.pt")
    (adapter,) = run_node(host, "ImagePromptAdapterLoader", ipadapter_file=ADAPTER)
    images = torch.rand(8, 64, 64, 3, generator=torch.Generator().manual_seed(6))
    masks = torch.rand(8, 16, 16, generator=torch.Generator().manual_seed(7)).round()
    (unfolded,) = run_node(host, "ImagePromptApplyAdvanced", model=model, ipadapter=adapter, clip_vision=clip_vision,
                           image=images, weight=[1.0, 0.4, 1.6, 0.8, 1.2, 0.6, 1.4, 1.0], weight_type="linear",
                           start_at=0.0, end_at=1.0, combine_embeds="concat", embeds_scaling="V only",
                           composition_weight=1.0, unfold_batch=True, attn_mask=masks)
    (windowed,) = run_node(host, "ContextWindowsManual", model=unfolded, context_length=4, context_overlap=2,
                           context_schedule="standard_static", context_stride=1, closed_loop=False,
                           fuse_method="pyramid", dim=0, freenoise=False, causal_window_fix=causal_fix)
    positive, negative = encode(host, clip, "a house"), encode(host, clip, "blurry")
    latent = {"samples": torch.zeros(8, 4, 8, 8)}
    whole, in_windows = (host.KSampler().sample(m, 5, 2, 5.0, "euler", "normal", positive, negative, latent)[0]
                         ["samples"] for m in (unfolded, windowed))
    plain = host.KSampler().sample(model, 5, 2, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert (whole - plain).abs().max() > 0.05  # the images move the result: frames given the wrong one would show
    torch.testing.assert_close(in_windows, whole, rtol=1e-3, atol=1e-3)


def test_window_frames_come_from_the_hosts_context_window_or_animatediff_evolved(host):
    window_frames = pack_module("nodes.patch.hooks").window_frames
    assert window_frames({"context_window": context_window([5, 6, 7, 0])}, 4) == (5, 6, 7, 0)
    assert window_frames({"ad_params": {"sub_idxs": [8, 9, 10], "full_length": 32}}, 3) == (8, 9, 10)
    assert window_frames({"ad_params": {"sub_idxs": None, "full_length": 32}}, 32) is None
    assert window_frames({}, 4) is None
    # a window along another dimension (video models' frames), or of another length than the chunk: none
    assert window_frames({"context_window": context_window([1, 2], dim=2)}, 2) is None
    assert window_frames({"context_window": context_window([0, 1, 2, 3])}, 8) is None
    # where the host slices an anchor frame before the window (causal_window_fix), its rows come first
    anchored = context_window([4, 5, 6, 7], total=8)
    anchored.causal_anchor_index = 3
    expected = (3, 4, 5, 6, 7) if len(anchored.get_tensor(torch.arange(8))) == 5 else (4, 5, 6, 7)
    assert window_frames({"context_window": anchored}, len(expected)) == expected
