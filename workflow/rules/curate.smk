# Curation of real portraits: rule `curate` -> `portraitgen curate` -> portraitgen/curate.py.
# Inputs, outputs, params and command come from the stage table (portraitgen/stages.py, docs/stages.md).
#
# Outputs. results/curate/cache/ (per-image analyses keyed by content hash) is NOT declared: Snakemake
# deletes declared outputs before a job runs, and the cache is what lets a rerun after adding images
# analyse only the new ones (dvc.yaml declares it with `persist: true`).
# Rerun triggers: `curate`, `model.resolution` (the crop size) and, when curate.source is a folder,
# every image file in it (adding, removing or replacing a photo reruns the stage).
# Hardware: `--workers` is the job's threads (analysis processes); it never changes the outputs.
# Scatter/gather: `--config curate_parts=16` runs 16 `curate_part` jobs, then `curate` merges them.

if WF.num_parts("curate") > 1:

    rule curate_part:
        input:
            unpack(stage_inputs("curate", merge=False)),
        output:
            part=WF.part_pattern("curate"),
        wildcard_constraints:
            root=WF.root_constraint("curate"),
            part=r"\d{4}",
        params:
            **stage_params("curate"),
        log:
            "{root}/logs/curate_part-{part}.log",
        benchmark:
            "{root}/benchmarks/curate_part-{part}.tsv"
        conda:
            "../envs/portraitgen.yaml"
        threads: WF.threads("curate")
        resources:
            **WF.resources("curate"),
        shell:
            WF.shell("curate", part=True)


rule curate:
    input:
        unpack(stage_inputs("curate")),
    output:
        **stage_outputs("curate"),
    wildcard_constraints:
        root=WF.root_constraint("curate"),
    params:
        **stage_params("curate"),
    log:
        "{root}/logs/curate.log",
    benchmark:
        "{root}/benchmarks/curate.tsv"
    conda:
        "../envs/portraitgen.yaml"
    threads: WF.threads("curate")
    resources:
        **WF.resources("curate"),
    shell:
        WF.shell("curate")
