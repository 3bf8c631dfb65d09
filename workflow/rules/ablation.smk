# Ablations: `snakemake --cores N ablation` trains every run of the ablation file and benchmarks them
# side by side -> portraitgen/ablation.py (variants) and portraitgen/bench (comparison).
#
# The ablation file (default ablation.yaml; `--config ablation=FILE` for another) names variants as
# dotted-key overrides of params.yaml and the seeds to repeat them with; a run is `<variant>-s<seed>`.
# Each run gets its own params file (rule ablation_params) and runs the main rules invert ->
# precompute -> train with the root results/ablation/<run> (their `{root}` wildcard; curation is
# shared). The `bench` rule with the root results/ablation compares every run with the baseline
# variant's first seed. Runs are independent jobs, so a cluster trains them in parallel.
# The same runs as DVC experiments: `portraitgen ablation dvc --execute`.


rule ablation_params:
    input:
        src=WF.package_files(),
        params="params.yaml",
        variants=WF.ablation_file,
    output:
        params="results/ablation/{run}/params.yaml",
    wildcard_constraints:
        run=WF.run_constraint(),
    log:
        "results/ablation/{run}/logs/params.log",
    benchmark:
        "results/ablation/{run}/benchmarks/params.tsv"
    conda:
        "../envs/portraitgen.yaml"
    shell:
        "portraitgen ablation params --variants {input.variants} --params {input.params}"
        " --run {wildcards.run} --out {output.params} > {log} 2>&1"


# Variants pooled over their seeds: intervals, training curves, sample grid (portraitgen/ablation_report.py).
rule ablation_report:
    input:
        src=WF.package_files(),
        params="params.yaml",
        variants=WF.ablation_file,
        bench="results/ablation/bench/report.html",
    output:
        report="results/ablation/report/report.md",
        table="results/ablation/report/table.csv",
        comparisons="results/ablation/report/comparisons.csv",
        curves="results/ablation/report/curves.png",
    log:
        "results/ablation/logs/report.log",
    benchmark:
        "results/ablation/benchmarks/report.tsv"
    conda:
        "../envs/portraitgen.yaml"
    shell:
        "portraitgen ablation report --variants {input.variants} --params {input.params} --root results/ablation"
        " > {log} 2>&1"


# The ablation's target: `snakemake --cores N ablation` (never with a named run: rules/common.smk).
rule ablation:
    input:
        ablation_targets,
