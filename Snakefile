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
# Its root is results/, or results/runs/NAME with `--config run=NAME` (workflow/rules/common.smk).
rule all:
    input:
        curate_manifest=f"{WF.main_root}/curate/manifest.parquet",
        invert_report=f"{WF.main_root}/invert/report.html",
        precompute_metrics=f"{WF.main_root}/precompute/metrics.json",
        train_metrics=f"{WF.main_root}/train/metrics.json",
        bench_report=f"{WF.main_root}/bench/report.html",
