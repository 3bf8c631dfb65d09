# The pipeline's stage rules, one per stage of the stage table (portraitgen/stages.py), plus a part rule
# for each stage scattered with `--config <stage>_parts=N`. Everything about a rule comes from the
# table: inputs (the package, the files the stage reads from params, a run's params file), outputs,
# params (rerun triggers), resources, threads and the command. `{root}` is `results`, an ablation run's
# folder results/ablation/<run>, or results/ablation for the ablation's bench (rules/ablation.smk).
# What each stage makes and why some outputs are left undeclared: docs/stages.md.
#
# The rules are made by a function, not in the loop's body: Snakemake evaluates a rule's `shell:`
# expression again when the job runs, and a loop variable would by then hold the last stage.


def stage_rules(stage):
    if WF.num_parts(stage) > 1:

        rule:
            name:
                f"{stage}_part"
            input:
                unpack(stage_inputs(stage, merge=False)),
            output:
                part_output(stage),
            wildcard_constraints:
                root=WF.root_constraint(stage),
                part=r"\d{4}",
            params:
                **stage_params(stage),
            log:
                f"{{root}}/logs/{stage}_part-{{part}}.log",
            benchmark:
                f"{{root}}/benchmarks/{stage}_part-{{part}}.tsv"
            conda:
                "../envs/portraitgen.yaml"
            threads: WF.threads(stage)
            resources:
                **WF.resources(stage),
            shell:
                WF.shell(stage, part=True)

    rule:
        name:
            stage
        input:
            unpack(stage_inputs(stage)),
        output:
            **stage_outputs(stage),
        wildcard_constraints:
            root=WF.root_constraint(stage),
        params:
            **stage_params(stage),
        log:
            f"{{root}}/logs/{stage}.log",
        benchmark:
            f"{{root}}/benchmarks/{stage}.tsv"
        conda:
            "../envs/portraitgen.yaml"
        threads: WF.threads(stage)
        resources:
            **WF.resources(stage),
        shell:
            WF.shell(stage)


for _stage in WF.stage_names():
    stage_rules(_stage)
