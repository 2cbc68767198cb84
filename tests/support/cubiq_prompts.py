"""API prompts in ComfyUI_IPAdapter_plus's format: that pack's example graphs, and Krita AI Diffusion's way."""
from __future__ import annotations

from pathlib import Path

import torch

from support.cubiq import CHECKPOINT, CLIP_H, SIZE


def write_saved_embeds(input_dir: Path) -> None:
    """Embeds files as that pack's Save Embeds wrote them (torch.save of the tensor) in ``input_dir``: penultimate
    CLIP ViT-H states [1, 257, 1280] (reference.ipadpt) and a face embedding [1, 512] (face.ipadpt)."""
    generator = torch.Generator().manual_seed(3)
    torch.save(torch.randn(1, 257, 1280, generator=generator), input_dir / "reference.ipadpt")
    torch.save(torch.randn(1, 512, generator=generator), input_dir / "face.ipadpt")


def api_node(kind: str, **inputs) -> dict:
    """One node of an API prompt."""
    return {"class_type": kind, "inputs": inputs}


def api_tail(prompt: dict, model: list, positive: list | None = None, negative: list | None = None) -> dict:
    """``prompt`` with prompts, latent, KSampler on ``model`` (2 steps), decode and save."""
    prompt.update({
        "t1": api_node("CLIPTextEncode", text="a cabin in the snow", clip=["ckpt", 1]),
        "t2": api_node("CLIPTextEncode", text="blurry", clip=["ckpt", 1]),
        "lat": api_node("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1),
        "ks": api_node("KSampler", seed=42, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0,
                       model=model, positive=positive or ["t1", 0], negative=negative or ["t2", 0],
                       latent_image=["lat", 0]),
        "dec": api_node("VAEDecode", samples=["ks", 0], vae=["ckpt", 2]),
        "save": api_node("SaveImage", filename_prefix="migrated_api", images=["dec", 0]),
    })
    return prompt


def api_base() -> dict:
    """Checkpoint, reference image and that pack's unified loader (PLUS)."""
    return {"ckpt": api_node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT),
            "img": api_node("LoadImage", image="reference.png"),
            "ipa": api_node("IPAdapterUnifiedLoader", preset="PLUS (high strength)", model=["ckpt", 0])}


def api_tiled_and_enhancer() -> dict:
    """A wide reference through the tiled node, the CLIP-vision enhancer on a 2 x 2 grid, and the mad
    scientist's per-block weights (the tiny UNet has 4 attention blocks)."""
    prompt = api_base()
    prompt.update({
        "wide": api_node("ImageScale", upscale_method="bilinear", width=192, height=96, crop="disabled",
                         image=["img", 0]),
        "tiled": api_node("IPAdapterTiled", weight=0.7, weight_type="ease in", combine_embeds="concat", start_at=0.0,
                          end_at=1.0, sharpening=0.1, embeds_scaling="V only", model=["ipa", 0],
                          ipadapter=["ipa", 1], image=["wide", 0]),
        "enh": api_node("IPAdapterClipVisionEnhancer", weight=0.5, weight_type="linear", combine_embeds="concat",
                        start_at=0.0, end_at=1.0, embeds_scaling="K+mean(V) w/ C penalty", enhance_tiles=2,
                        enhance_ratio=0.7, model=["tiled", 0], ipadapter=["ipa", 1], image=["img", 0]),
        "ms": api_node("IPAdapterMS", weight=1.0, weight_faceidv2=1.0, weight_type="ease out", combine_embeds="concat",
                       start_at=0.0, end_at=0.8, embeds_scaling="V only", layer_weights="0:1, 2:0.5, 3:0.25",
                       model=["enh", 0], ipadapter=["ipa", 1], image=["img", 0]),
    })
    return api_tail(prompt, ["ms", 0])


def api_regions() -> dict:
    """Two regional conditionings (image + masked prompt) combined and applied from params."""
    prompt = api_base()
    prompt.update({
        "m1": api_node("SolidMask", value=1.0, width=SIZE, height=SIZE),
        "m2": api_node("SolidMask", value=0.5, width=SIZE, height=SIZE),
        "r1": api_node("IPAdapterRegionalConditioning", image_weight=0.7, prompt_weight=1.0, weight_type="linear",
                       start_at=0.0, end_at=1.0, image=["img", 0], mask=["m1", 0], positive=["t1", 0],
                       negative=["t2", 0]),
        "r2": api_node("IPAdapterRegionalConditioning", image_weight=0.5, prompt_weight=1.2, weight_type="ease in",
                       start_at=0.1, end_at=1.0, image=["img", 0], mask=["m2", 0], positive=["r1", 1],
                       negative=["r1", 2]),
        "cp": api_node("IPAdapterCombineParams", params_1=["r1", 0], params_2=["r2", 0]),
        "fp": api_node("IPAdapterFromParams", combine_embeds="concat", embeds_scaling="V only", model=["ipa", 0],
                       ipadapter=["ipa", 1], ipadapter_params=["cp", 0]),
    })
    return api_tail(prompt, ["fp", 0], positive=["r2", 1], negative=["r2", 2])


