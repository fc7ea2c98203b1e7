"""agent/lazy_stdlib.py: modules the idle agent never uses stay unloaded,
and code that does use them still gets the real thing.

Each test runs in a fresh interpreter: this one has long since imported
both modules, and deferring is only possible before the first import.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

PRELUDE = """
import json, sys
from agent.lazy_stdlib import DeferredModule, defer_import, defer_unused_imports

def deferred(name):
    module = sys.modules.get(name)
    return isinstance(module, DeferredModule) and not module._deferred_loaded
"""


def fresh(code: str, env: dict[str, str] | None = None) -> Any:
    """Run ``code`` after PRELUDE in a new interpreter; what it printed last, as JSON."""
    result = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False, env=env,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_the_agents_start_up_imports_leave_both_modules_unloaded() -> None:
    """What `slmfleet agent run` imports, plus a pydantic model built and used."""
    out = fresh("""
        names = defer_unused_imports()
        import paho.mqtt.client, aiomqtt
        import agent.config, agent.hardware, agent.service
        from protocol import State
        state = State(device_id="dev-1", state="online", ts=1.8e9)
        State.model_validate_json(state.model_dump_json(by_alias=True))
        print(json.dumps({"names": names,
                          "deferred": {n: deferred(n) for n in names},
                          "plugins": __import__("os").environ["PYDANTIC_DISABLE_PLUGINS"]}))
    """)
    assert sorted(out["names"]) == ["importlib.metadata", "urllib.request"]
    assert out["deferred"] == {"urllib.request": True, "importlib.metadata": True}
    assert out["plugins"] == "__all__"


def test_first_use_loads_the_real_module_everywhere() -> None:
    out = fresh("""
        defer_unused_imports()
        import urllib.request
        stand_in = urllib.request
        before = deferred("urllib.request")
        proxies = urllib.request.getproxies()  # the first real use
        real = sys.modules["urllib.request"]
        print(json.dumps({
            "before": before,
            "proxies_is_dict": isinstance(proxies, dict),
            "real_in_sys_modules": type(real).__name__ == "module",
            "parent_attribute_is_real": urllib.request is real,
            "stand_in_forwards": stand_in.urlopen is real.urlopen,
            "stand_in_says": repr(stand_in),
        }))
    """)
    assert out["before"] is True
    assert out["proxies_is_dict"] and out["real_in_sys_modules"]
    assert out["parent_attribute_is_real"] and out["stand_in_forwards"]
    assert "(loaded)" in out["stand_in_says"]


def test_a_forwarded_function_is_taken_without_loading_and_works() -> None:
    """pydantic's ``from importlib.metadata import entry_points``, then a real call."""
    out = fresh("""
        defer_unused_imports()
        from importlib.metadata import entry_points
        taken = deferred("importlib.metadata")
        scripts = [ep.name for ep in entry_points(group="console_scripts")]
        loaded_after = not deferred("importlib.metadata")
        print(json.dumps({"taken_deferred": taken, "loaded_after": loaded_after,
                          "has_slmfleet": "slmfleet" in scripts}))
    """)
    assert out == {"taken_deferred": True, "loaded_after": True, "has_slmfleet": True}


def test_submodules_star_imports_and_the_module_file() -> None:
    out = fresh("""
        defer_unused_imports()
        import importlib.metadata as metadata
        file_known = metadata.__file__.endswith("importlib/metadata/__init__.py")
        import importlib.metadata._meta as meta
        still_deferred = deferred("importlib.metadata")
        version = metadata.version("pydantic")     # loads the package
        real = sys.modules["importlib.metadata"]
        from urllib.request import *               # noqa: F403
        print(json.dumps({
            "file_known": file_known, "deferred_until_used": still_deferred,
            "submodule_on_real_package": real._meta is meta, "version": bool(version),
            "star_import": callable(urlopen),     # noqa: F405
        }))
    """)
    assert out == {"file_known": True, "deferred_until_used": True,
                   "submodule_on_real_package": True, "version": True, "star_import": True}


def test_probing_dunders_does_not_load() -> None:
    """inspect, copy and pickle ask modules for names they lack; that is not a use."""
    out = fresh("""
        import inspect
        defer_unused_imports()
        import urllib.request
        probes = [hasattr(urllib.request, n) for n in ("__wrapped__", "__version__")]
        inspect.getmodule(json.dumps)   # walks every module in sys.modules
        print(json.dumps({"probes": probes, "deferred": deferred("urllib.request")}))
    """)
    assert out == {"probes": [False, False], "deferred": True}


def test_modules_already_imported_are_left_alone_and_missing_ones_raise() -> None:
    out = fresh("""
        import urllib.request
        real = urllib.request
        names = defer_unused_imports()
        try:
            defer_import("no_such_module_anywhere")
            missing = "no error"
        except ModuleNotFoundError as exc:
            missing = str(exc)
        print(json.dumps({"names": names, "same": sys.modules["urllib.request"] is real,
                          "missing": missing}))
    """)
    assert out["names"] == ["importlib.metadata"]
    assert out["same"] is True
    assert "no_such_module_anywhere" in out["missing"]


def test_threads_loading_at_once_all_get_one_module() -> None:
    out = fresh("""
        import threading
        defer_unused_imports()
        import urllib.request
        stand_in = urllib.request
        seen, start = [], threading.Barrier(8)
        def use():
            start.wait()
            seen.append(stand_in._deferred_load())
        threads = [threading.Thread(target=use) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        print(json.dumps({"distinct": len({id(m) for m in seen}),
                          "is_real": seen[0] is sys.modules["urllib.request"]}))
    """)
    assert out == {"distinct": 1, "is_real": True}


def test_a_pydantic_plugins_setting_of_the_operator_wins() -> None:
    env = {"PATH": "/usr/bin:/bin", "PYDANTIC_DISABLE_PLUGINS": ""}
    out = fresh("""
        import os
        defer_unused_imports()
        print(json.dumps(os.environ["PYDANTIC_DISABLE_PLUGINS"]))
    """, env=env)
    assert out == ""
