"""Running herd on an existing distributed engine instead of a home-made cluster.

`herd.deploy.ray`: herd replicas on Ray Serve behind a prefix-affinity router
(`herd.deploy.affinity`); it needs the `ray` extra (`pip install 'herd[ray]'`).
"""

from __future__ import annotations

from herd.errors import HerdError


class ClusterError(HerdError):
    """The cluster cannot run herd: unreachable address, mismatched herd versions, a replica
    that cannot get or load its model. The message names the address or node."""
