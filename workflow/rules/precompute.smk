# Precompute (issue 5): rule `precompute` -> `portraitgen precompute` -> portraitgen/precompute.py.
# The prompt-embedding cache (training then never loads the text encoders) and the rewards of every
# curated exemplar (computed once; rows are reused while image and reward config are unchanged).
# Rerun triggers: `prompts`, `reward`, `model` and the curated manifest.


rule precompute:
    input:
        src=package_sources(),
        manifest="results/curate/manifest.parquet",
    output:
        embeddings="results/precompute/prompt_embeddings.safetensors",
        rewards="results/precompute/exemplar_rewards.parquet",
        metrics="results/precompute/metrics.json",
    params:
        prompts=params_section("prompts"),
        reward=params_section("reward"),
        model=params_section("model"),
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
        gpu=0,
    shell:
        "portraitgen precompute --params params.yaml --out results/precompute > {log} 2>&1"
