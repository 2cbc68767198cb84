"""ComfyUI_IPAdapter_plus's nodes as that pack defines them, and graphs built with them in its UI format (modelled
on that pack's example graphs), as the editor saves them."""
from __future__ import annotations

APPLY = "model:MODEL ipadapter:IPADAPTER image:IMAGE image_negative:IMAGE attn_mask:MASK clip_vision:CLIP_VISION"
FACE = APPLY + " insightface:INSIGHTFACE"
EMBEDS_IN = "model:MODEL ipadapter:IPADAPTER pos_embed:EMBEDS neg_embed:EMBEDS attn_mask:MASK clip_vision:CLIP_VISION"
STYLE_IN = ("model:MODEL ipadapter:IPADAPTER image_style:IMAGE image_composition:IMAGE image_negative:IMAGE "
            "attn_mask:MASK clip_vision:CLIP_VISION")
LOADER_IN = "model:MODEL ipadapter:IPADAPTER"
WEIGHTS_OUT = ("weights:FLOAT weights_invert:FLOAT total_frames:INT image_1:IMAGE image_2:IMAGE "
               "weights_strategy:WEIGHTS_STRATEGY")
# That pack's nodes as its INPUT_TYPES / RETURN_TYPES define them (IPAdapterPlus.py, commit 9d076a3),
# transcribed by hand: link inputs (required, then optional), widgets in order, outputs.
CUBIQ = {
    "IPAdapter": ("model:MODEL ipadapter:IPADAPTER image:IMAGE attn_mask:MASK", "weight start_at end_at weight_type",
                  "MODEL:MODEL"),
    "IPAdapterAdvanced": (APPLY, "weight weight_type combine_embeds start_at end_at embeds_scaling", "MODEL:MODEL"),
    "IPAdapterBatch": (APPLY, "weight weight_type start_at end_at embeds_scaling encode_batch_size", "MODEL:MODEL"),
    "IPAdapterFaceID": (FACE, "weight weight_faceidv2 weight_type combine_embeds start_at end_at embeds_scaling",
                        "MODEL:MODEL face_image:IMAGE"),
    "IPAAdapterFaceIDBatch": (FACE, "weight weight_faceidv2 weight_type combine_embeds start_at end_at "
                                    "embeds_scaling", "MODEL:MODEL face_image:IMAGE"),
    "IPAdapterFaceIDKolors": (FACE, "weight weight_faceidv2 weight_kolors weight_type combine_embeds start_at end_at "
                                    "embeds_scaling", "MODEL:MODEL face_image:IMAGE"),
    "IPAdapterTiled": (APPLY, "weight weight_type combine_embeds start_at end_at sharpening embeds_scaling",
                       "MODEL:MODEL tiles:IMAGE masks:MASK"),
    "IPAdapterTiledBatch": (APPLY, "weight weight_type start_at end_at sharpening embeds_scaling encode_batch_size",
                            "MODEL:MODEL tiles:IMAGE masks:MASK"),
    "IPAdapterEmbeds": (EMBEDS_IN, "weight weight_type start_at end_at embeds_scaling", "MODEL:MODEL"),
    "IPAdapterEmbedsBatch": (EMBEDS_IN, "weight weight_type start_at end_at embeds_scaling", "MODEL:MODEL"),
    "IPAdapterStyleComposition": (STYLE_IN, "weight_style weight_composition expand_style combine_embeds start_at "
                                            "end_at embeds_scaling", "MODEL:MODEL"),
    "IPAdapterStyleCompositionBatch": (STYLE_IN, "weight_style weight_composition expand_style start_at end_at "
                                                 "embeds_scaling", "MODEL:MODEL"),
    "IPAdapterMS": (FACE, "weight weight_faceidv2 weight_type combine_embeds start_at end_at embeds_scaling "
                          "layer_weights", "MODEL:MODEL"),
    "IPAdapterClipVisionEnhancer": (APPLY, "weight weight_type combine_embeds start_at end_at embeds_scaling "
                                           "enhance_tiles enhance_ratio", "MODEL:MODEL"),
    "IPAdapterClipVisionEnhancerBatch": (APPLY, "weight weight_type start_at end_at embeds_scaling enhance_tiles "
                                                "enhance_ratio encode_batch_size", "MODEL:MODEL"),
    "IPAdapterFromParams": ("model:MODEL ipadapter:IPADAPTER ipadapter_params:IPADAPTER_PARAMS image_negative:IMAGE "
                            "clip_vision:CLIP_VISION", "combine_embeds embeds_scaling", "MODEL:MODEL"),
    "IPAdapterPreciseStyleTransfer": (APPLY, "weight style_boost combine_embeds start_at end_at embeds_scaling",
                                      "MODEL:MODEL"),
    "IPAdapterPreciseStyleTransferBatch": (APPLY, "weight style_boost combine_embeds start_at end_at embeds_scaling",
                                           "MODEL:MODEL"),
    "IPAdapterPreciseComposition": (APPLY, "weight composition_boost combine_embeds start_at end_at embeds_scaling",
                                    "MODEL:MODEL"),
    "IPAdapterPreciseCompositionBatch": (APPLY, "weight composition_boost combine_embeds start_at end_at "
                                                "embeds_scaling", "MODEL:MODEL"),
    "IPAdapterUnifiedLoader": (LOADER_IN, "preset", "model:MODEL ipadapter:IPADAPTER"),
    "IPAdapterUnifiedLoaderFaceID": (LOADER_IN, "preset lora_strength provider", "MODEL:MODEL ipadapter:IPADAPTER"),
    "IPAdapterUnifiedLoaderCommunity": (LOADER_IN, "preset", "model:MODEL ipadapter:IPADAPTER"),
    "IPAdapterModelLoader": ("", "ipadapter_file", "IPADAPTER:IPADAPTER"),
    "IPAdapterInsightFaceLoader": ("", "provider model_name", "INSIGHTFACE:INSIGHTFACE"),
    "IPAdapterEncoder": ("ipadapter:IPADAPTER image:IMAGE mask:MASK clip_vision:CLIP_VISION", "weight",
                         "pos_embed:EMBEDS neg_embed:EMBEDS"),
    "IPAdapterCombineEmbeds": (" ".join(f"embed{i}:EMBEDS" for i in range(1, 6)), "method", "EMBEDS:EMBEDS"),
    "IPAdapterNoise": ("image_optional:IMAGE", "type strength blur", "IMAGE:IMAGE"),
    "PrepImageForClipVision": ("image:IMAGE", "interpolation crop_position sharpening", "IMAGE:IMAGE"),
    "IPAdapterSaveEmbeds": ("embeds:EMBEDS", "filename_prefix", ""),
    "IPAdapterLoadEmbeds": ("", "embeds", "EMBEDS:EMBEDS"),
    "IPAdapterWeights": ("image:IMAGE", "weights timing frames start_frame end_frame add_starting_frames "
                                        "add_ending_frames method", WEIGHTS_OUT),
    "IPAdapterWeightsFromStrategy": ("weights_strategy:WEIGHTS_STRATEGY image:IMAGE", "", WEIGHTS_OUT),
    "IPAdapterPromptScheduleFromWeightsStrategy": ("weights_strategy:WEIGHTS_STRATEGY", "prompt",
                                                   "prompt_schedule:STRING"),
    "IPAdapterCombineWeights": ("", "weights_1 weights_2", "weights:FLOAT count:INT"),
    "IPAdapterRegionalConditioning": ("image:IMAGE mask:MASK positive:CONDITIONING negative:CONDITIONING",
                                      "image_weight prompt_weight weight_type start_at end_at",
                                      "IPADAPTER_PARAMS:IPADAPTER_PARAMS POSITIVE:CONDITIONING NEGATIVE:CONDITIONING"),
    "IPAdapterCombineParams": (" ".join(f"params_{i}:IPADAPTER_PARAMS" for i in range(1, 6)), "",
                               "IPADAPTER_PARAMS:IPADAPTER_PARAMS"),
}
# The host's nodes these graphs use: link inputs and outputs.
HOST = {
    "CheckpointLoaderSimple": ("", "MODEL:MODEL CLIP:CLIP VAE:VAE"),
    "CLIPTextEncode": ("clip:CLIP", "CONDITIONING:CONDITIONING"),
    "CLIPVisionLoader": ("", "CLIP_VISION:CLIP_VISION"),
    "LoadImage": ("", "IMAGE:IMAGE MASK:MASK"),
    "ImageBatch": ("image1:IMAGE image2:IMAGE", "IMAGE:IMAGE"),
    "ImageScale": ("image:IMAGE", "IMAGE:IMAGE"),
    "SolidMask": ("", "MASK:MASK"),
    "EmptyLatentImage": ("", "LATENT:LATENT"),
    "KSampler": ("model:MODEL positive:CONDITIONING negative:CONDITIONING latent_image:LATENT", "LATENT:LATENT"),
    "VAEDecode": ("samples:LATENT vae:VAE", "IMAGE:IMAGE"),
    "SaveImage": ("images:IMAGE", ""),
    "Reroute": (":*", ":*"),
}
# the files the graphs name (map_to_stand_ins maps them to factory files)
CHECKPOINT, ADAPTER = "v1-5-pruned-emaonly.safetensors", "ip-adapter-plus_sd15.safetensors"
CLIP_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
SIZE = 128  # the side of the images the graphs make


