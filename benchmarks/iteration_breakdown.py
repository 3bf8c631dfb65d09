"""Where a GRPO iteration's time goes, and how far it is from the transformer's own time.

    python benchmarks/iteration_breakdown.py --config small --threads 1       # the CPU target (20 M params, 256 px)
    python benchmarks/iteration_breakdown.py --config tiny --quick            # CI smoke run (seconds)
    python benchmarks/iteration_breakdown.py --config small --exemplars 1     # groups with a real exemplar
    python benchmarks/iteration_breakdown.py --device cuda --config reference --compile --memory-sweep
    python benchmarks/iteration_breakdown.py --device cuda --config zimage --transformer-only

On a shared CPU use ``--threads 1``: with two OpenMP threads and other jobs on the cores, the same work
ran 5-13x slower and erratically on the 2-core development machine.

Runs ``--warmup`` + ``--iterations`` GRPO iterations with the real trainer (``GRPOTrainer.run``, the same
loop ``portraitgen train`` runs) on a benchmark configuration (see ``benchmarks/common.py``) and reports,
as medians over the measured iterations:

- the wall time of each phase - data loading, rollout, exemplar log-probs, reward, advantage, training
  forward/backward, optimizer, logging, checkpoint (one save timed apart, amortised over 10 iterations) -
  and the iteration wall (the phases sum to it);
- the transformer work of the same iteration replayed in isolation in the same run: every transformer call
  is counted by shape and kind (rollout / reference forward without grad, training forward+backward), one
  call of each kind is timed alone right after each iteration (so under the same load), and the
  **overhead ratio** is iteration wall / that time (median over iterations);
- transformer FLOPs per iteration (``torch.utils.flop_counter.FlopCounterMode``), achieved TFLOP/s over the
  iteration and, on a GPU, the model-FLOPs utilisation against the card's bf16 peak;
- peak memory per phase: CPU resident set and GPU allocated (``PhaseTimeline(track_memory=True)``);
- with ``--memory-sweep`` (GPU): peak memory of one training forward+backward per micro-batch size, and
  the largest micro-batch that fits in 80 GB.

One JSON line per figure, then a table. ``--quick`` shrinks the configuration for CI (timings meaningless).
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets the offline environment before torch/diffusers load)
import torch  # noqa: E402

CHECKPOINT_EVERY = 10  # iterations per checkpoint the breakdown amortises one checkpoint over
PHASES = ("data", "rollout", "exemplar_logp", "reward", "advantage", "train_fwd_bwd", "optimizer", "log", "checkpoint")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small", choices=["tiny", "small", "reference", "zimage"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="a CPU smoke run of the configuration's structure (CI)")
    ap.add_argument("--iterations", type=int, default=None, help="measured iterations (default 3; quick 1)")
    ap.add_argument("--warmup", type=int, default=1, help="iterations run first and not measured")
    ap.add_argument("--exemplars", type=int, default=0, help="exemplars per group (E; inverted here first)")
    ap.add_argument("--exemplar-prompts", action="store_true",
                    help="prompts are exemplar captions even with --exemplars 0 (E = 0 at equal prompts)")
    ap.add_argument("--index", help="an exemplar index to use instead of inverting synthetic portraits")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                    help="transformer autocast (default: bf16 on cuda, no on cpu)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--micro-batch-size", type=int, default=None, help="default: the configuration's")
    ap.add_argument("--rollout-batch-size", type=int, default=None, help="default: the configuration's")
    ap.add_argument("--transformer-only", action="store_true",
                    help="no GRPO iterations: the transformer's forward and forward+backward alone (TFLOP/s)")
    ap.add_argument("--images", type=int, default=None, help="images per iteration (default: the configuration's)")
    ap.add_argument("--repeats", type=int, default=3, help="timed replays of each transformer call kind")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    ap.add_argument("--memory-sweep", action="store_true", help="peak memory of training micro-batches (GPU)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the card for the MFU")
    ap.add_argument("--out", help="keep the training output here (default: a temporary folder)")
    return ap


# ---------------------------------------------------------------------------------------------- setup
def exemplar_index(cfg: common.BenchConfig, path: str, work: Path, quick: bool) -> Path:
    """Invert one synthetic portrait per group prompt (bridge mode) and return the index."""
    from helpers import make_manifest

    from portraitgen.config import params_from_dict
    from portraitgen.invert import run_invert

    groups = max(2, cfg.images // cfg.group_size)
    captions = [f"a portrait photo of person {i}" for i in range(groups)]
    manifest = make_manifest(work / "curate", n=groups, size=cfg.resolution, captions=captions)
    params = params_from_dict({
        **common.params_dict(cfg, path, "", iterations=1),
        "invert": {"manifest": str(manifest), "mode": "bridge", "shard_size": 64, "diagnostic_samples": 2}})
    run_invert(params, work / "invert", batch_size=cfg.micro_batch)
    return work / "invert" / "index.parquet"


def make_hardware(args, cfg):
    from portraitgen.hardware import Hardware

    wanted = {"micro_batch_size": args.micro_batch_size or cfg.micro_batch,
              "rollout_micro_batch_size": args.rollout_batch_size or cfg.rollout_batch,
              "mixed_precision": args.mixed_precision, "compile": args.compile,
              "gradient_checkpointing": args.gradient_checkpointing}
    fields = {f.name for f in dataclasses.fields(Hardware)}
    for k in ("compile", "gradient_checkpointing", "rollout_micro_batch_size"):
        if wanted[k] and k not in fields:
            raise SystemExit(f"this portraitgen has no Hardware.{k}")
    return Hardware(**{k: v for k, v in wanted.items() if k in fields})


class ExternalPhases:
    """Phase times from wrappers around the trainer's methods, for a trainer without a PhaseTimeline
    (measuring an older checkout). CPU only: it does not synchronise a GPU. ``on_end(iteration)`` runs
    between iterations, outside any timed span."""

    def __init__(self, trainer, on_end) -> None:
        self.on_end = on_end
        self.iteration = -1
        self.iter_start: list[float] = []
        self.current: dict[str, float] = {}
        self.done: list[dict[str, float]] = []
        t = trainer
        self._wrap(t, "sample", "rollout")
        self._wrap(t, "score", "reward")
        self._wrap(t, "compute_advantages", "advantage")
        self._wrap(t, "train", "train_fwd_bwd")
        self._wrap(t, "save_checkpoint", "checkpoint")
        self._wrap(t.optimizer, "step", "optimizer", sub_of="train_fwd_bwd")
        self._wrap(t.accelerator, "clip_grad_norm_", "optimizer", sub_of="train_fwd_bwd")
        if t.ema is not None:
            self._wrap(t.ema, "update", "optimizer", sub_of="train_fwd_bwd")
        plan, finish = t.plan, t.finish

        def plan_w(it):
            self._boundary()
            t0 = time.perf_counter()
            try:
                return plan(it)
            finally:
                self.current["data"] = self.current.get("data", 0.0) + time.perf_counter() - t0

        def finish_w():
            self._boundary()
            return finish()

        t.plan, t.finish = plan_w, finish_w

    def _wrap(self, obj, name: str, phase: str, sub_of: str | None = None) -> None:
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                self.current[phase] = self.current.get(phase, 0.0) + dt
                if sub_of:
                    self.current[sub_of] = self.current.get(sub_of, 0.0) - dt

        setattr(obj, name, wrapper)

    def _boundary(self) -> None:
        now = time.perf_counter()
        if self.iter_start:
            wall = now - self.iter_start[-1]
            rec = dict(self.current)
            rec["log"] = rec.get("log", 0.0) + wall - sum(rec.values())
            rec["iteration"] = wall
            self.done.append(rec)
            self.on_end(self.iteration)
        self.iteration += 1
        self.iter_start.append(time.perf_counter())
        self.current = {}


def phase_times(trainer, external: ExternalPhases | None, first: int) -> list[dict[str, float]]:
    if external is not None:
        return external.done[first:]
    out = []
    for h in trainer.history[first:]:
        rec = {p: h.get(f"time/{p}", 0.0) for p in PHASES}
        rec["iteration"] = h.get("time/wall", h.get("time/iteration"))
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------- run
def run(args) -> dict[str, Any]:
    """Train, measure and report one configuration; returns the summary figures."""
    from portraitgen.config import params_from_dict
    from portraitgen.policies import model_fingerprint
    from portraitgen.prompts import load_prompts
    from portraitgen.training import GRPOTrainer

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.device == "cuda" else "no"
    cfg = common.config(args.config, args.quick)
    if args.images:
        cfg = dataclasses.replace(cfg, images=args.images, train_batch=args.images)
    iterations = args.iterations or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix=f"bench-{cfg.name}-"))
    out = Path(args.out) if args.out else work / "train"
    try:
        path = common.model_path(cfg, args.quick)
        policy = None
        if cfg.on_device:
            dtype = torch.bfloat16 if args.mixed_precision == "bf16" else (
                torch.float16 if args.mixed_precision == "fp16" else torch.float32)
            policy = common.build_on_device(cfg, args.device, dtype)
        index, source = "", "builtin:demo"
        if args.exemplars or args.exemplar_prompts:
            if cfg.on_device:
                raise SystemExit("--exemplars needs a saved configuration (tiny or small)")
            index = args.index or str(exemplar_index(cfg, path, work, args.quick))
            source = "exemplars"
        embeddings = ""
        if cfg.name != "tiny":  # cached random embeddings: the text encoders never run
            import pandas as pd

            prompts = (sorted(set(pd.read_parquet(index, columns=["caption"])["caption"])) if index
                       else load_prompts(source))
            embeddings = str(common.embedding_cache(work / "embeddings.safetensors", prompts,
                                                    common.text_shapes(cfg, policy),
                                                    model_fingerprint(cfg.family, path), cfg.family))
        params = params_from_dict(common.params_dict(cfg, path, embeddings, iterations=args.warmup + iterations,
                                                     exemplars=args.exemplars, index=index, prompts_source=source))
        hardware = make_hardware(args, cfg)
        kwargs = {"policy": policy} if policy is not None else {}
        trainer = GRPOTrainer(params, out, hardware, **kwargs)
        timeline = getattr(trainer, "timeline", None)
        if timeline is not None:
            timeline.track_memory = True
        # A checkpoint is written every train.checkpoint_every iterations, not each one: it is timed once,
        # apart, and amortised (the run's final checkpoint would otherwise land in a measured iteration).
        save_checkpoint = trainer.save_checkpoint
        trainer.save_checkpoint = lambda it: None
        tw = common.TransformerWork(trainer.policy)
        iso: list[tuple[float, dict[str, float]]] = []  # per measured iteration: isolated seconds, by kind
        counts: list[dict] = []

        def at_end(it: int) -> None:
            """Between iterations (outside every timed span): replay this iteration's transformer work in
            isolation, so each iteration's overhead ratio compares times taken under the same load."""
            if it < args.warmup:
                return
            counts.append(tw.counts())
            tw.measure(args.device, repeats=1 if args.quick else args.repeats, flops=False,
                       warmup=1 if len(counts) == 1 else 0)
            seconds, _, kinds = tw.isolated(counts[-1])
            iso.append((seconds, kinds))

        plan = trainer.plan

        def plan_hook(it):
            tw.reset_counts()  # counts per iteration
            if it == args.warmup:  # the measured iterations start: memory peaks afresh
                if timeline is not None:
                    timeline.memory.clear()
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
            return plan(it)

        trainer.plan = plan_hook
        # (ExternalPhases wraps plan_hook: the previous iteration ends before the next one's counts reset.)
        external = None
        if timeline is None:
            if args.device == "cuda":
                raise SystemExit("this trainer has no PhaseTimeline: GPU phases cannot be measured without syncs")
            external = ExternalPhases(trainer, at_end)
        else:
            append = trainer._append_history

            def append_hook(record):
                append(record)
                at_end(record["iteration"])

            trainer._append_history = append_hook
        t0 = time.perf_counter()
        trainer.run()
        run_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        save_checkpoint(args.warmup + iterations - 1)
        common.sync(args.device)
        ckpt_s = time.perf_counter() - t0
        per_iter = phase_times(trainer, external, args.warmup)
        for rec in per_iter:  # (the no-op save's own span, microseconds, is replaced)
            rec["iteration"] += ckpt_s / CHECKPOINT_EVERY - rec.get("checkpoint", 0.0)
            rec["checkpoint"] = ckpt_s / CHECKPOINT_EVERY
        for rec, (seconds, kinds) in zip(per_iter, iso):
            rec["isolated"], rec["isolated_kinds"] = seconds, kinds
        flops = None
        if not args.no_flops:
            tw.measure(args.device, repeats=1, flops=True, warmup=0)
            _, flops, _ = tw.isolated(counts[-1])
        result = report(args, cfg, trainer, per_iter, flops, timeline, run_s)
        if args.memory_sweep:
            result["memory_sweep"] = memory_sweep(args, tw, trainer)
        return result
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def report(args, cfg, trainer, per_iter, flops, timeline, run_s) -> dict[str, Any]:
    dev = args.device
    ctx = {"config": cfg.name + ("-quick" if args.quick else ""), "exemplars": args.exemplars,
           "precision": args.mixed_precision, "compile": args.compile, "checkpointing": args.gradient_checkpointing,
           **common.machine(dev)}
    rep = common.Report("iteration_breakdown", **ctx)
    wall = statistics.median(r["iteration"] for r in per_iter)
    for ph in PHASES:
        vals = [r.get(ph, 0.0) for r in per_iter]
        if any(vals):
            med = statistics.median(vals)
            mem = (timeline.memory.get(ph, {}) if timeline is not None else {})
            rep.figure(f"phase/{ph}", med, "s", share=round(med / wall, 4),
                       cpu_rss_peak_mib=common.mib(mem.get("cpu_rss_peak")),
                       gpu_alloc_peak_mib=common.mib(mem.get("gpu_allocated_peak")) if dev == "cuda" else None)
    rep.figure("iteration_wall", wall, "s", share=1.0, min=round(min(r["iteration"] for r in per_iter), 4),
               max=round(max(r["iteration"] for r in per_iter), 4))
    iso_s = statistics.median(r["isolated"] for r in per_iter)
    for kind in sorted(per_iter[0]["isolated_kinds"]):
        s = statistics.median(r["isolated_kinds"][kind] for r in per_iter)
        rep.figure(f"isolated/{kind}", s, "s", share=round(s / wall, 4))
    rep.figure("isolated_transformer", iso_s, "s", share=round(iso_s / wall, 4))
    ratios = [r["iteration"] / r["isolated"] for r in per_iter if r["isolated"]]
    ratio = statistics.median(ratios) if ratios else float("nan")
    rep.figure("overhead_ratio", ratio, "x", min=round(min(ratios), 4), max=round(max(ratios), 4),
               note="median over iterations of wall / isolated transformer time, measured after each")
    images = cfg.images if not args.images else args.images
    rep.figure("images_per_second", images / wall, "img/s")
    n_params = sum(p.numel() for p in trainer.policy.transformer.parameters())
    rep.figure("transformer_params", n_params / 1e6, "M")
    result = {"config": cfg.name, "wall_s": wall, "isolated_s": iso_s, "overhead_ratio": ratio,
              "images_per_second": images / wall, "phases": {ph: statistics.median(r.get(ph, 0.0) for r in per_iter)
                                                              for ph in PHASES}}
    if flops:
        achieved = flops / wall / 1e12
        rep.figure("transformer_tflop_per_iteration", flops / 1e12, "TFLOP")
        rep.figure("achieved_tflops", achieved, "TFLOP/s", note="transformer FLOPs / iteration wall")
        rep.figure("isolated_tflops", flops / iso_s / 1e12, "TFLOP/s", note="transformer FLOPs / isolated time")
        peak = common.peak_tflops(dev, args.peak_tflops)
        if peak:
            rep.figure("mfu", achieved / peak, "fraction", peak_tflops=peak)
            result["mfu"] = achieved / peak
        result["tflops"] = achieved
    rep.figure("process_peak_rss", common.mib(common.peak_rss_bytes()), "MiB")
    if dev == "cuda":
        rep.figure("gpu_peak_allocated", common.mib(torch.cuda.max_memory_allocated()), "MiB")
        procs = trainer.policy.attention_processors() if hasattr(trainer.policy, "attention_processors") else []
        rep.figure("attention_processors", ",".join(procs), "")
    rep.figure("checkpoint_once", per_iter[0]["checkpoint"] * CHECKPOINT_EVERY, "s",
               note=f"one checkpoint, timed apart; phase/checkpoint is it / {CHECKPOINT_EVERY}")
    rep.figure("run_seconds", run_s, "s", note="setup excluded; includes warm-up and export")
    rep.table(f"GRPO iteration breakdown - {ctx['config']} on {dev}")
    return result


