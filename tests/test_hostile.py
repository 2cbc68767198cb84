"""Hostile and broken inputs through one headless server: each gets a clear error naming the input and
what was expected (or, where the input is legitimate, a result), no code from a file ever runs, and the
same server then runs a good prompt."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from bench.soak import base_prompt
from support.pickles import Canary, write_pickle
from tools import comfy_host

pytestmark = pytest.mark.server

PLUS = "tiny_ip-adapter-plus_sd15.bin"
VIT_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.pt"
BIG_G = "CLIP-ViT-bigG-14-laion2B-39B-b160k.pt"
FACTORY_FILES = ("checkpoints/tiny_sd15.ckpt", "checkpoints/tiny_sd15_ip2p.ckpt", f"ipadapter/{PLUS}",
                 "ipadapter/tiny_ip-adapter_sd15.bin", "ipadapter/tiny_ip-adapter-faceid_sd15.bin",
                 "ipadapter/ip-adapter_sdxl.bin", "ipadapter/ip-adapter_sd15.bin", f"clip_vision/{VIT_H}",
                 f"clip_vision/{BIG_G}")


def write_bad_files(models: Path, inputs: Path, canary: Path) -> None:
    adapters = models / "ipadapter"
    real = (adapters / PLUS).read_bytes()
    (adapters / "empty.bin").write_bytes(b"")
    (adapters / "truncated.bin").write_bytes(real[: len(real) // 3])
    (adapters / "text.safetensors").write_text("this is not a model\n")
    (adapters / "text.bin").write_text('{"image_proj": {}}')
    good = torch.load(adapters / PLUS, weights_only=True)
    flat = {f"{g}.{k}": v.clone() for g, sd in good.items() for k, v in sd.items()}
    save_file(flat, str(adapters / "full.safetensors"))
    (adapters / "truncated.safetensors").write_bytes((adapters / "full.safetensors").read_bytes()[:5000])
    (adapters / "full.safetensors").unlink()
    save_file({"model.diffusion_model.out.weight": torch.zeros(4, 4)}, str(adapters / "checkpoint_like.safetensors"))
    torch.save({"image_proj": {"latents": "not a tensor"}, "ip_adapter": {"1.to_k_ip.weight": 3}},
               adapters / "not_tensors.bin")
    for name in ("crafted.bin", "crafted.pt"):
        write_pickle(adapters / name, {"image_proj": Canary(canary), "ip_adapter": {}})
    inputs.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(inputs / "one_pixel.png")
    Image.new("L", (96, 64), 128).save(inputs / "grey.png")
    Image.new("RGBA", (80, 120), (10, 200, 30, 100)).save(inputs / "rgba.png")
    Image.new("RGB", (4096, 4096), (90, 90, 200)).save(inputs / "huge.png")
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(inputs / "ref.png")
    hidden = torch.randn(1, 257, 1280)
    save_file({"embeds": hidden.clone().index_fill_(1, torch.tensor([3]), float("nan"))}, str(inputs / "nan.safetensors"))
    save_file({"embeds": hidden.clone().index_fill_(1, torch.tensor([3]), float("inf"))}, str(inputs / "inf.safetensors"))
    save_file({"embeds": torch.randn(1, 1024)}, str(inputs / "pooled.safetensors"))
    save_file({"something": hidden}, str(inputs / "wrong_key.safetensors"))
    write_pickle(inputs / "crafted.ipadpt", Canary(canary))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, need_models):
    """(server, canary path): a server whose models folder holds factory files and broken ones."""
    source = need_models(*FACTORY_FILES)
    root = tmp_path_factory.mktemp("hostile")
    models = root / "models"
    for name in FACTORY_FILES:
        (models / name).parent.mkdir(parents=True, exist_ok=True)
        (models / name).symlink_to(source / name)
    (models / "ipadapter" / PLUS).unlink()
    (models / "ipadapter" / PLUS).write_bytes((source / "ipadapter" / PLUS).read_bytes())
    canary = root / "canary"
    server = comfy_host.HostServer(root / "base", models_dir=models)
    write_bad_files(models, server.base_dir / "input", canary)
    with server:
        yield server, canary
    assert not canary.exists(), "a pickled payload ran"


def good_prompt() -> dict:
    """The soak's base graph (tiny SD1.5, IP-Adapter Plus through the Advanced node, 64 px, one step)."""
    prompt = base_prompt()
    prompt["4"]["inputs"]["image"] = "ref.png"
    return prompt


def set_input(node: str, **values):
    def change(prompt):
        prompt[node]["inputs"].update(values)
    return change