def sockets(text: str) -> list[tuple[str, str]]:
    """Sockets written "name:TYPE name:TYPE" as [(name, TYPE), ...]."""
    return [tuple(item.split(":")) for item in text.split()]


class CubiqGraph:
    """A UI-format graph as the editor saves it (links [id, origin, slot, target, slot, type])."""

    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, kind: str, *widgets, title: str | None = None, color: str | None = None) -> int:
        inputs, outputs = (CUBIQ[kind][0], CUBIQ[kind][2]) if kind in CUBIQ else HOST[kind]
        if kind in CUBIQ:
            assert len(widgets) <= len(CUBIQ[kind][1].split()), kind
        node_id = len(self.nodes) + 1
        node = {"id": node_id, "type": kind, "pos": [210.5 * node_id, 40.0 * (node_id % 5)],
                "size": [315, 98 + 7 * node_id], "flags": {}, "order": node_id - 1, "mode": 0,
                "inputs": [{"name": name, "type": kind_, "link": None} for name, kind_ in sockets(inputs)],
                "outputs": [{"name": name, "type": kind_, "links": [], "slot_index": slot}
                            for slot, (name, kind_) in enumerate(sockets(outputs))],
                "properties": {"Node name for S&R": kind}, "widgets_values": list(widgets)}
        if title:
            node["title"] = title
        if color:
            node.update(color=color, bgcolor=color)
        self.nodes.append(node)
        return node_id

    def link(self, origin: int, slot: int, target: int, input_name: str, widget_type: str | None = None) -> int:
        """Link an output to an input; ``widget_type`` links a widget (the editor adds a socket for it)."""
        source, sink = self.nodes[origin - 1], self.nodes[target - 1]
        names = [item["name"] for item in sink["inputs"]]
        if input_name not in names:
            assert widget_type, f"{sink['type']} has no input {input_name}"
            sink["inputs"].append({"name": input_name, "type": widget_type, "widget": {"name": input_name},
                                   "link": None})
            names.append(input_name)
        link_id = len(self.links) + 1
        kind = source["outputs"][slot]["type"]
        self.links.append([link_id, origin, slot, target, names.index(input_name), kind])
        sink["inputs"][names.index(input_name)]["link"] = link_id
        source["outputs"][slot]["links"].append(link_id)
        return link_id

    def workflow(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [{"title": "Image prompt", "bounding": [0, 0, 900, 400],
                                                 "color": "#3f789e", "font_size": 24, "flags": {}}],
                "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}


def sampler_tail(graph: CubiqGraph, model: tuple[int, int], checkpoint: int, batch: int | None = 1,
                 positive: tuple[int, int] | None = None, negative: tuple[int, int] | None = None) -> int:
    """Prompts, latent, KSampler, decode, save; returns the latent node (for a linked batch size)."""
    if positive is None:
        positive = (graph.node("CLIPTextEncode", "a cabin in the snow"), 0)
        graph.link(checkpoint, 1, positive[0], "clip")
    if negative is None:
        negative = (graph.node("CLIPTextEncode", "blurry"), 0)
        graph.link(checkpoint, 1, negative[0], "clip")
    latent = graph.node("EmptyLatentImage", SIZE, SIZE, batch or 1)
    sampler = graph.node("KSampler", 42, "fixed", 2, 5.0, "euler", "normal", 1.0)
    graph.link(model[0], model[1], sampler, "model")
    graph.link(positive[0], positive[1], sampler, "positive")
    graph.link(negative[0], negative[1], sampler, "negative")
    graph.link(latent, 0, sampler, "latent_image")
    decode = graph.node("VAEDecode")
    graph.link(sampler, 0, decode, "samples")
    graph.link(checkpoint, 2, decode, "vae")
    save = graph.node("SaveImage", "migrated")
    graph.link(decode, 0, save, "images")
    return latent


def graph_simple() -> dict:
    """Unified loader, the simple node with a mask, 'prompt is more important' (ease out)."""
    g = CubiqGraph()
    checkpoint = g.node("CheckpointLoaderSimple", CHECKPOINT)
    loader = g.node("IPAdapterUnifiedLoader", "PLUS (high strength)", title="IPAdapter loader", color="#232")
    g.link(checkpoint, 0, loader, "model")
    image = g.node("LoadImage", "reference.png", "image")
    mask = g.node("SolidMask", 1.0, SIZE, SIZE)
    apply = g.node("IPAdapter", 0.8, 0.0, 1.0, "prompt is more important", title="Image prompt")
    g.link(loader, 0, apply, "model")
    g.link(loader, 1, apply, "ipadapter")
    g.link(image, 0, apply, "image")
    g.link(mask, 0, apply, "attn_mask")
    sampler_tail(g, (apply, 0), checkpoint)
    return g.workflow()


def graph_advanced() -> dict:
    """Model loader and CLIP vision loader through a reroute, two prepped references averaged, a noise
    image as the negative, K+V scaling."""
    g = CubiqGraph()
    checkpoint = g.node("CheckpointLoaderSimple", CHECKPOINT)
    adapter = g.node("IPAdapterModelLoader", ADAPTER)
    reroute = g.node("Reroute")
    g.link(adapter, 0, reroute, "")
    clip_vision = g.node("CLIPVisionLoader", CLIP_H)
    image = g.node("LoadImage", "reference.png", "image")
    wide = g.node("ImageScale", "bilinear", 192, 96, "disabled")
    g.link(image, 0, wide, "image")
    prep = g.node("PrepImageForClipVision", "LANCZOS", "top", 0.15)
    g.link(wide, 0, prep, "image")
    both = g.node("ImageBatch")
    g.link(prep, 0, both, "image1")
    g.link(image, 0, both, "image2")
    noise = g.node("IPAdapterNoise", "fade", 0.3, 5)
    g.link(image, 0, noise, "image_optional")
    apply = g.node("IPAdapterAdvanced", 0.7, "ease in", "average", 0.0, 0.9, "K+V")
    g.link(checkpoint, 0, apply, "model")
    g.link(reroute, 0, apply, "ipadapter")
    g.link(both, 0, apply, "image")
    g.link(noise, 0, apply, "image_negative")
    g.link(clip_vision, 0, apply, "clip_vision")
    sampler_tail(g, (apply, 0), checkpoint)
    return g.workflow()


def graph_embeds() -> dict:
    """Two encodings (one masked) combined by average, applied as embeds with the first's negative."""
    g = CubiqGraph()
    checkpoint = g.node("CheckpointLoaderSimple", CHECKPOINT)
    loader = g.node("IPAdapterUnifiedLoader", "PLUS (high strength)")
    g.link(checkpoint, 0, loader, "model")
    image = g.node("LoadImage", "reference.png", "image")
    mask = g.node("SolidMask", 0.5, 96, 96)
    first, second = g.node("IPAdapterEncoder", 1.5), g.node("IPAdapterEncoder", 0.6)
    for encoder in (first, second):
        g.link(loader, 1, encoder, "ipadapter")
        g.link(image, 0, encoder, "image")
    g.link(mask, 0, second, "mask")
    combine = g.node("IPAdapterCombineEmbeds", "average")
    g.link(first, 0, combine, "embed1")
    g.link(second, 0, combine, "embed2")
    apply = g.node("IPAdapterEmbeds", 0.8, "linear", 0.0, 1.0)   # saved before embeds_scaling existed
    g.link(loader, 0, apply, "model")
    g.link(loader, 1, apply, "ipadapter")
    g.link(combine, 0, apply, "pos_embed")
    g.link(first, 1, apply, "neg_embed")
    sampler_tail(g, (apply, 0), checkpoint)
    return g.workflow()


def two_references(g: CubiqGraph) -> tuple[int, int, int]:
    """Checkpoint, unified loader (plus) and a batch of two references (the image and a smaller copy): the
    start of that pack's animation graphs."""
    checkpoint = g.node("CheckpointLoaderSimple", CHECKPOINT)
    loader = g.node("IPAdapterUnifiedLoader", "PLUS (high strength)")
    g.link(checkpoint, 0, loader, "model")
    image = g.node("LoadImage", "reference.png", "image")
    small = g.node("ImageScale", "nearest-exact", 96, 96, "center")
    g.link(image, 0, small, "image")
    both = g.node("ImageBatch")
    g.link(image, 0, both, "image1")
    g.link(small, 0, both, "image2")
    return checkpoint, loader, both


def graph_batch_weights() -> dict:
    """Frame weights drive a batch node: weights into its weight widget, the frame count into the latent's
    batch size, the repeated images into its image (that pack's animation pattern)."""
    g = CubiqGraph()
    checkpoint, loader, both = two_references(g)
    weights = g.node("IPAdapterWeights", "1.0, 0.0", "linear", 2, 0, 9999, 0, 0, "full batch")
    g.link(both, 0, weights, "image")
    batch = g.node("IPAdapterBatch", 1.0, "linear", 0.0, 1.0, "V only", 0)
    g.link(loader, 0, batch, "model")
    g.link(loader, 1, batch, "ipadapter")
    g.link(weights, 3, batch, "image")
    g.link(weights, 0, batch, "weight", widget_type="FLOAT")
    latent = sampler_tail(g, (batch, 0), checkpoint)
    g.link(weights, 2, latent, "batch_size", widget_type="INT")
    return g.workflow()


def graph_weights_strategy() -> dict:
    """A cross-fade made from a weights strategy: two references over 2 frames each (shift batches), the
    strategy laid over them again, its weights and their inverse into two batch nodes, its prompt schedule as
    the positive text; a third batch node weighs the two references with combined weights."""
    g = CubiqGraph()
    checkpoint, loader, both = two_references(g)
    weights = g.node("IPAdapterWeights", "1.0, 0.0", "linear", 2, 0, 9999, 1, 1, "shift batches")
    g.link(both, 0, weights, "image")
    again = g.node("IPAdapterWeightsFromStrategy")
    g.link(weights, 5, again, "weights_strategy")
    g.link(both, 0, again, "image")
    schedule = g.node("IPAdapterPromptScheduleFromWeightsStrategy", "a cabin in the snow\na cabin at night")
    g.link(weights, 5, schedule, "weights_strategy")
    model = (loader, 0)
    for weight_slot, image_slot in ((0, 3), (1, 4)):
        batch = g.node("IPAdapterBatch", 1.0, "linear", 0.0, 1.0, "V only", 0)
        g.link(*model, batch, "model")
        g.link(loader, 1, batch, "ipadapter")
        g.link(again, image_slot, batch, "image")
        g.link(again, weight_slot, batch, "weight", widget_type="FLOAT")
        model = (batch, 0)
    combine = g.node("IPAdapterCombineWeights", 0.6, 0.9)
    batch = g.node("IPAdapterBatch", 1.0, "linear", 0.0, 1.0, "V only", 0)
    g.link(*model, batch, "model")
    g.link(loader, 1, batch, "ipadapter")
    g.link(both, 0, batch, "image")
    g.link(combine, 0, batch, "weight", widget_type="FLOAT")
    positive = g.node("CLIPTextEncode", "")
    g.link(checkpoint, 1, positive, "clip")
    g.link(schedule, 0, positive, "text", widget_type="STRING")
    latent = sampler_tail(g, (batch, 0), checkpoint, positive=(positive, 0))
    g.link(again, 2, latent, "batch_size", widget_type="INT")
    return g.workflow()


UI_GRAPHS = {"simple": graph_simple, "advanced": graph_advanced, "embeds": graph_embeds,
             "batch_weights": graph_batch_weights, "weights_strategy": graph_weights_strategy}
# images each UI graph saves: one per frame where frame weights set the batch size
UI_GRAPH_IMAGES = {"batch_weights": 4, "weights_strategy": 4}
