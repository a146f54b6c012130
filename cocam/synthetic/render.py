"""Rendering of synthetic aligned faces (178×218) from attribute labels.

Each face is drawn at CelebA's aligned geometry (eyes near y≈111, mouth near y≈152) with a
small per-image jitter of position and scale, random skin, hair, background, lighting and
noise. Most attributes have a visible cue in a known place; :func:`render_face` returns, with
the image and its five landmarks, the *evidence region* of every rendered attribute as up to
three ellipses ``(cx, cy, rx, ry)`` in aligned-image pixels — the ground truth attention is
scored against. The region is where the cue is drawn when the attribute is present (and where
it would be drawn when absent).

Difficulty is deliberate and set by :class:`CueDifficulty`: the paper's shortcut cues are large
and salient (eye make-up for Heavy_Makeup, a wide toothy smile for Smiling, a wide face for
Chubby) while the true cues are small and subtle (a lipstick tint that overlaps the natural
range of lip colours, a faint cheekbone highlight, a faint chin fold), and a fraction of
positives shows no true cue at all (like label noise in CelebA). A classifier can then do well
on average by reading the shortcut and still fail on the conflict subsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cocam.attributes import CELEBA_ATTRIBUTES
from cocam.geometry import ALIGNED_HEIGHT, ALIGNED_WIDTH

__all__ = [
    "CueDifficulty",
    "FaceGeometry",
    "REGION_ATTRIBUTES",
    "TEMPLATE_LABELS",
    "evidence_regions",
    "render_face",
    "sample_geometry",
    "template_geometry",
]

W, H = ALIGNED_WIDTH, ALIGNED_HEIGHT
Ellipse = tuple[float, float, float, float]

#: Attributes that have no localised cue: Attractive is never drawn; Blurry blurs the whole image.
UNLOCALISED = ("Attractive", "Blurry")
#: Attributes with a ground-truth evidence region, in CelebA order.
REGION_ATTRIBUTES: tuple[str, ...] = tuple(a for a in CELEBA_ATTRIBUTES if a not in UNLOCALISED)
#: The most ellipses one attribute's region is made of.
MAX_ELLIPSES = 3
#: Labels of the template face: a neutral, young, beardless face with no accessories.
TEMPLATE_LABELS: dict[str, int] = {a: 0 for a in CELEBA_ATTRIBUTES} | {"No_Beard": 1, "Young": 1}


@dataclass(frozen=True)
class CueDifficulty:
    """How visible the true cues of the paper's attributes are (0 = invisible, 1 = full colour).

    Attributes:
        lipstick: (low, high) strength of the lipstick tint over the natural lip colour.
        natural_lip_tint: (low, high) redness of lips without lipstick (overlaps ``lipstick``).
        cheekbones: (low, high) strength of the cheekbone highlight for High_Cheekbones.
        natural_cheek: (low, high) highlight every face has anyway (overlaps ``cheekbones``).
        double_chin: (low, high) strength of the chin fold for Double_Chin.
        natural_chin: (low, high) chin shadow every face has anyway.
        double_chin_shade: how dark the fold of Double_Chin is (its colour is the skin mixed
            this much toward dark brown; the natural shadow uses 0.35). At 0.35 the fold was
            all but invisible at 112 px, and no model learned Double_Chin without Chubby.
        cue_dropout: fraction of positives of these three attributes drawn without their cue.
    """

    lipstick: tuple[float, float] = (0.3, 0.8)
    natural_lip_tint: tuple[float, float] = (0.0, 0.2)
    cheekbones: tuple[float, float] = (0.3, 0.65)
    natural_cheek: tuple[float, float] = (0.0, 0.15)
    double_chin: tuple[float, float] = (0.4, 0.9)
    natural_chin: tuple[float, float] = (0.0, 0.2)
    double_chin_shade: float = 0.7
    cue_dropout: float = 0.04


@dataclass(frozen=True)
class FaceGeometry:
    """Where the face parts are, in aligned-image pixels."""

    cx: float  # face centre x
    cy: float  # face centre y
    rx: float  # face half-width
    ry: float  # face half-height
    eye_y: float
    eye_dx: float  # half distance between the eyes
    nose_y: float
    mouth_y: float
    mouth_w: float  # half-width of the mouth
    head_rx: float  # half-width of the skull (hair, hat): face shape attributes do not change it
    head_ry: float

    @property
    def eyes(self) -> tuple[tuple[float, float], tuple[float, float]]:
        return (self.cx - self.eye_dx, self.eye_y), (self.cx + self.eye_dx, self.eye_y)

    @property
    def chin_y(self) -> float:
        return self.cy + self.ry

    def landmarks(self) -> np.ndarray:
        """CelebA's 5 landmarks: left eye, right eye, nose, left and right mouth corner (5, 2)."""
        (lx, ly), (rx, ry) = self.eyes
        return np.array(
            [[lx, ly], [rx, ry], [self.cx, self.nose_y],
             [self.cx - self.mouth_w, self.mouth_y], [self.cx + self.mouth_w, self.mouth_y]]
        )


