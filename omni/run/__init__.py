"""`omni run`'s machinery: experiment YAMLs (experiment.py), papermill + reports + MLflow runs
(runner.py), and reports/index.html (index.py). Knows notebooks and parameters, not models."""
