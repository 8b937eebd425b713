"""Ray Tune sweep of the phase-2 perception-distortion weights (:mod:`.sweep`), its trials' MLflow runs
(:mod:`.mlflow_runs`), its Pareto front (:mod:`.pareto`) and trials of several workers (:mod:`.workers`)."""

from pipeline.train.tune.sweep import (
    BEST_FILE,
    DEFAULT_SPACE,
    Evaluator,
    TrialSummary,
    TuneResult,
    absolute_paths,
    best_trial,
    eval_set,
    format_table,
    restore_checkpoint,
    run_trial,
    search_space,
    summarize,
    trial_base,
    tune,
    write_pareto,
)

__all__ = [
    "BEST_FILE",
    "DEFAULT_SPACE",
    "Evaluator",
    "TrialSummary",
    "TuneResult",
    "absolute_paths",
    "best_trial",
    "eval_set",
    "format_table",
    "restore_checkpoint",
    "run_trial",
    "search_space",
    "summarize",
    "trial_base",
    "tune",
    "write_pareto",
]
