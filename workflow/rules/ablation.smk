# Ablations (issue 6): `snakemake --cores N ablation` trains every run of the ablation file and
# benchmarks them side by side -> portraitgen/ablation.py (variants) and portraitgen/bench (comparison).
#
# The ablation file (default ablation.yaml; `--config ablation=FILE` for another) names variants as
# dotted-key overrides of params.yaml and the seeds to repeat them with; a run is `<variant>-s<seed>`.
# Each run gets its own params file and its own invert -> precompute -> train chain under
# results/ablation/<run>/ (the same `portraitgen` commands as the main rules, with --params pointing at
# the run's file); curation is shared. One bench compares every run with the baseline variant's first
# seed. Runs are independent jobs, so a cluster trains them in parallel.
# The same runs as DVC experiments: `portraitgen ablation dvc --execute` (one `dvc exp run -S ...` each).

RUN_DIR = "results/ablation/{run}"


wildcard_constraints:
    run=r"[A-Za-z0-9_.]+-s\d+",


rule ablation_params:
    input:
        src=package_sources(),
        params="params.yaml",
        variants=ABLATION_FILE,
    output:
        params=f"{RUN_DIR}/params.yaml",
    log:
        "results/logs/ablation/{run}/params.log",
    benchmark:
        "results/benchmarks/ablation/{run}/params.tsv"
    conda:
        "../envs/portraitgen.yaml"
    shell:
        "portraitgen ablation params --variants {input.variants} --params {input.params}"
        " --run {wildcards.run} --out {output.params} > {log} 2>&1"


rule ablation_invert:
    input:
        src=package_sources(),
        params=f"{RUN_DIR}/params.yaml",
        manifest="results/curate/manifest.parquet",
    output:
        index=f"{RUN_DIR}/invert/index.parquet",
        report=f"{RUN_DIR}/invert/report.html",
        residuals=f"{RUN_DIR}/invert/residuals.png",
        metrics=f"{RUN_DIR}/invert/metrics.json",
    log:
        "results/logs/ablation/{run}/invert.log",
    benchmark:
        "results/benchmarks/ablation/{run}/invert.tsv"
    conda:
        "../envs/portraitgen.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=0,
        invert_batch=4,
    shell:
        "portraitgen invert --params {input.params} --out results/ablation/{wildcards.run}/invert"
        " --batch-size {resources.invert_batch} > {log} 2>&1"


rule ablation_precompute:
    input:
        src=package_sources(),
        params=f"{RUN_DIR}/params.yaml",
        manifest="results/curate/manifest.parquet",
    output:
        embeddings=f"{RUN_DIR}/precompute/prompt_embeddings.safetensors",
        rewards=f"{RUN_DIR}/precompute/exemplar_rewards.parquet",
        metrics=f"{RUN_DIR}/precompute/metrics.json",
    log:
        "results/logs/ablation/{run}/precompute.log",
    benchmark:
        "results/benchmarks/ablation/{run}/precompute.tsv"
    conda:
        "../envs/portraitgen.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=0,
    shell:
        "portraitgen precompute --params {input.params} --out results/ablation/{wildcards.run}/precompute"
        " > {log} 2>&1"


rule ablation_train:
    input:
        src=package_sources(),
        params=f"{RUN_DIR}/params.yaml",
        index=f"{RUN_DIR}/invert/index.parquet",
        embeddings=f"{RUN_DIR}/precompute/prompt_embeddings.safetensors",
        rewards=f"{RUN_DIR}/precompute/exemplar_rewards.parquet",
    output:
        model=directory(f"{RUN_DIR}/train/final"),
        metrics=f"{RUN_DIR}/train/metrics.json",
        history=f"{RUN_DIR}/train/metrics.jsonl",
    log:
        "results/logs/ablation/{run}/train.log",
    benchmark:
        "results/benchmarks/ablation/{run}/train.tsv"
    conda:
        "../envs/portraitgen.yaml"
    threads: 4
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=0,
        micro_batch=0,
        mixed_precision="no",
    shell:
        "portraitgen launch-train --params {input.params} --out results/ablation/{wildcards.run}/train"
        " --micro-batch-size {resources.micro_batch}"
        " --mixed-precision {resources.mixed_precision} > {log} 2>&1"


rule ablation_bench:
    input:
        src=package_sources(),
        models=expand(f"{RUN_DIR}/train/final", run=ABLATION_RUNS),
        reference="results/curate/manifest.parquet",
        embeddings=bench_prompt_embeddings(),  # the bench prompts' cache (bench_embeddings rule)
    output:
        scores="results/ablation/bench/scores.parquet",
        comparisons="results/ablation/bench/comparisons.parquet",
        report="results/ablation/bench/report.html",
        metrics="results/ablation/bench/metrics.json",
    params:
        bench=params_section("bench"),
        model=params_section("model"),
        models=" ".join(f"--model {run}=results/ablation/{run}/train" for run in ABLATION_RUNS),
        baseline=ABLATION_BASELINE,
    log:
        "results/logs/ablation/bench.log",
    benchmark:
        "results/benchmarks/ablation/bench.tsv"
    conda:
        "../envs/portraitgen.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=0,
        bench_batch=8,
    shell:
        "portraitgen bench --params params.yaml --out results/ablation/bench {params.models}"
        " --baseline {params.baseline} --batch-size {resources.bench_batch} > {log} 2>&1"


# The ablation's target: `snakemake --cores N ablation`.
rule ablation:
    input:
        "results/ablation/bench/report.html",
