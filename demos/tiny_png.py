"""A line chart as a PNG, in pure Python (zlib + struct): no plotting library needed.

    from tiny_png import line_chart
    line_chart("out.png", xs, {"native": (ys1, (200, 40, 40)), "lean": (ys2, (30, 80, 200))},
               title="...", x_label="BATCH SIZE", y_label="MIB")

Text uses a built-in 5x7 bitmap font (upper-case letters, digits, a few signs; other
characters are drawn as blanks), scaled 2x.
"""
from __future__ import annotations

import math
import struct
import zlib
from typing import Dict, List, Sequence, Tuple

Color = Tuple[int, int, int]

_FONT = {
    "A": " ### |#   #|#   #|#####|#   #|#   #|#   #", "B": "#### |#   #|#   #|#### |#   #|#   #|#### ",
    "C": " ### |#   #|#    |#    |#    |#   #| ### ", "D": "#### |#   #|#   #|#   #|#   #|#   #|#### ",
    "E": "#####|#    |#    |#### |#    |#    |#####", "F": "#####|#    |#    |#### |#    |#    |#    ",
    "G": " ### |#   #|#    |# ###|#   #|#   #| ####", "H": "#   #|#   #|#   #|#####|#   #|#   #|#   #",
    "I": " ### |  #  |  #  |  #  |  #  |  #  | ### ", "J": "  ###|   # |   # |   # |   # |#  # | ##  ",
    "K": "#   #|#  # |# #  |##   |# #  |#  # |#   #", "L": "#    |#    |#    |#    |#    |#    |#####",
    "M": "#   #|## ##|# # #|# # #|#   #|#   #|#   #", "N": "#   #|#   #|##  #|# # #|#  ##|#   #|#   #",
    "O": " ### |#   #|#   #|#   #|#   #|#   #| ### ", "P": "#### |#   #|#   #|#### |#    |#    |#    ",
    "Q": " ### |#   #|#   #|#   #|# # #|#  # | ## #", "R": "#### |#   #|#   #|#### |# #  |#  # |#   #",
    "S": " ####|#    |#    | ### |    #|    #|#### ", "T": "#####|  #  |  #  |  #  |  #  |  #  |  #  ",
    "U": "#   #|#   #|#   #|#   #|#   #|#   #| ### ", "V": "#   #|#   #|#   #|#   #|#   #| # # |  #  ",
    "W": "#   #|#   #|#   #|# # #|# # #|# # #| # # ", "X": "#   #|#   #| # # |  #  | # # |#   #|#   #",
    "Y": "#   #|#   #| # # |  #  |  #  |  #  |  #  ", "Z": "#####|    #|   # |  #  | #   |#    |#####",
    "0": " ### |#   #|#  ##|# # #|##  #|#   #| ### ", "1": "  #  | ##  |  #  |  #  |  #  |  #  | ### ",
    "2": " ### |#   #|    #|   # |  #  | #   |#####", "3": "#####|   # |  #  |   # |    #|#   #| ### ",
    "4": "   # |  ## | # # |#  # |#####|   # |   # ", "5": "#####|#    |#### |    #|    #|#   #| ### ",
    "6": "  ## | #   |#    |#### |#   #|#   #| ### ", "7": "#####|    #|   # |  #  | #   | #   | #   ",
    "8": " ### |#   #|#   #| ### |#   #|#   #| ### ", "9": " ### |#   #|#   #| ####|    #|   # | ##  ",
    ".": "     |     |     |     |     | ##  | ##  ", ",": "     |     |     |     | ##  |  #  | #   ",
    "(": "   # |  #  | #   | #   | #   |  #  |   # ", ")": " #   |  #  |   # |   # |   # |  #  | #   ",
    "-": "     |     |     |#####|     |     |     ", "_": "     |     |     |     |     |     |#####",
    ":": "     | ##  | ##  |     | ##  | ##  |     ", "%": "##   |##  #|   # |  #  | #   |#  ##|   ##",
    "/": "     |    #|   # |  #  | #   |#    |     ", "=": "     |     |#####|     |#####|     |     ",
    "+": "     |  #  |  #  |#####|  #  |  #  |     ", ">": " #   |  #  |   # |    #|   # |  #  | #   ",
    " ": "     |     |     |     |     |     |     ",
}


