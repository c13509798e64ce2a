"""A cap on what one tenant has in flight (``serving.max_requests_per_tenant``).

Without it the queue is first come, first served: one client that sends ``max_queue`` requests
at once (a batch job, a retry storm, a hostile key) takes every place in it, and every other
client gets 429 until they are done. With it, a tenant (the API key, and ``user`` within it:
:func:`serving.auth.tenant_of`) may have that many requests waiting or running; its next ones
get a 429 that says so, and everyone else's are served as before. Requests without a key or
``user`` share one tenant.

The server's event loop alone calls it (no lock): it keeps each tenant's handles and counts
those still in flight (neither done, failed, nor given up by their client) when the tenant
sends more.
"""

from __future__ import annotations

from serving.engine_loop import RequestHandle

__all__ = ["TenantLimit", "TenantBusy"]

SWEEP_EVERY = 256  # submissions between sweeps of tenants that sent nothing since


class TenantBusy(Exception):
    """The tenant has as many requests in flight as it may."""


class TenantLimit:
    def __init__(self, cap: int | None):
        self.cap = cap
        self._handles: dict[str | None, list[RequestHandle]] = {}
        self._submitted = 0

    def in_flight(self, tenant: str | None) -> int:
        live = [h for h in self._handles.get(tenant, ()) if h.in_flight]
        if live:
            self._handles[tenant] = live
        else:
            self._handles.pop(tenant, None)
        return len(live)

    def check(self, tenant: str | None, n: int) -> None:
        """Raise :class:`TenantBusy` if ``n`` more requests would take ``tenant`` past the cap
        (a ``ValueError`` if ``n`` alone does: waiting would not help)."""
        if self.cap is None:
            return
        if n > self.cap:
            raise ValueError(f"this request makes {n} requests (prompts x n), more than this server lets one "
                             f"client have in flight ({self.cap}: serving.max_requests_per_tenant)")
        busy = self.in_flight(tenant)
        if busy + n > self.cap:
            raise TenantBusy(f"this client has {busy} requests in flight, and this server lets one client have "
                             f"{self.cap} (serving.max_requests_per_tenant); retry when one is done")

    def track(self, tenant: str | None, handles: list[RequestHandle]) -> None:
        if self.cap is None:
            return
        self._handles.setdefault(tenant, []).extend(handles)
        self._submitted += 1
        if self._submitted % SWEEP_EVERY == 0:  # tenants that went quiet hold no handles for ever
            for quiet in list(self._handles):
                self.in_flight(quiet)

    @property
    def tenants(self) -> int:
        """Tenants with handles kept (for tests and the curious)."""
        return len(self._handles)
