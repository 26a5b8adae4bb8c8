"""The FID feature net: InceptionV3 (the 2015-12-05 TF graph as ported by pytorch-fid) in
Flax up to its 2048-d pool3 features, with weights converted from pytorch-fid's state dict
and loaded from a local file (nothing is downloaded; ``inception_v3``)."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.evaluation.extractor import FeatureExtractor, to_channels

INCEPTION_INPUT_SIZE = 299
INCEPTION_FILE_NAME = "pt_inception-2015-12-05.npz"
_INCEPTION_HOWTO = f"""\
The standard FID network is the 2015-12-05 TensorFlow Inception graph, as ported to PyTorch
by pytorch-fid: pt_inception-2015-12-05-6726825d.pth from
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
On a machine with internet access and PyTorch:
  python -c "import torch, numpy as np; \
    sd = torch.load('pt_inception-2015-12-05-6726825d.pth', map_location='cpu'); \
    np.savez('{INCEPTION_FILE_NAME}', **{{k: v.numpy() for k, v in sd.items()}})"
then pass the .npz path, e.g.
  --inception_weights=~/.cache/diffusion_jax/eval/{INCEPTION_FILE_NAME}
Verify the download before converting: torch.hub names such files with the first hex
digits of their sha256, so `sha256sum pt_inception-2015-12-05-6726825d.pth` must start
with 6726825d; compare the full digest with the one published for that release if you
have it. (No checksum of the .npz is given: it depends on the numpy version writing it.)
A .pkl holding a dict {{name: array}} with the same keys also works, as do files in this
module's own layout ("params/<module path>/kernel", "batch_stats/.../mean")."""


class _ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, inference statistics) + ReLU: Inception's
    BasicConv2d. Submodule names "conv"/"bn" mirror the PyTorch port."""

    features: int
    kernel: tuple = (1, 1)
    strides: tuple = (1, 1)
    padding: Any = "VALID"

    @nn.compact
    def __call__(self, x):
        pad = self.padding
        if isinstance(pad, tuple):  # (ph, pw) symmetric padding, as in PyTorch
            pad = ((pad[0], pad[0]), (pad[1], pad[1]))
        x = nn.Conv(
            self.features, self.kernel, self.strides, padding=pad, use_bias=False, name="conv"
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x):
    """3x3 stride-1 average pool, padding 1, padded cells excluded from the count
    (PyTorch count_include_pad=False, as in the TF graph)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride: int):
    pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=pad)


