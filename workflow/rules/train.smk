# GRPO post-training: rule `train` -> `portraitgen launch-train` -> `portraitgen train` ->
# portraitgen/training.py. launch-train (portraitgen/launch.py) starts one training process per GPU of
# the job's allocation; batch sizes in params are global, so the GPU count never changes what is trained.
# Everything about the rule comes from the stage table (portraitgen/stages.py); `{root}` is `results`
# or an ablation run's folder (rules/ablation.smk).
#
# Outputs. `final/`, `metrics.json` and `metrics.jsonl` are declared, so Snakemake removes them before
# the job runs and after it fails: a half-written model is never mistaken for a finished one.
# `checkpoints/` is deliberately NOT declared: Snakemake deletes every declared output before running
# a job and again when it fails, which would throw away what a killed run needs to resume. The
# trainer owns it (checkpoints/<training fingerprint>, portraitgen/fingerprint.py); dvc.yaml declares
# it with `persist: true` for the same reason.
#
# Rerun triggers: the training keys (portraitgen/fingerprint.py), the files training reads (exemplar
# index, prompt embeddings, exemplar rewards, a detector trained by precompute, a model made by
# another stage), the package.
#
# Hardware (portraitgen/hardware.py): every option is a resource, never a param, so changing one does
# not rerun a finished job:
#     snakemake --cores 8 --set-resources train:micro_batch=4 train:mixed_precision=bf16 train:gpu=1 \
#         train:rollout_batch=16 train:compile=1 train:gradient_checkpointing=1 train:fp32_frozen_weights=1
# `mixed_precision` is a string resource (quote "no" in a profile YAML: bare `no` is false).


rule train:
    input:
        unpack(stage_inputs("train")),
    output:
        **stage_outputs("train"),
    wildcard_constraints:
        root=WF.root_constraint("train"),
    params:
        **stage_params("train"),
    log:
        "{root}/logs/train.log",
    benchmark:
        "{root}/benchmarks/train.tsv"
    conda:
        "../envs/portraitgen.yaml"
    threads: WF.threads("train")
    resources:
        **WF.resources("train"),
    shell:
        WF.shell("train")
