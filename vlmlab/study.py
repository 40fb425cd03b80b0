"""A study file: what every run shares, the seeds, and the axes whose levels are compared.

    name: queries-and-prompts
    base: {preset: default, config: my.yaml, overrides: [train.max_steps=600]}   # each key optional
    seeds: [0, 1, 2]                 # train.seed (initialisation and data order); the eval set stays the same
    design: one-at-a-time            # or grid
    diagnose: false                  # also write `vlmlab diagnose --json` of each run (diagnose.json)
    axes:
      queries: {q16: [connector.num_queries=16], q64: [connector.num_queries=64]}    # first level: the reference
      prompt: {plain: [data.prompt=none], instruct: [data.prompt=instruct]}

A study may come at several scales (`scales`, `vlmlab sweep NAME --scale colab`; the first listed is the default),
each a base of its own laid over `base`: e.g. `tiny` (offline, tiny parts) and `colab` (the real parts by hub name).
A level is then either one list of overrides for every scale or a mapping `{tiny: [...], colab: [...]}`; a level
without an entry for a scale is not run at that scale (`absent` says so). A base or scale may `prepare` parts that
its runs load, as pretrained parts are downloaded: each a `vlmlab pretrain-lm` or `pretrain-vision` command, run
once into `DIR/prepared/NAME` before any training, that an override names as `@prepared/NAME`:

    scales:
      tiny:
        overrides: [language.model=@prepared/lm, language.train=lora]
        prepare: {lm: [pretrain-lm, --family, t5, language.hidden_size=64]}
      colab: {preset: recommended}

`one-at-a-time` (the Idefics2 protocol) gives a variant `reference` (every axis at its first level) and one
variant per other level, named by it, that changes only its own axis; `grid` gives every combination, named by
its levels joined with `+`. A level may start from another variant's model of the same seed with
`train.init_from=@VARIANT`. Everything is checked before anything runs, every override against the config it
lands on, and a mistake is one `StudyError` line that names the file and the place.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vlmlab.config import Config, ConfigError, apply_overrides, flat_fields, merge_config_file
from vlmlab.presets import get_preset

SHIPPED = Path(__file__).parent / "studies"
DESIGNS = ("one-at-a-time", "grid")
TOP_KEYS = ("name", "description", "base", "scales", "seeds", "design", "diagnose", "axes")
BASE_KEYS = ("preset", "config", "overrides", "prepare")
PREPARE_COMMANDS = ("pretrain-lm", "pretrain-vision")  # each takes --out, which the sweep sets
PREPARED = re.compile(r"@prepared/([A-Za-z0-9_.-]+)")  # in an override's value: DIR/prepared/NAME
REFERENCE = "reference"
NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a level becomes part of a directory name
INIT_FROM = "train.init_from="
SET_BY_SWEEP = ("train.seed",)  # the sweep sets it for every run, from `seeds`


class StudyError(ConfigError):
    """A study file that cannot run as written; the message names the file and the place."""


@dataclass
class Variant:
    name: str
    levels: dict[str, str]  # axis -> level
    overrides: list[str]  # the levels' overrides, in axis order (train.init_from=@VARIANT kept symbolic)

    @property
    def starts_from(self) -> str | None:
        """The variant whose model (same seed) this one starts from, or None."""
        for item in reversed(self.overrides):
            if item.startswith(INIT_FROM):
                value = item[len(INIT_FROM):].strip()
                return value[1:] if value.startswith("@") and not PREPARED.match(value) else None
        return None


@dataclass
class Study:
    name: str
    path: Path
    preset: str = "default"
    config: Path | None = None  # resolved against the study file's folder
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    design: str = "one-at-a-time"
    diagnose: bool = False
    description: str = ""
    axes: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    scale: str = ""  # the scale these runs are of ("" where the file has none)
    scales: list[str] = field(default_factory=list)
    absent: dict[str, str] = field(default_factory=dict)  # level -> axis, for levels not run at this scale
    prepare: dict[str, list[str]] = field(default_factory=dict)  # name -> `vlmlab` command words, without --out

    @property
    def reference(self) -> str:
        if self.design == "grid" and self.axes:
            return "+".join(next(iter(levels)) for levels in self.axes.values())
        return REFERENCE

    def variants(self) -> dict[str, Variant]:
        """Every variant in run order: each after the variant it starts from."""
        first = {axis: next(iter(levels)) for axis, levels in self.axes.items()}
        if self.design == "grid":
            combos = [dict(zip(self.axes, choice)) for choice in itertools.product(*self.axes.values())]
            named = {"+".join(combo.values()): combo for combo in combos} if self.axes else {REFERENCE: {}}
        else:
            named = {REFERENCE: first}
            named.update({level: {**first, axis: level} for axis, levels in self.axes.items()
                          for level in list(levels)[1:]})
        variants = {name: Variant(name, levels, [o for axis, level in levels.items() for o in self.axes[axis][level]])
                    for name, levels in named.items()}
        return _in_dependency_order(variants, self.path)

    def base_config(self) -> Config:
        cfg = get_preset(self.preset)
        if self.config:
            cfg = merge_config_file(self.config, base=cfg)
        return cfg

    def run_config(self, variant: Variant, seed: int) -> tuple[Config, list[str]]:
        """(the run's resolved config, the overrides after the preset and config file that give it); the
        feature cache folder and the path behind `@VARIANT` are the sweep's to add."""
        overrides = [*self.overrides, *variant.overrides, f"train.seed={seed}"]
        return apply_overrides(self.base_config(), overrides), overrides

    def prepare_command(self, name: str, out: Path) -> list[str]:
        """The `vlmlab` command line (without `vlmlab`) that makes the prepared part `name` in `out/prepared/`."""
        command, *rest = self.prepare[name]
        return [command, "--out", str(prepared_dir(out, name)), *rest]

    def source_args(self) -> list[str]:
        """`--preset` and `--config` as `vlmlab train` takes them."""
        return ["--preset", self.preset, *(["--config", str(self.config)] if self.config else [])]


# Fields that change where a run's numbers are sent, not the numbers: a run differing only in them is the same run.
NOT_RESULTS = ("train.report_to",)


def config_fields(cfg: Config) -> dict:
    """The resolved config as `section.field -> value`, what "the same config" is judged on (NOT_RESULTS left out)."""
    return {key: value for key, value in flat_fields(cfg).items() if key not in NOT_RESULTS}


def config_changes(recorded: dict, current: dict) -> list[str]:
    """`field: recorded -> current` for each field a run was started with that the study now sets otherwise. A field
    the record lacks (added to vlmlab since) counts only if it is not at its default, which is what ran before."""
    defaults = config_fields(Config())
    return [f"{key}: {recorded.get(key, defaults.get(key))!r} -> {value!r}" for key, value in current.items()
            if (recorded[key] if key in recorded else defaults.get(key)) != value]


def prepared_dir(out: Path, name: str) -> Path:
    return out / "prepared" / name


def find_study(name_or_path: str) -> Path:
    """A study file by path, or a shipped study (vlmlab/studies/NAME.yaml) by name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SHIPPED / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(shipped_studies()) or "none"
    raise StudyError(f"study file not found: {name_or_path} (shipped studies: {names})")


def study_argument(path: Path) -> str:
    """What `vlmlab sweep` is given to find this study again: a shipped study's name (its file lives inside the
    installed package, a path that differs per machine), else the path."""
    return path.stem if path.resolve() == (SHIPPED / path.name).resolve() else str(path)


def shipped_studies() -> dict[str, str]:
    """name -> first line of its description, for `vlmlab sweep --list`."""
    found = {}
    for path in sorted(SHIPPED.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        description = str(data.get("description", "")).strip()
        scales = f" [scales: {', '.join(data['scales'])}]" if data.get("scales") else ""
        found[path.stem] = (description.splitlines()[0] if description else "") + scales
    return found


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a repeated key (plain YAML keeps the last one silently: a level would vanish)."""


