"""OpenAPI links: which answer supplies the parameters of which next call.

A client (or a stateful test, such as schemathesis's) follows them from a
listing or a create to the item's own operations: from ``POST /v1/tokens``
to ``DELETE /v1/tokens/{token_id}`` with the new token's ``id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Link:
    """``source`` answering ``status`` gives ``parameters`` of ``target``
    (each an OpenAPI runtime expression such as ``$response.body#/id``)."""

    name: str
    source: tuple[str, str]
    status: str
    target: tuple[str, str]
    parameters: dict[str, str]


def _pointer(method: str, path: str) -> str:
    # JSON pointer escaping (RFC 6901): "~" first, then "/".
    return "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method


_FIRST_DEVICE = {"device_id": "$response.body#/items/0/id"}
_NEW_RELEASE = {"name": "$response.body#/name", "version": "$response.body#/version"}
_NEW_ROLLOUT = {"rollout_id": "$response.body#/id"}

LINKS: tuple[Link, ...] = (
    Link("RevokeNewToken", ("post", "/v1/tokens"), "201",
         ("delete", "/v1/tokens/{token_id}"), {"token_id": "$response.body#/id"}),
    Link("RevokeListedToken", ("get", "/v1/tokens"), "200",
         ("delete", "/v1/tokens/{token_id}"), {"token_id": "$response.body#/items/0/id"}),
    Link("GetDevice", ("get", "/v1/devices"), "200",
         ("get", "/v1/devices/{device_id}"), _FIRST_DEVICE),
    Link("GetDeviceHistory", ("get", "/v1/devices"), "200",
         ("get", "/v1/devices/{device_id}/history"), _FIRST_DEVICE),
    Link("GetDeviceMetrics", ("get", "/v1/devices"), "200",
         ("get", "/v1/devices/{device_id}/metrics"), _FIRST_DEVICE),
    Link("RevokeCredentials", ("post", "/v1/devices/{device_id}/credentials"), "201",
         ("delete", "/v1/devices/{device_id}/credentials"),
         {"device_id": "$response.body#/device_id"}),
    Link("Unassign", ("post", "/v1/devices/{device_id}/assignment"), "200",
         ("delete", "/v1/devices/{device_id}/assignment"),
         {"device_id": "$request.path.device_id"}),
    Link("GetArtifact", ("put", "/v1/artifacts/{path}"), "201",
         ("get", "/v1/artifacts/{path}"), {"path": "$response.body#/path"}),
    Link("HeadArtifact", ("put", "/v1/artifacts/{path}"), "201",
         ("head", "/v1/artifacts/{path}"), {"path": "$response.body#/path"}),
    Link("GetVersions", ("get", "/v1/models"), "200",
         ("get", "/v1/models/{name}/versions"), {"name": "$response.body#/items/0/name"}),
    Link("GetRelease", ("post", "/v1/models"), "201",
         ("get", "/v1/models/{name}/versions/{version}"), _NEW_RELEASE),
    Link("GetReleaseMetrics", ("post", "/v1/models"), "201",
         ("get", "/v1/models/{name}/versions/{version}/metrics"), _NEW_RELEASE),
    Link("GetRollout", ("post", "/v1/rollouts"), "201",
         ("get", "/v1/rollouts/{rollout_id}"), _NEW_ROLLOUT),
    Link("ActOnRollout", ("post", "/v1/rollouts"), "201",
         ("post", "/v1/rollouts/{rollout_id}/{action}"), _NEW_ROLLOUT),
)


def add_links(schema: dict[str, Any], links: tuple[Link, ...] = LINKS) -> None:
    """Write ``links`` into ``schema``'s responses (in place); a link whose source or
    target the schema does not have is left out, so a smaller app stays consistent."""
    paths = schema.get("paths", {})
    for link in links:
        source = paths.get(link.source[1], {}).get(link.source[0])
        if link.target[0] not in paths.get(link.target[1], {}) or source is None:
            continue
        response = source.get("responses", {}).get(link.status)
        if response is None:
            continue
        response.setdefault("links", {})[link.name] = {
            "operationRef": _pointer(*link.target),
            "parameters": link.parameters,
        }
