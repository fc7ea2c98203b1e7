"""Access control for the admin API.

Roles (:mod:`.roles`), hashed bearer tokens (:mod:`.tokens`), the route
policy (:mod:`.policy`) enforced by one middleware (:mod:`.middleware`), the
audit log (:mod:`.audit`) and the first-run admin token (:mod:`.bootstrap`).
"""
