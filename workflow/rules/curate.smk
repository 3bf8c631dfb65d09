# Curation of real portraits (issue 3): rule `curate` -> `portraitgen curate` -> portraitgen/curate.py.
#
# Outputs. The manifest, the crops (images/), the rejection table, the report and metrics.json are
# declared. `results/curate/cache/` (per-image analyses and crops, keyed by content hash) is NOT
# declared: Snakemake deletes declared outputs before a job runs, and the cache is what lets a rerun
# after adding images analyse only the new ones (dvc.yaml declares it with `persist: true`).
# `results/curate/demo/` (the built-in demo photos, written by the stage) is not an output either.
#
# Rerun triggers. The `curate` section and `model.resolution` (the crop size) go through `params:`;
# `tracking`, `seed` and the rest of `model` do not change what is curated. Inputs: the package, and,
# when curate.source is a folder, every image file in it (so adding, removing or replacing a photo
# reruns the stage, which then analyses only what is new), or the list file, plus the captions and
# include/exclude files. The stage's output is byte-identical when nothing relevant changed.
#
# Hardware. `--workers` is the job's threads (analysis processes); it never changes the outputs.
#
# Scatter/gather for a cluster: `snakemake --config curate_parts=16` (default 1) splits the files into
# 16 `curate_part` jobs (each `portraitgen curate --part I --num-parts 16`, writing
# results/curate/parts/part-I-of-16.jsonl and filling the shared cache), then `curate` merges them
# (`--merge-only --num-parts 16`). One job or N parts give the same outputs. Helpers: common.smk.

if CURATE_PARTS > 1:

    rule curate_part:
        input:
            src=package_sources(),
            sources=curate_sources(),
        output:
            part=f"results/curate/parts/part-{{part}}-of-{CURATE_PARTS:04d}.jsonl",
        wildcard_constraints:
            part=r"\d{4}",
        params:
            curate=params_section("curate"),
            model_resolution=config["model"]["resolution"],
        log:
            "results/logs/curate_part-{part}.log",
        benchmark:
            "results/benchmarks/curate_part-{part}.tsv"
        conda:
            "../envs/portraitgen.yaml"
        threads: 8
        resources:
            mem_mb=8000,
            runtime=240,
        shell:
            f"portraitgen curate --params params.yaml --out results/curate"
            f" --part {{wildcards.part}} --num-parts {CURATE_PARTS}"
            f" --workers {{threads}} > {{log}} 2>&1"


rule curate:
    input:
        src=package_sources(),
        sources=curate_sources(),
        parts=curate_part_files(),
    output:
        manifest="results/curate/manifest.parquet",
        images=directory("results/curate/images"),
        rejected="results/curate/rejected.parquet",
        report="results/curate/report.html",
        metrics="results/curate/metrics.json",
    params:
        curate=params_section("curate"),
        model_resolution=config["model"]["resolution"],
    log:
        "results/logs/curate.log",
    benchmark:
        "results/benchmarks/curate.tsv"
    conda:
        "../envs/portraitgen.yaml"
    threads: 8
    resources:
        mem_mb=8000,
        runtime=240,  # minutes; the SLURM time limit
    shell:
        f"portraitgen curate --params params.yaml --out results/curate"
        f" --workers {{threads}}{CURATE_MERGE_FLAGS} > {{log}} 2>&1"
