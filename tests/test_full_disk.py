"""A full disk over real HTTP: the hit run ends ``error``, reads go on, ``/ready`` says why,
a refused create stores nothing, and everything works again once space returns — no restart.

The data directory is a real 1 MiB tmpfs filled to its last byte (see ``tests/tiny_fs.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from app.settings import Settings
from app.testing import Gates, gated_registry
from tests.live import live_server
from tests.tiny_fs import tiny_tmpfs

pytestmark = pytest.mark.timeout(30)


async def test_full_disk_run_ends_error_and_the_server_recovers_without_restart(
    tmp_path: Path, gates: Gates
) -> None:
    """The run whose write hits the full disk ends ``error`` (recorded once space returns),
    another conversation stays readable, ``/ready`` is 503 ``store_unavailable`` until a
    probe write succeeds, and a create with ``run: true`` on the full disk stores nothing."""
    with tiny_tmpfs(tmp_path / "data") as disk:
        settings = Settings(data_dir=disk.path, max_concurrent_runs=2, max_queued_runs=3)
        with trio.fail_after(20):
            async with live_server(settings, gated_registry(gates)) as server:
                client = server.client
                agent: dict[str, Any] = {"kind": "gated", "steps": ["hit", "next"]}
                hit = await client.post("/api/conversations", json={"agent": agent, "run": True})
                hit_id = hit.json()["id"]
                bystander = await client.post("/api/conversations", json={"agent": agent})
                await gates["hit"].wait_entered()
                assert (await client.get("/ready")).status_code == 200

                disk.fill()
                gates["hit"].release()  # the step ends: saving its progress fails
                run_id = hit.json()["run"]["id"]
                while (await client.get("/ready")).status_code == 200:
                    await trio.sleep(0.01)
                ready = await client.get("/ready")
                assert ready.status_code == 503
                assert ready.json()["error"]["code"] == "store_unavailable"
                while server.supervisor.statistics().running:
                    await trio.sleep(0.01)  # the run's thread is gone...
                read = await client.get(f"/api/conversations/{bystander.json()['id']}")
                assert read.status_code == 200  # ...and reads keep working
                before = (await client.get("/api/conversations")).json()["items"]
                refused = await client.post(
                    "/api/conversations", json={"agent": agent, "run": True}
                )
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "store_unavailable"
                assert (await client.get("/api/conversations")).json()["items"] == before

                disk.free()
                assert (await client.get("/ready")).status_code == 200  # a probe succeeded
                path = f"/api/conversations/{hit_id}/runs/{run_id}"
                while (await client.get(path)).json()["status"] == "running":
                    await trio.sleep(0.05)  # the end ledger retries the final status
                ended = (await client.get(path)).json()
                assert (ended["status"], ended["reason"]) == ("error", "internal_error")
                assert "StoreUnavailable" in ended["error"]
                again = await client.post(f"/api/conversations/{hit_id}/runs", json={})
                assert again.status_code == 202, again.text  # not 409 illegal_transition
                gates["next"].release()  # creates the gate if no step reached it yet
                done = await client.get(f"{path[: -len(run_id)]}{again.json()['id']}/wait")
                assert done.json()["status"] == "finished"