def memory_sweep(args, tw: common.TransformerWork, trainer) -> dict[int, float]:
    """Peak GPU memory of one training forward+backward (CFG batch included) per micro-batch size."""
    if args.device != "cuda":
        return {}
    grad_calls = [c for c in tw.calls.values() if c.grad]
    if not grad_calls:
        return {}
    call = max(grad_calls, key=lambda c: c.latents.shape[0])
    per_call = call.latents.shape[0] // max(1, trainer.micro_batch)  # 2 with CFG
    rep = common.Report("memory_sweep", config=args.config, **common.machine(args.device))
    sizes, peaks = [], {}
    base = torch.cuda.memory_allocated()
    for mb in (1, 2, 4, 8, 16, 32):
        n = mb * per_call
        rep_idx = torch.arange(n, device=call.latents.device) % call.latents.shape[0]
        sub = common._Call(key=("sweep", n), module=call.module, latents=call.latents[rep_idx],
                           sigma=call.sigma[rep_idx], cond={k: v[rep_idx] for k, v in call.cond.items()}, grad=True, reference=False,
                           autocast=call.autocast)
        torch.cuda.reset_peak_memory_stats()
        try:
            tw._replay(sub)
            torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            rep.figure("train_step_peak", None, "GiB", micro_batch=mb, note="out of memory")
            break
        finally:
            for p in trainer.named_trainable.values():
                p.grad = None
            torch.cuda.empty_cache()
        peak = torch.cuda.max_memory_allocated() / 2**30
        peaks[mb] = peak
        sizes.append(mb)
        rep.figure("train_step_peak", peak, "GiB", micro_batch=mb, resident_gib=round(base / 2**30, 2))
    if len(sizes) >= 2:
        a, b = sizes[-2], sizes[-1]
        slope = (peaks[b] - peaks[a]) / (b - a)
        fit = int(a + (80.0 - peaks[a]) / slope) if slope > 0 else None
        rep.figure("gib_per_sample", slope, "GiB", note="training activations per sample (CFG included)")
        rep.figure("max_micro_batch_80gb", fit, "samples", note="linear fit of the last two sizes")
    rep.table("training micro-batch memory")
    return peaks


