# PortraitBench (issue 6): rule `bench` -> `portraitgen bench` -> portraitgen/bench/run.py (suite in
# suite.py, metrics in metrics.py, comparisons in compare.py, the report in report.py).
#
# What is benched: `bench.models` (label -> base | a training output | an exported or diffusers folder),
# compared with `bench.baseline`. A model inside results/train is an input through the train rule's
# declared output results/train/final, so retraining reruns the bench.
#
# Outputs. The tables, metrics.json, the report and its assets are declared. The images
# (results/bench/images/) are not: with `--config bench_parts=N` the part jobs write them and the merge
# job reads them, and Snakemake would delete a declared output of the merge before it runs. The merge
# removes images of models or prompts no longer benched. dvc.yaml declares them `persist: true`.
#
# Prompt conditioning: with `bench.prompt_embeddings` set (params.yaml: results/precompute/
# bench_prompt_embeddings.safetensors, the `bench_embeddings` rule's output in rules/precompute.smk),
# that file is an input (bench_inputs() in common.smk) and the models built on `model.path` are loaded
# without their text encoders. Set it to "" and the bench encodes the prompts itself (no input).
#
# Rerun triggers: the `bench` and `model` sections (the training seed does not move the bench's
# noise), the trained model, the real reference set, the suite file (unless built in), the prompt
# embeddings (so editing `bench.suite`/`bench.subset` reruns `bench_embeddings` and the bench only).
# Hardware: --batch-size (images per forward pass, the resource bench_batch; part jobs and the merge
# must agree on it, so it is one resource).
#
# Scatter/gather: `snakemake --config bench_parts=4` runs 4 `bench_part` jobs (`--part I --num-parts 4`,
# each sampling and scoring a share of the prompts for every model), then `bench` merges them.

if BENCH_PARTS > 1:

    rule bench_part:
        input:
            src=package_sources(),
            other=bench_inputs(),
        output:
            part=f"results/bench/parts/part-{{part}}-of-{BENCH_PARTS:04d}.parquet",
        wildcard_constraints:
            part=r"\d{4}",
        params:
            bench=params_section("bench"),
            model=params_section("model"),
        log:
            "results/logs/bench_part-{part}.log",
        benchmark:
            "results/benchmarks/bench_part-{part}.tsv"
        conda:
            "../envs/portraitgen.yaml"
        threads: 2
        resources:
            mem_mb=8000,
            runtime=120,
            gpu=0,
            bench_batch=8,
        shell:
            f"portraitgen bench --params params.yaml --out results/bench"
            f" --part $((10#{{wildcards.part}})) --num-parts {BENCH_PARTS}"
            f" --batch-size {{resources.bench_batch}} > {{log}} 2>&1"


rule bench:
    input:
        src=package_sources(),
        other=bench_inputs(),
        parts=bench_part_files(),
    output:
        scores="results/bench/scores.parquet",
        per_category="results/bench/per_category.parquet",
        set_metrics="results/bench/set_metrics.parquet",
        comparisons="results/bench/comparisons.parquet",
        metrics_info="results/bench/metrics_info.json",
        report="results/bench/report.html",
        assets=directory("results/bench/report_assets"),
        plots=directory("results/bench/plots"),
        metrics="results/bench/metrics.json",
    params:
        bench=params_section("bench"),
        model=params_section("model"),
    log:
        "results/logs/bench.log",
    benchmark:
        "results/benchmarks/bench.tsv"
    conda:
        "../envs/portraitgen.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=0,
        bench_batch=8,
    shell:
        "portraitgen bench --params params.yaml --out results/bench"
        + BENCH_MERGE_FLAGS
        + " --batch-size {resources.bench_batch} > {log} 2>&1"
