"""Reference images and embeds: prepare an image for CLIP vision, encode it to EMBEDS, combine, save and
load EMBEDS, and make a noise image to use as the negative reference."""
from __future__ import annotations

import os

import folder_paths
import torch
from comfy_api.latest import io

from ..ipadapter_core import prep
from ..ipadapter_core.embeds import COMBINE_MODES, EMBEDS_SUFFIXES, combine_embeds, load_embeds, save_embeds
from ..ipadapter_core.variants import ENCODERS
from .ipadapter_encode import LoadedAdapter, reference_embeds
from .ipadapter_inputs import CATEGORY, CLIP_VISION_INPUT, Adapter, Embeds

CROP_INPUT = io.Combo.Input("crop_position", options=list(prep.CROP_POSITIONS), default="center",
                            tooltip="Which square CLIP vision sees: a crop at this position, or 'pad' for the "
                                    "whole image on a neutral square.")
INTERPOLATION_INPUT = io.Combo.Input("interpolation", options=list(prep.INTERPOLATIONS), default="bicubic",
                                     tooltip="Resampling to the encoder's input size (antialiased when shrinking).")
SHARPENING_INPUT = io.Float.Input("sharpening", default=0.0, min=0.0, max=1.0, step=0.05,
                                  tooltip="Unsharp-mask amount after resizing (0 = off).")


NAME_MAX = 255  # bytes in one file or folder name on the common file systems


def inside(folder: str, name: str, what: str) -> str:
    """The path of ``name`` within ``folder``; ValueError when it would leave it (.., absolute, symlinks) or when a
    part of it is longer than a file system takes."""
    longest = max((part for part in name.replace("\\", "/").split("/")), key=lambda part: len(part.encode()))
    if len(longest.encode()) > NAME_MAX - 16:  # room for the counter and extension the node adds
        raise ValueError(f"{what}: a name of {len(longest.encode())} bytes is too long; a file or folder name takes "
                         f"at most {NAME_MAX - 16} here")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath((root, path)) != root or path == root:
        raise ValueError(f"{what}: '{name}' is outside the {os.path.basename(root)} folder; give a name within it")
    return path


class ImagePromptPrepImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptPrepImage",
            display_name="Prep Image For CLIP Vision",
            category=CATEGORY,
            description="Crops (or pads) to a square, resizes to 224 px and optionally sharpens: exactly what CLIP "
                        "vision will see, so the choice is visible.",
            inputs=[io.Image.Input("image", tooltip="The reference image(s)."),
                    INTERPOLATION_INPUT, CROP_INPUT, SHARPENING_INPUT],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, image, interpolation, crop_position, sharpening) -> io.NodeOutput:
        return io.NodeOutput(prep.prepare(image, 224, crop_position, interpolation, sharpening))


class ImagePromptEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptEncode",
            display_name="IP-Adapter Encode",
            category=CATEGORY,
            description="Encodes reference images with CLIP vision into the EMBEDS the adapter reads (batched, with "
                        "progress), and the unconditional EMBEDS: of image_negative, or the neutral ones.",
            inputs=[Adapter.Input("ipadapter", tooltip="Decides which CLIP output is kept (pooled or hidden states)."),
                    io.Image.Input("image", tooltip="The reference image(s)."),
                    io.Float.Input("weight", default=1.0, min=-1.0, max=3.0, step=0.01,
                                   tooltip="Multiplies the embeds (a per-reference strength for Combine Embeds)."),
                    CROP_INPUT, INTERPOLATION_INPUT, SHARPENING_INPUT, CLIP_VISION_INPUT,
                    io.Image.Input("image_negative", optional=True,
                                   tooltip="Encoded as the unconditional embeds (default: neutral embeds)."),
                    io.Mask.Input("mask", optional=True,
                                  tooltip="Only this region of the reference is seen; the rest becomes neutral.")],
            outputs=[Embeds.Output(display_name="pos_embeds"), Embeds.Output(display_name="neg_embeds")],
        )

    @classmethod
    def execute(cls, ipadapter: LoadedAdapter, image, weight, crop_position, interpolation, sharpening,
                clip_vision=None, image_negative=None, mask=None) -> io.NodeOutput:
        size = ENCODERS.get(ipadapter.file.variant.encoder, {"image_size": 224})["image_size"]
        image = prep.as_rgb(image)
        if mask is not None:
            if mask.ndim not in (2, 3):
                raise ValueError(f"mask: expected a MASK [B, H, W], got shape {tuple(mask.shape)}")
            mask = torch.nn.functional.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(),
                                                   size=image.shape[1:3], mode="bilinear").movedim(1, -1)
            image = torch.lerp(torch.tensor(prep.CLIP_MEAN), image, mask)
        prepared = prep.prepare(image, size, crop_position, interpolation, sharpening)
        negative = None if image_negative is None else prep.prepare(image_negative, size, crop_position,
                                                                    interpolation, sharpening)
        cond, uncond = reference_embeds(ipadapter, clip_vision, prepared, negative)
        return io.NodeOutput(cond * weight, uncond)


class ImagePromptCombineEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptCombineEmbeds",
            display_name="IP-Adapter Combine Embeds",
            category=CATEGORY,
            description="Merges up to five EMBEDS (of the same encoder) into one.",
            inputs=[Embeds.Input("embed1", tooltip="The first embeds (for subtract: the one the others are taken "
                                                   "from)."),
                    io.Combo.Input("method", options=list(COMBINE_MODES), default="concat",
                                   tooltip="concat keeps every image; the others merge all into one."),
                    *[Embeds.Input(f"embed{i}", optional=True, tooltip="More embeds.") for i in range(2, 6)]],
            outputs=[Embeds.Output(display_name="embeds")],
        )

    @classmethod
    def execute(cls, embed1, method, **more) -> io.NodeOutput:
        parts = [embed1, *(e for _, e in sorted(more.items()) if e is not None)]
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"embed2..embed5: every embeds must have the shape of embed1 apart from the count "
                             f"(same encoder and output); got {sorted(shapes)}")
        return io.NodeOutput(combine_embeds(torch.cat(parts), method))


class ImagePromptSaveEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptSaveEmbeds",
            display_name="IP-Adapter Save Embeds",
            category=CATEGORY,
            description="Saves EMBEDS as a .safetensors file in the output folder (move it to input/ to load it).",
            inputs=[Embeds.Input("embeds", tooltip="The embeds to keep."),
                    io.String.Input("filename_prefix", default="IP_embeds",
                                    tooltip="File name prefix within the output folder (a subfolder may be given).")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, embeds, filename_prefix) -> io.NodeOutput:
        output_dir = folder_paths.get_output_directory()
        inside(output_dir, filename_prefix or "_", "filename_prefix")
        folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, output_dir)
        os.makedirs(folder, exist_ok=True)
        # numbered as the host's Save Image numbers its files (name_00001_.png): its counter reads that form
        save_embeds(inside(folder, f"{name}_{counter:05}_.safetensors", "filename_prefix"), embeds)
        return io.NodeOutput()


def embeds_files() -> list[str]:
    root = folder_paths.get_input_directory()
    return sorted(os.path.relpath(os.path.join(folder, f), root) for folder, _, files in os.walk(root)
                  for f in files if f.lower().endswith(EMBEDS_SUFFIXES))


class ImagePromptLoadEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptLoadEmbeds",
            display_name="IP-Adapter Load Embeds",
            category=CATEGORY,
            description="Loads EMBEDS from the input folder: .safetensors saved by this pack, or .ipadpt files "
                        "(read weights-only: no code in them can run).",
            inputs=[io.Combo.Input("embeds", options=embeds_files(),
                                   tooltip="An embeds file in the input folder.")],
            outputs=[Embeds.Output(display_name="embeds")],
        )

    @classmethod
    def validate_inputs(cls, embeds) -> bool | str:
        try:
            path = inside(folder_paths.get_input_directory(), embeds, "embeds")
        except ValueError as err:
            return str(err)
        return True if os.path.isfile(path) else f"embeds: '{embeds}' is not a file in the input folder"

    @classmethod
    def execute(cls, embeds) -> io.NodeOutput:
        return io.NodeOutput(load_embeds(inside(folder_paths.get_input_directory(), embeds, "embeds")))


class ImagePromptNoiseImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptNoiseImage",
            display_name="IP-Adapter Noise Image",
            category=CATEGORY,
            description="A noisy image (or a noised copy of one) to connect as image_negative: guidance then "
                        "pushes away from noise, which often gives cleaner results than the neutral image.",
            inputs=[io.Combo.Input("type", options=list(prep.NOISE_TYPES), default="fade",
                                   tooltip="fade: mix with noise; dissolve: replace pixels; gaussian: add noise; "
                                           "shuffle: move pixels."),
                    io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                                   tooltip="How much noise."),
                    io.Int.Input("blur", default=0, min=0, max=32, tooltip="Gaussian blur radius in pixels."),
                    io.Image.Input("image_optional", optional=True,
                                   tooltip="The image to noise; without it, a grey 224 px square.")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, type, strength, blur, image_optional=None) -> io.NodeOutput:
        return io.NodeOutput(prep.noise_image(type, strength, blur, image_optional))


NODES = [ImagePromptPrepImage, ImagePromptEncode, ImagePromptCombineEmbeds, ImagePromptSaveEmbeds,
         ImagePromptLoadEmbeds, ImagePromptNoiseImage]
