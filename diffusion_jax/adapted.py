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
from diffusion_jax.models.text import TextConditional


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
    """The base UNet (or caption-conditioned UNet) steered by a ControlNet
    (models/controlnet.py). Its condition is
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

    @property
    def captioned(self) -> bool:
        """Whether the base reads captions (a TextConditional over a UNet): then the
        ControlNet copies its UNet and reads the caption as the base's encoder gives it."""
        return isinstance(self.model, TextConditional)

    def _net_inputs(self, base, y):
        """(the ControlNet's y, its caption keyword arguments) for the condition ``y``."""
        if not self.captioned:
            return y["y"], {}
        # the frozen base's text encoder (a ControlNet trains none of its own)
        return None, self.model.apply({"params": base}, y["y"], method=TextConditional.text_inputs)

    def init(self, rngs, x, t, y, train: bool = False):
        net_y, text = self._net_inputs(self.base_params, y)
        fresh = self.controlnet.init(rngs, x, t, net_y, train, hint=y["hint"], **text)
        unet = self.base_params["backbone"] if self.captioned else self.base_params
        return {"params": copy_encoder(fresh["params"], unet)}

    def apply(self, variables, x, t, y, train: bool = False, **kwargs):
        params = variables["params"]
        if set(params) == {"base", "control"}:  # the sampling view's joint tree
            base, net = params["base"], params["control"]
        else:
            base, net = self.base_params, params
        net_y, text = self._net_inputs(base, y)
        residuals = self.controlnet.apply(
            {"params": net}, x, t, net_y, train, hint=y["hint"], **text, **kwargs
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