def transformer_only(args) -> dict[str, Any]:
    """docs/design.md §8's anchors: ms per image-step and TFLOP/s of the LoRA'd transformer alone, forward at the
    rollout batch and forward+backward at the training batch (CFG doubles both), random inputs."""
    from portraitgen.policies import load_policy

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.device == "cuda" else "no"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    cfg = common.config(args.config, args.quick)
    if cfg.on_device:
        policy = common.build_on_device(cfg, args.device, dtype)
    else:
        policy = load_policy(cfg.family, common.model_path(cfg, args.quick), device=args.device, text_encoders=False)
    policy.freeze_all()
    torch.manual_seed(0)
    policy.enable_lora(cfg.lora_rank, 2.0 * cfg.lora_rank, ())
    if dtype != torch.float32:
        policy.cast_frozen(dtype)
    if args.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    if args.compile:
        policy.compile_transformer(dynamic=False)
    tw = common.TransformerWork(policy)
    shape = policy.latent_shape(cfg.resolution, cfg.resolution)
    cfg_mult = 2 if cfg.guidance_scale != 1.0 else 1
    ac = (dtype != torch.float32, dtype if dtype != torch.float32 else torch.get_autocast_dtype(args.device))
    g = torch.Generator().manual_seed(0)
    rep = common.Report("transformer_only", config=cfg.name + ("-quick" if args.quick else ""),
                        precision=args.mixed_precision, compile=args.compile,
                        checkpointing=args.gradient_checkpointing, **common.machine(args.device))
    out = {}
    for kind, per, grad in (("forward", args.rollout_batch_size or cfg.rollout_batch or cfg.micro_batch, False),
                            ("forward_backward", args.micro_batch_size or cfg.micro_batch, True)):
        b = per * cfg_mult
        cond = {k: (torch.ones(b, *sh, dtype=torch.bool) if k == "prompt_mask" else torch.randn(b, *sh, generator=g))
                for k, sh in common.text_shapes(cfg, policy).items()}
        call = common._Call(key=(kind,), module=policy.transformer,
                            latents=torch.randn(b, *shape, generator=g).to(args.device),
                            sigma=torch.full((b,), 0.5, device=args.device),
                            cond={k: v.to(args.device) for k, v in cond.items()}, grad=grad, reference=False,
                            autocast=ac)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = common.timed(lambda: tw._replay(call), args.device, repeats=1 if args.quick else args.repeats,
                               warmup=2 if args.compile else 1)
        for p in policy.transformer.parameters():
            p.grad = None
        flops = None if args.no_flops else tw._flops(call)
        rep.figure(f"{kind}/ms_per_image", 1000 * seconds / b, "ms", batch=b)
        extra = {}
        if flops:
            tf = flops / seconds / 1e12
            rep.figure(f"{kind}/tflops", tf, "TFLOP/s", batch=b, gflop_per_image=round(flops / b / 1e9, 1))
            peak = common.peak_tflops(args.device, args.peak_tflops)
            if peak:
                rep.figure(f"{kind}/mfu", tf / peak, "fraction", batch=b, peak_tflops=peak)
            extra["tflops"] = tf
        if args.device == "cuda":
            rep.figure(f"{kind}/gpu_peak_allocated", common.mib(torch.cuda.max_memory_allocated()), "MiB", batch=b)
        out[kind] = {"seconds": seconds, "batch": b, **extra}
    rep.figure("transformer_params", sum(p.numel() for p in policy.transformer.parameters()) / 1e6, "M")
    rep.table(f"transformer alone - {cfg.name} at {cfg.resolution}px on {args.device}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.transformer_only:
        transformer_only(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