def template_geometry() -> FaceGeometry:
    """The canonical face: CelebA's mean aligned landmarks, no jitter."""
    return FaceGeometry(cx=88.5, cy=128.0, rx=46.0, ry=62.0, eye_y=111.0, eye_dx=19.5,
                        nose_y=134.0, mouth_y=152.0, mouth_w=15.0, head_rx=46.0, head_ry=62.0)


def sample_geometry(labels: dict[str, int], rng: np.random.Generator) -> FaceGeometry:
    """Per-image geometry: template jittered in position (±3 px) and scale (±5 %).

    Always consumes the same random numbers, whatever the labels.
    """
    t = template_geometry()
    s, dx, dy, jx, jy, chubby, smile, mouth = rng.uniform(
        [0.95, -3, -3, 0.97, 0.97, 1.17, 1.2, 0.95], [1.05, 3, 3, 1.03, 1.03, 1.25, 1.3, 1.05])
    rx, ry = head_rx, head_ry = t.rx * s * jx, t.ry * s * jy
    if labels["Chubby"]:
        rx *= chubby
    if labels["Oval_Face"]:
        rx *= 0.94
        ry *= 1.05
    mouth_w = t.mouth_w * s * (smile if labels["Smiling"] else mouth)
    cx, cy = t.cx + dx, t.cy + dy
    return FaceGeometry(cx=cx, cy=cy, rx=rx, ry=ry, eye_y=cy + (t.eye_y - t.cy) * s, eye_dx=t.eye_dx * s,
                        nose_y=cy + (t.nose_y - t.cy) * s, mouth_y=cy + (t.mouth_y - t.cy) * s, mouth_w=mouth_w,
                        head_rx=head_rx, head_ry=head_ry)


