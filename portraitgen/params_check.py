"""Every check a pipeline can make before its first job, with one plain line per problem.

    portraitgen check --params params.yaml        # exit 2 and one line per problem, e.g.
    train.lr: expected a number (float), got 'fast'
    model.famly: unknown key (did you mean 'family'?); known keys: family, path, resolution
    model.path: expected a diffusers model folder (with model_index.json), got '/models/sd35' (not found)

Run by the Snakemake workflow when it starts (workflow/rules/common.smk: before the DAG, so no job runs
and no output is touched) and by ``portraitgen tracked -- dvc repro`` / ``dvc exp run`` before DVC starts.

What is checked, in order (the later checks need a readable file, so they run when the earlier pass):

1. the params' shape against the JSON schema generated from config.py: unknown keys, types, enums, every
   error at once (never the schema itself);
2. config.py's own rules: ranges and rules across keys;
3. what the params point at: the model folder (``model.path``, unless a stage makes it), the curate
   source, every file a stage reads from params (stages.stage_inputs: prompt lists, suites, sidecar
   captions, include/exclude lists, a bench model), the reward components (registered names, option
   names their factories take) and the files their options name.
"""
from __future__ import annotations

import difflib
import inspect
import re
from pathlib import Path
from typing import Any, Mapping

TYPE_WORDS = {"integer": "an integer", "number": "a number (float)", "string": "a string",
              "boolean": "true or false", "object": "a mapping of keys", "array": "a list", "null": "nothing"}


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _schema_at(schema: Mapping[str, Any], path) -> Mapping[str, Any]:
    node = schema
    for part in path:
        props = node.get("properties") or {}
        if part in props:
            node = props[part]
        elif isinstance(node.get("additionalProperties"), Mapping):
            node = node["additionalProperties"]
        elif isinstance(node.get("items"), Mapping):
            node = node["items"]
        else:
            return {}
    return node


def _expected(node: Mapping[str, Any]) -> str:
    types = node.get("type")
    if isinstance(types, str):
        types = [types]
    for option in node.get("anyOf") or node.get("oneOf") or []:
        if isinstance(option.get("type"), str):
            types = [*(types or []), option["type"]]
    words = [TYPE_WORDS.get(t, t) for t in dict.fromkeys(types or []) if t != "string" or "number" not in types]
    return " or ".join(words) if words else "another value"


