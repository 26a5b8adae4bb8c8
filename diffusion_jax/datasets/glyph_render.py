"""Glyphs without TFDS: the attributes of an image, rendering it, and its captions.

A glyph image is one character (``A``..``Z``, ``0``..``9``) drawn with Pillow from a
TrueType font shipped inside matplotlib (``matplotlib.get_data_path()/fonts/ttf``), in a
foreground colour on a background colour, 32x32 RGB. What is drawn is fully described by an
``Attributes``: the captioned ones of ``ATTRIBUTES`` (class indices) plus an uncaptioned
jitter ``dx``, ``dy`` in pixels.

Rendering (``render``): the character is drawn at 4x (a 128x128 coverage image, Pillow
"L"), its ink bounding box is centred on the canvas, the coverage is box-filtered 4x4 ->
32x32 (``a`` in [0, 1]), shifted by (dx, dy) whole pixels, and ``image = bg*(1-a) + fg*a``
rounded to uint8; ``mask = a > 0.5``. Sizes are cap heights (the ink height of "H"):
``SIZE_CAP_HEIGHT`` px, except that a glyph is shrunk until its ink fits ``FIT`` x ``FIT``
px, so the +-``MAX_JITTER`` px jitter never clips it (only three large glyphs shrink, by
2%: "W" of DejaVu Serif Bold, "W" and "M" of DejaVu Serif Bold Italic). The 32x32 coverage
of each (font, char, size) is cached, so shifting it is the only per-render work; jittering
the cached coverage by whole pixels is exactly the same as drawing the 4x glyph shifted by
4 px per pixel, because the box filter commutes with such shifts.
Measured on a 2-core CPU: 3,800 glyphs/s drawn from the fonts (cache cold: all 1,152
(font, char, size) once), 33,000 ``render`` calls/s with the cache warm (20,000 draws).

The Computer Modern faces (``HELD_OUT_FACES``) are never used for the dataset: they are
kept for a later "learn a new font" experiment, which renders them with
``render(attrs, font_path=...)``.

Captions (``caption``) fill one of ``TEMPLATES``, which all name every captioned attribute;
words are ``tokenizer.words(text)`` (runs of ASCII letters and digits; punctuation is not
a word), all in ``VOCABULARY``. The character is the only upper-case word, so "a" and "A" differ.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import string

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffusion_jax.tokenizer import words

IMAGE_SIZE = 32
SCALE = 4  # glyphs are drawn at SCALE x the image size, then box-filtered down
MAX_JITTER = 2  # dx, dy are integers in [-MAX_JITTER, MAX_JITTER]
FIT = IMAGE_SIZE - 2 * MAX_JITTER  # a glyph's ink fits FIT x FIT px, centred

CHARS = tuple(string.ascii_uppercase + string.digits)
# Named colours, RGB; the closest two (red, orange) are 134 apart (Euclidean, 0..255).
COLORS = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "red": (215, 0, 0),
    "green": (0, 160, 0),
    "blue": (0, 0, 230),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 160),
    "orange": (255, 128, 0),
}
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "char": CHARS,
    "family": ("sans", "serif", "mono", "stix"),
    "weight": ("regular", "bold"),
    "slant": ("upright", "italic"),
    "fg": tuple(COLORS),
    "bg": tuple(COLORS),
    "size": ("small", "large"),
}
SIZE_CAP_HEIGHT = {"small": 12, "large": 18}  # px of 32: ink height of "H"

# family -> {(weight, slant): file in matplotlib's fonts/ttf}
FONT_FILES = {
    "sans": {
        ("regular", "upright"): "DejaVuSans.ttf",
        ("bold", "upright"): "DejaVuSans-Bold.ttf",
        ("regular", "italic"): "DejaVuSans-Oblique.ttf",
        ("bold", "italic"): "DejaVuSans-BoldOblique.ttf",
    },
    "serif": {
        ("regular", "upright"): "DejaVuSerif.ttf",
        ("bold", "upright"): "DejaVuSerif-Bold.ttf",
        ("regular", "italic"): "DejaVuSerif-Italic.ttf",
        ("bold", "italic"): "DejaVuSerif-BoldItalic.ttf",
    },
    "mono": {
        ("regular", "upright"): "DejaVuSansMono.ttf",
        ("bold", "upright"): "DejaVuSansMono-Bold.ttf",
        ("regular", "italic"): "DejaVuSansMono-Oblique.ttf",
        ("bold", "italic"): "DejaVuSansMono-BoldOblique.ttf",
    },
    "stix": {
        ("regular", "upright"): "STIXGeneral.ttf",
        ("bold", "upright"): "STIXGeneralBol.ttf",
        ("regular", "italic"): "STIXGeneralItalic.ttf",
        ("bold", "italic"): "STIXGeneralBolIta.ttf",
    },
}
# Computer Modern (roman, sans, typewriter): never in the dataset, see the module doc.
HELD_OUT_FACES = {"cmr": "cmr10.ttf", "cmss": "cmss10.ttf", "cmtt": "cmtt10.ttf"}


# ----------------------------------------------------------------------------------------
# Attributes.


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What one glyph image shows: class indices into ``ATTRIBUTES[field]``, and the jitter
    (dx > 0 moves right, dy > 0 down, in px)."""

    char: int
    family: int
    weight: int
    slant: int
    fg: int
    bg: int
    size: int
    dx: int = 0
    dy: int = 0

    def __post_init__(self):
        for name, classes in ATTRIBUTES.items():
            value = getattr(self, name)
            if not 0 <= value < len(classes):
                raise ValueError(f"{name}={value} is not a class 0..{len(classes) - 1}")
        for name in ("dx", "dy"):
            if abs(getattr(self, name)) > MAX_JITTER:
                raise ValueError(f"{name}={getattr(self, name)} is outside +-{MAX_JITTER}")
        if self.fg == self.bg:
            raise ValueError(f"fg and bg are both {ATTRIBUTES['fg'][self.fg]!r}")

    @classmethod
    def from_names(cls, *, dx: int = 0, dy: int = 0, **names: str) -> Attributes:
        """``Attributes.from_names(char="A", family="serif", ..., dx=1)``: by class name."""
        missing = set(ATTRIBUTES) - set(names)
        if missing or len(names) != len(ATTRIBUTES):
            raise ValueError(f"need exactly the attributes {list(ATTRIBUTES)}, got {names}")
        return cls(**{k: ATTRIBUTES[k].index(v) for k, v in names.items()}, dx=dx, dy=dy)

    @classmethod
    def from_mapping(cls, values) -> Attributes:
        """From any mapping with the field names (e.g. a dataset record), values cast to int."""
        return cls(**{f.name: int(values[f.name]) for f in dataclasses.fields(cls)})

    def names(self) -> dict[str, str]:
        """Captioned attributes by class name, e.g. {"char": "A", "fg": "red", ...}."""
        return {name: ATTRIBUTES[name][getattr(self, name)] for name in ATTRIBUTES}

    @property
    def kind(self) -> str:
        """ "letter" or "digit"."""
        return "digit" if CHARS[self.char].isdigit() else "letter"