def api_embeds_files() -> dict:
    """Embeds that pack saved (a torch.save'd tensor, .ipadpt) loaded and applied per image; an encoding
    saved again."""
    prompt = api_base()
    prompt.update({
        "load": api_node("IPAdapterLoadEmbeds", embeds="reference.ipadpt"),
        "enc": api_node("IPAdapterEncoder", weight=1.0, ipadapter=["ipa", 1], image=["img", 0]),
        "keep": api_node("IPAdapterSaveEmbeds", filename_prefix="migrated_embeds", embeds=["enc", 0]),
        "emb": api_node("IPAdapterEmbedsBatch", weight=0.9, weight_type="ease in-out", start_at=0.0, end_at=1.0,
                        embeds_scaling="K+V w/ C penalty", model=["ipa", 0], ipadapter=["ipa", 1],
                        pos_embed=["load", 0], neg_embed=["enc", 1]),
    })
    return api_tail(prompt, ["emb", 0])


API_GRAPHS = {"tiled_and_enhancer": api_tiled_and_enhancer, "regions": api_regions, "embeds_files": api_embeds_files}


def api_style_composition() -> dict:
    """Block-map weight types (style/composition): they need the full SD1.5 layout of attention blocks."""
    prompt = api_base()
    prompt["adp"] = api_node("IPAdapterModelLoader", ipadapter_file="ip-adapter-plus_sd15.bin")
    prompt["cv"] = api_node("CLIPVisionLoader", clip_name=CLIP_H)
    common = dict(ipadapter=["adp", 0], clip_vision=["cv", 0], start_at=0.0, end_at=1.0, embeds_scaling="V only")
    prompt.update({
        "sc": api_node("IPAdapterStyleComposition", weight_style=1.0, weight_composition=0.8, expand_style=False,
                       combine_embeds="average", model=["ckpt", 0], image_style=["img", 0],
                       image_composition=["img", 0], **common),
        "ps": api_node("IPAdapterPreciseStyleTransfer", weight=0.8, style_boost=1.5, combine_embeds="concat",
                       model=["sc", 0], image=["img", 0], **common),
        "pc": api_node("IPAdapterPreciseComposition", weight=0.6, composition_boost=0.3, combine_embeds="concat",
                       model=["ps", 0], image=["img", 0], **common),
        "two": api_node("ImageBatch", image1=["img", 0], image2=["img", 0]),
        "scb": api_node("IPAdapterStyleCompositionBatch", weight_style=0.7, weight_composition=0.5, expand_style=True,
                        model=["pc", 0], image_style=["two", 0], image_composition=["two", 0], **common),
    })
    del prompt["ipa"]
    return api_tail(prompt, ["scb", 0])


def api_faceid() -> dict:
    """SwarmUI's FaceID way: the FaceID unified loader (FACEID PLUS V2), then the FaceID apply."""
    prompt = api_base()
    prompt.update({
        "fl": api_node("IPAdapterUnifiedLoaderFaceID", preset="FACEID PLUS V2", lora_strength=0.6, provider="CPU",
                       model=["ckpt", 0]),
        "fid": api_node("IPAdapterFaceID", weight=0.8, weight_faceidv2=1.5, weight_type="linear",
                        combine_embeds="concat", start_at=0.0, end_at=1.0, embeds_scaling="V only",
                        model=["fl", 0], ipadapter=["fl", 1], image=["img", 0]),
    })
    del prompt["ipa"]
    return api_tail(prompt, ["fid", 0])


def krita_embeds() -> dict:
    """Krita AI Diffusion's way: the adapter and CLIP vision loaded by file, one encoding per reference,
    the encodings concatenated, applied as embeds under a mask."""
    prompt = {"ckpt": api_node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT),
              "img": api_node("LoadImage", image="reference.png"),
              "adp": api_node("IPAdapterModelLoader", ipadapter_file="ip-adapter-plus_sd15.safetensors"),
              "cv": api_node("CLIPVisionLoader", clip_name=CLIP_H),
              "mask": api_node("SolidMask", value=1.0, width=SIZE, height=SIZE)}
    for name, weight in (("e1", 1.0), ("e2", 0.6)):
        prompt[name] = api_node("IPAdapterEncoder", image=["img", 0], weight=weight, ipadapter=["adp", 0],
                                clip_vision=["cv", 0])
    prompt["cat"] = api_node("IPAdapterCombineEmbeds", method="concat", embed1=["e1", 0], embed2=["e2", 0])
    prompt["apply"] = api_node("IPAdapterEmbeds", model=["ckpt", 0], ipadapter=["adp", 0], pos_embed=["cat", 0],
                               clip_vision=["cv", 0], weight=0.8, weight_type="linear", embeds_scaling="V only",
                               start_at=0.0, end_at=1.0, attn_mask=["mask", 0])
    return api_tail(prompt, ["apply", 0])
