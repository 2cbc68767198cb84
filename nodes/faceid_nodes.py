"""FaceID: IP-Adapters that read a face-recognition embedding (InsightFace ArcFace, 512 values per face)
instead of, or beside, a CLIP image encoding. The embedding comes from InsightFace when the user has the
``insightface`` package and its models, or from any node that outputs one as EMBEDS [n, 512]."""
from __future__ import annotations

import logging
import os
from dataclasses import replace

import comfy.sd
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ..ipadapter_core import prep
from ..ipadapter_core.presets import FACEID_PRESETS, lora_file, plain, preset_variant
from ..ipadapter_core.variants import ENCODERS
from ..ipadapter_core.apply_options import ApplyOptions
from .ipadapter_apply import apply_tokens
from .ipadapter_encode import LoadedAdapter, clip_vision_for, encode_images, image_tokens, neutral_embeds
from .ipadapter_inputs import (CATEGORY, CLIP_VISION_INPUT, COMBINE_INPUT, END_INPUT, MASK_INPUT, NEGATIVE_INPUT,
                               REUSE_INPUT, SCALING_INPUT, START_INPUT, UNFOLD_LATER_INPUT, WEIGHT_TYPE_INPUT, Adapter,
                               Embeds, model_inputs, weight_input)
from .loader_nodes import find_adapter, find_clip_vision, model_base


def find_lora(variant) -> str | None:
    """The FaceID adapter's LoRA in models/loras: the first listed file named as its public LoRA (compared by
    ``plain``: a LoRA's weights do not say which adapter it belongs to)."""
    wanted = plain(lora_file(variant))
    return next((name for name in folder_paths.get_filename_list("loras") if wanted in plain(name)), None)

InsightFace = io.Custom("INSIGHTFACE")
PROVIDERS = ("CPU", "CUDA", "ROCM", "DirectML", "OpenVINO", "CoreML")
FACE_CROP = 224  # the aligned face crop the FaceID-Plus adapters encode with CLIP vision


def load_insightface(provider: str, model_name: str = "buffalo_l"):
    """InsightFace's FaceAnalysis from models/insightface/models/<model_name>; errors say what to install."""
    try:
        from insightface.app import FaceAnalysis
    except ImportError:
        raise ValueError("insightface: the 'insightface' package is not installed in ComfyUI's Python (pip install "
                         "insightface onnxruntime); or connect a face embedding to face_embeds instead") from None
    root = os.path.join(folder_paths.models_dir, "insightface")
    if not os.path.isdir(os.path.join(root, "models", model_name)):
        raise ValueError(f"insightface: the model '{model_name}' is not in {os.path.join(root, 'models')}")
    analysis = FaceAnalysis(name=model_name, root=root, providers=[f"{provider}ExecutionProvider"])
    analysis.prepare(ctx_id=0, det_size=(640, 640))
    return analysis


