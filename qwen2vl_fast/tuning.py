"""`qwen2vl_fast.tune(model, inputs)`: measure, at the model's real shapes on this device, every op that has more
than one implementation, and keep the winners (ops/dispatch.py) in the tuning cache for later processes.

A model loaded with backend="auto" already measures each new shape on its first call (dispatch="measure"); tune
does it up front, for the shapes of `inputs` (processed dicts, a forward each), whatever the model's mode, so
the first real request runs no measurement. The engine's warm-up calls it for its prefill and decode shapes.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

from .errors import InputError


def measured_forward(model, inputs: Union[dict, Iterable[dict]], remeasure: bool = False) -> list:
    """Run the forward of each processed dict in `inputs` with measurement on; return the dispatch report."""
    dispatch = model.ops.dispatch
    if dispatch is None:
        return []  # nothing is raced on this device (e.g. the CPU): there is nothing to measure
    if isinstance(inputs, dict):
        inputs = [inputs]
    with measuring(model.ops, remeasure):
        for batch in inputs:
            if not isinstance(batch, dict) or "input_ids" not in batch:
                raise InputError("tune takes processed inputs: a dict (or a list of dicts) with input_ids, ...")
            model(**{k: (v.to(model.device) if hasattr(v, "to") and k != "pixel_frames" else v)
                     for k, v in batch.items()})
    return dispatch.report()


def tune(model, inputs: Optional[Union[dict, Iterable[dict]]] = None, remeasure: bool = False) -> list:
    """Measure the candidates of every raced op at the shapes of `inputs` (default: one 448x448 image with 64
    text tokens and a 512-token text prompt) and store the winners. `remeasure=True` forgets earlier winners of
    this device first. Returns [(op, shape key, winner, {backend: microseconds})]."""
    if inputs is None:
        from .testing.inputs import image_prompt, text_prompt

        inputs = [image_prompt(model.config, 448, 448, 64), text_prompt(512)]
    return measured_forward(model, inputs, remeasure)


class measuring:
    """Context: the table's dispatch measures unknown shapes (whatever its mode) and, with `remeasure`, forgets
    the winners measured before."""

    def __init__(self, table, remeasure: bool = False):
        self.dispatch, self.remeasure = table.dispatch, remeasure

    def __enter__(self):
        d = self.dispatch
        if d is None:
            return self
        self.saved_mode, d.mode = d.mode, "measure"
        if self.remeasure:
            for name, op in d.ops.items():
                op.winners.clear()
                d.cache.entries.pop(name, None)
        return self

    def __exit__(self, *exc):
        if self.dispatch is not None:
            self.dispatch.mode = self.saved_mode
            self.dispatch.cache.save()
        return False
