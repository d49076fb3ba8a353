"""A loss curve as a PNG without matplotlib (the ``plots`` extra): a plain raster drawn here and written with
zlib, so that every run leaves OUT/loss.png. With matplotlib installed ``checkpoint.plot_loss`` draws its own.

The image: the raw loss per optimizer step (light) and its running mean (dark) over a light grid, the y axis
labelled with the loss at five levels and the x axis with five step numbers (digits in a 3 x 5 pixel font at
twice its size). No text beyond numbers: the file name says what it is."""
from __future__ import annotations

import struct
import zlib

WIDTH, HEIGHT = 700, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 20, 40          # the plot area's margins (pixels)
WHITE, AXIS, GRID = (255, 255, 255), (90, 90, 90), (225, 225, 225)
RAW, MEAN, TEXT = (150, 185, 235), (200, 90, 20), (40, 40, 40)

# 3 x 5 glyphs, one string of 15 bits per character, row by row
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111111100111", "+": "000010111010000",
}
_SCALE = 2


class _Canvas:
    def __init__(self, w: int, h: int):
        self.w, self.h = w, h
        self.px = bytearray(bytes(WHITE) * (w * h))

    def dot(self, x: int, y: int, rgb):
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i:i + 3] = bytes(rgb)

    def line(self, x0: int, y0: int, x1: int, y1: int, rgb, width: int = 1):
        """Bresenham's line, ``width`` pixels thick (stacked downwards)."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for k in range(width):
                self.dot(x0, y0 + k, rgb)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, s: str, rgb, align: str = "left"):
        """Numbers at (x, y) = the top left (align "left"), top right ("right") or top centre ("center")."""
        adv = 4 * _SCALE
        width = len(s) * adv - _SCALE
        x -= {"left": 0, "right": width, "center": width // 2}[align]
        for n, ch in enumerate(s):
            bits = _FONT.get(ch)
            if bits is None:
                continue
            for r in range(5):
                for c in range(3):
                    if bits[3 * r + c] == "1":
                        for u in range(_SCALE):
                            for v in range(_SCALE):
                                self.dot(x + n * adv + c * _SCALE + u, y + r * _SCALE + v, rgb)

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        stride = 3 * self.w
        raw = b"".join(b"\x00" + bytes(self.px[y * stride:(y + 1) * stride]) for y in range(self.h))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def loss_png(steps: list[int], losses: list[float], mean: list[float] | None) -> bytes:
    """The PNG bytes of the curve: ``losses`` (and their running ``mean``) against ``steps``."""
    c = _Canvas(WIDTH, HEIGHT)
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM
    s_lo, s_hi = min(steps), max(steps)
    l_lo, l_hi = min(losses), max(losses)
    if l_hi == l_lo:                                   # a flat curve: a band around it
        l_lo, l_hi = l_lo - 0.5, l_hi + 0.5
    if s_hi == s_lo:
        s_hi = s_lo + 1

    def px(step, loss):
        return (round(x0 + (step - s_lo) / (s_hi - s_lo) * (x1 - x0)),
                round(y1 - (loss - l_lo) / (l_hi - l_lo) * (y1 - y0)))

    for v in _ticks(l_lo, l_hi):
        _, y = px(s_lo, v)
        c.line(x0, y, x1, y, GRID)
        c.text(x0 - 6, y - 5, f"{v:.3g}", TEXT, align="right")
    for s in _ticks(s_lo, s_hi):
        x, _ = px(s, l_lo)
        c.line(x, y0, x, y1, GRID)
        c.text(x, y1 + 8, str(round(s)), TEXT, align="center")
    c.line(x0, y0, x0, y1, AXIS)
    c.line(x0, y1, x1, y1, AXIS)
    for series, rgb, width in ((losses, RAW, 1), (mean, MEAN, 2)):
        if not series:
            continue
        pts = [px(s, v) for s, v in zip(steps, series)]
        if len(pts) == 1:
            c.dot(*pts[0], rgb)
        for (a, b), (u, v) in zip(pts, pts[1:]):
            c.line(a, b, u, v, rgb, width)
    return c.png()
