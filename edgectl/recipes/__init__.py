"""Recipes: one small TOML file naming model, quantization, backend, shard precisions,
budget and run settings. It maps onto frozen dataclasses; an unknown key or a wrong type
is an error. Command-line flags override it (`--recipe FILE|NAME` on every command: a
path, or the name of a recipe shipped in edgectl/recipes/, listed by `edgectl recipes`).

    [model]
    id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    max_seq_len = 1024

    [quantize]
    scheme = "8da4w"
    group_size = 32
    embedding = "int4"

    [run]
    memory_budget = "150MB"
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from edgectl.backends.registry import NAMES
from edgectl.util.errors import EdgectlError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (a dependency there)
    import tomli as tomllib

PRECISIONS = ("fp32", "int8", "8da4w", "4w")
MODES = ("auto", "resident", "pipelined", "on-demand")
BACKENDS = NAMES  # export's backends: the one list is in backends.py
INTERFACES = ("edgectl", "stock")  # export's program interfaces (stock.py)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.I)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'150MB' -> 150_000_000; '1.5GiB' -> bytes. Plain numbers are bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise EdgectlError(f"cannot read {text!r} as a size", hint="write e.g. 150MB, 1.5GiB or 123456789")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


def _one_of(name: str, value, allowed) -> None:
    if value is not None and value not in allowed:
        raise EdgectlError(f"{name} = {value!r} is not one of: {', '.join(allowed)}")


@dataclass(frozen=True)
class ModelSection:
    id: str | None = None  # hub id, HF directory or .gguf
    max_seq_len: int | None = None


@dataclass(frozen=True)
class QuantizeSection:
    scheme: str | None = None  # int8 | 8da4w | 4w
    group_size: int = 32
    embedding: str = "none"  # none | int8 | int4
    embedding_group_size: int = 32
    mapping: str = "asymmetric"  # 4-bit weights: asymmetric | symmetric
    smoothquant: bool | None = None  # int8: SmoothQuant folded in (None: on for int8)
    smooth_alpha: float = 0.6
    calibration: str | None = None  # text SmoothQuant is calibrated on (None: built-in paragraph)

    def __post_init__(self):
        _one_of("quantize.scheme", self.scheme, ("int8", "8da4w", "4w"))
        if not 0 < self.smooth_alpha < 1:
            raise EdgectlError("quantize.smooth_alpha must be between 0 and 1")
        _one_of("quantize.mapping", self.mapping, ("asymmetric", "symmetric"))
        _one_of("quantize.embedding", self.embedding, ("none", "int8", "int4"))
        for name in ("group_size", "embedding_group_size"):
            if getattr(self, name) <= 0:
                raise EdgectlError(f"quantize.{name} must be positive")


@dataclass(frozen=True)
class ExportSection:
    backend: str = "xnnpack"
    interface: str | None = None  # edgectl | stock (None: stock with --plan, else edgectl)

    def __post_init__(self):
        _one_of("export.backend", self.backend, BACKENDS)
        _one_of("export.interface", self.interface, INTERFACES)


@dataclass(frozen=True)
class ShardSection:
    precisions: tuple[str, ...] = ("fp32", "int8", "8da4w")
    layers_per_shard: int = 1
    calibration: str | None = None
    calibration_tokens: int = 2048

    def __post_init__(self):
        for p in self.precisions:
            _one_of("shard.precisions", p, PRECISIONS)
        if self.layers_per_shard < 1:
            raise EdgectlError("shard.layers_per_shard must be at least 1")


@dataclass(frozen=True)
class RunSection:
    memory_budget: str | None = None  # "150MB"
    latency_target_ms: float | None = None
    mode: str = "auto"
    threads: int | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    chat: bool = False

    def __post_init__(self):
        _one_of("run.mode", self.mode, MODES)
        if self.memory_budget is not None:
            parse_size(self.memory_budget)


@dataclass(frozen=True)
class Recipe:
    name: str = ""
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    quantize: QuantizeSection = field(default_factory=QuantizeSection)
    export: ExportSection = field(default_factory=ExportSection)
    shard: ShardSection = field(default_factory=ShardSection)
    run: RunSection = field(default_factory=RunSection)


def _check_type(where: str, value, tp):
    """Validate `value` against a dataclass field type; returns the value (tuples from lists)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(where, value, a)
            except EdgectlError as e:
                errors.append(e)
        raise errors[0]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise EdgectlError(f"{where} must be a list, got {type(value).__name__}")
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_check_type(where, v, item) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise EdgectlError(f"{where} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise EdgectlError(f"{where}: unknown key {unknown[0]!r}", hint=f"known keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{where}.{name}" if where != "recipe" else name
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise EdgectlError(f"[{name}] must be a table")
            kwargs[name] = _build(tp, value, name)
        else:
            kwargs[name] = _check_type(key, value, tp)
    return cls(**kwargs)


def load_recipe(path: str | Path) -> Recipe:
    """Load and validate a recipe: a TOML path, or the name of a shipped one (find_recipe)."""
    path = find_recipe(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise EdgectlError(f"{path}: cannot read recipe ({e.strerror})") from e
    except tomllib.TOMLDecodeError as e:
        raise EdgectlError(f"{path}: not valid TOML ({e})") from e
    try:
        return _build(Recipe, data, "recipe")
    except EdgectlError as e:
        raise EdgectlError(f"{path}: {e}", hint=e.hint) from e


def apply_overrides(recipe: Recipe, assignments: list[str]) -> Recipe:
    """`--set section.key=value` (value parsed as TOML, or a bare string)."""
    for a in assignments:
        key, sep, raw = a.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise EdgectlError(f"--set {a!r}: expected section.key=value")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        if section not in {f.name for f in dataclasses.fields(Recipe)} or not dataclasses.is_dataclass(getattr(recipe, section)):
            raise EdgectlError(f"--set {a!r}: unknown section {section!r}")
        current = dataclasses.asdict(getattr(recipe, section))
        current[name] = value
        recipe = dataclasses.replace(recipe, **{section: _build(type(getattr(recipe, section)), current, section)})
    return recipe


RECIPE_DIR = Path(__file__).resolve().parent  # the TOML files beside this module: package data, ships in the wheel


def shipped_recipes() -> list[Path]:
    """The recipes that ship with edgectl, sorted by name."""
    return sorted(RECIPE_DIR.glob("*.toml"))


def find_recipe(spec: str | Path) -> Path:
    """`--recipe` SPEC as a file: an existing path wins; else a bare name (`smollm2-135m-android`,
    `.toml` optional) names a shipped recipe. Anything else is a one-line error listing them."""
    path = Path(spec)
    if path.exists() or len(path.parts) != 1:
        return path  # a path (a missing one is reported by load_recipe when read)
    stem = path.name[: -len(".toml")] if path.name.endswith(".toml") else path.name
    shipped = RECIPE_DIR / f"{stem}.toml"
    if shipped.is_file():
        return shipped
    names = ", ".join(p.stem for p in shipped_recipes())
    raise EdgectlError(f"--recipe {spec}: no such file, and no shipped recipe of that name",
                       hint=f"shipped recipes (`edgectl recipes`): {names}")


def recipe_index() -> list[dict]:
    """Every shipped recipe as {name, description, path}: what `edgectl recipes` lists."""
    out = []
    for p in shipped_recipes():
        r = load_recipe(p)
        out.append({"name": p.stem, "description": r.description, "path": str(p)})
    return out


def command_defaults(recipe: Recipe, command: str) -> dict:
    """A recipe as default values for one command's parameters (by parameter name).
    Flags given on the command line override these."""
    m, q, e, s, r = recipe.model, recipe.quantize, recipe.export, recipe.shard, recipe.run
    model = {"model": m.id, "max_seq_len": m.max_seq_len}
    quant = {"scheme": q.scheme, "group_size": q.group_size, "embedding": q.embedding,
             "embedding_group_size": q.embedding_group_size, "mapping": q.mapping,
             "smoothquant": q.smoothquant, "smooth_alpha": q.smooth_alpha, "calibration": q.calibration}
    budget = {"memory_budget": r.memory_budget, "latency_target": r.latency_target_ms, "mode": r.mode,
              "threads": r.threads}
    table = {
        "export": {**model, "backend": e.backend, "interface": e.interface, **(quant if q.scheme else {})},
        "quantize": {"model": m.id, **quant},
        "shard": {**model, "backend": e.backend, "group_size": q.group_size, "precisions": ",".join(s.precisions),
                  "layers_per_shard": s.layers_per_shard, "calibration": s.calibration,
                  "calibration_tokens": s.calibration_tokens},
        "run": {**budget, "n": r.max_new_tokens, "temperature": r.temperature, "top_p": r.top_p, "chat": r.chat},
        "bench": budget,
    }
    return {k: v for k, v in table.get(command, {}).items() if v is not None}
