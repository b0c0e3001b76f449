"""Third-party chatter off by default: the libraries' warnings, log lines and progress bars.

A normal run shows only dcpo's own progress bars, tables and errors. `configure()` is called
once by the command entry, before any heavy import; `DCPO_DEBUG=1` or `dcpo --verbose` leave
the libraries as loud as they are by default. The settings go into the environment too, so
worker processes (the scoring pool, vLLM's engine) start equally quiet.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Read by the libraries when they are imported (and inherited by subprocesses).
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",  # its fork warning
    "VLLM_LOGGING_LEVEL": "ERROR",
    "PYTHONWARNINGS": "ignore",
}
LOGGERS = ("transformers", "datasets", "huggingface_hub", "torch", "vllm", "accelerate",
           "math_verify", "latex2sympy2_extended", "filelock", "urllib3", "httpx", "fsspec")


def verbose_requested() -> bool:
    return os.environ.get("DCPO_DEBUG", "").strip() not in ("", "0")


def configure(verbose: bool | None = None) -> None:
    """Silence (or, verbose, leave alone) third-party output for this process and its
    children. Safe to call again; values a user set in the environment are kept."""
    if verbose is None:
        verbose = verbose_requested()
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.simplefilter("ignore")  # dcpo reports through its own console, not warnings
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Libraries imported before this call (in-process use, tests) read no environment now.
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if sys.modules.get("datasets") is not None:  # None: blocked (the tests of extras)
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