def detect_faces(insightface, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest face of each image: normalised embeddings [n, 512] and aligned crops [n, 224, 224, 3]
    (n may be below the batch size: images without a face are left out)."""
    from insightface.utils import face_align
    embeddings, crops = [], []
    for picture in (prep.as_rgb(image).cpu().numpy() * 255).astype(np.uint8):
        bgr = picture[..., ::-1]
        faces = sorted(insightface.get(bgr), key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        if faces:
            embeddings.append(torch.from_numpy(faces[-1].normed_embedding).float())
            crop = face_align.norm_crop(bgr, landmark=faces[-1].kps, image_size=FACE_CROP)[..., ::-1]
            crops.append(torch.from_numpy(crop.copy()).float() / 255)
    if not embeddings:
        return torch.zeros(0, 512), torch.zeros(0, FACE_CROP, FACE_CROP, 3)
    return torch.stack(embeddings), torch.stack(crops)


class ImagePromptInsightFaceLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptInsightFaceLoader",
            display_name="Load InsightFace",
            category=CATEGORY,
            description="Loads InsightFace face analysis (needs the optional insightface package and its models "
                        "in models/insightface/models).",
            inputs=[io.Combo.Input("provider", options=list(PROVIDERS), default="CPU",
                                   tooltip="The ONNX Runtime execution provider."),
                    io.Combo.Input("model_name", options=["buffalo_l", "antelopev2"], default="buffalo_l",
                                   tooltip="The InsightFace model pack.")],
            outputs=[InsightFace.Output(display_name="insightface")],
        )

    @classmethod
    def execute(cls, provider, model_name) -> io.NodeOutput:
        return io.NodeOutput(load_insightface(provider, model_name))


class ImagePromptFaceID(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptFaceID",
            display_name="Apply IP-Adapter FaceID",
            category=CATEGORY,
            description="Steers the model toward a face: from face_embeds, or from the image through InsightFace. "
                        "FaceID-Plus adapters also encode the face crop with CLIP vision.",
            inputs=[*model_inputs(),
                    io.Image.Input("image", tooltip="The face image(s) (used for InsightFace and CLIP vision)."),
                    weight_input(),
                    io.Float.Input("weight_faceidv2", default=1.0, min=-1.0, max=5.0, step=0.05,
                                   tooltip="FaceID-Plus v2 only: the weight of the CLIP part added to the identity."),
                    WEIGHT_TYPE_INPUT, COMBINE_INPUT, START_INPUT, END_INPUT, SCALING_INPUT,
                    io.Combo.Input("on_no_face", options=["error", "skip"], default="error",
                                   tooltip="When no face is found: stop the graph with an error, or pass the model "
                                           "on unchanged with a warning."),
                    NEGATIVE_INPUT, MASK_INPUT, CLIP_VISION_INPUT,
                    InsightFace.Input("insightface", optional=True,
                                      tooltip="From Load InsightFace (or the FaceID unified loader's)."),
                    Embeds.Input("face_embeds", optional=True,
                                 tooltip="Face embeddings [n, 512] from another node, used instead of InsightFace; "
                                         "an empty batch means no face."),
                    UNFOLD_LATER_INPUT],
            outputs=[io.Model.Output(), io.Image.Output(display_name="face_image")],
        )

    @classmethod
    def execute(cls, model, ipadapter: LoadedAdapter, image, weight_faceidv2, on_no_face, clip_vision=None,
                insightface=None, face_embeds=None, **inputs) -> io.NodeOutput:
        options = ApplyOptions.from_inputs(**inputs)
        variant, name = ipadapter.file.variant, ipadapter.file.name
        if variant.encoder_output != "face":
            raise ValueError(f"ipadapter: {name} ({variant.name}) is not a FaceID adapter; use Apply IP-Adapter")
        face_image = prep.as_rgb(image)
        if face_embeds is not None:
            faces = face_embeds
        else:
            insightface = insightface if insightface is not None else ipadapter.insightface
            if insightface is None:
                raise ValueError("insightface: connect Load InsightFace, or give face_embeds [n, 512]")
            faces, face_image = detect_faces(insightface, image)
            if options.unfold_batch and 0 < faces.shape[0] < image.shape[0]:
                raise ValueError(f"image: a face in {faces.shape[0]} of {image.shape[0]} frames; unfold_batch gives "
                                 f"frame i its own face, so every frame needs one (or give face_embeds)")
        if faces.shape[0] == 0:
            if on_no_face == "skip":
                logging.warning("Apply IP-Adapter FaceID: no face found; the model is passed on unchanged")
                return io.NodeOutput(model, prep.as_rgb(image))
            raise ValueError("image: no face found in the face image (set on_no_face to 'skip' to continue without)")
        uncond = None
        if options.image_negative is not None and insightface is not None and face_embeds is None:
            uncond = detect_faces(insightface, options.image_negative)[0]
        clip_hidden = None
        if variant.projection == "faceid_plus":
            clip_vision = clip_vision_for(ipadapter, clip_vision, variant.clip_encoder)
            crops = prep.prepare(face_image, ENCODERS[variant.clip_encoder]["image_size"])
            hidden = encode_images(ipadapter, clip_vision, crops, "penultimate", "image", variant.clip_encoder)
            clip_hidden = (hidden, neutral_embeds(ipadapter, clip_vision, hidden, "penultimate", variant.clip_encoder))
        cond, uncond = image_tokens(ipadapter, faces, uncond if uncond is not None and uncond.shape[0] else None,
                                    options.combine_embeds, unfold=options.unfold_batch, clip_hidden=clip_hidden,
                                    shortcut_scale=weight_faceidv2)
        patched = apply_tokens(model, ipadapter, cond, uncond, options)
        return io.NodeOutput(patched, face_image)


class ImagePromptUnifiedLoaderFaceID(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ImagePromptUnifiedLoaderFaceID",
            display_name="IP-Adapter Unified Loader FaceID",
            category=CATEGORY,
            description="Finds the FaceID adapter of a preset for the connected model and the CLIP vision FaceID-Plus "
                        "needs (each recognised by its weights, whatever the file is called), and its LoRA (in "
                        "models/loras by name, applied to the model when present).",
            inputs=[io.Model.Input("model", tooltip="The model the adapter is for; returned with the LoRA applied."),
                    io.Combo.Input("preset", options=list(FACEID_PRESETS), default="FACEID PLUS V2",
                                   tooltip="Which FaceID adapter."),
                    io.Float.Input("lora_strength", default=0.6, min=0.0, max=1.0, step=0.01,
                                   tooltip="Strength of the adapter's LoRA on the model (FaceID and FaceID-Plus "
                                           "were trained with one)."),
                    io.Combo.Input("provider", options=list(PROVIDERS), default="CPU",
                                   tooltip="InsightFace's execution provider, when the insightface package is "
                                           "installed (otherwise give face_embeds to the apply node)."),
                    REUSE_INPUT],
            outputs=[io.Model.Output(), Adapter.Output(display_name="ipadapter"), io.ClipVision.Output()],
        )

    @classmethod
    def execute(cls, model, preset, lora_strength, provider, ipadapter: LoadedAdapter | None = None) -> io.NodeOutput:
        variant = preset_variant(preset, model_base(model), FACEID_PRESETS)
        if ipadapter is None or ipadapter.file.variant != variant:
            ipadapter = find_adapter(model, variant, preset)
            clip_vision = find_clip_vision(variant.clip_encoder, preset) if variant.clip_encoder else None
            try:
                face = load_insightface(provider)
            except ValueError as err:
                logging.info("IP-Adapter Unified Loader FaceID: %s", err)
                face = None
            ipadapter = replace(ipadapter, clip_vision=clip_vision, insightface=face)
        if variant.faceid_lora and lora_strength:
            lora = find_lora(variant)
            if lora:
                weights = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", lora), safe_load=True)
                model, _ = comfy.sd.load_lora_for_models(model, None, weights, lora_strength, 0)
            else:
                logging.warning("IP-Adapter Unified Loader FaceID: no LoRA named like %s in models/loras; the "
                                "adapter runs without it", lora_file(variant))
        return io.NodeOutput(model, ipadapter, ipadapter.clip_vision)


NODES = [ImagePromptUnifiedLoaderFaceID, ImagePromptInsightFaceLoader, ImagePromptFaceID]
