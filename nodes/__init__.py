"""ComfyUI glue: the pack's extension and its node list."""
from comfy_api.latest import ComfyExtension, io


class ImagePromptEditExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []
