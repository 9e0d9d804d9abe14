"""The local control plane's own admin client (ControlPlane.request), which benches and fixtures call from
several threads at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor


def test_concurrent_admin_requests_all_succeed(control_plane):
    """Many threads at once: every request authenticates (the admin key pair was once rewritten per
    request, so a concurrent reader could load a half-written PEM: ssl.SSLError PEM lib)."""
    def get(_: int) -> int:
        return control_plane.request("/readyz", timeout=30)[0]

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(get, range(400)))
    assert codes == [200] * 400
