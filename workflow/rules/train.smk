# GRPO post-training (design.md §3): rule `train` -> `portraitgen launch-train` -> `portraitgen train`
# -> portraitgen/training.py. launch-train (portraitgen/launch.py) starts one training process per GPU
# of the job's allocation (`accelerate launch --multi_gpu`; SLURM_GPUS_ON_NODE, else the visible GPUs),
# or exactly `portraitgen train` on one GPU or none; every process checks at start-up that it sees its
# node's GPUs. Batch sizes in params are global, so the GPU count never changes what is trained.
#
# Outputs. `final/` (exported diffusers weights), `metrics.json` (summary) and `metrics.jsonl` (one
# row per iteration, rewritten from the checkpointed history on resume) are declared, so Snakemake
# removes them before the job runs and after it fails: a half-written model is never mistaken for a
# finished one. `results/train/checkpoints/` is deliberately NOT declared. Snakemake deletes every
# declared output (directory() included) before running a job and again when it fails, which would
# throw away exactly what a killed or failed run needs in order to resume. Left undeclared, it
# survives reruns and `--delete-all-output`; the trainer owns it (resumes from the newest checkpoint,
# keeps `train.keep_checkpoints`). dvc.yaml declares it with `persist: true` for the same reason.
# Delete it by hand to start training from scratch.
#
# Rerun triggers. Every params.yaml section that changes what is trained goes through `params:`, so
# editing one reruns the job (rerun-trigger "params"). `tracking` is left out on purpose: where the
# MLflow run is recorded does not change the model. Editing the package reruns it too (input `src`,
# the twin of `deps: [portraitgen]` in dvc.yaml).
#
# Hardware. Micro-batch size, mixed precision, threads and GPUs are resources, not params: they come
# from the profile or the command line and never from params.yaml, and changing them does not rerun
# a finished job (batch sizes in params.yaml are global, so the micro-batch size does not change what
# is computed; mixed precision changes rounding only):
#     snakemake --cores 8 --set-resources train:micro_batch=4 train:mixed_precision=bf16 train:gpu=1
# `mixed_precision` is a string resource: Snakemake schedules only on numeric resources and passes
# strings through untouched (also to cluster jobs, like `slurm_partition`). In a profile YAML, quote
# "no": bare `no` is YAML for false.


rule train:
    input:
        src=package_sources(),
        exemplar_index=train_input("exemplar_index"),
        prompt_embeddings=train_input("prompt_embeddings"),
        exemplar_rewards=train_input("exemplar_rewards"),
        detector=train_input("detector"),  # the precompute stage's detector, when a reward uses it
    output:
        model=directory("results/train/final"),
        metrics="results/train/metrics.json",
        history="results/train/metrics.jsonl",
    params:
        seed=params_section("seed"),
        model=params_section("model"),
        prompts=params_section("prompts"),
        sample=params_section("sample"),
        train=params_section("train"),
        reward=params_section("reward"),
    log:
        "results/logs/train.log",
    benchmark:
        "results/benchmarks/train.tsv"
    conda:
        "../envs/portraitgen.yaml"
    threads: 4
    resources:
        mem_mb=16000,
        runtime=240,  # minutes; matters on SLURM, where it is the job's time limit
        gpu=0,  # GPUs per job (scheduling; on SLURM, --gpus). Set train:gpu=N on a GPU machine or cluster
        micro_batch=0,  # samples per forward/backward on each process; 0: the trainer picks
        mixed_precision="no",  # no | fp16 | bf16 (Accelerate's names)
    shell:
        "portraitgen launch-train --params params.yaml --out results/train"
        " --micro-batch-size {resources.micro_batch}"
        " --mixed-precision {resources.mixed_precision}"
        " > {log} 2>&1"