def _mapping_without_repeats(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise StudyError(f"{loader.name}: line {key_node.start_mark.line + 1}: {key!r} appears twice")
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def _keys(data, allowed: tuple, where: str) -> dict:
    if not isinstance(data, dict):
        raise StudyError(f"{where} must be a mapping, got {type(data).__name__}")
    unknown = [key for key in data if key not in allowed]
    if unknown:
        raise StudyError(f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(allowed)}")
    return data


def _override_list(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise StudyError(f"{where} must be a list of section.field=value strings, got {value!r}")
    for item in value:
        key = item.partition("=")[0].strip()
        if key in SET_BY_SWEEP:
            raise StudyError(f"{where}: {key} is set by the sweep for every run (seeds: ...); remove it")
    return value


def load_study(path: str | Path, scale: str | None = None) -> Study:
    """Reads and checks a study file at `scale` (its first, where it has scales and none is named): keys, names,
    designs, every override on the config it lands on."""
    path = Path(path)
    try:
        with path.open() as stream:
            loader = _StrictLoader(stream)
            loader.name = str(path)
            try:
                data = loader.get_single_data()
            finally:
                loader.dispose()
    except OSError as err:
        raise StudyError(f"study file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise StudyError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    data = _keys(data if data is not None else {}, TOP_KEYS, str(path))
    if not isinstance(data.get("name"), str) or not NAME.fullmatch(data["name"]):
        raise StudyError(f"{path}: name must be a word of letters, digits, '_', '.' or '-', got {data.get('name')!r}")
    base = _keys(data.get("base") or {}, BASE_KEYS, f"{path}: base")
    scales = _keys(data.get("scales") or {}, tuple(data.get("scales") or ()), f"{path}: scales")
    if scale is not None and scale not in scales:
        raise StudyError(f"{path}: no scale {scale!r}; " + (f"scales: {', '.join(scales)}" if scales else
                                                              "the study has no scales"))
    for name in scales:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise StudyError(f"{path}: scales: a scale's name is a word of letters, digits, '_', '.' or '-'")
    scale = scale or next(iter(scales), "")
    layer = _keys(scales[scale] or {}, BASE_KEYS, f"{path}: scales.{scale}") if scale else {}
    study = Study(name=data["name"], path=path, description=str(data.get("description", "")),
                  preset=str(layer.get("preset", base.get("preset", "default"))), scale=scale, scales=list(scales),
                  overrides=[*_override_list(base.get("overrides", []), f"{path}: base.overrides"),
                             *_override_list(layer.get("overrides", []), f"{path}: scales.{scale}.overrides")],
                  prepare={**_prepare(base, f"{path}: base"), **_prepare(layer, f"{path}: scales.{scale}")})
    config = layer.get("config", base.get("config"))
    if config:
        study.config = (path.parent / str(config)).resolve()
    seeds = data.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or not all(type(s) is int and s >= 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise StudyError(f"{path}: seeds must be a list of distinct integers >= 0, got {seeds!r}")
    study.seeds = seeds
    study.design = data.get("design", "one-at-a-time")
    if study.design not in DESIGNS:
        raise StudyError(f"{path}: design {study.design!r} is not known; valid: {', '.join(DESIGNS)}")
    if not isinstance(data.get("diagnose", False), bool):
        raise StudyError(f"{path}: diagnose must be true or false, got {data['diagnose']!r}")
    study.diagnose = data.get("diagnose", False)
    study.axes, study.absent = _at_scale(_axes(data.get("axes") or {}, study.design, path, scales), scale)
    _check_configs(study)
    return study


def _prepare(layer: dict, where: str) -> dict[str, list[str]]:
    """A base's or scale's `prepare`: name -> the words of a PREPARE_COMMANDS command, --out left to the sweep."""
    prepare = _keys(layer.get("prepare") or {}, tuple(layer.get("prepare") or ()), f"{where}.prepare")
    for name, words in prepare.items():
        place = f"{where}.prepare.{name}"
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise StudyError(f"{place}: a prepared part's name is a word of letters, digits, '_', '.' or '-'")
        if (not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words)
                or words[0] not in PREPARE_COMMANDS):
            raise StudyError(f"{place} must be a list of words starting with {' or '.join(PREPARE_COMMANDS)}, "
                             f"got {words!r}")
        if "--out" in words:
            raise StudyError(f"{place}: --out is set by the sweep (DIR/prepared/{name}); remove it")
    return prepare


def _at_scale(axes: dict, scale: str) -> tuple[dict[str, dict[str, list[str]]], dict[str, str]]:
    """The axes' levels as overrides at `scale`, and the levels that have no entry for it (level -> axis)."""
    kept: dict[str, dict[str, list[str]]] = {}
    absent: dict[str, str] = {}
    for axis, levels in axes.items():
        for level, overrides in levels.items():
            if isinstance(overrides, dict) and scale not in overrides:
                absent[level] = axis
            else:
                kept.setdefault(axis, {})[level] = overrides[scale] if isinstance(overrides, dict) else overrides
    return kept, absent


def _axes(axes, design: str, path: Path, scales: dict) -> dict[str, dict[str, list[str] | dict]]:
    if not isinstance(axes, dict):
        raise StudyError(f"{path}: axes must be a mapping of axis -> levels")
    owner: dict[str, str] = {}
    for axis, levels in axes.items():
        if not isinstance(levels, dict) or not levels:
            raise StudyError(f"{path}: axes.{axis} must be a mapping of level -> overrides, with one level or more")
        for level, overrides in levels.items():
            where = f"{path}: axes.{axis}.{level}"
            if not isinstance(level, str) or not NAME.fullmatch(level):
                raise StudyError(f"{where}: a level name is a word of letters, digits, '_', '.' or '-'")
            if level in owner:
                raise StudyError(f"{where}: level name {level!r} is also a level of axis {owner[level]!r}; "
                                 "level names are unique across axes")
            if design == "one-at-a-time" and level == REFERENCE:
                raise StudyError(f"{where}: {REFERENCE!r} names the variant of every axis' first level; rename it")
            owner[level] = axis
            if isinstance(overrides, dict):  # per scale
                for name, listed in overrides.items():
                    if name not in scales:
                        raise StudyError(f"{where}: a level's mapping is scale -> overrides; no scale {name!r} "
                                         f"(scales: {', '.join(scales) or 'none'})")
                    _override_list(listed, f"{where}.{name}")
            else:
                _override_list(overrides, where)
    return axes


def _check_configs(study: Study) -> None:
    """Every variant's overrides applied to the config they land on, before anything runs."""
    try:
        study.base_config()
        apply_overrides(study.base_config(), study.overrides)
    except ConfigError as err:
        raise StudyError(f"{study.path}: base: {err}") from None
    for item in [*study.overrides, *(o for levels in study.axes.values() for lst in levels.values() for o in lst)]:
        for name in PREPARED.findall(item):
            if name not in study.prepare:
                raise StudyError(f"{study.path}: {item}: @prepared/{name} names no prepared part"
                                 + (f" at scale {study.scale}" if study.scale else "")
                                 + f"; prepared: {', '.join(study.prepare) or 'none'}")
    variants = study.variants()
    for variant in variants.values():
        for axis, level in variant.levels.items():
            try:
                apply_overrides(study.base_config(), [*study.overrides, *study.axes[axis][level]])
            except ConfigError as err:
                raise StudyError(f"{study.path}: axes.{axis}.{level}: {err}") from None
        for item in variant.overrides:
            if item.startswith(INIT_FROM) and not variant.starts_from:
                continue  # a saved model by path (or a prepared one): train checks it
            source = variant.starts_from
            if item.startswith(INIT_FROM) and source not in variants:
                raise StudyError(f"{study.path}: variant {variant.name}: train.init_from=@{source} names no "
                                 f"variant; variants: {', '.join(variants)}")
    seen: dict[str, str] = {}
    for variant in variants.values():
        try:
            fields = json.dumps(config_fields(study.run_config(variant, study.seeds[0])[0]), sort_keys=True)
        except ConfigError as err:  # levels that pass alone but not together (a rule across two fields)
            raise StudyError(f"{study.path}: variant {variant.name}: {err}") from None
        if fields in seen:  # nothing to compare: the levels between them change no field
            raise StudyError(f"{study.path}: variants {seen[fields]} and {variant.name} resolve to the same config")
        seen[fields] = variant.name


def _in_dependency_order(variants: dict[str, Variant], path: Path) -> dict[str, Variant]:
    """The variants reordered so that each comes after the one it starts from; a cycle is an error."""
    ordered: dict[str, Variant] = {}
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in ordered or name not in variants:
            return  # an unknown name is reported by _check_configs with the list of variants
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name):], name])
            raise StudyError(f"{path}: train.init_from=@... goes round in a circle: {cycle}")
        visiting.append(name)
        if variants[name].starts_from:
            visit(variants[name].starts_from)
        visiting.pop()
        ordered[name] = variants[name]

    for name in variants:
        visit(name)
    return ordered


def with_sweep_settings(overrides: list[str], out: Path, seed: int, runs_dir: Path) -> list[str]:
    """The overrides of a run as the sweep launches it: `@VARIANT` replaced by that variant's run folder of the
    same seed, `@prepared/NAME` by the prepared part's folder, and one feature cache under the sweep's folder
    (unless the study names its own)."""
    resolved = []
    for item in overrides:
        item = PREPARED.sub(lambda found: str(prepared_dir(out, found[1])), item)
        value = item[len(INIT_FROM):].strip() if item.startswith(INIT_FROM) else ""
        resolved.append(f"{INIT_FROM}{runs_dir / value[1:] / f'seed{seed}'}" if value.startswith("@") else item)
    if not any(item.startswith("train.feature_cache_dir=") for item in overrides):
        resolved.append(f"train.feature_cache_dir={out / 'feature_cache'}")
    return resolved
