# Helpers shared by the rules. No pipeline logic lives here: every rule calls the `portraitgen` CLI,
# and the package validates params.yaml in full (portraitgen/config.py). The schema below only checks
# the top-level sections, so a missing section fails at DAG-building time, naming the key.

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
