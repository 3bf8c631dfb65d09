# Inversion of the curated portraits (issue 4): rule `invert` -> `portraitgen invert` -> portraitgen/invert.py
# (math in portraitgen/inversion.py, storage in portraitgen/shards.py).
#
# Outputs. index.parquet, metrics.json, report.html and residuals.png are declared. The shards
# (results/invert/shards/) are NOT: they are a content-addressed cache (a shard is reused only when
# image, caption, model and inversion config match, and is verified by checksum), and Snakemake would
# delete a declared output before every rerun. dvc.yaml declares them with `persist: true`.
#
# Rerun triggers: the `invert` and `sample` sections, `model`, `seed` (the bridge noise) and the
# curated manifest. Hardware: `--batch-size` (images per forward pass) is the resource invert_batch.
#
# Scatter/gather for a cluster: `snakemake --config invert_parts=8` (default 1) runs 8 `invert_part`
# jobs (`portraitgen invert --part I --num-parts 8`, each writing its shards), then `invert` verifies
# them and builds the index (`--merge-only`). One job or N parts give the same shards and index.

INVERT_PARTS = int(config.get("invert_parts", 1))

if INVERT_PARTS > 1:

    rule invert_part:
        input:
            src=package_sources(),
            manifest="results/curate/manifest.parquet",
        output:
            done=touch(f"results/invert/parts/part-{{part}}-of-{INVERT_PARTS:04d}.done"),
        wildcard_constraints:
            part=r"\d{4}",
        params:
            invert=params_section("invert"),
            model=params_section("model"),
            sample=params_section("sample"),
            seed=params_section("seed"),
        log:
            "results/logs/invert_part-{part}.log",
        benchmark:
            "results/benchmarks/invert_part-{part}.tsv"
        conda:
            "../envs/portraitgen.yaml"
        threads: 2
        resources:
            mem_mb=8000,
            runtime=240,
            gpu=0,
            invert_batch=4,
        shell:
            f"portraitgen invert --params params.yaml --out results/invert"
            f" --part $((10#{{wildcards.part}})) --num-parts {INVERT_PARTS}"
            f" --batch-size {{resources.invert_batch}} > {{log}} 2>&1"


rule invert:
    input:
        src=package_sources(),
        manifest="results/curate/manifest.parquet",
        parts=[f"results/invert/parts/part-{i:04d}-of-{INVERT_PARTS:04d}.done" for i in range(INVERT_PARTS)]
        if INVERT_PARTS > 1
        else [],
    output:
        index="results/invert/index.parquet",
        report="results/invert/report.html",
        plot="results/invert/residuals.png",
        metrics="results/invert/metrics.json",
    params:
        invert=params_section("invert"),
        model=params_section("model"),
        sample=params_section("sample"),
        seed=params_section("seed"),
    log:
        "results/logs/invert.log",
    benchmark:
        "results/benchmarks/invert.tsv"
    conda:
        "../envs/portraitgen.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=0,  # set invert:gpu=1 on a GPU machine or cluster
        invert_batch=4,
    shell:
        "portraitgen invert --params params.yaml --out results/invert"
        + (" --merge-only" if INVERT_PARTS > 1 else "")
        + " --batch-size {resources.invert_batch} > {log} 2>&1"
