"""Error types of rocket: every user-facing error is a one-line RocketError naming its subject.

One class per layer or stage, all here so that shared layers and stages raise them without
importing one another."""


class RocketError(ValueError):
    """Bad input or configuration; the message names the file, field, adapter or shape at fault."""


class DataError(RocketError):
    """Malformed or unusable example data; the message names the file and line (or the example)."""


class BankError(RocketError):
    """An adapter or bank that cannot be used; the message names the adapter and the reason."""


class MoEError(RocketError):
    """A LoRA-MoE layer, injection or saved state that cannot be used."""


class ModelError(RocketError):
    """A base model or tokenizer that cannot be loaded."""


class ScoringError(RocketError):
    """Stage 1 (score): unusable scoring inputs or options."""


class SelectionError(RocketError):
    """Stage 2 (select): unusable scores, bank or selection options."""


class AugmentError(RocketError):
    """Stage 3 (augment): unusable open data, K-shot data, embeddings or options."""


class TrainError(RocketError):
    """Stage 4 (train): a training setup that cannot run: configuration, checkpoint or output directory."""


class EvaluationError(RocketError):
    """`rocket eval`: unusable held-out data, models or output path."""


class RationaleError(RocketError):
    """`rocket rationale`: unusable K-shot data, model directory, output path or partial output."""


class PipelineError(RocketError):
    """`rocket run`: a run directory or run option that cannot be used."""