def evidence_regions(g: FaceGeometry, labels: dict[str, int] | None = None) -> dict[str, list[Ellipse]]:
    """Ground-truth evidence region of every attribute in :data:`REGION_ATTRIBUTES`.

    ``labels`` only matters for Male (long hair at the sides is the cue for not-Male).
    """
    (lx, ey), (rx_, _) = g.eyes
    mx, my = g.cx, g.mouth_y
    both = lambda dxl, dy, a, b: [(lx - dxl, ey + dy, a, b), (rx_ + dxl, ey + dy, a, b)]  # noqa: E731
    sides = lambda off, y, a, b: [(g.cx - off, y, a, b), (g.cx + off, y, a, b)]  # noqa: E731
    mouth = [(mx, my, g.mouth_w + 5, 9)]
    lower_face = [(g.cx, my + 10, g.rx * 0.85, 30)]
    hair = [(g.cx, g.cy - g.head_ry + 4, g.head_rx + 14, 26), *sides(g.head_rx + 4, g.cy + 12, 13, g.head_ry + 8)]
    face = [(g.cx, g.cy, g.rx + 6, g.ry + 6)]
    r: dict[str, list[Ellipse]] = {
        "5_o_Clock_Shadow": lower_face,
        "Arched_Eyebrows": both(0, -12, 12, 6),
        "Bags_Under_Eyes": both(0, 8, 10, 5),
        "Bald": hair,
        "Bangs": [(g.cx, g.cy - g.head_ry + 32, g.head_rx * 0.85, 14)],
        "Big_Lips": mouth,
        "Big_Nose": [(g.cx, g.nose_y - 6, 10, 14)],
        "Black_Hair": hair,
        "Blond_Hair": hair,
        "Brown_Hair": hair,
        "Bushy_Eyebrows": both(0, -12, 12, 6),
        "Chubby": sides(g.rx, g.cy + 6, 15, g.ry + 4),
        "Double_Chin": [(g.cx, g.chin_y - 2, 24, 9)],
        "Eyeglasses": both(0, 0, 15, 14),
        "Goatee": [(g.cx, g.chin_y - 14, 13, 11)],
        "Gray_Hair": hair,
        "Heavy_Makeup": both(0, -3, 16, 11),
        "High_Cheekbones": both(2, 19, 11, 8),
        "Male": sides(g.head_rx + 8, g.cy + 25, 11, 45),
        "Mouth_Slightly_Open": mouth,
        "Mustache": [(mx, my - 7, g.mouth_w + 3, 5)],
        "Narrow_Eyes": both(0, 0, 10, 6),
        "No_Beard": lower_face,
        "Oval_Face": face,
        "Pale_Skin": [(g.cx, g.cy, g.rx, g.ry)],
        "Pointy_Nose": [(g.cx, g.nose_y - 6, 10, 14)],
        "Receding_Hairline": [(g.cx, g.cy - g.head_ry + 12, g.head_rx * 0.8, 18)],
        "Rosy_Cheeks": both(0, 30, 10, 7),
        "Sideburns": sides(g.rx - 3, ey + 14, 6, 18),
        "Smiling": mouth,
        "Straight_Hair": hair,
        "Wavy_Hair": hair,
        "Wearing_Earrings": sides(g.rx + 3, ey + 32, 6, 7),
        "Wearing_Hat": [(g.cx, g.cy - g.head_ry - 10, g.head_rx + 16, 26)],
        "Wearing_Lipstick": [(mx, my, g.mouth_w + 3, 7)],
        "Wearing_Necklace": [(g.cx, g.chin_y + 22, 26, 9)],
        "Wearing_Necktie": [(g.cx, H - 8, 11, 12)],
        "Young": [(g.cx, g.cy - g.head_ry + 26, 30, 9)],
    }
    return {a: r[a] for a in REGION_ATTRIBUTES}


# ----------------------------------------------------------------------------------- drawing

_HAIR = {
    "Black_Hair": (28, 24, 24), "Blond_Hair": (214, 182, 118), "Brown_Hair": (104, 66, 40),
    "Gray_Hair": (168, 166, 162),
}
_OTHER_HAIR = ((70, 46, 30), (140, 96, 56), (52, 36, 28), (120, 60, 30))
_SKIN = ((236, 198, 170), (222, 178, 146), (196, 150, 116), (160, 112, 80), (118, 80, 56))
_PALE_SKIN = (248, 226, 212)
_EYESHADOW = ((118, 58, 128), (58, 78, 150), (86, 50, 40), (44, 36, 46), (150, 70, 100))
_LIPSTICK = ((200, 20, 40), (214, 60, 110), (130, 20, 60), (186, 40, 30))
_NATURAL_LIP = np.array([186.0, 108.0, 104.0])
_GRID = np.mgrid[0:H, 0:W].astype(np.float32)


