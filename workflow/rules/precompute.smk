# Precompute (issue 5): rule `precompute` -> `portraitgen precompute` -> portraitgen/precompute.py.
# The training prompts' embedding cache (training then never loads the text encoders), the AI-Portrait
# detector when a reward component uses it with `path: results/precompute/detector`, and the rewards of
# every curated exemplar (scored after the detector is trained).
#
# Outputs. prompt_embeddings.safetensors, exemplar_rewards.parquet and metrics.json are declared.
# results/precompute/cache/ (per-prompt embeddings and per-exemplar rewards, keyed by content and
# settings) and results/precompute/detector/ (reused while key.json matches its inputs) are NOT:
# Snakemake deletes declared outputs before a job runs, and these are what make a rerun encode,
# score and train only what changed.
#
# Rerun triggers: `prompts`, `reward`, `model`, the sample settings the detector's generated images
# use by default (`sample.eval_num_steps`, `sample.guidance_scale`, `sample.cfg`), `bench.reward` when
# params.yaml has a `bench` section (a bench reward's detector is trained here), and the curated
# manifest. Not PortraitBench's prompts: those are the `bench_embeddings` rule's (below), so that
# editing `bench.suite`/`bench.subset` never reruns this job, and through its outputs, training.
#
# Rule `bench_embeddings` -> `portraitgen precompute --bench-only`: PortraitBench's prompts (and the
# empty prompt) -> results/precompute/bench_prompt_embeddings.safetensors, which the bench reads with
# `bench.prompt_embeddings` (rules/bench.smk: an input through bench_inputs() when that key is set).
# A rule of its own because Snakemake reruns every job downstream of a rerun job whatever the content
# of its outputs: were the bench's prompts an output of `precompute`, editing `bench.subset` would
# retrain the model. Its rerun triggers are what the file depends on: `model.family`, `model.path`,
# `bench.suite`, `bench.subset` and the suite file (unless built in). It writes into
# results/precompute because it shares the per-prompt store results/precompute/cache/embeddings/ with
# `precompute` (a prompt in both lists is encoded once; entries from before the split are reused); it
# only adds entries, and `precompute` prunes only entries that neither prompt list uses, so the two
# jobs may run at the same time. Editing `bench.suite` or `bench.subset` reruns `bench_embeddings`
# and `bench`, nothing else.
#
# Scatter/gather for a cluster: `snakemake --config precompute_parts=8` (default 1) runs 8
# `precompute_part` jobs (`portraitgen precompute --part I --num-parts 8`, each scoring its blocks of
# exemplars with every reward that does not need the detector trained here and writing
# results/precompute/parts/part-I-of-8.parquet), then `precompute` gathers them (`--merge-only`),
# encodes the prompts and trains the detector with one load of the base model, and scores the
# detector's components. One job or N parts write the same files.

PRECOMPUTE_PARTS = int(config.get("precompute_parts", 1))


# The params.yaml values the stage reads (the same keys as dvc.yaml's precompute params). Plain values,
# not functions: the lint wants helper functions in common.smk.
PRECOMPUTE_PARAMS = {
    "prompts": params_section("prompts"),
    "reward": params_section("reward"),
    "model": params_section("model"),
    "sample_eval_num_steps": config["sample"].get("eval_num_steps", 20),
    "sample_guidance_scale": config["sample"].get("guidance_scale", 4.5),
    "sample_cfg": config["sample"].get("cfg", True),
    # PortraitBench's rewards (a detector they use is trained here); its prompts are `bench_embeddings`'.
    **({"bench_reward": params_section("bench").get("reward", {})} if "bench" in config else {}),
}
# The params.yaml values `bench_embeddings` reads (the same keys as dvc.yaml's bench_embeddings params).
BENCH_EMBEDDINGS_PARAMS = {
    "model_family": config["model"].get("family", "sd3"),
    "model_path": config["model"].get("path", "builtin:tiny"),
    "bench_suite": (config.get("bench") or {}).get("suite", "builtin:v1"),
    "bench_subset": (config.get("bench") or {}).get("subset", "cpu"),
}
PRECOMPUTE_PART_FILES = [
    f"results/precompute/parts/part-{i:04d}-of-{PRECOMPUTE_PARTS:04d}.parquet"
    for i in range(PRECOMPUTE_PARTS)
    if PRECOMPUTE_PARTS > 1
]


if PRECOMPUTE_PARTS > 1:

    rule precompute_part:
        input:
            src=package_sources(),
            manifest="results/curate/manifest.parquet",
        output:
            part=f"results/precompute/parts/part-{{part}}-of-{PRECOMPUTE_PARTS:04d}.parquet",
        wildcard_constraints:
            part=r"\d{4}",
        params:
            **PRECOMPUTE_PARAMS,
        log:
            "results/logs/precompute_part-{part}.log",
        benchmark:
            "results/benchmarks/precompute_part-{part}.tsv"
        conda:
            "../envs/portraitgen.yaml"
        threads: 2
        resources:
            mem_mb=8000,
            runtime=120,
            gpu=0,
        shell:
            f"portraitgen precompute --params params.yaml --out results/precompute"
            f" --part {{wildcards.part}} --num-parts {PRECOMPUTE_PARTS} > {{log}} 2>&1"


rule precompute:
    input:
        src=package_sources(),
        manifest="results/curate/manifest.parquet",
        parts=PRECOMPUTE_PART_FILES,
    output:
        embeddings="results/precompute/prompt_embeddings.safetensors",
        rewards="results/precompute/exemplar_rewards.parquet",
        metrics="results/precompute/metrics.json",
    params:
        **PRECOMPUTE_PARAMS,
    log:
        "results/logs/precompute.log",
    benchmark:
        "results/benchmarks/precompute.tsv"
    conda:
        "../envs/portraitgen.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=0,  # set precompute:gpu=1 where the text encoders and the detector's generations need one
    shell:
        "portraitgen precompute --params params.yaml --out results/precompute"
        + (f" --merge-only --num-parts {PRECOMPUTE_PARTS}" if PRECOMPUTE_PARTS > 1 else "")
        + " > {log} 2>&1"


rule bench_embeddings:
    input:
        src=package_sources(),
        suite=bench_suite_file(),
    output:
        embeddings="results/precompute/bench_prompt_embeddings.safetensors",
    params:
        **BENCH_EMBEDDINGS_PARAMS,
    log:
        "results/logs/bench_embeddings.log",
    benchmark:
        "results/benchmarks/bench_embeddings.tsv"
    conda:
        "../envs/portraitgen.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=0,  # set bench_embeddings:gpu=1 where the text encoders need one
    shell:
        "portraitgen precompute --params params.yaml --out results/precompute --bench-only > {log} 2>&1"