def use_embeds(file: str, **extra):
    """Node 5 becomes Apply IP-Adapter Embeds fed by Load Embeds of ``file``."""
    def change(prompt):
        prompt["12"] = {"class_type": "ImagePromptLoadEmbeds", "inputs": {"embeds": file}}
        prompt["5"] = {"class_type": "ImagePromptApplyEmbeds", "inputs": {
            "model": ["1", 0], "ipadapter": ["2", 0], "pos_embeds": ["12", 0], "weight": 1.0,
            "weight_type": "linear", "start_at": 0.0, "end_at": 1.0, "embeds_scaling": "V only",
            "unfold_batch": False, **extra}}
    return change


def replace_apply(class_type: str, **inputs):
    def change(prompt):
        prompt["5"] = {"class_type": class_type, "inputs": {"model": ["1", 0], "ipadapter": ["2", 0], **inputs}}
    return change


def enhance(tiles: int, ratio: float = 1.0):
    """Node 5, the Advanced node, becomes the CLIP-vision enhancer with the same inputs."""
    def change(prompt):
        prompt["5"]["class_type"] = "ImagePromptClipVisionEnhancer"
        prompt["5"]["inputs"].update(enhance_tiles=tiles, enhance_ratio=ratio)
    return change


def add_node(node: str, class_type: str, then=None, **inputs):
    def change(prompt):
        prompt[node] = {"class_type": class_type, "inputs": inputs}
        if then:
            then(prompt)
    return change


def only_embeds_saved(prompt):
    """Drop the graph's Save Image, so that a branch ending in Save Embeds is the prompt's only output (a branch that
    fails validation beside a valid one is left out and the rest runs: the host's rule for every invalid input)."""
    for node_id in [i for i, node in prompt.items() if node["class_type"] == "SaveImage"]:
        del prompt[node_id]


def chain(*changes):
    def change(prompt):
        for c in changes:
            c(prompt)
    return change


FACE = dict(image=["4", 0], weight=1.0, weight_faceidv2=1.0, weight_type="linear", combine_embeds="concat",
            start_at=0.0, end_at=1.0, embeds_scaling="V only", on_no_face="error")
EMBEDS_OK = dict(clip_vision=["3", 0])

