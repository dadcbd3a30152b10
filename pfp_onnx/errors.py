"""Errors a user can cause. Each message says what was wrong and what to do; the CLI prints it as one
paragraph and exits with status 2. Anything else escaping the library is a bug."""


class PfpError(Exception):
    """Base of every error a user can cause; the CLI prints its message as one paragraph and exits 2."""


class BudgetError(PfpError):
    """The requested budget is out of range or cannot be met."""


class ModelError(PfpError):
    """The model file is missing, unreadable, not ONNX, invalid, or has nothing to prune."""


class DataError(PfpError):
    """The calibration data does not match the model's inputs or is not usable."""


class OutputError(PfpError):
    """The output path cannot be written safely."""


class OptionError(PfpError):
    """A command-line or API option is invalid or contradicts another."""
