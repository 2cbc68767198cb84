"""The newcomer check: every input of every node id the pack registers (ours and ComfyUI_IPAdapter_plus's compatible
ids) carries a tooltip, as the host serves it at /object_info."""
from __future__ import annotations

import pytest

from tools import comfy_host

pytestmark = pytest.mark.server


def test_every_input_of_every_node_id_the_pack_registers_has_a_tooltip(server):
    info = server.get_json("/object_info")
    ours = {node_id: entry for node_id, entry in info.items()
            if entry["python_module"] == f"custom_nodes.{comfy_host.PACK_DIR_NAME}"}
    assert "IPAdapterUnifiedLoader" in ours and "ImagePromptUnifiedLoader" in ours
    untipped = {node_id: [name for name, (_, *options) in {**entry["input"]["required"],
                                                           **entry["input"].get("optional", {})}.items()
                          if not (options and options[0].get("tooltip"))]
                for node_id, entry in ours.items()}
    untipped = {node_id: names for node_id, names in untipped.items() if names}
    assert not untipped, f"{sum(map(len, untipped.values()))} inputs without a tooltip: {untipped}"
