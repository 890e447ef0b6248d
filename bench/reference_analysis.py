"""NONE's analysis the way the paper's reference code computes it: Python loops over layers,
channels and classes with NumPy, on the activations written by the Rust bench (same arrays).
Prints one JSON line with the time and the selected neurons (to check both agree)."""
import json, math, sys, time
import numpy as np

d = sys.argv[1]
probs = np.load(f"{d}/probs.npy")
acts = [np.load(f"{d}/act{i}.npy") for i in range(3)]
lh, ll, frac = 0.9, 0.1, 0.05


def analyse():
    selected, h = [], np.zeros(probs.shape[0])
    for a in acts:
        c = a.shape[1]
        score = np.full(c, -np.inf)
        for ch in range(c):
            for k in range(probs.shape[1]):
                s = probs[:, k] > lh
                w = probs[:, k] < ll
                if s.sum() == 0 or w.sum() == 0:
                    diff = 0.0
                else:
                    diff = a[s, ch].max() - (a[w, ch].mean() + 3 * a[w, ch].std())
                score[ch] = max(score[ch], diff)
        top = np.argsort(-score, kind="stable")[: math.ceil(frac * c)]
        selected.append([int(t) for t in top])
        h += a[:, top[0]]
    v = np.sort(h)
    best, brk = None, None
    cs, cs2 = np.cumsum(v), np.cumsum(v * v)
    for i in range(1, len(v)):  # the reference's Jenks is a loop too
        n1, n2 = i, len(v) - i
        s1, s2 = cs[i - 1], cs[-1] - cs[i - 1]
        q1, q2 = cs2[i - 1], cs2[-1] - cs2[i - 1]
        sse = (q1 - s1 * s1 / n1) + (q2 - s2 * s2 / n2)
        if best is None or sse < best:
            best, brk = sse, v[i]
    return selected, brk


t = time.perf_counter()
selected, _ = analyse()
sec = time.perf_counter() - t
print(json.dumps({"impl": "reference-style Python loops (NumPy)", "seconds": round(sec, 3), "selected": selected}))