class Canvas:
    def __init__(self, width: int, height: int, background: Color = (255, 255, 255)) -> None:
        self.w, self.h = width, height
        self.px = bytearray(bytes(background) * (width * height))

    def dot(self, x: int, y: int, color: Color, r: int = 0) -> None:
        for yy in range(y - r, y + r + 1):
            for xx in range(x - r, x + r + 1):
                if 0 <= xx < self.w and 0 <= yy < self.h:
                    i = 3 * (yy * self.w + xx)
                    self.px[i:i + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, r: int = 0) -> None:
        # Bresenham, with a square brush of radius r
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.dot(x0, y0, color, r)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, s: str, color: Color = (0, 0, 0), scale: int = 2, anchor: str = "left") -> None:
        """Draw ``s`` with its top at ``y``; anchor left, center or right at ``x``."""
        width = len(s) * 6 * scale
        if anchor == "center":
            x -= width // 2
        elif anchor == "right":
            x -= width
        for k, ch in enumerate(s.upper()):
            rows = _FONT.get(ch, _FONT[" "]).split("|")
            for j, row in enumerate(rows):
                for i, c in enumerate(row):
                    if c == "#":
                        for yy in range(scale):
                            for xx in range(scale):
                                self.dot(x + k * 6 * scale + i * scale + xx, y + j * scale + yy, color)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w: 3 * (y + 1) * self.w]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / max(1, ticks)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def line_chart(path: str, xs: Sequence[float], series: Dict[str, Tuple[Sequence[float], Color]],
               title: str = "", x_label: str = "", y_label: str = "", size: Tuple[int, int] = (800, 520),
               value_digits: int = 0) -> None:
    """Write a PNG with one polyline (and point markers) per series, axes, ticks and a legend."""
    w, h = size
    c = Canvas(w, h)
    left, right, top, bottom = 110, 40, 90, 70
    x_max = max(xs) * 1.05
    y_top = max(max(v) for v, _ in series.values()) * 1.1 or 1.0
    step = _nice_step(y_top)
    y_top = math.ceil(y_top / step) * step

    def X(v: float) -> int:
        return left + round((w - left - right) * v / x_max)

    def Y(v: float) -> int:
        return h - bottom - round((h - top - bottom) * v / y_top)

    grey, black = (225, 225, 225), (0, 0, 0)
    t = 0.0
    while t <= y_top + 1e-9:  # horizontal grid and y ticks
        c.line(left, Y(t), w - right, Y(t), grey)
        c.text(left - 10, Y(t) - 7, f"{t:g}", anchor="right")
        t += step
    for v in xs:  # x ticks at the data points
        c.line(X(v), h - bottom, X(v), h - bottom + 6, black)
        c.text(X(v), h - bottom + 12, f"{v:g}", anchor="center")
    c.line(left, top - 10, left, h - bottom, black, 1)  # axes
    c.line(left, h - bottom, w - right, h - bottom, black, 1)
    c.text(w // 2, 14, title, anchor="center")
    c.text((left + w - right) // 2, h - 30, x_label, anchor="center")
    c.text(12, top - 38, y_label)
    ly = top + 4
    for name, (ys, color) in series.items():
        pts: List[Tuple[int, int]] = [(X(a), Y(b)) for a, b in zip(xs, ys)]
        for (a, b), (p, q) in zip(pts, pts[1:]):
            c.line(a, b, p, q, color, 1)
        above = color == next(iter(series.values()))[1]  # the first series' values above its points
        for (a, b), v in zip(pts, ys):
            c.dot(a, b, color, 4)
            if above:
                c.text(a, b - 24, f"{v:.{value_digits}f}", color, anchor="center")
            else:  # right of the point and a little below, clear of the axis
                c.text(a + 10, b + 4, f"{v:.{value_digits}f}", color)
        c.line(left + 20, ly + 7, left + 60, ly + 7, color, 2)  # legend
        c.text(left + 70, ly, name, color)
        ly += 26
    with open(path, "wb") as f:
        f.write(c.png())
