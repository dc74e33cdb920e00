#!/usr/bin/env python3
"""Draws the loss curves of run folders' metrics.jsonl into one SVG (no
plotting library needed): the pictures of docs/training.md.

Usage: scripts/plot-loss-curves.py OUT.svg TITLE LABEL=RUN_DIR [LABEL=RUN_DIR ...]
Each curve is the loss per step, smoothed over 20 steps (the raw values
are noisy batch to batch); the legend gives each run's mean loss over its
last 50 steps.
"""
import json
import sys

COLORS = ["#0072B2", "#E69F00", "#009E73", "#D55E00"]  # Okabe-Ito
W, H, LEFT, RIGHT, TOP, BOTTOM = 760, 420, 70, 20, 46, 56


def losses(run_dir):
    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl") if line.strip()]
    return [(r["step"], r["loss"]) for r in rows]


def smooth(points, window=20):
    out = []
    for i in range(len(points)):
        part = points[max(0, i - window + 1):i + 1]
        out.append((points[i][0], sum(p[1] for p in part) / len(part)))
    return out


def tick(v):
    text = f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def main():
    out, title, runs = sys.argv[1], sys.argv[2], [a.split("=", 1) for a in sys.argv[3:]]
    curves = [(label, losses(d)) for label, d in runs]
    smoothed = [(label, smooth(c)) for label, c in curves]
    xs = [p[0] for _, c in smoothed for p in c]
    ys = [p[1] for _, c in smoothed for p in c]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    X = lambda x: LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT)
    Y = lambda y: TOP + (1 - (y - y0) / (y1 - y0)) * (H - TOP - BOTTOM)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="DejaVu Sans, Arial, sans-serif" font-size="13">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="16">{title}</text>']
    for i in range(6):
        v = y0 + (y1 - y0) * i / 5
        svg.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#ddd"/>')
        svg.append(f'<text x="{LEFT - 8}" y="{Y(v) + 4:.1f}" text-anchor="end">{tick(v)}</text>')
    for i in range(6):
        v = x0 + (x1 - x0) * i / 5
        svg.append(f'<text x="{X(v):.1f}" y="{H - BOTTOM + 20}" text-anchor="middle">{round(v)}</text>')
    svg.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 14}" text-anchor="middle">step</text>')
    svg.append(f'<text x="18" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" transform="rotate(-90 18 {(TOP + H - BOTTOM) / 2})">loss (nats, mean of 20 steps)</text>')
    for i, ((label, c), (_, raw)) in enumerate(zip(smoothed, curves)):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in c)
        svg.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        tail = [p[1] for p in raw[-50:]]
        legend = f"{label}: mean of the last 50 steps {sum(tail) / len(tail):.4f}"
        svg.append(f'<rect x="{W - RIGHT - 330}" y="{TOP + 8 + i * 20}" width="16" height="3" fill="{color}"/>')
        svg.append(f'<text x="{W - RIGHT - 308}" y="{TOP + 13 + i * 20}">{legend}</text>')
    svg.append("</svg>")
    open(out, "w").write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
