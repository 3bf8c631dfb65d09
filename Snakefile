"""PortraitGen: `snakemake --cores N` from this folder runs the whole pipeline (README "Workflow").

The workflow is workflow/Snakefile (rules in workflow/rules/, the params schema in workflow/schemas/);
profiles are workflow/profiles/, reached as profiles/ so that Snakemake picks up profiles/default by
itself. This file only names what a plain `snakemake` builds.
"""


include: "workflow/Snakefile"


localrules:
    all,
    ablation,


# The default target. It must be a rule of this file: Snakemake never takes an included file's rule.
rule all:
    input:
        curate_manifest="results/curate/manifest.parquet",
        invert_report="results/invert/report.html",
        precompute_metrics="results/precompute/metrics.json",
        train_metrics="results/train/metrics.json",
        bench_report="results/bench/report.html",
