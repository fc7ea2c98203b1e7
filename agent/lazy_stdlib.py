"""Keep standard-library modules the agent never calls out of its memory.

Two libraries the agent depends on import modules at start-up that an
idling agent does not use, and whatever a process imports stays resident
for its whole life:

- paho-mqtt imports ``urllib.request`` (and with it ``http.client`` and most
  of ``email``) to look up proxy settings, which it does only when PySocks
  is installed;
- pydantic's plugin loader does ``from importlib.metadata import
  entry_points`` (which pulls in ``zipfile``, ``csv``, ``email`` and
  ``importlib.resources``) to find plugins, and calls it only when plugins
  are not disabled.

Together that is about 2 MB of an agent that should idle in 40.
:func:`defer_unused_imports` puts a stand-in module under each of those
names before either library is imported. ``import urllib.request`` then
binds the stand-in without running the real module; the first use of any
of its attributes (or a call of a forwarded function such as
``entry_points``) imports the real module, which from then on serves every
access. Nothing is lost: code that needs the module gets it, only later.

It also disables pydantic plugins unless ``PYDANTIC_DISABLE_PLUGINS`` is
already set (the agent uses none; set it to an empty value to load them).

Call it once, first thing in the agent process, before paho or pydantic is
imported; modules already imported are left as they are.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import types
from collections.abc import Callable, Iterable
from typing import Any

#: module name -> functions that ``from module import name`` may take without
#: loading the module (each forwards its calls to the real function)
DEFERRED: dict[str, tuple[str, ...]] = {
    "urllib.request": (),
    "importlib.metadata": ("entry_points",),
}


class DeferredModule(types.ModuleType):
    """Stands in for module ``name`` until one of its attributes is used.

    It carries the real module's ``__spec__``, so the import system treats it
    as a loaded module and ``import name`` does not load it; any other
    attribute lookup loads the real module and answers from it.
    """

    def __init__(self, name: str, forwarded: Iterable[str] = ()) -> None:
        super().__init__(name)
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise ModuleNotFoundError(f"no module named {name!r}", name=name)
        # What module_from_spec sets before a module runs, so that nothing
        # has to load the module just to ask where it lives. A package's
        # __path__ matters most: the import system reads it for every
        # ``from package import name`` and to import a submodule.
        self.__spec__ = spec
        self.__loader__ = spec.loader
        self.__package__ = spec.parent
        if spec.has_location and spec.origin:
            self.__file__ = spec.origin
        if spec.submodule_search_locations is not None:
            self.__path__ = list(spec.submodule_search_locations)
        self._deferred_real: types.ModuleType | None = None
        self._deferred_lock = threading.Lock()
        for attr in forwarded:
            setattr(self, attr, self._deferred_forwarder(attr))

    # Every name of the stand-in's own starts with _deferred_: anything else
    # could hide an attribute of the real module.

    def _deferred_forwarder(self, attr: str) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return getattr(self._deferred_load(), attr)(*args, **kwargs)

        forward.__name__ = forward.__qualname__ = attr
        forward.__doc__ = f"Calls {self.__name__}.{attr}, importing {self.__name__} first."
        return forward

    @property
    def _deferred_loaded(self) -> bool:
        """Whether the real module has been imported."""
        return self._deferred_real is not None

    def _deferred_load(self) -> types.ModuleType:
        """Import the real module (once) and put it in ``sys.modules`` in our place."""
        real = self._deferred_real
        if real is not None:
            return real
        with self._deferred_lock:
            real = self._deferred_real
            if real is None:
                if sys.modules.get(self.__name__) is self:
                    del sys.modules[self.__name__]
                # The import system also rebinds the parent package's attribute.
                real = importlib.import_module(self.__name__)
                # Submodules imported meanwhile were bound to the stand-in.
                for attr, value in vars(self).items():
                    if isinstance(value, types.ModuleType) and not hasattr(real, attr):
                        setattr(real, attr, value)
                self._deferred_real = real
        return real

    def __getattr__(self, attr: str) -> Any:
        # Only called for names the stand-in itself lacks. Dunder lookups
        # (copy, pickle, inspect probing for __wrapped__ and the like) must
        # not load the module as a side effect. __all__ is content, asked
        # for by ``from module import *``.
        if attr.startswith("__") and attr.endswith("__") and attr != "__all__":
            raise AttributeError(attr)
        return getattr(self._deferred_load(), attr)

    def __dir__(self) -> list[str]:
        return dir(self._deferred_load())

    def __repr__(self) -> str:
        state = "loaded" if self._deferred_loaded else "deferred"
        return f"<module {self.__name__!r} ({state})>"


def defer_import(name: str, forwarded: Iterable[str] = ()) -> bool:
    """Put a :class:`DeferredModule` under ``name``; False if it is already imported."""
    if name in sys.modules:
        return False
    stand_in = DeferredModule(name, forwarded)
    sys.modules[name] = stand_in
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, stand_in)
    return True


def defer_unused_imports() -> list[str]:
    """Defer the modules in :data:`DEFERRED` and disable pydantic plugins; the names deferred."""
    # Set before pydantic builds its first validator, which is when it looks.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    return [name for name, forwarded in DEFERRED.items() if defer_import(name, forwarded)]
