# Inversion of the curated portraits: rule `invert` -> `portraitgen invert` -> portraitgen/invert.py
# (math in portraitgen/inversion.py, storage in portraitgen/shards.py). Everything about the rule comes
# from the stage table (portraitgen/stages.py); `{root}` is `results` or an ablation run's folder.
#
# Outputs. The shards (results/invert/shards/) are NOT declared: they are a content-addressed cache
# (a shard is reused only when image, caption, model and inversion config match), and Snakemake would
# delete a declared output before every rerun. dvc.yaml declares them with `persist: true`.
# Hardware: `--batch-size` (images per forward pass) is the resource invert_batch.
# Scatter/gather: `--config invert_parts=8` runs 8 `invert_part` jobs (each writes its shards and a
# marker file), then `invert` verifies the shards and builds the index (`--merge-only`).

if WF.num_parts("invert") > 1:

    rule invert_part:
        input:
            unpack(stage_inputs("invert", merge=False)),
        output:
            done=touch(WF.part_pattern("invert")),
        wildcard_constraints:
            root=WF.root_constraint("invert"),
            part=r"\d{4}",
        params:
            **stage_params("invert"),
        log:
            "{root}/logs/invert_part-{part}.log",
        benchmark:
            "{root}/benchmarks/invert_part-{part}.tsv"
        conda:
            "../envs/portraitgen.yaml"
        threads: WF.threads("invert")
        resources:
            **WF.resources("invert"),
        shell:
            WF.shell("invert", part=True)


rule invert:
    input:
        unpack(stage_inputs("invert")),
    output:
        **stage_outputs("invert"),
    wildcard_constraints:
        root=WF.root_constraint("invert"),
    params:
        **stage_params("invert"),
    log:
        "{root}/logs/invert.log",
    benchmark:
        "{root}/benchmarks/invert.tsv"
    conda:
        "../envs/portraitgen.yaml"
    threads: WF.threads("invert")
    resources:
        **WF.resources("invert"),
    shell:
        WF.shell("invert")
