# The pipeline's stage rules, made from the stage table (portraitgen/stages.py). For every stage, a
# rule named after the stage writes under results/ (the main pipeline, so `snakemake train` works and a
# profile's `train` settings apply); when ablation runs use the stage, the same rule named
# `ablation_<stage>` writes under a `{root}` wildcard (results/ablation/<run>, or results/ablation for
# the ablation's bench; rules/ablation.smk); and each of them gets a part rule when the stage is
# scattered with `--config <stage>_parts=N`. Everything about each comes from the table -- inputs (the
# package, the files the stage reads from params, a run's params file), outputs, params (rerun
# triggers), resources, threads and the command --. What each stage makes, and why some outputs are left
# undeclared: docs/stages.md.
#
# The rules are made by a function, not in a loop's body: Snakemake evaluates a rule's `shell`
# expression again when the job runs, and a loop variable would by then hold the last stage.


def stage_rules(stage, name, root):
    base = root or "{root}"
    if WF.num_parts(stage) > 1:

        rule:
            name:
                f"{name}_part"
            input:
                unpack(stage_inputs(stage, root, merge=False)),
            output:
                part_output(stage, root),
            wildcard_constraints:
                **WF.constraints(stage, root, part=True),
            params:
                **stage_params(stage, root),
            log:
                f"{base}/logs/{stage}_part-{{part}}.log",
            benchmark:
                f"{base}/benchmarks/{stage}_part-{{part}}.tsv"
            conda:
                "../envs/portraitgen.yaml"
            threads: WF.threads(stage)
            resources:
                **WF.resources(stage),
            shell:
                WF.shell(stage, root, part=True)

    rule:
        name:
            name
        input:
            unpack(stage_inputs(stage, root)),
        output:
            **stage_outputs(stage, root),
        wildcard_constraints:
            **WF.constraints(stage, root),
        params:
            **stage_params(stage, root),
        log:
            f"{base}/logs/{stage}.log",
        benchmark:
            f"{base}/benchmarks/{stage}.tsv"
        conda:
            "../envs/portraitgen.yaml"
        threads: WF.threads(stage)
        resources:
            **WF.resources(stage),
        shell:
            WF.shell(stage, root)


for _stage, _name, _root in WF.rules():
    stage_rules(_stage, _name, _root)