class _Draws:
    """Named random draws: each key has its own stream derived from one base seed.

    Whether a cue is drawn never shifts the random numbers of the others, so toggling one
    label changes only that attribute's cue (the rest of the face stays identical).
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self.base = int(rng.integers(2**62))

    def __call__(self, key: str) -> np.random.Generator:
        return np.random.default_rng([self.base, zlib.crc32(key.encode())])

    def uniform(self, key: str, low=0.0, high=1.0, size=None):
        return self(key).uniform(low, high, size)

    def choice(self, key: str, options):
        return options[int(self(key).integers(len(options)))]


class _Ink:
    """An ImageDraw whose shapes are filled (or stroked) with 255 unless told otherwise."""

    def __init__(self, draw: ImageDraw.ImageDraw) -> None:
        self._draw = draw

    def __getattr__(self, name):
        fn = getattr(self._draw, name)

        def call(*args, **kwargs):
            if "outline" not in kwargs:
                kwargs.setdefault("fill", 255)
            return fn(*args, **kwargs)

        return call


class _Canvas:
    """A float RGB image with alpha-blended shape painting."""

    def __init__(self, colour) -> None:
        self.rgb = np.empty((H, W, 3), dtype=np.float32)
        self.rgb[:] = colour

    def paint(self, draw_fn, colour, alpha: float = 1.0, blur: float = 0.0) -> None:
        """Blend ``colour`` where ``draw_fn(ImageDraw)`` draws (fill 255) with opacity ``alpha``."""
        if alpha <= 0:
            return
        m = Image.new("L", (W, H), 0)
        draw_fn(_Ink(ImageDraw.Draw(m)))
        box = m.getbbox()
        if box is None:
            return
        if blur:  # blur only the shape's neighbourhood
            pad = int(3 * blur) + 1
            box = (max(box[0] - pad, 0), max(box[1] - pad, 0), min(box[2] + pad, W), min(box[3] + pad, H))
            m = m.crop(box).filter(ImageFilter.GaussianBlur(blur))
        else:
            m = m.crop(box)
        x0, y0, x1, y1 = box
        a = np.asarray(m, dtype=np.float32)[..., None] * (alpha / 255.0)
        region = self.rgb[y0:y1, x0:x1]
        region += a * (np.asarray(colour, dtype=np.float32) - region)


def _box(cx, cy, rx, ry):
    return [cx - rx, cy - ry, cx + rx, cy + ry]


def _mix(a, b, t):
    return tuple(float(x) for x in (np.asarray(a, float) * (1 - t) + np.asarray(b, float) * t))


def _jitter(colour, r: _Draws, key: str, amount=12):
    return tuple(float(np.clip(c + v, 0, 255)) for c, v in zip(colour, r.uniform(key, -amount, amount, 3)))


def _hair_colour(labels, r: _Draws):
    named = [a for a in ("Gray_Hair", "Blond_Hair", "Black_Hair", "Brown_Hair") if labels[a]]
    base = _HAIR[named[0]] if named else r.choice("hair", _OTHER_HAIR)
    return _jitter(base, r, "hair jitter", 10)


def _strength(r: _Draws, key: str, on: bool, cue: tuple[float, float], natural: tuple[float, float],
              dropout: float) -> float:
    drop, u_cue, u_natural = r.uniform(key, size=3)
    if on and drop >= dropout:
        return float(cue[0] + u_cue * (cue[1] - cue[0]))
    return float(natural[0] + u_natural * (natural[1] - natural[0]))


def _cue_drawn(r: _Draws, key: str, on: bool, dropout: float) -> bool:
    """Whether :func:`_strength` with the same key drew the attribute's cue (not dropped)."""
    return on and r.uniform(key, size=3)[0] >= dropout