@functools.lru_cache(maxsize=8)
def heldout_pairs(seed: int = 0) -> frozenset[tuple[int, int]]:
    """A fixed 10% (29 of 8 x 36) of the (fg, char) index pairs: never in training.

    The pairs with the smallest of 288 keys from ``np.random.SeedSequence(seed)`` (a stable
    hash, independent of numpy's sampling algorithms).
    """
    num_fg, num_char = len(ATTRIBUTES["fg"]), len(CHARS)
    keys = np.random.SeedSequence(seed).generate_state(num_fg * num_char)
    count = round(0.1 * num_fg * num_char)
    chosen = np.argsort(keys, kind="stable")[:count]
    return frozenset((int(k) // num_char, int(k) % num_char) for k in chosen)


def sample_attributes(
    rng: np.random.Generator, heldout: bool, pairs: frozenset[tuple[int, int]]
) -> Attributes:
    """Uniform attributes whose (fg, char) is in `pairs` (heldout) or not (otherwise);
    bg uniform over the colours other than fg, dx, dy uniform in +-MAX_JITTER."""
    if heldout:
        fg, char = sorted(pairs)[int(rng.integers(len(pairs)))]
    else:
        while True:  # rejection: `pairs` is a small fraction of all pairs
            fg, char = int(rng.integers(len(ATTRIBUTES["fg"]))), int(rng.integers(len(CHARS)))
            if (fg, char) not in pairs:
                break
    bg = int(rng.integers(len(ATTRIBUTES["bg"]) - 1))
    bg += bg >= fg  # skip fg
    other = {k: int(rng.integers(len(ATTRIBUTES[k]))) for k in ("family", "weight", "slant")}
    size = int(rng.integers(len(ATTRIBUTES["size"])))
    dx, dy = (int(v) for v in rng.integers(-MAX_JITTER, MAX_JITTER + 1, size=2))
    return Attributes(char=char, fg=fg, bg=bg, size=size, dx=dx, dy=dy, **other)


# ----------------------------------------------------------------------------------------
# Rendering.


@functools.lru_cache(maxsize=None)
def font_dir() -> str:
    """matplotlib's bundled TrueType fonts directory."""
    import matplotlib  # not pyplot: no backend is loaded

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def font_file(attrs: Attributes) -> str:
    """The font file that draws `attrs` (its family, weight and slant)."""
    names = attrs.names()
    return os.path.join(font_dir(), FONT_FILES[names["family"]][names["weight"], names["slant"]])


@functools.lru_cache(maxsize=256)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def ink_box(path: str, size: int, char: str) -> np.ndarray:
    """uint8 coverage of `char` at font size `size`, cropped to its ink bounding box."""
    font = _font(path, size)
    left, top, right, bottom = font.getbbox(char)
    pad = 2  # getbbox may be off by a pixel of antialiasing
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), char, fill=255, font=font)
    ink = np.asarray(canvas)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if not len(rows):
        raise ValueError(f"{os.path.basename(path)} draws no ink for {char!r}")
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


