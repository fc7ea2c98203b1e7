"""LoRA adapters on a loaded llama.cpp model, switched at run time (worker side only).

``llama_adapter_lora_init`` reads an adapter file into memory beside the
model (the base weights are not touched, loaded again or copied: mmap
stays on, unlike ``Llama(lora_path=...)``, which applies one adapter at
load time and turns mmap off). ``llama_set_adapters_lora`` then applies a
set of them to a *context*: every sequence decoded in that context sees
the same adapters, so the decoder (:mod:`.batch_decoder`) lets requests for
different adapters take turns, and the KV cells it keeps for prompt reuse
were computed under the adapter of their turn and are dropped when it
changes.

Adapters are known here by name; :class:`AdapterSet` loads, applies and
frees them. Only the decoding thread calls :meth:`AdapterSet.apply`;
:meth:`AdapterSet.load` runs on the worker's frame loop and
:meth:`AdapterSet.drop` is handed to the decoding thread (it frees memory
the context may be using).
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass
from typing import Any

import llama_cpp

from .backend import BadRequest

#: adapters one worker keeps loaded at once
MAX_ADAPTERS = 8


@dataclass
class _Loaded:
    handle: Any
    scale: float
    path: str


class AdapterSet:
    """The adapters loaded for one model, and the one applied to its context."""

    def __init__(self, model: Any, ctx: Any) -> None:
        self._model, self._ctx = model, ctx
        self._loaded: dict[str, _Loaded] = {}
        self._lock = threading.Lock()
        #: the adapter applied to the context now (None: the base alone)
        self.applied: str | None = None

    def names(self) -> list[str]:
        """The adapters loaded, by name."""
        with self._lock:
            return sorted(self._loaded)

    def has(self, name: str) -> bool:
        """Is ``name`` loaded (requests may name it)?"""
        with self._lock:
            return name in self._loaded

    def load(self, name: str, path: str, scale: float) -> float:
        """Read the adapter at ``path`` under ``name``; return the milliseconds it took.

        Loading a name again with the same file is a no-op (a worker
        restarted, an agent re-sending what it has); another file under a
        loaded name is refused: drop it first.
        """
        with self._lock:
            known = self._loaded.get(name)
            if known is not None:
                if known.path != path:
                    raise BadRequest(f"adapter {name!r} is loaded from another file",
                                     status=409, code="adapter_conflict")
                known.scale = scale
                return 0.0
            if len(self._loaded) >= MAX_ADAPTERS:
                raise BadRequest(f"at most {MAX_ADAPTERS} adapters per model",
                                 status=409, code="too_many_adapters")
        started = time.perf_counter()
        handle = llama_cpp.llama_adapter_lora_init(self._model, path.encode())
        if not handle:
            # llama.cpp logs why (wrong architecture, a tensor the base lacks, bad shapes).
            raise BadRequest(f"adapter {name!r} does not load on this model ({path})",
                             status=422, code="adapter_does_not_load")
        with self._lock:
            self._loaded[name] = _Loaded(handle, scale, path)
        return (time.perf_counter() - started) * 1000

    def apply(self, name: str | None) -> bool:
        """Apply ``name`` (None: no adapter) to the context; True when that changed it.

        Called from the decoding thread between two steps, with no sequence
        decoding: the caller drops its cached KV cells when this returns True.
        """
        if name == self.applied:
            return False
        with self._lock:
            loaded = self._loaded.get(name) if name is not None else None
            if name is not None and loaded is None:
                raise BadRequest(f"adapter {name!r} is not loaded", status=404,
                                 code="model_not_found")
            if loaded is None:
                status = llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
            else:
                handles = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(loaded.handle)
                scales = (ctypes.c_float * 1)(loaded.scale)
                status = llama_cpp.llama_set_adapters_lora(self._ctx, handles, 1, scales)
        if status != 0:
            raise RuntimeError(f"llama_set_adapters_lora returned {status}")
        self.applied = name
        return True

    def drop(self, name: str) -> None:
        """Free ``name`` (decoding thread: the context no longer uses it afterwards)."""
        if self.applied == name:
            self.apply(None)
        with self._lock:
            loaded = self._loaded.pop(name, None)
        if loaded is not None:
            llama_cpp.llama_adapter_lora_free(loaded.handle)

    def close(self) -> None:
        """Free every adapter (the model is being freed)."""
        with self._lock:
            loaded, self._loaded = list(self._loaded.values()), {}
        for item in loaded:
            llama_cpp.llama_adapter_lora_free(item.handle)
