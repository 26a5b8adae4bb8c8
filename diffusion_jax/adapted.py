"""Models seen through an adapter (adapters.py): a trained base model and its frozen
parameters, and the adapter's own parameters, which are all a run trains and saves.

Each wrapper looks like a Flax module to the rest of the code: ``init`` returns
``{"params": the adapter's fresh parameters}`` and ``apply`` runs the base with them, so
the train step, data parallelism and checkpoints need no change. Besides:

  with_base(arrays)     the same wrapper over other base arrays: the train step passes
                        the base as an argument (never a constant baked into the program);
  prepare(batch)        what the adapter adds to a train batch (a ControlNet's control);
  sampling_model / sampling_params(params, scale)
                        what samplers run: a LoRA merged into its base; a ControlNet with
                        its base as one params tree; ``scale`` is traced.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Tuple

import jax
import numpy as np

from diffusion_jax import controls, lora
from diffusion_jax.models import abstract_inputs
from diffusion_jax.models.controlnet import copy_encoder


class Adapted:
    """What the two wrappers share (``model``: the base model, ``base_params``)."""

    def with_base(self, base_params):
        return dataclasses.replace(self, base_params=base_params)

    def prepare(self, batch):
        return batch

    def abstract_inputs(self, batch_size: int, image_shape):
        return abstract_inputs(self.model, batch_size, image_shape)

    def __getattr__(self, name):  # check_input_shape, fields the samplers read, ...
        if name == "model":  # not set yet (copy, unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: params are not hashable
class LoraModel(Adapted):
    """``init``: a fresh LoRA (lora.py) from the params rng; ``apply``: the base with the
    LoRA given as params merged into ``base_params``."""

    model: Any
    base_params: Any
    targets: Tuple[str, ...]
    rank: int
    alpha: float

    def init(self, rngs, *args, **kwargs):
        del args, kwargs
        key = rngs["params"] if isinstance(rngs, dict) else rngs
        return {"params": lora.init(self.base_params, self.targets, self.rank, key)}

    def apply(self, variables, *args, **kwargs):
        merged = lora.merge(self.base_params, variables["params"], self.alpha)
        return self.model.apply({"params": merged}, *args, **kwargs)

    @property
    def sampling_model(self):
        return self.model

    def sampling_params(self, params, scale=1.0):
        return _merge(self.base_params, params, self.alpha, np.float32(scale))


@functools.partial(jax.jit, static_argnames="alpha")
def _merge(base_params, lora_params, alpha: float, scale):
    return lora.merge(base_params, lora_params, alpha, scale)


@dataclasses.dataclass(frozen=True, eq=False)
class ControlledModel(Adapted):
    """The base UNet steered by a ControlNet (models/controlnet.py). Its condition is
    ``{"y": the base's condition, "hint": control image [B, H, W, 1][, "scale": [B]]}``
    (conditioning.py passes it through guidance and dropout; the control is never
    dropped). ``init`` copies the base's encoder into a fresh ControlNet; ``apply`` adds
    the ControlNet's residuals, times ``scale``, to the base's skips and middle block.
    Its params are the ControlNet's, or ``{"base": ..., "control": ...}`` at sampling."""

    model: Any
    base_params: Any
    controlnet: Any
    control: str  # controls.CONTROLS key
    hint_shape: Tuple[int, int, int]
    controlled = True  # make_sample_fn: conditional even over an unconditional base

    def abstract_inputs(self, batch_size: int, image_shape):
        x, t, y = abstract_inputs(self.model, batch_size, image_shape)
        hint = jax.ShapeDtypeStruct((batch_size, *self.hint_shape), np.float32)
        return x, t, {"y": y, "hint": hint}

    def init(self, rngs, x, t, y, train: bool = False):
        fresh = self.controlnet.init(rngs, x, t, y["y"], train, hint=y["hint"])["params"]
        return {"params": copy_encoder(fresh, self.base_params)}

    def apply(self, variables, x, t, y, train: bool = False, **kwargs):
        params = variables["params"]
        if set(params) == {"base", "control"}:  # the sampling view's joint tree
            base, net = params["base"], params["control"]
        else:
            base, net = self.base_params, params
        residuals = self.controlnet.apply(
            {"params": net}, x, t, y["y"], train, hint=y["hint"], **kwargs
        )
        scale = y.get("scale")
        if scale is not None:
            residuals = [r * scale.reshape(-1, 1, 1, 1).astype(r.dtype) for r in residuals]
        return self.model.apply({"params": base}, x, t, y["y"], train, control=residuals, **kwargs)

    def prepare(self, batch):
        return {**batch, "hint": controls.extract(self.control, batch["image"])}

    @property
    def sampling_model(self):
        return self

    def sampling_params(self, params, scale=1.0):
        del scale  # a ControlNet's scale is per sample, in its condition ("scale")
        return {"base": self.base_params, "control": params}


__all__ = ("Adapted", "ControlledModel", "LoraModel")