def render_face(
    labels: dict[str, int],
    rng: np.random.Generator,
    *,
    difficulty: CueDifficulty = CueDifficulty(),
    geometry: FaceGeometry | None = None,
    plain: bool = False,
) -> tuple[Image.Image, np.ndarray, dict[str, list[Ellipse]]]:
    """Render one aligned face.

    Args:
        labels: 0/1 per CelebA attribute.
        rng: the source of every random choice (the image is a function of labels and rng).
        difficulty: visibility of the paper attributes' true cues.
        geometry: fixed geometry (default: :func:`sample_geometry`).
        plain: no lighting, noise or background variation (used for the template face).

    Returns:
        ``(image, landmarks, regions)``: a 178×218 RGB image, (5, 2) landmarks (float pixels)
        and the evidence regions of :func:`evidence_regions`.
    """
    L = labels
    r = _Draws(rng)
    g = geometry if geometry is not None else sample_geometry(L, r("geometry"))
    bg = (200, 204, 210) if plain else tuple(r.uniform("background", 40, 230, 3))
    c = _Canvas(bg)
    if not plain:  # a soft background blob for variety
        blob = r.uniform("blob", [0, 0, 30, 30, 30, 30, 30], [W, H, 90, 90, 230, 230, 230])
        c.paint(lambda d: d.ellipse(_box(*blob[:4])), tuple(blob[4:]), 0.5, blur=12)
    skin = _PALE_SKIN if L["Pale_Skin"] else _SKIN[1] if plain else r.choice("skin", _SKIN)
    skin = _jitter(skin, r, "skin jitter", 0 if plain else 10)
    hair = _OTHER_HAIR[0] if plain else _hair_colour(L, r)
    dark_skin = _mix(skin, (60, 30, 20), 0.35)
    (lx, ey), (rx_, _) = g.eyes
    eyes = ((lx, ey), (rx_, ey))

    # clothes, neck, back hair
    cloth = _jitter((60, 70, 110), r, "cloth", 60) if not plain else (70, 80, 110)
    c.paint(lambda d: d.ellipse(_box(g.cx, H + 20, 80, 45)), cloth)
    c.paint(lambda d: d.rectangle([g.cx - 20, g.chin_y - 20, g.cx + 20, H]), _mix(skin, (0, 0, 0), 0.12))
    if L["Wearing_Necktie"]:
        tie = _jitter((150, 30, 40), r, "tie", 60)
        c.paint(lambda d: d.polygon([(g.cx - 7, H - 22), (g.cx + 7, H - 22), (g.cx + 10, H), (g.cx - 10, H)]), tie)
    if L["Wearing_Necklace"]:
        c.paint(lambda d: d.arc(_box(g.cx, g.chin_y + 5, 24, 20), 20, 160, width=3), (232, 200, 90))
    if not L["Bald"]:
        c.paint(lambda d: d.ellipse(_box(g.cx, g.cy - 14, g.head_rx + 12, g.head_ry + 12)), hair)
        if not L["Male"]:  # long hair at the sides
            c.paint(lambda d: d.rectangle([g.cx - g.head_rx - 14, g.cy - 20, g.cx - g.head_rx + 8, g.cy + g.head_ry + 16]), hair)
            c.paint(lambda d: d.rectangle([g.cx + g.head_rx - 8, g.cy - 20, g.cx + g.head_rx + 14, g.cy + g.head_ry + 16]), hair)

    # ears and earrings
    for side in (-1, 1):
        c.paint(lambda d, s=side: d.ellipse(_box(g.cx + s * g.rx, ey + 14, 6, 12)), skin)
        if L["Wearing_Earrings"]:
            c.paint(lambda d, s=side: d.ellipse(_box(g.cx + s * (g.rx + 3), ey + 32, 3.5, 3.5)), (240, 210, 80))

    # face
    c.paint(lambda d: d.ellipse(_box(g.cx, g.cy, g.rx, g.ry)), skin)
    if not plain:  # side shading of the face
        c.paint(lambda d: d.ellipse(_box(g.cx + r.choice("shading", (-1, 1)) * g.rx * 0.6, g.cy, g.rx * 0.6, g.ry)),
                dark_skin, 0.12, blur=10)

    # chin: natural shadow or the double-chin fold (subtle true cue)
    chin = _strength(r, "chin", bool(L["Double_Chin"]), difficulty.double_chin, difficulty.natural_chin,
                     difficulty.cue_dropout)
    fold = (_mix(skin, (60, 30, 20), difficulty.double_chin_shade)
            if _cue_drawn(r, "chin", bool(L["Double_Chin"]), difficulty.cue_dropout) else dark_skin)
    c.paint(lambda d: d.arc(_box(g.cx, g.chin_y - 8, 22, 8), 15, 165, width=3), fold, chin)
    c.paint(lambda d: d.ellipse(_box(g.cx, g.chin_y + 1, 20, 5)), fold, chin * 0.6, blur=1.5)

    # beard family
    beard = _mix(hair, (20, 16, 14), 0.3)
    if L["5_o_Clock_Shadow"]:
        pts = r.uniform("stubble", -1, 1, (220, 2))
        pts = pts[(pts ** 2).sum(1) < 1] * [g.rx * 0.8, 26] + [g.cx, g.mouth_y + 12]
        c.paint(lambda d: [d.point(tuple(p)) for p in pts], beard, 0.7)
    if not L["No_Beard"]:
        c.paint(lambda d: d.chord(_box(g.cx, g.mouth_y - 4, g.rx * 0.9, g.chin_y - g.mouth_y + 10), 0, 180), beard, 0.85)
    if L["Goatee"]:
        c.paint(lambda d: d.ellipse(_box(g.cx, g.chin_y - 14, 11, 10)), beard, 0.9)
    if L["Sideburns"]:
        for s in (-1, 1):
            c.paint(lambda d, s=s: d.rectangle([g.cx + s * (g.rx - 3) - 4, ey - 2, g.cx + s * (g.rx - 3) + 4, ey + 30]),
                    beard, 0.9)

    # cheeks: natural highlight or the cheekbone highlight (subtle true cue); rosy cheeks
    cheek = _strength(r, "cheek", bool(L["High_Cheekbones"]), difficulty.cheekbones, difficulty.natural_cheek,
                      difficulty.cue_dropout)
    for (x, y), s in zip(eyes, (-1, 1)):
        c.paint(lambda d, x=x, y=y, s=s: d.ellipse(_box(x + s * 2, y + 17, 10, 5)), (255, 250, 240), cheek, blur=2)
        c.paint(lambda d, x=x, y=y, s=s: d.ellipse(_box(x + s * 3, y + 25, 9, 4)), dark_skin, cheek * 0.8, blur=2)
        if L["Rosy_Cheeks"]:
            c.paint(lambda d, x=x, y=y: d.ellipse(_box(x, y + 30, 9, 6)), (230, 100, 110), 0.45, blur=3)

    # forehead: wrinkles when not young
    if not L["Young"]:
        for k in range(3):
            yy = g.cy - g.head_ry + 20 + 5 * k
            c.paint(lambda d, yy=yy: d.arc(_box(g.cx, yy + 10, 24, 10), 200, 340, width=1), dark_skin, 0.8)

    # eyes, make-up, eyeglasses, eyebrows
    if L["Heavy_Makeup"]:  # the salient shortcut cue: large coloured eye shadow and thick liner
        shadow = _jitter(r.choice("eyeshadow", _EYESHADOW), r, "eyeshadow jitter", 15)
        shadow_alpha = r.uniform("eyeshadow alpha", 0.7, 0.9)
        for x, y in eyes:
            c.paint(lambda d, x=x, y=y: d.ellipse(_box(x, y - 3, 15, 9)), shadow, shadow_alpha, blur=1.5)
    eye_ry = 2.2 if L["Narrow_Eyes"] else 4.2
    for x, y in eyes:
        c.paint(lambda d, x=x, y=y: d.ellipse(_box(x, y, 8, eye_ry)), (245, 245, 240))
        c.paint(lambda d, x=x, y=y: d.ellipse(_box(x, y, 3, min(3, eye_ry))), (50, 40, 35))
        liner = 3 if L["Heavy_Makeup"] else 1
        c.paint(lambda d, x=x, y=y: d.arc(_box(x, y, 8, eye_ry), 180, 360, width=liner), (20, 15, 15))
        if L["Bags_Under_Eyes"]:
            c.paint(lambda d, x=x, y=y: d.arc(_box(x, y + 4, 8, 4), 20, 160, width=2), dark_skin, 0.8)
        brow_w = 4 if L["Bushy_Eyebrows"] else 2
        peak = 5 if L["Arched_Eyebrows"] else 1
        brow = [(x - 11, y - 10), (x, y - 10 - peak), (x + 11, y - 10)]
        c.paint(lambda d, b=brow: d.line(b, width=brow_w, joint="curve"), _mix(hair, (0, 0, 0), 0.4))
    if L["Eyeglasses"]:
        frame = _jitter((30, 30, 30), r, "frame", 25)
        for x, y in eyes:
            c.paint(lambda d, x=x, y=y: d.ellipse(_box(x, y, 13, 10), outline=255, width=2), frame)
        c.paint(lambda d: d.line([(lx + 13, ey), (rx_ - 13, ey)], width=2), frame)

    # nose
    nose_w = 8 if L["Big_Nose"] else 5
    tip = 4 if L["Pointy_Nose"] else 0
    c.paint(lambda d: d.line([(g.cx - 2, ey + 4), (g.cx - nose_w, g.nose_y + 2 - tip), (g.cx, g.nose_y + 4 + tip),
                              (g.cx + nose_w, g.nose_y + 2 - tip)], width=2), dark_skin, 0.7)

    # mouth: natural lip colour, lipstick (subtle true cue), smile (salient), open mouth
    lip_h = 4.5 if L["Big_Lips"] else 3.0
    tint = _strength(r, "lipstick", bool(L["Wearing_Lipstick"]), difficulty.lipstick, (0.0, 0.0), difficulty.cue_dropout)
    natural = r.uniform("lip", *difficulty.natural_lip_tint)
    lip = _mix(_mix(skin, _NATURAL_LIP, 0.35 + natural), r.choice("lipstick shade", _LIPSTICK), tint)
    mx, my, mw = g.cx, g.mouth_y, g.mouth_w
    if L["Smiling"]:  # a wide open smile with teeth: large and salient
        c.paint(lambda d: d.chord(_box(mx, my - 3, mw, 9), 0, 180), lip)
        c.paint(lambda d: d.chord(_box(mx, my - 3, mw - 3, 6.5), 0, 180), (250, 248, 240))
        c.paint(lambda d: d.arc(_box(mx, my - 6, mw + 1, 6), 200, 340, width=int(lip_h)), lip)
    else:
        c.paint(lambda d: d.ellipse(_box(mx, my - lip_h / 2, mw * 0.9, lip_h / 2 + 0.5)), lip)
        c.paint(lambda d: d.ellipse(_box(mx, my + lip_h / 2, mw * 0.85, lip_h / 2 + 0.5)), lip)
        gap = 2.0 if L["Mouth_Slightly_Open"] else 0.6
        c.paint(lambda d: d.line([(mx - mw * 0.85, my), (mx + mw * 0.85, my)], width=max(1, round(gap))),
                (70, 30, 30), 0.9 if L["Mouth_Slightly_Open"] else 0.5)
    if L["Mustache"]:
        c.paint(lambda d: d.chord(_box(mx, my - 5, mw + 2, 5), 180, 360), beard, 0.9)

    # hair on top: hairline, bangs, receding hairline, texture, hat
    if not L["Bald"]:
        top = g.cy - g.head_ry
        hairline = top + (10 if L["Receding_Hairline"] else 20)
        c.paint(lambda d: d.chord(_box(g.cx, hairline, g.head_rx + 2, hairline - top + 12), 180, 360), hair)
        if L["Bangs"]:
            c.paint(lambda d: d.rectangle([g.cx - g.head_rx * 0.8, hairline - 4, g.cx + g.head_rx * 0.8, top + 38]), hair)
        if L["Wavy_Hair"] or L["Straight_Hair"]:
            strand = _mix(hair, (0, 0, 0), 0.35)
            xs = np.linspace(g.cx - g.head_rx, g.cx + g.head_rx, 9)
            for x in xs:
                if L["Wavy_Hair"]:
                    ys = np.linspace(top - 8, hairline, 7)
                    pts = [(x + 3 * np.sin(i * 1.7), y) for i, y in enumerate(ys)]
                else:
                    pts = [(x, top - 8), (x, hairline)]
                c.paint(lambda d, p=pts: d.line(p, width=1), strand, 0.8)
    if L["Wearing_Hat"]:
        hat = _jitter((90, 60, 50), r, "hat", 60)
        top = g.cy - g.head_ry
        c.paint(lambda d: d.chord(_box(g.cx, top + 6, g.head_rx + 4, 30), 180, 360), hat)
        c.paint(lambda d: d.rectangle([g.cx - g.head_rx - 16, top + 2, g.cx + g.head_rx + 16, top + 8]), hat)

    # photometric variation
    rgb = c.rgb
    if not plain:
        yy, xx = _GRID
        angle, gain, slope, sigma = r.uniform("light", [0, 0.8, 0.0, 2.0], [2 * np.pi, 1.15, 0.35, 6.0])
        ramp = (np.cos(angle) * (xx - W / 2) / W + np.sin(angle) * (yy - H / 2) / H)
        rgb = rgb * (gain + slope * ramp)[..., None]
        rgb = rgb + r("noise").normal(0.0, sigma, size=rgb.shape).astype(np.float32)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(2.2 if L["Blurry"] else 0.6))
    return img, g.landmarks(), evidence_regions(g, L)
