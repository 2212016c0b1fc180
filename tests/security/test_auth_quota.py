"""Per-tenant quota (``tenant_max_active_runs``): one tenant cannot fill the queue.

Real HTTP with two tenants' keys; runs are held with gates, so "active" is asserted at
known points, and bursts are concurrent requests (admission is exact: no checkpoint
between the count and the reservation).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from app.admission import Admission
from app.errors import TenantQuotaExceeded
from app.settings import Settings
from app.store import NewConversation, SqliteStore
from app.supervisor import open_run_supervisor
from app.testing import Gates, gated_registry
from tests.live import LiveServer, live_server
from tests.security.test_auth_tenants import ALICE, BOB, KEYS, client_of

pytestmark = pytest.mark.timeout(30)

QUOTA, BURST = 2, 6


def quota_settings(settings: Settings) -> Settings:
    update = {
        "api_keys": Settings(api_keys=KEYS).api_keys,
        "tenant_max_active_runs": QUOTA,
        "max_concurrent_runs": 1,
        "max_queued_runs": 100,
        "queue_full_retry_after_seconds": 7,
    }
    return settings.model_copy(update=update)


def gated(step: str) -> dict[str, Any]:
    return {"agent": {"kind": "gated", "steps": [step]}, "run": True}


async def burst(client: httpx.AsyncClient, step: str, count: int) -> list[httpx.Response]:
    """``count`` concurrent creates with a run, each held at gate ``step``."""
    answers: list[httpx.Response] = []

    async def send() -> None:
        answers.append(await client.post("/api/conversations", json=gated(step)))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(send)
    return answers


async def active_runs(server: LiveServer) -> int:
    return len(server.supervisor.active_runs())


async def test_tenant_quota_refuses_past_it_while_other_tenants_are_admitted(
    settings: Settings, gates: Gates
) -> None:
    """A burst of 6 run requests from Alice with a quota of 2: exactly 2 admitted, 4 get
    429 tenant_quota_exceeded with Retry-After and store nothing; Bob is still admitted
    (up to his own quota); when one of Alice's runs ends she is admitted again."""
    with trio.fail_after(25):
        async with (
            live_server(quota_settings(settings), gated_registry(gates)) as server,
            client_of(server, ALICE) as alice,
            client_of(server, BOB) as bob,
        ):
            answers = await burst(alice, "a", BURST)
            statuses = sorted(answer.status_code for answer in answers)
            assert statuses == [201] * QUOTA + [429] * (BURST - QUOTA)
            for refused in (a for a in answers if a.status_code == 429):
                assert refused.json()["error"]["code"] == "tenant_quota_exceeded"
                assert refused.headers["Retry-After"] == "7"
                assert refused.json()["error"]["detail"]["tenant_max_active_runs"] == QUOTA
            listed = await alice.get("/api/conversations")
            assert len(listed.json()["items"]) == QUOTA  # a refused create stored nothing

            bobs = await burst(bob, "b", QUOTA)
            assert [answer.status_code for answer in bobs] == [201] * QUOTA
            assert await active_runs(server) == 2 * QUOTA

            await gates["a"].wait_entered()  # one slot: one of Alice's runs holds it
            gates["a"].release()
            first = next(a.json() for a in answers if a.status_code == 201)
            path = f"/api/conversations/{first['id']}/runs/{first['run']['id']}/wait"
            ended = await alice.get(path, params={"timeout": 10})
            assert ended.json()["status"] == "finished", ended.text
            admitted = await alice.post("/api/conversations", json=gated("c"))
            assert admitted.status_code == 201, admitted.text
            gates.release_all()


async def test_quota_zero_means_none(settings: Settings, gates: Gates) -> None:
    """With tenant_max_active_runs = 0 (the default) a tenant may fill the whole queue."""
    update = {"api_keys": Settings(api_keys=KEYS).api_keys, "max_concurrent_runs": 1}
    with trio.fail_after(20):
        async with (
            live_server(settings.model_copy(update=update), gated_registry(gates)) as server,
            client_of(server, ALICE) as alice,
        ):
            answers = await burst(alice, "a", settings.max_queued_runs + 1)
            assert all(answer.status_code == 201 for answer in answers)
            assert server.supervisor.run_tenant(answers[0].json()["run"]["id"]) == "alice"
            gates.release_all()


async def test_a_reservation_undone_and_an_ended_run_give_the_place_back(
    settings: Settings, store: SqliteStore, gates: Gates
) -> None:
    """Quota 1, at the supervisor: a write that fails after the reservation leaves the
    tenant's count at 0 (the next run is admitted); while that run is active the tenant is
    at its quota (another tenant is not); once it ended the tenant is admitted again."""
    quota = settings.model_copy(update={"tenant_max_active_runs": 1})
    async with open_run_supervisor(quota, store, registry=gated_registry(gates)) as sup:
        mine = create_in(store, "alice")
        theirs = create_in(store, "bob")

        def failing(admission: Admission) -> None:
            raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            await sup.admit(mine, failing, lambda _: store.get_conversation(mine))
        run = await sup.start_run(mine)  # the tenant comes from the conversation
        assert sup.run_tenant(run.id) == "alice"
        with pytest.raises(TenantQuotaExceeded):
            sup.check_admission(mine, tenant="alice")
        sup.check_admission(theirs, tenant="bob")
        gates["a"].release()
        ended = await sup.wait_run(mine, run.id, 10)
        assert ended.status == "finished"
        assert sup.run_tenant(run.id) is None
        sup.check_admission(mine, tenant="alice")


def create_in(store: SqliteStore, tenant: str) -> str:
    new = NewConversation({"kind": "gated", "steps": ["a"]}, None, 5, tenant=tenant)
    record, _ = store.create_conversation(new)
    return record.id
