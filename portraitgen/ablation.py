"""Ablations: variants of params.yaml trained and benchmarked side by side (PortraitBench comparison).

An ablation file (``ablation.yaml``) names variants as dotted-key overrides of params.yaml, and the
training seeds to repeat each one with:

    baseline: plain                  # the variant the others are compared with (PortraitBench verdicts)
    seeds: [42, 43]                  # every variant runs once per seed (sets `seed`)
    common: {train.iterations: 40}   # overrides every variant shares (applied before the variant's own)
    controls: [sft]                  # the report also compares every variant with these (besides the baseline)
    variants:
      plain: {train.exemplars.per_group: 0}
      exemplar: {}                   # params.yaml as it is
      exemplar_euler: {invert.mode: euler}

Each (variant, seed) is a *run* named ``<variant>-s<seed>``, with its own params file and its own
invert -> precompute -> train chain under ``results/ablation/<run>/`` (curation is shared: it does not
depend on the variants), and one bench compares all runs. Two ways to run it:

- Snakemake: ``snakemake --cores 4 ablation`` (workflow/rules/ablation.smk; ``--config
  ablation=my_ablation.yaml`` for another file). Runs are independent jobs, so a cluster runs them in
  parallel.
- DVC experiments: ``portraitgen ablation dvc --run`` queues one ``dvc exp run -S key=value ...`` per
  run and runs the queue; ``dvc exp show`` and ``dvc metrics diff`` then compare them.

    portraitgen ablation list                              # run names
    portraitgen ablation params --run exemplar-s42 --out results/ablation/exemplar-s42/params.yaml
    portraitgen ablation dvc [--run]                       # print (or run) the DVC experiment commands
"""
from __future__ import annotations

import copy
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, params_from_dict, read_yaml
from .io import atomic_write_text

RUN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")
# Stage outputs a run reads from the runs' own folders (each run inverts/precomputes under its params).
RUN_PATHS = {
    "train.exemplars.index": "invert/index.parquet",
    "train.exemplars.rewards": "precompute/exemplar_rewards.parquet",
    "train.prompt_embeddings": "precompute/prompt_embeddings.safetensors",
}


class AblationError(ValueError):
    """The ablation file is missing or malformed."""


@dataclass(frozen=True)
class Ablation:
    baseline: str
    seeds: tuple[int, ...]
    variants: dict[str, dict[str, Any]]
    source: Path
    common: dict[str, Any] = field(default_factory=dict)  # overrides shared by every variant
    controls: tuple[str, ...] = ()  # variants the report compares every other variant with, besides the baseline

    def overrides(self, variant: str) -> dict[str, Any]:
        """The dotted-key overrides of ``variant``: the common ones, then its own (which win)."""
        return {**self.common, **self.variants[variant]}

    @property
    def runs(self) -> list[str]:
        return [run_name(v, s) for v in self.variants for s in self.seeds]

    @property
    def baseline_run(self) -> str:
        return run_name(self.baseline, self.seeds[0])

    def split(self, run: str) -> tuple[str, int]:
        for v in self.variants:
            for s in self.seeds:
                if run_name(v, s) == run:
                    return v, s
        raise AblationError(f"{self.source}: no run named {run!r}; runs: {', '.join(self.runs)}")


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def load_ablation(path: str | Path) -> Ablation:
    path = Path(path)
    data = read_yaml(path, "ablation file", AblationError)
    if not isinstance(data, dict):
        raise AblationError(f"{path}: expected a mapping with keys baseline, seeds, variants")
    unknown = set(data) - {"baseline", "seeds", "variants", "common", "controls"}
    if unknown:
        raise AblationError(f"{path}: unknown key {sorted(unknown)[0]!r}; expected baseline, seeds, variants, "
                            f"common, controls")
    common = data.get("common") or {}
    if not isinstance(common, dict):
        raise AblationError(f"{path}: 'common' must be a mapping of dotted params keys to values")
    variants = data.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise AblationError(f"{path}: 'variants' must be a non-empty mapping of name -> {{dotted.key: value}}")
    for name, overrides in variants.items():
        if not isinstance(name, str) or not RUN_NAME.match(name):
            raise AblationError(f"{path}: variant name {name!r} must use letters, digits, '_' and '.' only")
        if overrides is None:
            variants[name] = {}
        elif not isinstance(overrides, dict):
            raise AblationError(f"{path}: variants.{name} must be a mapping of dotted params keys to values")
    seeds = data.get("seeds", [42])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                             for s in seeds):
        raise AblationError(f"{path}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    baseline = data.get("baseline", next(iter(variants)))
    if baseline not in variants:
        raise AblationError(f"{path}: baseline {baseline!r} is not a variant; variants: {', '.join(variants)}")
    controls = data.get("controls") or []
    if not isinstance(controls, list) or any(c not in variants for c in controls):
        raise AblationError(f"{path}: 'controls' must be a list of variant names; variants: {', '.join(variants)}")
    return Ablation(baseline=baseline, seeds=tuple(seeds), variants=dict(variants), source=path, common=dict(common),
                    controls=tuple(controls))


def _set(tree: dict, dotted: str, value: Any, where: str) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise AblationError(f"{where}: {dotted!r} goes through {key!r}, which is not a section")
        node = child
    node[leaf] = value


def run_params(base_params: str | Path, ablation: Ablation, run: str, run_dir: str | Path) -> dict:
    """params.yaml with the run's overrides, its seed, and its own stage outputs under ``run_dir``."""
    variant, seed = ablation.split(run)
    data = yaml.safe_load(Path(base_params).read_text())
    data = copy.deepcopy(data)
    for dotted, value in ablation.overrides(variant).items():
        _set(data, dotted, value, f"{ablation.source}: variants.{variant} (or common)")
    _set(data, "seed", seed, "seed")
    run_dir = Path(run_dir)
    for dotted, rel in RUN_PATHS.items():
        node = data
        for key in dotted.split(".")[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and node.get(dotted.split(".")[-1]):  # only caches the params use
            _set(data, dotted, str(run_dir / rel), dotted)
    try:
        params_from_dict(data)
    except ConfigError as exc:
        raise AblationError(f"{ablation.source}: run {run}: {exc}") from None
    return data


def write_run_params(base_params: str | Path, ablation_path: str | Path, run: str, out: str | Path) -> Path:
    ablation = load_ablation(ablation_path)
    out = Path(out)
    data = run_params(base_params, ablation, run, out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out, f"# Ablation run {run}: {base_params} + {ablation.source} (portraitgen ablation "
                                  f"params)\n" + yaml.safe_dump(data, sort_keys=False))


def _dvc_value(value: Any) -> str:
    # `-S key=value` values are parsed as YAML by DVC.
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def dvc_commands(ablation: Ablation) -> list[list[str]]:
    """One queued ``dvc exp run`` per run, then running the queue."""
    commands = []
    for variant in ablation.variants:
        overrides = ablation.overrides(variant)
        for seed in ablation.seeds:
            cmd = ["dvc", "exp", "run", "--queue", "--name", run_name(variant, seed).replace(".", "_"),
                   "-S", f"seed={seed}"]
            for dotted, value in overrides.items():
                cmd += ["-S", f"{dotted}={_dvc_value(value)}"]
            commands.append(cmd)
    commands.append(["dvc", "exp", "run", "--run-all"])
    return commands


def run_dvc(ablation: Ablation, execute: bool) -> int:
    for cmd in dvc_commands(ablation):
        print(shlex.join(cmd))
        if execute:
            rc = subprocess.call(cmd)
            if rc != 0:
                return rc
    if execute:
        print("compare with: dvc exp show; dvc metrics diff")
    return 0
