"""gpuvisor on Ray Serve: every replica owns one GPU and runs one supervisor.

Ray places the replicas across machines and routes calls among them;
gpuvisor keeps each replica's GPU work in a worker process it can kill, so
a mode change on a replica gives back all of that GPU's memory. Its own
distribution, gpuvisor-ray: ``pip install ./contrib/ray`` brings Ray Serve
with it; see contrib/ray/README.md.
"""

from __future__ import annotations

try:
    from ray import serve as _serve  # noqa: F401  (only to fail here, with the fix, when ray is missing)
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(f"gpuvisor_ray needs Ray Serve: pip install 'ray[serve]>=2.9' ({exc})") from exc

from gpuvisor_ray.deployment import GpuvisorDeployment

__all__ = ["GpuvisorDeployment"]
