# The pipeline's stage rules, one per stage of the stage table (portraitgen/stages.py), plus a part rule
# for each stage scattered with `--config <stage>_parts=N`. Everything about a rule comes from the
# table: inputs (the package, the files the stage reads from params, a run's params file), outputs,
# params (rerun triggers), resources, threads and the command. `{root}` is `results`, an ablation run's
# folder results/ablation/<run>, or results/ablation for the ablation's bench (rules/ablation.smk).
# What each stage makes and why some outputs are left undeclared: docs/stages.md.

for _stage in WF.stage_names():
    if WF.num_parts(_stage) > 1:

        rule:
            name:
                f"{_stage}_part"
            input:
                unpack(stage_inputs(_stage, merge=False)),
            output:
                part_output(_stage),
            wildcard_constraints:
                root=WF.root_constraint(_stage),
                part=r"\d{4}",
            params:
                **stage_params(_stage),
            log:
                f"{{root}}/logs/{_stage}_part-{{part}}.log",
            benchmark:
                f"{{root}}/benchmarks/{_stage}_part-{{part}}.tsv"
            conda:
                "../envs/portraitgen.yaml"
            threads: WF.threads(_stage)
            resources:
                **WF.resources(_stage),
            shell:
                WF.shell(_stage, part=True)

    rule:
        name:
            _stage
        input:
            unpack(stage_inputs(_stage)),
        output:
            **stage_outputs(_stage),
        wildcard_constraints:
            root=WF.root_constraint(_stage),
        params:
            **stage_params(_stage),
        log:
            f"{{root}}/logs/{_stage}.log",
        benchmark:
            f"{{root}}/benchmarks/{_stage}.tsv"
        conda:
            "../envs/portraitgen.yaml"
        threads: WF.threads(_stage)
        resources:
            **WF.resources(_stage),
        shell:
            WF.shell(_stage)
