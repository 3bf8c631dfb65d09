# Precompute: rule `precompute` -> `portraitgen precompute` -> portraitgen/precompute.py: the training
# prompts' embedding cache, the AI-Portrait detector when a reward component uses it with
# `path: results/precompute/detector`, and the rewards of every curated exemplar. Everything about the
# rules comes from the stage table (portraitgen/stages.py).
#
# Outputs. results/precompute/cache/ and results/precompute/detector/ are NOT declared: Snakemake
# deletes declared outputs before a job runs, and these make a rerun encode, score and train only
# what changed. A stage that scores with that detector depends on precompute's metrics.json.
#
# Rule `bench_embeddings` -> `portraitgen precompute --bench-only`: PortraitBench's prompts ->
# results/precompute/bench_prompt_embeddings.safetensors (read by the bench with bench.prompt_embeddings).
# A rule of its own because Snakemake reruns every job downstream of a rerun job: were the bench's
# prompts an output of `precompute`, editing `bench.subset` would retrain the model. It shares
# precompute's per-prompt store (cache/embeddings/), only adding entries, so the two may run together.
#
# Scatter/gather: `--config precompute_parts=8` runs 8 `precompute_part` jobs (each scores its block of
# exemplars with the rewards that do not need the detector trained here), then `precompute` gathers
# them, encodes the prompts, trains the detector and scores its components.

if WF.num_parts("precompute") > 1:

    rule precompute_part:
        input:
            unpack(stage_inputs("precompute", merge=False)),
        output:
            part=WF.part_pattern("precompute"),
        wildcard_constraints:
            root=WF.root_constraint("precompute"),
            part=r"\d{4}",
        params:
            **stage_params("precompute"),
        log:
            "{root}/logs/precompute_part-{part}.log",
        benchmark:
            "{root}/benchmarks/precompute_part-{part}.tsv"
        conda:
            "../envs/portraitgen.yaml"
        threads: WF.threads("precompute")
        resources:
            **WF.resources("precompute"),
        shell:
            WF.shell("precompute", part=True)


rule precompute:
    input:
        unpack(stage_inputs("precompute")),
    output:
        **stage_outputs("precompute"),
    wildcard_constraints:
        root=WF.root_constraint("precompute"),
    params:
        **stage_params("precompute"),
    log:
        "{root}/logs/precompute.log",
    benchmark:
        "{root}/benchmarks/precompute.tsv"
    conda:
        "../envs/portraitgen.yaml"
    threads: WF.threads("precompute")
    resources:
        **WF.resources("precompute"),
    shell:
        WF.shell("precompute")


rule bench_embeddings:
    input:
        unpack(stage_inputs("bench_embeddings")),
    output:
        **stage_outputs("bench_embeddings"),
    wildcard_constraints:
        root=WF.root_constraint("bench_embeddings"),
    params:
        **stage_params("bench_embeddings"),
    log:
        "{root}/logs/bench_embeddings.log",
    benchmark:
        "{root}/benchmarks/bench_embeddings.tsv"
    conda:
        "../envs/portraitgen.yaml"
    threads: WF.threads("bench_embeddings")
    resources:
        **WF.resources("bench_embeddings"),
    shell:
        WF.shell("bench_embeddings")
