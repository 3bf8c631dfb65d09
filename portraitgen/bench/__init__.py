"""PortraitBench: a versioned portrait prompt suite, per-image metrics, comparisons and the report.

``portraitgen bench`` runs :func:`portraitgen.bench.run.run_bench`: suite.py (the prompts), metrics.py (what is
measured), compare.py (aggregation and bootstrap comparisons), run.py (the stage and its output files), report.py
(report.html, DVC plots, MLflow). Nothing is imported here, so ``python -m portraitgen.bench.suite`` runs cleanly
and importing the report does not pull in torch.
"""
