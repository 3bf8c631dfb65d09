# The reward server as its own job, on its own GPU (docs/reward-server.md): rule `reward_server` ->
# `portraitgen reward-server` -> portraitgen/serving. It serves the reward components whose options
# name a server, e.g. in params.yaml
#
#     reward:
#       options:
#         omni_vlm: {model_path: /models/Qwen2.5-VL-7B-Instruct,
#                    server: {address_file: results/reward_server/address.json, wait_s: 1800}}
#
# and the train (or bench) job finds it through that address file, which the server writes once its
# models are loaded (any node, any free port) and removes when it stops. Nothing else in the train or
# bench rule changes: the two jobs run side by side, and the trainer's reward worker thread scores
# through the server while the GPU keeps computing.
#
#     snakemake --cores 8 train_with_reward_server          # local: both jobs at once
#     snakemake --workflow-profile profiles/slurm train_with_reward_server   # SLURM: two sbatch jobs
#     snakemake ... bench_with_reward_server
#
# The server job stops by itself once its consumer's metrics.json is written after the server started
# (an older one, about to be replaced, does not count), or after REWARD_SERVER_IDLE_S without a
# request (a consumer that failed, or was already up to date and never ran). Its output, what was
# served (rewards, batch-size histograms, totals), is temporary, so every request of the target starts
# a server again. A train job that finds no server within wait_s fails naming the address file; its
# checkpoints stay, and the rerun resumes.

REWARD_SERVER_IDLE_S = 900
REWARD_SERVER_ADDRESS = "results/reward_server/address.json"


localrules:
    train_with_reward_server,
    bench_with_reward_server,


rule reward_server:
    output:
        served=temp("results/reward_server/served_{consumer}.json"),
    wildcard_constraints:
        consumer="train|bench",
    params:
        done="results/{consumer}/metrics.json",
        address=REWARD_SERVER_ADDRESS,
        idle=REWARD_SERVER_IDLE_S,
    log:
        "results/logs/reward_server_{consumer}.log",
    conda:
        "../envs/portraitgen.yaml"
    threads: 4
    resources:
        gpu=1,
        mem_mb=64000,
        runtime=2880,
    shell:
        "portraitgen reward-server --params params.yaml --host 0.0.0.0 --port 0 --threads {threads}"
        " --address-file {params.address} --stop-when-exists {params.done} --stop-when-idle {params.idle}"
        " --info-out {output.served} > {log} 2>&1"


rule train_with_reward_server:
    input:
        "results/train/metrics.json",
        "results/reward_server/served_train.json",


rule bench_with_reward_server:
    input:
        "results/bench/metrics.json",
        "results/reward_server/served_bench.json",
