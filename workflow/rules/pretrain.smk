# Pretraining of the toy base model: rule `pretrain` -> `portraitgen pretrain` -> portraitgen/pretrain
# (docs/pretrain.md). Everything about the rule comes from the stage table (portraitgen/stages.py).
# Its model folder is the default `model.path` (results/pretrain/model): every stage that loads the
# model then depends on this one (through its metrics.json, which is written last). The model and the
# artifact detector are NOT declared outputs: the stage reuses them while their content key is
# unchanged, and Snakemake would delete declared outputs before every run (dvc.yaml: `persist: true`).


rule pretrain:
    input:
        unpack(stage_inputs("pretrain")),
    output:
        **stage_outputs("pretrain"),
    wildcard_constraints:
        root=WF.root_constraint("pretrain"),
    params:
        **stage_params("pretrain"),
    log:
        "{root}/logs/pretrain.log",
    benchmark:
        "{root}/benchmarks/pretrain.tsv"
    conda:
        "../envs/portraitgen.yaml"
    threads: WF.threads("pretrain")
    resources:
        **WF.resources("pretrain"),
    shell:
        WF.shell("pretrain")
