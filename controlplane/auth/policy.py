"""Which role each API route needs, decided from the method and the route template.

The default follows the HTTP method: reads (``GET``, ``HEAD``, ``OPTIONS``)
need ``viewer``, ``DELETE`` needs ``admin``, every other method (``POST``,
``PUT``, ``PATCH``) needs ``operator``. :data:`EXCEPTIONS` lists every route
that differs, each with the reason. New routes are covered by the default
the moment they are included in the app; nothing in a route module opts in.
"""

from __future__ import annotations

from dataclasses import dataclass

from .roles import Role

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ANY_METHOD = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True, slots=True)
class Rule:
    """Routes matching ``pattern`` (exact, or a prefix when it ends in ``*``) called
    with one of ``methods`` need ``role``; ``None`` means no token at all."""

    methods: frozenset[str]
    pattern: str
    role: Role | None
    why: str

    def matches(self, method: str, route: str) -> bool:
        """Whether this rule decides ``method`` on ``route``."""
        if method not in self.methods:
            return False
        if self.pattern.endswith("*"):
            return route.startswith(self.pattern[:-1])
        return route == self.pattern


#: first match wins; anything not listed takes the method's default
EXCEPTIONS: tuple[Rule, ...] = (
    Rule(READ_METHODS, "/healthz", None,
         "load balancers and systemd probes carry no token; it reveals only up/down"),
    Rule(READ_METHODS, "/metrics", None,
         "Prometheus scrapes without a token; fleet counts only, no identities"),
    Rule(READ_METHODS, "/v1/artifacts/{path}", None,
         "devices download model files with no API token; every file is checked "
         "against the sha256 in a release-signed manifest"),
    Rule(READ_METHODS, "/openapi.json", None, "the API description holds no fleet data"),
    Rule(READ_METHODS, "/docs*", None, "the interactive docs page; calls from it need a token"),
    Rule(READ_METHODS, "/redoc", None, "the API reference page"),
    Rule(ANY_METHOD, "/v1/tokens*", Role.ADMIN, "tokens grant access, listing them included"),
    Rule(ANY_METHOD, "/v1/audit*", Role.ADMIN, "who did what is for admins"),
    Rule(ANY_METHOD, "/v1/keys*", Role.ADMIN, "trust roots"),
    Rule(ANY_METHOD, "/v1/blobs/gc", Role.ADMIN, "removes stored model files for good"),
    Rule(ANY_METHOD, "/v1/devices/{device_id}/credentials*", Role.ADMIN,
         "device identities: issuing or revoking MQTT credentials"),
    # The console (controlplane/ui) follows the API: its pages are reads, its
    # forms are the same actions with the same roles.
    Rule(READ_METHODS, "/ui/static/{name}", None, "the console's stylesheet and scripts"),
    Rule(ANY_METHOD, "/ui/sign-in", None,
         "the sign-in form, where a token or one-time code is exchanged for a session"),
    Rule(ANY_METHOD, "/ui/sign-out", Role.VIEWER, "anyone signed in may sign out"),
    Rule(ANY_METHOD, "/ui/sign-in-codes", Role.VIEWER,
         "a code signs in as the caller's own token, nothing more"),
    Rule(ANY_METHOD, "/ui/tokens*", Role.ADMIN, "tokens grant access, as /v1/tokens"),
    Rule(ANY_METHOD, "/ui/audit*", Role.ADMIN, "who did what is for admins, as /v1/audit"),
)


def default_role(method: str) -> Role:
    """The role a method needs when no exception applies."""
    if method in READ_METHODS:
        return Role.VIEWER
    if method == "DELETE":
        return Role.ADMIN
    return Role.OPERATOR


def required_role(method: str, route: str | None) -> Role | None:
    """The role ``method`` on ``route`` (a template such as ``/v1/devices/{device_id}``)
    needs; ``None``: open to anyone. A path that matches no route needs ``viewer``,
    so probing for routes without a token answers 401, not 404."""
    method = method.upper()
    if route is not None:
        for rule in EXCEPTIONS:
            if rule.matches(method, route):
                return rule.role
    return default_role(method)


def is_mutation(method: str) -> bool:
    """Whether a request with ``method`` can change state (and so is audited)."""
    return method.upper() not in READ_METHODS
