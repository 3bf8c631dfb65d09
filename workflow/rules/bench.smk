# PortraitBench: rule `bench` -> `portraitgen bench` -> portraitgen/bench/run.py. Everything about the
# rule comes from the stage table (portraitgen/stages.py): the models of `bench.models` made by this
# pipeline (e.g. results/train -> its final/), the real reference, the suite file and the prompt
# embeddings are inputs. `{root}` is `results`, or `results/ablation` for the ablation's bench of
# every run (rules/ablation.smk), which names its models and baseline with --model/--baseline.
#
# Outputs. The images (results/bench/images/) are not declared: with `--config bench_parts=N` the part
# jobs write them and the merge reads them. dvc.yaml declares them `persist: true`.
# Hardware: --batch-size is the resource bench_batch (part jobs and the merge must agree on it).

if WF.num_parts("bench") > 1:

    rule bench_part:
        input:
            unpack(stage_inputs("bench", merge=False)),
        output:
            part=WF.part_pattern("bench"),
        wildcard_constraints:
            root=WF.root_constraint("bench"),
            part=r"\d{4}",
        params:
            **stage_params("bench"),
        log:
            "{root}/logs/bench_part-{part}.log",
        benchmark:
            "{root}/benchmarks/bench_part-{part}.tsv"
        conda:
            "../envs/portraitgen.yaml"
        threads: WF.threads("bench")
        resources:
            **WF.resources("bench"),
        shell:
            WF.shell("bench", part=True)


rule bench:
    input:
        unpack(stage_inputs("bench")),
    output:
        **stage_outputs("bench"),
    wildcard_constraints:
        root=WF.root_constraint("bench"),
    params:
        **stage_params("bench"),
    log:
        "{root}/logs/bench.log",
    benchmark:
        "{root}/benchmarks/bench.tsv"
    conda:
        "../envs/portraitgen.yaml"
    threads: WF.threads("bench")
    resources:
        **WF.resources("bench"),
    shell:
        WF.shell("bench")
