# Helpers shared by the rules. No pipeline logic lives here: every rule calls the `portraitgen` CLI,
# and the package validates params.yaml in full (portraitgen/config.py). The schema below only checks
# the top-level sections, so a missing section fails at DAG-building time, naming the key.

import os
from pathlib import Path

from snakemake.utils import validate

# params.yaml is the Snakemake config (configfile: in workflow/Snakefile) and the file every stage
# reads; check its sections before any job starts.
validate(config, schema="../schemas/params.schema.yaml")


def params_section(name):
    """The params.yaml section `name`, passed to a rule's `params:` so that changing it reruns the job.

    Keys are sorted: Snakemake compares params by their repr, which follows key order, so without
    this, reordering params.yaml (or a tool rewriting it) would rerun every stage. DVC compares values.
    """
    return _sorted_keys(config[name])


def _sorted_keys(value):
    if isinstance(value, dict):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(item) for item in value]
    return value


def package_sources():
    """Every file of the portraitgen package (code and shipped data), the Snakemake twin of DVC's
    `deps: [portraitgen]`: editing the package reruns the stages that run it."""
    return sorted(
        str(p)
        for p in Path("portraitgen").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


# --- curate (rules/curate.smk) ---------------------------------------------------------------------
# `snakemake --config curate_parts=N` scatters curate over N part jobs (default: one job).
CURATE_PARTS = int(config.get("curate_parts", 1))
# Mirrors portraitgen.curate.IMAGE_EXTENSIONS (the Snakefile does not import the package).
CURATE_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def curate_sources():
    """The files `portraitgen curate` reads besides the package (rerun triggers: rules/curate.smk)."""
    cur = config["curate"]
    files = []
    source = str(cur.get("source", "builtin:demo"))
    if not source.startswith("builtin:"):
        path = Path(source)
        if path.is_dir():
            for root, dirs, names in os.walk(path, followlinks=True):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                files += [
                    os.path.join(root, n)
                    for n in names
                    if not n.startswith(".") and n.lower().endswith(CURATE_IMAGE_EXTENSIONS)
                ]
        else:
            files.append(source)
    files += [cur[key] for key in ("captions", "include", "exclude") if cur.get(key)]
    return sorted(files)


def curate_part_files():
    if CURATE_PARTS <= 1:
        return []
    return [
        f"results/curate/parts/part-{i:04d}-of-{CURATE_PARTS:04d}.jsonl"
        for i in range(CURATE_PARTS)
    ]


CURATE_MERGE_FLAGS = (
    f" --merge-only --num-parts {CURATE_PARTS}" if CURATE_PARTS > 1 else ""
)


def train_input(kind):
    """A file of another stage that the params make training read ([] when they do not): the exemplar
    index (prompts.source: exemplars), the prompt-embedding cache, the precomputed exemplar rewards."""
    t = config["train"]
    ex = t.get("exemplars", {})
    path = {
        "exemplar_index": ex.get("index", "results/invert/index.parquet")
        if config["prompts"]["source"] == "exemplars"
        else "",
        "prompt_embeddings": t.get("prompt_embeddings", ""),
        "exemplar_rewards": ex.get("rewards", ""),
    }[kind]
    return [path] if path else []