# (case id, change to the good prompt, expected: ("rejected" | "failed", text in the error) or ("ok", None))
CASES = [
    ("empty adapter file", set_input("2", ipadapter_file="empty.bin"), ("failed", "empty.bin: the file is empty")),
    ("truncated .bin", set_input("2", ipadapter_file="truncated.bin"),
     ("failed", "truncated.bin: not a readable weights-only torch file")),
    ("truncated .safetensors", set_input("2", ipadapter_file="truncated.safetensors"),
     ("failed", "truncated.safetensors: not a readable safetensors file")),
    ("text as .safetensors", set_input("2", ipadapter_file="text.safetensors"),
     ("failed", "text.safetensors: not a readable safetensors file")),
    ("text as .bin", set_input("2", ipadapter_file="text.bin"), ("failed", "text.bin: not a readable weights-only")),
    ("a checkpoint, not an adapter", set_input("2", ipadapter_file="checkpoint_like.safetensors"),
     ("failed", "not an IP-Adapter file: expected the groups image_proj and ip_adapter")),
    ("groups of non-tensors", set_input("2", ipadapter_file="not_tensors.bin"),
     ("failed", "not_tensors.bin: image_proj.latents is not a tensor")),
    ("crafted pickle .bin", set_input("2", ipadapter_file="crafted.bin"),
     ("failed", "crafted.bin: refused for safety: reading it would run io.open")),
    ("crafted pickle .pt", set_input("2", ipadapter_file="crafted.pt"),
     ("failed", "crafted.pt: refused for safety: reading it would run io.open")),
    ("missing adapter file", set_input("2", ipadapter_file="nowhere.bin"),
     ("rejected", "ipadapter_file: 'nowhere.bin' is not in the ipadapter model folders")),
    ("missing clip vision file", set_input("3", clip_name="nowhere.safetensors"), ("rejected", "nowhere.safetensors")),
    ("SDXL adapter on an SD1.5 model", set_input("2", ipadapter_file="ip-adapter_sdxl.bin"),
     ("failed", "ip-adapter_sdxl.bin is a SDXL IP-Adapter (70 cross-attention layers, context width 2048) but the "
                "model is an SD1.5 UNet")),
    ("full SD1.5 adapter on a 4-layer UNet", set_input("2", ipadapter_file="ip-adapter_sd15.bin"),
     ("failed", "ip-adapter_sd15.bin is a SD15 IP-Adapter (16 cross-attention layers")),
    ("wrong CLIP vision", set_input("3", clip_name=BIG_G),
     ("failed", "needs the CLIP vision ViT-H-14 (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")),
    ("no CLIP vision at all", lambda p: p["5"]["inputs"].pop("clip_vision"),
     ("failed", "clip_vision: tiny_ip-adapter-plus_sd15.bin needs the CLIP vision ViT-H-14")),
    ("1x1 image", set_input("4", image="one_pixel.png"), ("failed", "image: expected an IMAGE batch [B, H, W, 3] of "
                                                                    "at least 2x2 pixels, got shape (1, 1, 1, 3)")),
    ("grey image", set_input("4", image="grey.png"), ("ok", None)),
    ("RGBA image", set_input("4", image="rgba.png"), ("ok", None)),
    ("4096x4096 image", set_input("4", image="huge.png"), ("ok", None)),
    ("more images than latents, unfolded",
     chain(add_node("13", "ImageBatch", image1=["4", 0], image2=["4", 0]),
           set_input("5", image=["13", 0], unfold_batch=True)), ("ok", None)),
    ("missing image file", set_input("4", image="nowhere.png"), ("rejected", "nowhere.png")),
    ("enhancer grid finer than the image", chain(
        add_node("13", "ImageScale", image=["4", 0], upscale_method="nearest-exact", width=20, height=20,
                 crop="disabled"), set_input("5", image=["13", 0]), enhance(16)),
     ("failed", "enhance_tiles: 16 tiles per side of a 20x20 image are under 2 pixels")),
    ("enhancer grid above its maximum", enhance(17), ("rejected", "bigger than max of 16")),
    ("enhancer on a 4096x4096 image", chain(set_input("4", image="huge.png"), enhance(3, 0.4)), ("ok", None)),
    ("mask batch of two (a mask per frame)", chain(add_node("15", "RepeatImageBatch", image=["4", 0], amount=2),
                                                   add_node("16", "ImageToMask", image=["15", 0], channel="red"),
                                                   set_input("5", attn_mask=["16", 0])), ("ok", None)),
    ("mask of another size", chain(add_node("13", "SolidMask", value=1.0, width=37, height=91),
                                   set_input("5", attn_mask=["13", 0])), ("ok", None)),
    ("NaN embeds", use_embeds("nan.safetensors"), ("failed", "NaN or inf image tokens")),
    ("inf embeds", use_embeds("inf.safetensors"), ("failed", "NaN or inf image tokens")),
    ("pooled embeds for a hidden-state adapter", use_embeds("pooled.safetensors"),
     ("failed", "takes penultimate hidden states [n, tokens, 1280] of the CLIP vision ViT-H-14; got a tensor of "
                "shape (1, 1024)")),
    ("embeds file without embeds", use_embeds("wrong_key.safetensors"),
     ("failed", "wrong_key.safetensors does not hold one float tensor")),
    ("crafted pickle embeds", use_embeds("crafted.ipadpt"),
     ("failed", "embeds: crafted.ipadpt: refused for safety: reading it would run io.open")),
    ("missing embeds file", use_embeds("nowhere.safetensors"),
     ("rejected", "embeds: 'nowhere.safetensors' is not a file in the input folder")),
    ("embeds path traversal", use_embeds("../../../etc/passwd"), ("rejected", "is outside the input folder")),
    ("save embeds outside output", chain(
        add_node("12", "ImagePromptLoadEmbeds", embeds="pooled.safetensors"),
        add_node("13", "ImagePromptSaveEmbeds", embeds=["12", 0], filename_prefix="../../escaped")),
     ("failed", "filename_prefix: '../../escaped' is outside the output folder")),
    ("save embeds to an absolute path", chain(
        add_node("12", "ImagePromptLoadEmbeds", embeds="pooled.safetensors"),
        add_node("13", "ImagePromptSaveEmbeds", embeds=["12", 0], filename_prefix="/tmp/escaped")),
     ("failed", "is outside the output folder")),
    ("weight above its maximum", set_input("5", weight=50.0), ("rejected", "bigger than max of 5.0")),
    ("NaN weight (passes the host's range check)", set_input("5", weight=float("nan")),
     ("failed", "weight: expected a finite number from -1.0 to 5.0; got nan")),
    ("NaN weight on Apply IP-Adapter", replace_apply("ImagePromptApply", image=["4", 0], weight=float("nan"),
                                                     start_at=0.0, end_at=1.0, weight_type="linear",
                                                     clip_vision=["3", 0]),
     ("failed", "weight: expected a finite number from -1.0 to 5.0; got nan")),
    ("NaN weight on Apply Embeds", use_embeds("pooled.safetensors", weight=float("nan")),
     ("failed", "weight: expected a finite number from -1.0 to 5.0; got nan")),
    ("huge weight through a primitive node", chain(add_node("13", "PrimitiveFloat", value=9e18),
                                                   set_input("5", weight=["13", 0])),
     ("failed", "weight: expected a number from -1.0 to 5.0; got 9e+18")),
    ("mask holding NaN", chain(add_node("13", "SolidMask", value=float("nan"), width=64, height=64),
                               set_input("5", attn_mask=["13", 0])),
     ("failed", "attn_mask: the MASK holds 4096 NaN or infinite values")),
    ("frame weights with one image, shift batches", chain(
        add_node("13", "ImagePromptFrameWeights", weights="1, 0", timing="linear", frames=2, start_frame=0,
                 end_frame=99, add_starting_frames=0, add_ending_frames=0, method="shift batches", image=["4", 0]),
        set_input("5", weight=["13", 0], image=["13", 3], unfold_batch=True)),
     ("failed", "image: the method 'shift batches' pairs each reference image with another and needs at least 2")),
    ("frame weights with one image, alternate batches", chain(
        add_node("13", "ImagePromptFrameWeights", weights="1, 0", timing="linear", frames=2, start_frame=0,
                 end_frame=99, add_starting_frames=0, add_ending_frames=0, method="alternate batches",
                 image=["4", 0]),
        set_input("5", weight=["13", 0], image=["13", 3], unfold_batch=True)),
     ("failed", "image: the method 'alternate batches' pairs each reference image with another")),
    ("start_at after end_at", set_input("5", start_at=0.8, end_at=0.5),
     ("failed", "start_at (0.8) must be below end_at (0.5)")),
    ("unknown weight type", set_input("5", weight_type="sideways"), ("rejected", "weight_type: 'sideways' is not one of")),
    ("unknown embeds scaling", set_input("5", embeds_scaling="K only"),
     ("rejected", "embeds_scaling: 'K only' is not one of")),
    ("unknown combine mode", set_input("5", combine_embeds="median"), ("rejected", "combine_embeds: 'median' is not one")),
    ("malformed layer weights", set_input("5", layer_weights="a:b"), ("failed", "layer_weights: 'a:b' is not")),
    ("layer weight index out of range", set_input("5", layer_weights="0:1, 40:1"),
     ("failed", "layer_weights: '40:1' is not 'index:weight' with an attention block index 0..3")),
    ("FaceID node with a plain adapter", replace_apply("ImagePromptFaceID", **FACE, face_embeds=None),
     ("failed", "is not a FaceID adapter")),
    ("plain apply with a FaceID adapter", chain(set_input("2", ipadapter_file="tiny_ip-adapter-faceid_sd15.bin")),
     ("failed", "is a FaceID adapter: it reads face embeddings")),
    ("FaceID with neither InsightFace nor an embedding", chain(
        set_input("2", ipadapter_file="tiny_ip-adapter-faceid_sd15.bin"), replace_apply("ImagePromptFaceID", **FACE)),
     ("failed", "insightface: connect Load InsightFace, or give face_embeds")),
    ("unified loader, file missing", chain(
        add_node("13", "ImagePromptUnifiedLoader", model=["1", 0], preset="FULL FACE - SD1.5 only"),
        set_input("5", ipadapter=["13", 1])),
     ("failed", "needs ip-adapter-full-face_sd15.safetensors in")),
    ("unified loader, unknown preset", chain(
        add_node("13", "ImagePromptUnifiedLoader", model=["1", 0], preset="SUPER"), set_input("5", ipadapter=["13", 1])),
     ("rejected", "preset: 'SUPER' is not one of")),
    ("combining embeds of two encoders", chain(
        add_node("12", "ImagePromptLoadEmbeds", embeds="pooled.safetensors"),
        add_node("14", "ImagePromptLoadEmbeds", embeds="nan.safetensors"),
        add_node("13", "ImagePromptCombineEmbeds", embed1=["12", 0], method="add", embed2=["14", 0]),
        add_node("15", "ImagePromptSaveEmbeds", embeds=["13", 0], filename_prefix="combined")),
     ("failed", "every embeds must have the shape of embed1")),
    ("frame weights that are not numbers", chain(
        add_node("13", "ImagePromptFrameWeights", weights="1, lots", timing="linear", frames=2, start_frame=0,
                 end_frame=99, add_starting_frames=0, add_ending_frames=0, method="full batch"),
        set_input("5", weight=["13", 0])), ("failed", "weights: expected numbers separated by commas")),
    ("region mask batch of two", chain(
        add_node("15", "RepeatImageBatch", image=["4", 0], amount=2),
        add_node("16", "ImageToMask", image=["15", 0], channel="red"),
        add_node("13", "ImagePromptRegion", image=["4", 0], image_weight=1.0, prompt_weight=1.0, weight_type="linear",
                 start_at=0.0, end_at=1.0, mask=["16", 0]),
        replace_apply("ImagePromptApplyRegions", ipadapter_params=["13", 0], combine_embeds="concat",
                      embeds_scaling="V only", clip_vision=["3", 0])),
     ("failed", "mask: expected one MASK [1, H, W], got shape (2, 64, 64)")),
    ("encode with an unknown crop position", chain(
        add_node("12", "ImagePromptEncode", ipadapter=["2", 0], image=["4", 0], weight=1.0, crop_position="middle",
                 interpolation="bicubic", sharpening=0.0, clip_vision=["3", 0]),
        set_input("5", weight=1.0), add_node("13", "ImagePromptSaveEmbeds", embeds=["12", 0], filename_prefix="x"),
        only_embeds_saved), ("rejected", "crop_position: 'middle' is not one of")),
    ("edit sampler on a model that is not an edit model", chain(
        add_node("13", "InstructEditSampler", model=["1", 0], seed=1, steps=1, text_scale=5.0, image_scale=1.5,
                 sampler_name="euler", scheduler="normal", positive=["6", 0], negative=["7", 0], vae=["1", 2],
                 image=["4", 0], denoise=1.0, feather=0),
        set_input("10", samples=["13", 0])),
     ("failed", "model: the connected model's UNet takes 4 input channels")),
    ("edit mask batch of three for two images", chain(
        add_node("14", "CheckpointLoaderSimple", ckpt_name="tiny_sd15_ip2p.ckpt"),
        add_node("15", "RepeatImageBatch", image=["4", 0], amount=2),
        add_node("16", "SolidMask", value=1.0, width=64, height=64),
        add_node("17", "MaskToImage", mask=["16", 0]), add_node("18", "RepeatImageBatch", image=["17", 0], amount=3),
        add_node("19", "ImageToMask", image=["18", 0], channel="red"),
        add_node("13", "InstructEditSampler", model=["14", 0], seed=1, steps=1, text_scale=5.0, image_scale=1.5,
                 sampler_name="euler", scheduler="normal", positive=["6", 0], negative=["7", 0], vae=["14", 2],
                 image=["15", 0], denoise=1.0, feather=0, mask=["19", 0]),
        set_input("10", samples=["13", 0])),
     ("failed", "mask: 3 masks for 2 images; give one mask for every image or one mask per image")),
    ("edit mask of another size (stretched to the image, as its tooltip says)", chain(
        add_node("14", "CheckpointLoaderSimple", ckpt_name="tiny_sd15_ip2p.ckpt"),
        add_node("16", "SolidMask", value=1.0, width=37, height=91),
        add_node("13", "InstructEditSampler", model=["14", 0], seed=1, steps=1, text_scale=5.0, image_scale=1.5,
                 sampler_name="euler", scheduler="normal", positive=["6", 0], negative=["7", 0], vae=["14", 2],
                 image=["4", 0], denoise=1.0, feather=0, mask=["16", 0]),
        set_input("10", samples=["13", 0])), ("ok", None)),
]


@pytest.mark.parametrize("case, change, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error_and_the_server_goes_on(hostile, case, change, expected):
    server, canary = hostile
    prompt = copy.deepcopy(good_prompt())
    change(prompt)
    outcome, text = expected
    if outcome == "ok":
        assert server.output_files(server.run_prompt(prompt))
    elif outcome == "rejected":
        with pytest.raises(comfy_host.PromptRejected) as refused:
            server.run_prompt(prompt)
        assert refused.value.status == 400 and text in refused.value.body
    else:
        with pytest.raises(comfy_host.PromptFailed) as failed:
            server.run_prompt(prompt)
        assert text in failed.value.message, failed.value.message
    assert not canary.exists()


def test_at_least_forty_cases_and_a_good_prompt_runs_after_them_all(hostile):
    assert len(CASES) >= 40 and len([c for c in CASES if c[2][0] != "ok"]) >= 40
    server, _ = hostile
    assert server.output_files(server.run_prompt(good_prompt()))
    assert server.process.poll() is None
