"""Open graphs built with ComfyUI_IPAdapter_plus on this pack: that pack's nodes become ours.

    python -m ipadapter_core.migrate IN.json [-o OUT.json]

Reads a workflow in the UI format (nodes and links as the editor saves them, with subgraphs and group
nodes) or the API format (node id -> class_type and inputs). Every node of that pack becomes the node
of this pack that does the same: widget values and inputs are mapped, input and output slots renumbered,
the link types IPADAPTER, IPADAPTER_PARAMS and WEIGHTS_STRATEGY renamed. Links, groups, titles, positions,
sizes, colours and the nodes of the host and of other packs are kept. One report line per node of that pack says:
mapped; mapped with a difference in behaviour (which); or what is not supported. Without -o the
migrated workflow goes to stdout and the report to stderr. A migrated workflow migrates to itself.

The mapping is data, ``ipadapter_core/migration_table.json`` (the frontend extension reads it too):
``nodes`` (that pack's node id -> ours: its widget order and defaults, how each of our widgets is
computed, which inputs and outputs go where, and what differs), ``ours`` (our nodes' inputs in the
host's order and outputs, from the host's /object_info) and ``types`` (link types to rename).
"""
from .cli import main
from .table import TABLE_PATH, Conversion, MigrationTable, ReportLine, node_schema
from .workflow import is_api_workflow, is_ui_workflow, migrate

__all__ = ["TABLE_PATH", "Conversion", "MigrationTable", "ReportLine", "is_api_workflow", "is_ui_workflow", "main",
           "migrate", "node_schema"]
