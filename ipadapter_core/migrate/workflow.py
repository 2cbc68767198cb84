"""``migrate``: a workflow in either format, copied and migrated, with its report."""
from __future__ import annotations

import copy

from .api_prompt import migrate_api_prompt
from .group_nodes import migrate_group_nodes
from .table import MigrationTable, ReportLine
from .ui_graph import migrate_ui_graphs


def is_ui_workflow(workflow) -> bool:
    return isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list)


def is_api_workflow(workflow) -> bool:
    return isinstance(workflow, dict) and bool(workflow) and all(
        isinstance(node, dict) and "class_type" in node for node in workflow.values())


def migrate(workflow: dict, table: MigrationTable | None = None) -> tuple[dict, list[ReportLine]]:
    """(the migrated copy of ``workflow``, one report line per node of that pack)."""
    table = table or MigrationTable.load()
    migrated, report = copy.deepcopy(workflow), []
    if is_ui_workflow(migrated):
        migrate_ui_graphs(table, migrated, report)
        migrate_group_nodes(table, (migrated.get("extra") or {}).get("groupNodes") or {}, report)
    elif is_api_workflow(migrated):
        migrate_api_prompt(table, migrated, report)
    else:
        raise ValueError("workflow: expected the UI format (a 'nodes' list) or the API format "
                         "(node id -> {'class_type', 'inputs'})")
    return migrated, report
