"""`rocket run`: score → select → augment → train → report in one resumable run directory."""
from rocket.pipeline.run import RunConfig, run_pipeline

__all__ = ["RunConfig", "run_pipeline"]
