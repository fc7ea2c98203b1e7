"""Documents people write by hand: a YAML mapping read with a size cap, and
pydantic's complaints about it as one line.

Firmware profiles (agent), release and rollout specs (control plane) and
fleetsim scenarios all arrive as a small YAML file whose top level must be
a mapping. Each caller reads the bytes (I/O stays with it) and hands them
here with a name for the source, which every message starts with.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


def parse_yaml_mapping(
    raw: bytes, source: str, *, max_bytes: int, expected: str = "a mapping"
) -> dict[str, Any]:
    """``raw`` parsed as YAML whose top level is a mapping.

    ``source`` names the document in every message (``"firmware profile
    /etc/…/pi4.yaml"``); ``expected`` says what the top level should be
    (``"a mapping (model, version, target, stages)"``). Raises
    ``ValueError`` when ``raw`` is over ``max_bytes``, is not YAML, or its
    top level is not a mapping.
    """
    # Checked before parsing: the cap is what keeps a huge or hostile file
    # from costing the parser memory and time.
    if len(raw) > max_bytes:
        raise ValueError(f"{source}: {len(raw)} bytes, limit {max_bytes}")
    # Imported here: the agent parses profiles only in its one-shot hardware
    # probe child, so its long-lived process never holds PyYAML.
    import yaml

    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: expected {expected} at the top level")
    return doc


def validation_problems(exc: ValidationError, root: str = "(top level)") -> str:
    """Every error in ``exc`` as ``field.path: message``, joined by ``; ``.

    ``root`` stands in for the path of an error about the whole document.
    """
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or root}: {err['msg']}"
        for err in exc.errors(include_url=False)
    )
