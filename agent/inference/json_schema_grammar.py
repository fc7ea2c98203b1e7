"""JSON Schema -> GBNF, the grammar llama.cpp samples under for ``response_format``.

In the spirit of llama.cpp's ``examples/json_schema_to_grammar.py``, but
strict: every keyword is either in :data:`ENFORCED` (the grammar makes the
output satisfy it), in :data:`ANNOTATIONS` (no effect on validity, ignored),
or refused with :class:`UnsupportedSchema` naming the keyword and its JSON
path. llama-cpp-python's own converter drops what it does not know
(``minimum``, ``pattern``, ...), which would answer JSON the caller's
validator then rejects; a 400 up front is the honest answer.

Stdlib only: the agent imports this (lazily, when a request carries a
schema) to refuse a bad schema before it reaches the worker, and the worker
builds the grammar with it.

Choices that keep a small model on track:

* properties come in the order declared, required ones first, and no
  property beyond those declared is ever generated (valid whatever
  ``additionalProperties`` says);
* whitespace between tokens is bounded (``space``: nothing, one space, or a
  newline and up to 20 indent characters), so the model cannot loop on
  blanks forever;
* integers carry at most 16 digits, and ``minimum``/``maximum`` become digit
  ranges, the way llama.cpp builds them.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .integer_ranges import MAX_DIGITS, integer_range

#: keywords the grammar enforces
ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "enum", "const", "items",
    "minItems", "maxItems", "minLength", "maxLength", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "anyOf", "oneOf", "$ref", "$defs", "definitions",
})
#: keywords that never change which values are valid: accepted and ignored
ANNOTATIONS = frozenset({
    "title", "description", "examples", "default", "$schema", "$id", "$comment",
    "deprecated", "readOnly", "writeOnly",
})
TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
#: longest repetition bound accepted (each bound unrolls into grammar rules)
MAX_REPEAT = 4096

SPACE = '| " " | "\\n" [ \\t]{0,20}'
_PRIMITIVES = {
    "space": SPACE,
    "boolean": '("true" | "false") space',
    "null": '"null" space',
    "integral-part": f"[0] | [1-9] [0-9]{{0,{MAX_DIGITS - 1}}}",
    "decimal-part": f"[0-9]{{1,{MAX_DIGITS}}}",
    "number": '("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)? space',
    "integer": '("-"? integral-part) space',
    "char": '[^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": '"\\"" char* "\\"" space',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" space ( string ":" space value ("," space string ":" space value)* )? '
              '"}" space',
    "array": '"[" space ( value ("," space value)* )? "]" space',
}
#: which primitive rules each one uses
_NEEDS = {
    "boolean": ["space"], "null": ["space"], "integral-part": [], "decimal-part": [],
    "number": ["integral-part", "decimal-part", "space"],
    "integer": ["integral-part", "space"], "char": [], "string": ["char", "space"],
    "value": ["object", "array", "string", "number", "boolean", "null"],
    "object": ["string", "value", "space"], "array": ["value", "space"], "space": [],
}


#: the keywords each type takes (besides "type")
_KEYWORDS: dict[str, frozenset[str]] = {
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "minItems", "maxItems"}),
    "string": frozenset({"minLength", "maxLength"}),
    "integer": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}),
    "number": frozenset(), "boolean": frozenset(), "null": frozenset(),
}


class UnsupportedSchema(ValueError):
    """The schema asks for something the grammar cannot enforce.

    ``keyword`` is the offending keyword (or ``None`` for a bad value),
    ``path`` the JSON pointer of the schema object that holds it; ``code``
    says whether the keyword is unknown to the converter or used in a way
    it cannot enforce.
    """

    def __init__(self, message: str, path: str, keyword: str | None = None) -> None:
        super().__init__(f"{message} (at {path})")
        self.path, self.keyword = path, keyword
        known = keyword is None or keyword in ENFORCED or keyword in ANNOTATIONS
        self.code = "unsupported_schema" if known else "unsupported_schema_keyword"


def literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               .replace("\r", "\\r").replace("\t", "\\t"))
    return f'"{escaped}"'


def repeat(item: str, lo: int, hi: int | None) -> str:
    """``item`` repeated ``lo`` to ``hi`` (None: unbounded) times, in GBNF."""
    if hi is None:
        return f"({item}){{{lo},}}" if lo else f"({item})*"
    if lo == hi == 1:
        return item
    if lo == hi:
        return f"({item}){{{lo}}}"
    return f"({item}){{{lo},{hi}}}"


# -- the converter -----------------------------------------------------------------------

def _pointer(path: str, *parts: str | int) -> str:
    for part in parts:
        path += "/" + str(part).replace("~", "~0").replace("/", "~1")
    return path


class _Converter:
    def __init__(self, root: Any, prefix: str = "") -> None:
        self.root = root
        #: starts the name of every rule of this schema but the shared primitives, so
        #: several schemas' rules live in one grammar (tool calls: one per tool)
        self.prefix = prefix
        self.rules: dict[str, str] = {}
        self.refs: dict[str, str] = {}

    def add(self, name: str, body: str) -> str:
        name = re.sub(r"[^a-zA-Z0-9-]+", "-", name).strip("-") or "r"
        key, i = name, 1
        while key in self.rules and self.rules[key] != body:
            i += 1
            key = f"{name}{i}"
        self.rules[key] = body
        return key

    def primitive(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = _PRIMITIVES[name]
            for dep in _NEEDS[name]:
                self.primitive(dep)
        return name

    def visit(self, schema: Any, path: str, name: str) -> str:
        """A rule name for ``schema`` (a JSON value followed by ``space``)."""
        if schema is True or schema == {}:
            return self.primitive("value")
        if not isinstance(schema, dict):
            raise UnsupportedSchema("a schema must be an object (or true)", path)
        for keyword in schema:
            if keyword not in ENFORCED and keyword not in ANNOTATIONS:
                raise UnsupportedSchema(f"JSON Schema keyword {keyword!r} is not supported",
                                        path, keyword)
        constraints = {k: v for k, v in schema.items()
                       if k not in ANNOTATIONS and k not in ("$defs", "definitions")}
        if "$ref" in constraints:
            self._alone(constraints, "$ref", path)
            return self.ref(constraints["$ref"], path)
        for key in ("anyOf", "oneOf"):
            if key in constraints:
                self._alone(constraints, key, path)
                branches = constraints[key]
                if not isinstance(branches, list) or not branches:
                    raise UnsupportedSchema(f"{key!r} must be a non-empty list", path, key)
                alts = [self.visit(b, _pointer(path, key, i), f"{name}-{i}")
                        for i, b in enumerate(branches)]
                return self.add(name, " | ".join(alts))
        if "const" in constraints or "enum" in constraints:
            return self.literals(constraints, path, name)
        kind = constraints.get("type")
        if kind is None:
            kind = self._implied_type(constraints, path)
        if isinstance(kind, list):
            if not kind or not all(t in TYPES for t in kind) or len(set(kind)) != len(kind):
                raise UnsupportedSchema(f"'type' must be one of {list(TYPES)} or a list of "
                                        "them", path, "type")
            # Each type takes the keywords that apply to it (maxLength to strings...);
            # a keyword that applies to none of them is still refused, by typed().
            applies = set().union(*(_KEYWORDS[t] for t in kind))
            stray = {k: v for k, v in constraints.items() if k not in applies}
            # (A number takes the integer's bounds in JSON Schema: passed on, refused.)
            alts = [self.typed({**{k: v for k, v in constraints.items()
                                   if k in _KEYWORDS["integer" if t == "number" else t]},
                                **stray, "type": t}, t, path, f"{name}-{t}")
                    for t in kind]
            return self.add(name, " | ".join(alts))
        if kind not in TYPES:
            raise UnsupportedSchema(f"'type' must be one of {list(TYPES)}", path, "type")
        return self.typed(constraints, kind, path, name)

    def _alone(self, constraints: dict[str, Any], key: str, path: str) -> None:
        others = sorted(set(constraints) - {key})
        if others:
            raise UnsupportedSchema(f"{key!r} beside {others} is not supported: put the "
                                    "constraints inside it", path, others[0])

    def _implied_type(self, constraints: dict[str, Any], path: str) -> str | list[str]:
        if not constraints:
            return list(TYPES)
        for kind, keys in (("object", {"properties", "required", "additionalProperties"}),
                           ("array", {"items", "minItems", "maxItems"}),
                           ("string", {"minLength", "maxLength"}),
                           ("integer", {"minimum", "maximum", "exclusiveMinimum",
                                        "exclusiveMaximum"})):
            if set(constraints) <= keys:
                return kind
        raise UnsupportedSchema(f"keywords {sorted(constraints)} without a 'type' are "
                                "ambiguous: name the type", path, "type")

    def _allowed(self, constraints: dict[str, Any], kind: str, allowed: frozenset[str],
                 path: str) -> None:
        extra = sorted(set(constraints) - allowed - {"type"})
        if extra and kind == "number" and extra[0] in _KEYWORDS["integer"]:
            raise UnsupportedSchema(f"{extra[0]!r} is enforced for type 'integer' only, not "
                                    "'number'", path, extra[0])
        if extra:
            raise UnsupportedSchema(f"{extra[0]!r} does not apply to type {kind!r}",
                                    path, extra[0])

    def typed(self, c: dict[str, Any], kind: str, path: str, name: str) -> str:
        if kind == "object":
            self._allowed(c, kind, _KEYWORDS[kind], path)
            return self.object(c, path, name)
        if kind == "array":
            self._allowed(c, kind, _KEYWORDS[kind], path)
            return self.array(c, path, name)
        if kind == "string":
            self._allowed(c, kind, _KEYWORDS[kind], path)
            lo, hi = self._bounds(c, "minLength", "maxLength", path)
            if lo == 0 and hi is None:
                return self.primitive("string")
            self.primitive("char")
            self.primitive("space")
            return self.add(name, f'"\\"" {repeat("char", lo, hi)} "\\"" space')
        if kind == "integer":
            self._allowed(c, kind, _KEYWORDS[kind], path)
            return self.integer(c, path, name)
        self._allowed(c, kind, _KEYWORDS[kind], path)
        return self.primitive(kind)

    def _bounds(self, c: dict[str, Any], lo_key: str, hi_key: str,
                path: str) -> tuple[int, int | None]:
        lo, hi = c.get(lo_key, 0), c.get(hi_key)
        for key, value in ((lo_key, lo), (hi_key, hi)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_REPEAT):
                raise UnsupportedSchema(f"{key!r} must be an integer from 0 to {MAX_REPEAT}",
                                        path, key)
        if hi is not None and lo > hi:
            raise UnsupportedSchema(f"{lo_key!r} is above {hi_key!r}: nothing is valid",
                                    path, lo_key)
        return lo, hi

    def integer(self, c: dict[str, Any], path: str, name: str) -> str:
        lo = hi = None
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            value = c.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value):
                raise UnsupportedSchema(f"{key!r} must be a number", path, key)
            if key == "minimum":
                bound = math.ceil(value)
            elif key == "exclusiveMinimum":
                bound = math.floor(value) + 1
            elif key == "maximum":
                bound = math.floor(value)
            else:
                bound = math.ceil(value) - 1
            if key.endswith("inimum"):
                lo = bound if lo is None else max(lo, bound)
            else:
                hi = bound if hi is None else min(hi, bound)
        if lo is None and hi is None:
            return self.primitive("integer")
        if lo is not None and hi is not None and lo > hi:
            raise UnsupportedSchema(f"no integer lies in [{lo}, {hi}]", path, "minimum")
        self.primitive("space")
        return self.add(name, f"({integer_range(lo, hi)}) space")

    def literals(self, c: dict[str, Any], path: str, name: str) -> str:
        extra = sorted(set(c) - {"const", "enum", "type"})
        if extra:
            raise UnsupportedSchema(f"{extra[0]!r} beside 'enum'/'const' is not supported",
                                    path, extra[0])
        if "const" in c and "enum" in c:
            raise UnsupportedSchema("'const' and 'enum' together are not supported",
                                    path, "enum")
        values = [c["const"]] if "const" in c else c["enum"]
        if not isinstance(values, list) or not values:
            raise UnsupportedSchema("'enum' must be a non-empty list", path, "enum")
        kinds = c.get("type")
        if kinds is not None:
            kinds = kinds if isinstance(kinds, list) else [kinds]
            values = [v for v in values if any(_is_type(v, t) for t in kinds)]
            if not values:
                raise UnsupportedSchema("no 'enum'/'const' value has the schema's 'type'",
                                        path, "enum")
        self.primitive("space")
        alts = " | ".join(literal(json.dumps(v, ensure_ascii=False, separators=(",", ":")))
                          for v in values)
        return self.add(name, f"({alts}) space")

    def object(self, c: dict[str, Any], path: str, name: str) -> str:
        props = c.get("properties", {})
        required = c.get("required", [])
        extra = c.get("additionalProperties", True)
        if not isinstance(props, dict):
            raise UnsupportedSchema("'properties' must be an object", path, "properties")
        if not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
            raise UnsupportedSchema("'required' must be a list of names", path, "required")
        missing = [r for r in required if r not in props]
        if missing:
            raise UnsupportedSchema(f"required property {missing[0]!r} is not declared in "
                                    "'properties'", path, "required")
        self.primitive("space")
        if not props:
            if extra is False:
                return self.add(name, '"{" space "}" space')
            if extra is True or extra == {}:
                return self.primitive("object")
            # a map: any keys, values of one schema
            value = self.visit(extra, _pointer(path, "additionalProperties"),
                               f"{name}-value")
            self.primitive("string")
            kv = self.add(f"{name}-kv", f'string ":" space {value}')
            return self.add(name, f'"{{" space ( {kv} ( "," space {kv} )* )? "}}" space')
        if not isinstance(extra, bool | dict):
            raise UnsupportedSchema("'additionalProperties' must be a boolean or a schema",
                                    path, "additionalProperties")
        # Declared properties only, in declared order with the required ones first:
        # valid whatever additionalProperties allows, and what a small model does best.
        kvs = {}
        for key, sub in props.items():
            value = self.visit(sub, _pointer(path, "properties", key), f"{name}-{key}")
            kvs[key] = self.add(f"{name}-{key}-kv",
                                f'{literal(json.dumps(key, ensure_ascii=False))} space '
                                f'":" space {value}')
        req = [k for k in props if k in required]
        opt = [k for k in props if k not in required]
        body = '"{" space ' + ' "," space '.join(kvs[k] for k in req)
        if opt:
            # Each optional property may be present or not, order kept: the
            # alternatives start at whichever optional property comes first.
            def tail(keys: list[str]) -> str:
                first, rest = keys[0], keys[1:]
                out = kvs[first]
                if rest:
                    out += " " + self.add(f"{name}-{first}-rest",
                                          " ".join(f'( "," space {kvs[k]} )?' for k in rest))
                return out
            alts = " | ".join(tail(opt[i:]) for i in range(len(opt)))
            body += f' ( "," space ( {alts} ) )?' if req else f" ( {alts} )?"
        return self.add(name, body + ' "}" space')

    def array(self, c: dict[str, Any], path: str, name: str) -> str:
        items = c.get("items", True)
        if isinstance(items, list):
            raise UnsupportedSchema("'items' as a list (tuples) is not supported", path, "items")
        lo, hi = self._bounds(c, "minItems", "maxItems", path)
        self.primitive("space")
        if hi == 0:
            return self.add(name, '"[" space "]" space')
        item = self.visit(items, _pointer(path, "items"), f"{name}-item")
        more = repeat(f'"," space {item}', max(lo - 1, 0), None if hi is None else hi - 1)
        inner = f"{item} {more}"
        if lo == 0:
            inner = f"( {inner} )?"
        return self.add(name, f'"[" space {inner} "]" space')

    def ref(self, ref: Any, path: str) -> str:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise UnsupportedSchema(f"only local references ('#/$defs/...') are supported, "
                                    f"not {ref!r}", path, "$ref")
        if ref in self.refs:
            return self.refs[ref]
        target: Any = self.root
        for raw in ref[1:].split("/")[1:] if ref != "#" else []:
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise UnsupportedSchema(f"$ref {ref!r} points nowhere", path, "$ref")
        # Reserve a name of its own first: a recursive schema refers to itself.
        base = re.sub(r"[^a-zA-Z0-9-]+", "-",
                      f"{self.prefix}ref-{ref[1:] or 'root'}").strip("-")
        rule, i = base, 1
        while rule in self.rules:
            i += 1
            rule = f"{base}{i}"
        self.rules[rule] = ""
        self.refs[ref] = rule
        self.rules[rule] = self.visit(target, ref, f"{rule}-body")
        return rule


_PY_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "number": (int, float),
}


def _is_type(value: Any, kind: str) -> bool:
    """Whether a JSON value has the JSON Schema type ``kind``."""
    if isinstance(value, bool):
        return kind == "boolean"
    if kind == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, _PY_TYPES[kind])


def schema_rules(schema: Any, name: str) -> tuple[str, dict[str, str]]:
    """(the rule for ``schema``'s JSON texts, every rule it needs) to embed in a larger grammar.

    The schema's own rules are named ``name`` and ``name-...``; the primitives
    (``string``, ``space``, ...) keep their names and bodies, so the rules of
    several schemas with different names merge into one grammar. Raises
    :class:`UnsupportedSchema` for anything it cannot enforce.
    """
    converter = _Converter(schema, prefix=f"{name}-")
    top = converter.visit(schema, "#", name)
    return top, converter.rules


def schema_to_gbnf(schema: Any) -> str:
    """The GBNF grammar (root rule ``root``) of JSON texts valid against ``schema``.

    Raises :class:`UnsupportedSchema` for anything it cannot enforce.
    """
    top, rules = schema_rules(schema, "root")
    if top != "root":
        rules["root"] = top
    order = ["root", *sorted(k for k in rules if k != "root")]
    return "\n".join(f"{k} ::= {rules[k]}" for k in order) + "\n"


def json_object_gbnf() -> str:
    """The grammar of any JSON object (``response_format: json_object``)."""
    return schema_to_gbnf({"type": "object"})


def check_schema(schema: Any) -> None:
    """Raise :class:`UnsupportedSchema` if ``schema`` cannot be enforced (cheap: a dry run)."""
    schema_to_gbnf(schema)
