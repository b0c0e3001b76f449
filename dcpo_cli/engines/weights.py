"""Checking a set of named weights against the model they are to replace, before any is
copied: a load that would fail half-way must fail before it starts, so a refused load leaves
the engine's weights as they were (`dcpo serve`'s /load-weights, `HFEngine.load_weights`).

A model's layout is its checkpoint names with their shapes and kinds (floating point or
not): the transformers model's own state dict (the hf engine's, or one built on the meta
device from config.json, which holds no memory, for vLLM, which takes checkpoint names).
A saved checkpoint leaves out tied copies (the lm-head of tied embeddings), so of each group
of names sharing one parameter one must come; names the model itself ignores on load (its
`_keys_to_ignore_on_load_unexpected`) may come too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcpo_cli.errors import DcpoError, first_line


@dataclass(frozen=True)
class Layout:
    shapes: dict[str, tuple[int, ...]]
    floating: dict[str, bool]
    tied: tuple[frozenset[str], ...]  # names of one parameter: a checkpoint needs one of each
    ignored: tuple[str, ...] = ()  # regexes of names the model skips on load

    def required(self, given: set[str]) -> list[str]:
        tied = set().union(*self.tied) if self.tied else set()
        missing = [name for name in self.shapes if name not in tied and name not in given]
        missing += [min(group) for group in self.tied if not group & given]
        return sorted(missing)


def module_layout(model: Any) -> Layout:
    state = model.state_dict()
    groups: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), set()).add(name)
    return Layout({name: tuple(t.shape) for name, t in state.items()},
                  {name: t.is_floating_point() for name, t in state.items()},
                  tuple(frozenset(g) for g in groups.values() if len(g) > 1),
                  tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()))


def config_layout(model_dir: str | Path) -> Layout:
    """The layout of the transformers model config.json describes, built without memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise DcpoError(f"{model_dir}: cannot build the model of its config.json "
                        f"({first_line(exc)})") from None
    return module_layout(model)


def check_weights(tensors: Mapping[str, Any], layout: Layout, complete: bool = True) -> None:
    """Refuse (one line, before anything is copied) weights that are not the layout's:
    names missing (unless not `complete`: some of them) or unexpected, another shape, or
    another kind of value."""
    import torch

    given = set(tensors)
    unexpected = sorted(name for name in given - set(layout.shapes)
                        if not any(re.search(p, name) for p in layout.ignored))
    missing = layout.required(given) if complete else []
    problems = [(unexpected, "unexpected tensors"), (missing, "missing tensors")]
    shapes, kinds = [], []
    for name in sorted(given & set(layout.shapes)):
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor):
            kinds.append(f"{name}: not a tensor")
        elif tuple(tensor.shape) != layout.shapes[name]:
            shapes.append(f"{name}: shape {list(tensor.shape)}, the model's "
                          f"{list(layout.shapes[name])}")
        elif tensor.is_floating_point() != layout.floating[name] or tensor.is_complex() \
                or tensor.dtype == torch.bool:
            kinds.append(f"{name}: dtype {str(tensor.dtype).removeprefix('torch.')}, the "
                         f"model's is {'floating point' if layout.floating[name] else 'integer'}")
    problems += [(shapes, "tensors of another shape"), (kinds, "tensors of another dtype")]
    for names, what in problems:
        if names:
            raise DcpoError(f"the new weights do not fit the model: {len(names)} {what} "
                            f"({names[0]}{', ...' if len(names) > 1 else ''})")