def schema_errors(data: Mapping[str, Any]) -> list[str]:
    """One line per schema violation: key, what was expected, what was given."""
    import jsonschema

    from .schema import params_schema

    schema = params_schema()
    lines = []
    for err in sorted(jsonschema.Draft202012Validator(schema).iter_errors(dict(data)),
                      key=lambda e: [str(p) for p in e.absolute_path]):
        path = list(err.absolute_path)
        if err.validator == "additionalProperties":
            known = sorted((err.schema.get("properties") or {}).keys())
            for extra in sorted(set(err.instance) - set(known)):
                close = difflib.get_close_matches(str(extra), known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                lines.append(f"{_key([*path, extra])}: unknown key{hint}; known keys: {', '.join(known)}")
        elif err.validator == "required":
            for name in err.validator_value:
                if name not in err.instance:
                    lines.append(f"{_key([*path, name])}: missing (a required section or key)")
        elif err.validator == "enum":
            lines.append(f"{_key(path)}: expected one of {', '.join(map(str, err.validator_value))}, "
                         f"got {err.instance!r}")
        elif err.validator in ("type", "pattern", "anyOf", "oneOf"):
            lines.append(f"{_key(path)}: expected {_expected(_schema_at(schema, path))}, got {err.instance!r}")
        else:
            lines.append(f"{_key(path)}: {err.message}")
    return lines


def _exists_or_made(path: str) -> bool:
    from .stages import producer

    return Path(path).exists() or producer(path) is not None


def target_errors(params) -> list[str]:
    """What the params point at: model folder, data and files, reward components and their files."""
    from . import rewards  # importing the package registers the built-in rewards
    from .rewards.registry import available_rewards, reward_factory
    from .stages import STAGES, stage_inputs

    del rewards

    lines = []
    model = str(params.model.path)
    if not model.startswith("builtin:") and not _exists_or_made(model):
        lines.append(f"model.path: expected a diffusers model folder (with model_index.json) or builtin:tiny, "
                     f"got {model!r} (not found)")
    elif not model.startswith("builtin:") and Path(model).is_dir() and not (Path(model) / "model_index.json").is_file():
        lines.append(f"model.path: expected a diffusers model folder (with model_index.json), got {model!r} "
                     f"(a folder without model_index.json)")
    source = str(params.curate.source)
    if not source.startswith("builtin:") and not Path(source).exists():
        lines.append(f"curate.source: expected builtin:demo, a folder of photos or a list file, got {source!r} "
                     f"(not found)")
    seen = {model, source}
    for stage in STAGES:
        for path in stage_inputs(stage, params):
            if path in seen or path.startswith("results/") or Path(path).exists():
                continue
            seen.add(path)
            lines.append(f"{stage.name} reads {path!r} (named in params): not found")
    for section, cfg in (("reward", params.reward), ("bench.reward", params.bench.reward)):
        for name in cfg.components:
            factory = reward_factory(name)
            if factory is None:
                close = difflib.get_close_matches(name, available_rewards(), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                lines.append(f"{section}.components.{name}: unknown reward{hint}; available: "
                             f"{', '.join(available_rewards())}")
                continue
            options = dict((cfg.options or {}).get(name) or {})
            remote = options.pop("server", None) is not None  # scored by a reward server, which holds the files
            sig = inspect.signature(factory)
            takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
            for opt, value in options.items():
                if not takes_any and opt not in sig.parameters:
                    lines.append(f"{section}.options.{name}.{opt}: unknown option; {name} takes "
                                 f"{', '.join(sorted(sig.parameters)) or 'no options'}")
                elif (not remote and re.search(r"path|file|dir", opt) and isinstance(value, str) and value
                      and not value.startswith(("builtin:", "http://", "https://")) and not _exists_or_made(value)):
                    lines.append(f"{section}.options.{name}.{opt}: file or folder not found: {value!r}")
    return lines


def check_params(data: Mapping[str, Any]) -> list[str]:
    """All problems of a params mapping (params.yaml as loaded), one line each; empty when it is usable."""
    from .config import ConfigError, params_from_dict

    lines = schema_errors(data)
    if lines:
        return lines
    try:
        params = params_from_dict(dict(data))
    except ConfigError as exc:
        return [str(exc).removeprefix("params key ").replace("'", "", 2) if str(exc).startswith("params key '")
                else str(exc)]
    return target_errors(params)


def check_file(path: str | Path) -> list[str]:
    """``check_params`` of a params file (an unreadable file is one problem)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        return [f"{path}: params file not found"]
    except yaml.YAMLError as exc:
        return [f"{path}: not valid YAML ({exc})"]
    if not isinstance(data, dict):
        return [f"{path}: expected a mapping of params sections, got {type(data).__name__}"]
    return check_params(data)


def check_command(params_path: str | Path, command: list[str]) -> list[str]:
    """``check_file`` before a DVC run that ``portraitgen tracked`` wraps, with the params an experiment sets
    (``dvc exp run -S train.lr=0.01``) applied first; other commands are not checked."""
    import yaml

    words = [Path(command[0]).name, *command[1:]] if command else []
    if words[:2] != ["dvc", "repro"] and words[:3] != ["dvc", "exp", "run"]:
        return []
    problems = check_file(params_path)
    sets = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-S", "--set-param")]
    sets += [w.split("=", 1)[1] for w in words if w.startswith("--set-param=")]
    if problems or not sets:
        return problems
    data = yaml.safe_load(Path(params_path).read_text())
    for item in sets:
        key, _, value = item.partition("=")
        key = key.split(":", 1)[-1]  # `params.yaml:train.lr=...`
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node[leaf] = yaml.safe_load(value) if value else value
    return [f"{line} (with {', '.join(sets)})" for line in check_params(data)]