@functools.lru_cache(maxsize=64)
def _cap_ratio(path: str) -> float:
    """Ink height of "H" per unit of font size."""
    reference = 400
    return ink_box(path, reference, "H").shape[0] / reference


@functools.lru_cache(maxsize=4096)
def _centred_coverage(path: str, char: str, cap_height: int) -> np.ndarray:
    """Read-only float32 [32, 32] coverage in [0, 1] of `char`, ink box centred, no jitter."""
    size = max(1, round(SCALE * cap_height / _cap_ratio(path)))
    ink = ink_box(path, size, char)
    limit = SCALE * FIT
    while max(ink.shape) > limit:  # too wide or tall for the jitter: shrink to fit
        size = int(size * limit / max(ink.shape))
        ink = ink_box(path, size, char)
    big = SCALE * IMAGE_SIZE
    canvas = np.zeros((big, big), np.float32)
    top, left = (big - ink.shape[0]) // 2, (big - ink.shape[1]) // 2
    canvas[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    coverage = canvas.reshape(IMAGE_SIZE, SCALE, IMAGE_SIZE, SCALE).mean(axis=(1, 3)) / 255.0
    coverage.setflags(write=False)
    return coverage


def coverage(attrs: Attributes, font_path: str | None = None) -> np.ndarray:
    """float32 [32, 32] ink coverage in [0, 1] of `attrs`'s glyph (its char, size and
    jitter), drawn with `font_path` if given (then family, weight, slant are ignored)."""
    path = font_path or font_file(attrs)
    cap_height = SIZE_CAP_HEIGHT[ATTRIBUTES["size"][attrs.size]]
    centred = _centred_coverage(path, CHARS[attrs.char], cap_height)
    shifted = np.zeros_like(centred)
    dy, dx, n = attrs.dy, attrs.dx, IMAGE_SIZE
    shifted[max(dy, 0) : n + min(dy, 0), max(dx, 0) : n + min(dx, 0)] = centred[
        max(-dy, 0) : n + min(-dy, 0), max(-dx, 0) : n + min(-dx, 0)
    ]
    return shifted


def render(attrs: Attributes, font_path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image [32, 32, 3], bool mask [32, 32]) of `attrs`: ``bg*(1-a) + fg*a`` rounded,
    and ``a > 0.5``, with ``a = coverage(attrs, font_path)``."""
    a = coverage(attrs, font_path)[..., None]
    names = attrs.names()
    fg = np.asarray(COLORS[names["fg"]], np.float32)
    bg = np.asarray(COLORS[names["bg"]], np.float32)
    image = np.rint(bg * (1.0 - a) + fg * a).astype(np.uint8)
    return image, a[..., 0] > 0.5


# ----------------------------------------------------------------------------------------
# Captions.

# Every template names every captioned attribute; {kind} is "letter" or "digit".
TEMPLATES = (
    "a {size} {weight} {slant} {fg} {family} {kind} {char} on the {bg} background",
    "{bg} background, {fg} {char}, {weight} {slant} {family}, {size}",
    "the {kind} {char} in {fg}, {family} font, {weight}, {slant}, {size}, on {bg}",
    "{size} {fg} {char} on {bg}; {family} {weight} {slant}",
    "{char}: {weight} {slant} {family} type, {size}, {fg} on {bg} background",
    "an image of the {fg} {kind} {char}, written {size} in {weight} {slant} {family} over {bg}",
)
HELDOUT_TEMPLATE = 5  # used only in the test split
_FIELD_VALUES = {**ATTRIBUTES, "kind": ("letter", "digit")}


def caption(attrs: Attributes, template: int, **words_for: str) -> str:
    """`attrs` described by ``TEMPLATES[template]``; ``words_for`` puts other words in
    named slots (subject tuning's identifier in the family slot: ``family="zxq"``)."""
    return TEMPLATES[template].format(**{**attrs.names(), "kind": attrs.kind, **words_for})


def _template_words(template: str) -> list[tuple[str, bool]]:
    """A template as (word, is_field) pairs: literal words and {field} slots, in order."""
    out = []
    for literal, field, _, _ in string.Formatter().parse(template):
        out += [(w, False) for w in words(literal)]
        if field is not None:
            out.append((field, True))
    return out


def parse_caption(text: str) -> dict[str, int]:
    """The attribute indices a caption names ({"char": 0, "family": 2, ...}), read back by
    matching its words against every template (punctuation ignored); ValueError if no
    template matches. The inverse of ``caption`` (tested on every template), used to
    give classifier guidance its targets from a prompt."""
    found = words(text)
    for template in TEMPLATES:
        slots = _template_words(template)
        if len(slots) != len(found):
            continue
        names = {}
        for (slot, is_field), word in zip(slots, found):
            if not is_field and slot != word:
                break
            if is_field:
                if word not in _FIELD_VALUES[slot]:
                    break
                names[slot] = word
        else:
            return {k: ATTRIBUTES[k].index(names[k]) for k in ATTRIBUTES}
    raise ValueError(
        f"caption {text!r} follows none of the {len(TEMPLATES)} glyph caption templates, so "
        "its attributes are unknown (classifier guidance needs them); e.g. "
        f"{TEMPLATES[0]!r}"
    )


def _vocabulary() -> tuple[str, ...]:
    vocabulary = set()
    for template in TEMPLATES:
        for slot, is_field in _template_words(template):
            values = _FIELD_VALUES[slot] if is_field else (slot,)
            vocabulary.update(w for value in values for w in words(value))
    return tuple(sorted(vocabulary))


VOCABULARY = _vocabulary()  # every word any caption can have, sorted