class _InceptionA(nn.Module):  # Mixed_5b..5d: 35x35
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = _ConvBN(64, name="branch1x1")(x)
        b5 = _ConvBN(48, name="branch5x5_1")(x)
        b5 = _ConvBN(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = _ConvBN(64, name="branch3x3dbl_1")(x)
        b3 = _ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = _ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = _ConvBN(self.pool_features, name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class _InceptionB(nn.Module):  # Mixed_6a: 35 -> 17
    @nn.compact
    def __call__(self, x):
        b3 = _ConvBN(384, (3, 3), (2, 2), name="branch3x3")(x)
        bd = _ConvBN(64, name="branch3x3dbl_1")(x)
        bd = _ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = _ConvBN(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class _InceptionC(nn.Module):  # Mixed_6b..6e: 17x17, factorized 7x7
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = _ConvBN(192, name="branch1x1")(x)
        b7 = _ConvBN(c, name="branch7x7_1")(x)
        b7 = _ConvBN(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = _ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = _ConvBN(c, name="branch7x7dbl_1")(x)
        bd = _ConvBN(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = _ConvBN(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = _ConvBN(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = _ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = _ConvBN(192, name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class _InceptionD(nn.Module):  # Mixed_7a: 17 -> 8
    @nn.compact
    def __call__(self, x):
        b3 = _ConvBN(192, name="branch3x3_1")(x)
        b3 = _ConvBN(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
        b7 = _ConvBN(192, name="branch7x7x3_1")(x)
        b7 = _ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = _ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = _ConvBN(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class _InceptionE(nn.Module):  # Mixed_7b (average pool branch), Mixed_7c (max pool branch)
    pool: str  # "avg" | "max": the FID graph's Mixed_7c pools with max, unlike torchvision

    @nn.compact
    def __call__(self, x):
        b1 = _ConvBN(320, name="branch1x1")(x)
        b3 = _ConvBN(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                _ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                _ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            -1,
        )
        bd = _ConvBN(448, name="branch3x3dbl_1")(x)
        bd = _ConvBN(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                _ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                _ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            -1,
        )
        pooled = _avg_pool_3x3_same(x) if self.pool == "avg" else _max_pool_3x3(x, 1)
        bp = _ConvBN(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID variant of InceptionV3 (the 2015-12-05 TF graph, as in pytorch-fid's
    FIDInception* blocks), up to the 2048-d global average pool ("pool3"). Input: NHWC RGB
    in [-1, 1], any size >= 75 (FID uses 299x299; ``inception_v3`` resizes). Submodule
    names follow the PyTorch port, so weights convert by renaming and transposing."""

    @nn.compact
    def __call__(self, x):  # [B, H, W, 3]
        x = _ConvBN(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
        x = _ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = _ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = _ConvBN(80, name="Conv2d_3b_1x1")(x)
        x = _ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, 2)  # 35x35x192 at 299 input
        x = _InceptionA(32, name="Mixed_5b")(x)
        x = _InceptionA(64, name="Mixed_5c")(x)
        x = _InceptionA(64, name="Mixed_5d")(x)
        x = _InceptionB(name="Mixed_6a")(x)  # 17x17x768
        for name, c7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x = _InceptionC(c7, name=name)(x)
        x = _InceptionD(name="Mixed_7a")(x)  # 8x8x1280
        x = _InceptionE("avg", name="Mixed_7b")(x)
        x = _InceptionE("max", name="Mixed_7c")(x)  # 8x8x2048
        return jnp.mean(x, axis=(1, 2))  # pool3 [B, 2048]


def inception_variables_from_torch(state_dict: Mapping[str, np.ndarray]) -> dict:
    """pytorch-fid state dict (name -> numpy array) -> flat {"params/...": ...,
    "batch_stats/...": ...} in this module's layout. Conv weights [O, I, kh, kw] become
    kernels [kh, kw, I, O]; BN weight/bias/running_mean/running_var become
    scale/bias/mean/var. The 1008-way "fc" head, "AuxLogits" (absent from pytorch-fid's
    file) and "num_batches_tracked" are dropped."""
    out = {}
    for name, value in state_dict.items():
        value = np.asarray(value)
        *path, leaf = name.split(".")
        if path[:1] in (["fc"], ["AuxLogits"]) or leaf == "num_batches_tracked":
            continue
        module = "/".join(path)
        if path[-1] == "conv" and leaf == "weight":
            out[f"params/{module}/kernel"] = value.transpose(2, 3, 1, 0)
        elif path[-1] == "bn" and leaf in ("weight", "bias"):
            out[f"params/{module}/{'scale' if leaf == 'weight' else 'bias'}"] = value
        elif path[-1] == "bn" and leaf in ("running_mean", "running_var"):
            out[f"batch_stats/{module}/{leaf[len('running_') :]}"] = value
        else:
            raise ValueError(f"unexpected InceptionV3 weight {name!r} {value.shape}")
    return out


def _flatten(tree, prefix=""):
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
        return out
    return {prefix[:-1]: tree}


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *path, leaf = key.split("/")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def load_inception_variables(weights_path: str) -> dict:
    """Flax variables {"params", "batch_stats"} of ``InceptionV3`` from a local .npz/.pkl
    (pytorch-fid names or this module's names); every shape is checked."""
    path = os.path.expanduser(weights_path or "")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"InceptionV3 weights not found at {weights_path!r}; nothing is downloaded at run "
            f"time.\n{_INCEPTION_HOWTO}"
        )
    if path.endswith(".pkl"):
        with open(path, "rb") as f:  # user-supplied file: unpickling runs its code
            flat = dict(pickle.load(f))
    else:
        with np.load(path, allow_pickle=False) as z:
            flat = {k: z[k] for k in z.files}
    if any("." in k for k in flat):
        flat = inception_variables_from_torch(flat)
    template = jax.eval_shape(
        InceptionV3().init, jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3), jnp.float32)
    )
    expected = _flatten(template)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: not FID InceptionV3 weights; missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    for key, shape in expected.items():
        if tuple(flat[key].shape) != tuple(shape.shape):
            raise ValueError(f"{path}: {key} has shape {flat[key].shape}, expected {shape.shape}")
    return _unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inception_v3(weights_path: str, *, batch_size: int = 64) -> FeatureExtractor:
    """FID InceptionV3 pool3 features (2048-d) with weights from ``weights_path``.

    Images [N, H, W, C] in [-1, 1] (C = 1 is repeated to RGB) are resized to 299x299 with
    bilinear interpolation (half-pixel centres, no antialiasing: PyTorch's
    ``F.interpolate(..., align_corners=False)`` as pytorch-fid does), then fed as is (the
    network expects [-1, 1]). The version is the weights file's sha256 prefix.
    """
    variables = load_inception_variables(weights_path)
    net = InceptionV3()
    size = INCEPTION_INPUT_SIZE

    @jax.jit
    def feats(x):
        x = to_channels(jnp.asarray(x, jnp.float32), 3)
        if x.shape[1:3] != (size, size):
            x = jax.image.resize(x, (x.shape[0], size, size, 3), "linear", antialias=False)
        return net.apply(variables, x)

    sha = _file_sha256(os.path.expanduser(weights_path))
    return FeatureExtractor(
        name="inception_v3",
        version=f"pool3-{sha[:12]}",
        feature_dim=2048,
        apply_features=feats,
        batch_size=batch_size,
        info={"weights_path": weights_path, "weights_sha256": sha},
    )
