"""ComfyUI entry point of the image-prompt (IP-Adapter) and instruction-edit (InstructPix2Pix) node pack."""
import tomllib
from pathlib import Path

WEB_DIRECTORY = "./web"  # the frontend extension that offers to migrate ComfyUI_IPAdapter_plus graphs

# The pack's version: the one the Comfy Registry lists, written once, in pyproject.toml.
__version__ = tomllib.loads(Path(__file__).with_name("pyproject.toml").read_text())["project"]["version"]


async def comfy_entrypoint():
    """The pack's V3 extension (imported here, so that importing the pack alone needs no host)."""
    from .nodes import ImagePromptEditExtension
    return ImagePromptEditExtension()
