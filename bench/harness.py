"""What the benchmarks share: an in-process host (optionally with ComfyUI_IPAdapter_plus loaded beside this
pack), the full SD1.5 UNet, the same adapter files applied by each implementation, timing and statistics.

The most-used pack is never part of this repository: pass the folder it was unpacked into (``--cubiq DIR``,
e.g. ``git -C <mirror> archive HEAD | tar -x -C /tmp/cubiq_pack``); it is linked into a host base directory
of its own under the system temp folder and loaded by the host as a custom node.
"""
from __future__ import annotations

import gc
import json
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tools import comfy_host, factory

SD15_CHECKPOINT = "checkpoints/sd15_layout.ckpt"
ADAPTERS = {  # adapter kind -> factory file
    "base": "ipadapter/ip-adapter_sd15.bin",
    "plus": "ipadapter/ip-adapter-plus_sd15.bin",
    "full-face": "ipadapter/ip-adapter-full-face_sd15.bin",
}
CUBIQ_NODE_DIR = "ComfyUI_IPAdapter_plus"


def machine() -> str:
    """The machine CPU timings are labelled with."""
    import os
    load = os.getloadavg()[0]
    return (f"{os.cpu_count()}-core CPU ({platform.machine()}, shared: load {load:.1f}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


def start_host(cubiq: Path | None = None, pytorch_attention: bool = False, cpu: bool = True):
    """The host's ``nodes`` module with this pack (and ComfyUI_IPAdapter_plus from ``cubiq``) loaded; on the
    CPU, or (``cpu=False``) on the device the host picks."""
    base = Path(tempfile.mkdtemp(prefix="bench-host-"))
    if cubiq is not None:
        if not (Path(cubiq) / "CrossAttentionPatch.py").is_file():
            raise FileNotFoundError(f"--cubiq {cubiq}: not an unpacked ComfyUI_IPAdapter_plus (no CrossAttentionPatch.py)")
        (base / "custom_nodes").mkdir(parents=True)
        (base / "custom_nodes" / CUBIQ_NODE_DIR).symlink_to(Path(cubiq).resolve(), target_is_directory=True)
    comfy_host.import_host(base_dir=base, models_dir=factory.models_dir(), load_nodes=False,
                           pytorch_attention=pytorch_attention, cpu=cpu)
    nodes = comfy_host.import_host()
    if cubiq is not None and "IPAdapterEmbeds" not in nodes.NODE_CLASS_MAPPINGS:
        raise RuntimeError(f"the host did not load ComfyUI_IPAdapter_plus from {cubiq}")
    return nodes


def load_unet(name: str = SD15_CHECKPOINT):
    """The MODEL of a factory checkpoint, without its text encoder and VAE (less memory)."""
    import comfy.sd
    models = factory.ensure(name)
    return comfy.sd.load_checkpoint_guess_config(str(models / name), output_vae=False, output_clip=False,
                                                 output_clipvision=False)[0]


def clip_embeds(adapter_file, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random cond and uncond CLIP outputs of the kind the adapter reads ([1, E] pooled or [1, 257, E])."""
    v = adapter_file.variant
    shape = (1, v.embed_dim) if v.encoder_output == "image_embeds" else (1, 257, v.embed_dim)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


@dataclass
class Implementations:
    """Apply each implementation's adapter to a model, from the same file and the same CLIP outputs.
    ``files`` maps an adapter kind to its factory file."""
    files: dict = field(default_factory=lambda: dict(ADAPTERS))

    def __post_init__(self):
        self.loader = comfy_host.pack_module("ipadapter_core.loader")
        self.projection = comfy_host.pack_module("ipadapter_core.projection")
        self.encode = comfy_host.pack_module("nodes.ipadapter_encode")
        self.apply = comfy_host.pack_module("nodes.ipadapter_apply")
        self.options = comfy_host.pack_module("ipadapter_core.apply_options").ApplyOptions
        self._ours, self._theirs, self._embeds = {}, {}, {}

    def _loaded(self, kind: str):
        if kind not in self._ours:
            models = factory.ensure(self.files[kind])
            adapter = self.loader.load_adapter(models / self.files[kind])
            self._ours[kind] = self.encode.LoadedAdapter(adapter, self.projection.build_projection(adapter.variant,
                                                                                                   adapter.image_proj))
        return self._ours[kind]

    def embeds(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Random cond and uncond CLIP outputs for the adapter of ``kind`` (fixed per kind)."""
        if kind not in self._embeds:
            self._embeds[kind] = clip_embeds(self._loaded(kind).file, torch.Generator().manual_seed(len(self._embeds)))
        return self._embeds[kind]

    def ours(self, model, kind: str, weight: float = 1.0, **options):
        """Our EMBEDS apply path (after the CLIP encode): project the embeds, build the spec, patch a clone."""
        loaded = self._loaded(kind)
        return self.apply.apply_tokens(model, loaded, *self.encode.image_tokens(loaded, *self.embeds(kind)),
                                       self.options.from_inputs(weight, **options))

    def cubiq(self, model, kind: str, weight: float = 1.0, attn_mask=None, start_at=0.0, end_at=1.0):
        """ComfyUI_IPAdapter_plus's IPAdapterEmbeds node on the same file and CLIP outputs."""
        import nodes
        cond_embeds, uncond_embeds = self.embeds(kind)
        if kind not in self._theirs:
            self._theirs[kind] = nodes.NODE_CLASS_MAPPINGS["IPAdapterModelLoader"]().load_ipadapter_model(
                self.files[kind].split("/", 1)[1])[0]
        node = nodes.NODE_CLASS_MAPPINGS["IPAdapterEmbeds"]()
        return node.apply_ipadapter(model, self._theirs[kind], cond_embeds, weight, "linear", start_at, end_at,
                                    neg_embed=uncond_embeds, attn_mask=attn_mask)[0]

    def stack(self, implementation: str, model, kinds: list[str], **options):
        apply = self.ours if implementation == "ours" else self.cubiq
        for kind in kinds:
            model = apply(model, kind, **options)
        return model


class UNetTimer:
    """Wall time and CPU time of every call of a UNet module (forward hooks; clones of a host model share
    the module). On a machine shared with other jobs the process's CPU time is the steadier measure of the
    work a step does: wall time also counts the time the scheduler gave to other processes."""

    def __init__(self, module: torch.nn.Module):
        self.times: list[tuple[float, float]] = []
        self._start = (0.0, 0.0)
        module.register_forward_pre_hook(self._before)
        module.register_forward_hook(self._after)

    def _before(self, *_):
        self._start = (time.perf_counter(), time.process_time())

    def _after(self, *_):
        self.times.append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))

    def take(self) -> list[tuple[float, float]]:
        """(wall s, CPU s) of each call since the last take."""
        times, self.times = self.times, []
        return times


def summary(values: list[float]) -> dict:
    """Median, quartiles, min and max of a list of numbers."""
    values = sorted(values)
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "min": values[0], "max": values[-1],
            "n": len(values)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free() -> None:
    gc.collect()


def write_result(path: Path | None, result) -> None:
    """Write a bench's result as JSON to ``path`` (its folder made if needed); nothing when ``path`` is None."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
