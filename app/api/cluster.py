"""``GET /api/cluster``: the nodes sharing this server's database.

On PostgreSQL (``database_url``) the answer is the ``nodes`` table — every node whose lease
is live, as each last heartbeat it (``app/cluster/nodes.py``; ``running`` and
``max_concurrent_runs`` are at most a third of ``node_lease_seconds`` old), ordered by
id — read on a short connection in a thread of the I/O limiter. On SQLite one process owns
the database: the answer is this node alone, from its own live numbers (``last_heartbeat``:
now). Each node's ``GET /api/server`` keeps its own numbers. Who may read it: as
``/api/server`` (with API keys, admin keys only).
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field
from quart import Blueprint, Response

from app.api.http import json_response, supervisor
from app.api.openapi import documented
from app.auth import require_admin
from app.cluster.nodes import read_nodes
from app.events import utc_now

blueprint = Blueprint("cluster", __name__)


class ClusterNodeInfo(BaseModel):
    id: str = Field(description="The node's id: the `node` of the runs it claimed.")
    address: str = Field(description='The URL it serves on; "" for one without HTTP.')
    max_concurrent_runs: int = Field(description="Its run slots (as changed at runtime).")
    running: int = Field(description="Its runs holding a run slot.")
    last_heartbeat: datetime = Field(description="When it last renewed its lease.")


class ClusterInfo(BaseModel):
    nodes: list[ClusterNodeInfo]


@blueprint.get("/api/cluster")
@documented(
    "The nodes sharing this server's database, ordered by id, as each last heartbeat its"
    " lease (on SQLite: this server alone). With API keys: admin keys only (403).",
    response=ClusterInfo,
    errors=(403,),
)
async def cluster() -> Response:
    require_admin()
    sup = supervisor()
    url = sup.store.cluster_url
    if url is None:
        stats = sup.statistics()
        alone = ClusterNodeInfo(
            id=sup.store.node_id,
            address=sup.address,
            max_concurrent_runs=stats.max_concurrent_runs,
            running=stats.running,
            last_heartbeat=utc_now(),
        )
        return json_response(ClusterInfo(nodes=[alone]))
    rows = await sup.io(read_nodes, url)
    return json_response(ClusterInfo(nodes=[ClusterNodeInfo(**row) for row in rows]))
