#!/usr/bin/env python3
"""NONE diagnostic: what the analysis sees, and how well each candidate suspect statistic separates the
poisoned training samples, scored on the same activations (no retraining).

Usage: none_diagnose.py MODEL.onnx DATA.npz [--json OUT.json] [--limit N]

DATA.npz needs x_train, y_train and poison_idx (audit attack --poisoned-data writes them; so does
tests/fixtures/python/train_backdoor_fmnist.py). The model runs through onnxruntime with every Conv
output and every hidden Gemm/MatMul output added as a graph output (the layers NONE monitors: the
node producing the logits is never one). Preprocessing: the model's audit.mean/audit.std metadata.

For every layer it records the per-channel spatial max and spatial mean. Each candidate statistic
gives a score per training sample; it is judged by AUROC against poison_idx and by the precision
and recall of the split the method would make (exact two-class Jenks, as NONE does):
  paper            top-1 neuron per layer (spatial max), raw sum over layers, one global Jenks split
  paper-mean       the same with the spatial mean
  z-all            every selected neuron (top 5% per layer), each standardised on the samples
                   unconfident for the class it points to, averaged per layer, summed over layers
  z-deep           the same, layers whose map is smaller than the input's only (the stem left out)
  class-*          the score of the row above it, split by Jenks only among the samples labelled
                   with the class the selected neurons point to (the vote of the layers' top neurons)
  spectral-class   spectral signature (squared projection on the top singular vector of the centred
                   penultimate features) of the samples labelled with that class, Jenks within it
  class-side       the toolkit's class-wise split: the signed projection, Jenks, the smaller side,
                   for the true target classes (the plugin's probe decides which sides to drop)
It prints one table (markdown) and optionally writes every number as JSON.
"""
import argparse
import json
import math
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, shape_inference

LH, LL, FRAC = 0.9, 0.1, 0.05


def monitored(model):
    outputs = {o.name for o in model.graph.output}
    inits = {i.name for i in model.graph.initializer}
    layers, final_in = [], None
    for n in model.graph.node:
        weighted = n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits
        if not weighted:
            continue
        if n.output[0] in outputs:
            final_in = n.input[0]
            continue
        layers.append((n.name or n.output[0], n.op_type, n.output[0]))
    return layers, final_in


def run(path, x, mean, std):
    model = onnx.load(path)
    layers, final_in = monitored(model)
    model = shape_inference.infer_shapes(model)
    have = {o.name for o in model.graph.output}
    extra = [v for _, _, v in layers] + ([final_in] if final_in else [])
    for name in extra:
        if name not in have:
            model.graph.output.append(helper.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    logits_name = model.graph.output[0].name
    names = [logits_name] + extra
    acc = {n: ([], []) for n in names}
    for i in range(0, len(x), 500):
        b = (x[i : i + 500].astype(np.float32) / 255.0 - mean) / std
        outs = sess.run(names, {inp: b})
        for n, o in zip(names, outs):
            if o.ndim == 4:
                acc[n][0].append(o.max(axis=(2, 3)))
                acc[n][1].append(o.mean(axis=(2, 3)))
            else:
                o = o.reshape(len(o), -1)
                acc[n][0].append(o)
                acc[n][1].append(o)
    cat = {n: (np.concatenate(a).astype(np.float64), np.concatenate(m).astype(np.float64)) for n, (a, m) in acc.items()}
    logits = cat[logits_name][0]
    z = logits - logits.max(1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    spatial = {}
    for name, _, v in layers:
        o = next(o for o in model.graph.value_info if o.name == v) if any(o.name == v for o in model.graph.value_info) else None
        dims = [d.dim_value for d in o.type.tensor_type.shape.dim] if o is not None else []
        spatial[name] = dims[2] if len(dims) == 4 else 1
    feats = cat[final_in][0] if final_in else None
    return layers, probs, {name: cat[v] for name, _, v in layers}, spatial, feats


def auroc(score, pos):
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    # average ranks for ties
    s = score[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        if j > i:
            ranks[order[i : j + 1]] = (i + j + 2) / 2
        i = j + 1
    n1, n0 = pos.sum(), (~pos).sum()
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def jenks(v):
    """Exact two-class break; returns (break value, goodness of variance fit)."""
    v = np.sort(v)
    n = len(v)
    if n < 2 or v[0] == v[-1]:
        return math.inf, 0.0
    cs, cs2 = np.cumsum(v), np.cumsum(v * v)
    i = np.arange(1, n)
    s1, q1 = cs[:-1], cs2[:-1]
    s2, q2 = cs[-1] - s1, cs2[-1] - q1
    sse = (q1 - s1 * s1 / i) + (q2 - s2 * s2 / (n - i))
    b = int(np.argmin(sse))
    total = cs2[-1] - cs[-1] ** 2 / n
    return float(v[b + 1]), float(1 - sse[b] / total) if total > 0 else 0.0


def diffs(probs, a):
    """[K, C] NONE's per-class diff for one layer's activations."""
    k = probs.shape[1]
    out = np.zeros((k, a.shape[1]))
    for j in range(k):
        s, w = probs[:, j] > LH, probs[:, j] < LL
        if s.any() and w.any():
            out[j] = a[s].max(0) - (a[w].mean(0) + 3 * a[w].std(0))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--json")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--gvf", type=float, default=0.8)
    args = ap.parse_args()
    d = np.load(args.data)
    x, y = d["x_train"], d["y_train"]
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    pos = np.zeros(len(y), bool)
    pidx = d["poison_idx"]
    pos[pidx[pidx < len(y)]] = True
    meta = {p.key: p.value for p in onnx.load(args.model, load_external_data=False).metadata_props}
    mean = float(meta.get("audit.mean", "0").split(",")[0])
    std = float(meta.get("audit.std", "1").split(",")[0])
    layers, probs, acts, spatial, feats = run(args.model, x, mean, std)
    in_size = x.shape[-1]
    k = probs.shape[1]

    scores, per_layer = {}, []
    for red, tag in ((0, "paper"), (1, "paper-mean")):
        h = np.zeros(len(y))
        for name, _, _ in layers:
            a = acts[name][red]
            df = diffs(probs, a)
            top = int(np.argmax(df.max(0)))
            h += a[:, top]
        scores[tag] = h
    votes = np.zeros(k)
    for deep in (False, True):
        zsum = np.zeros(len(y))
        for name, op, _ in layers:
            if deep and op == "Conv" and spatial[name] >= in_size:
                continue
            a = acts[name][0]
            df = diffs(probs, a)
            sc = df.max(0)
            cls = df.argmax(0)
            n_top = max(1, math.ceil(FRAC * a.shape[1]))
            top = np.argsort(-sc, kind="stable")[:n_top]
            zs = []
            for c in top:
                w = probs[:, cls[c]] < LL
                m, s = a[w, c].mean(), a[w, c].std() + 1e-12
                zs.append((a[:, c] - m) / s)
            zsum += np.mean(zs, 0)
            if not deep:
                votes[cls[top[0]]] += 1
                per_layer.append({"layer": name, "op": op, "spatial": spatial[name], "top": int(top[0]),
                                  "score": float(sc[top[0]]), "class": int(cls[top[0]]),
                                  "auroc_top_max": auroc(a[:, top[0]], pos),
                                  "auroc_top_mean": auroc(acts[name][1][:, top[0]], pos)})
        scores["z-deep" if deep else "z-all"] = zsum
    target = int(np.argmax(votes))
    true_targets = sorted(set(y[pos].tolist()))

    rows = []

    def judge(tag, score, members=None):
        s = score if members is None else score[members]
        brk, gvf = jenks(s)
        flag = np.zeros(len(y), bool)
        if members is None:
            flag = score >= brk
        else:
            flag[np.flatnonzero(members)[s >= brk]] = True
        tp = int((flag & pos).sum())
        rows.append({"statistic": tag, "auroc": auroc(score if members is None else s, pos if members is None else pos[members]),
                     "flagged": int(flag.sum()), "precision": tp / max(1, flag.sum()), "recall": tp / max(1, pos.sum()),
                     "gvf": gvf})

    for tag in ("paper", "paper-mean", "z-all", "z-deep"):
        judge(tag, scores[tag])
    members = y == target
    for tag in ("z-all", "z-deep"):
        judge(f"class-{tag}", scores[tag], members)
    if feats is not None:
        f = feats[members]
        f = f - f.mean(0)
        _, _, vt = np.linalg.svd(f, full_matrices=False)
        proj = np.zeros(len(y))
        proj[members] = (f @ vt[0]) ** 2
        judge("spectral-class", proj, members)
    # The toolkit's class-wise sides (plugins/defense-none class_sides): per class, Jenks on the top
    # principal direction of the centred penultimate features, the smaller side. Which sides are
    # dropped is decided in the plugin by a probe model (exclusionary reclassification), which needs
    # training and is not scored here: the row is the side of the true target class(es), i.e. what
    # the split can give when the probe accepts exactly those.
    class_table = []
    if feats is not None:
        split = np.zeros(len(y), bool)
        for c in range(k):
            m = np.flatnonzero(y == c)
            if len(m) < 10:
                continue
            f = feats[m] - feats[m].mean(0)
            _, vecs = np.linalg.eigh(f.T @ f)
            pr = f @ vecs[:, -1]
            brk, gvf = jenks(pr)
            up = pr >= brk
            small = up if up.sum() <= (~up).sum() else ~up
            a, b = pr[small], pr[~small]
            pooled = math.sqrt((a.var() + b.var()) / 2)
            tp = int(pos[m[small]].sum())
            class_table.append({"class": c, "n": int(len(m)), "side": int(small.sum()), "poisoned_in_side": tp,
                                "poisoned_in_class": int(pos[m].sum()),
                                "separation": float(abs(a.mean() - b.mean()) / pooled) if pooled > 0 else 0.0})
            if c in true_targets:
                split[m[small]] = True
        tp = int((split & pos).sum())
        rows.append({"statistic": "class-side (target classes)", "auroc": float("nan"), "flagged": int(split.sum()),
                     "precision": tp / max(1, split.sum()), "recall": tp / max(1, pos.sum()), "gvf": float("nan")})
    # GVF of the z-deep per-class split for every class (is the accepted class the only bimodal one?)
    gvf_by_class = [jenks(scores["z-deep"][y == c])[1] for c in range(k)]

    out = {"model": args.model, "data": args.data, "n": int(len(y)), "poisoned": int(pos.sum()),
           "true_targets": true_targets, "voted_target": target, "votes": votes.tolist(),
           "gvf_by_class_z_deep": gvf_by_class, "class_split": class_table, "layers": per_layer, "statistics": rows}
    print(f"{args.model}: {len(y)} samples, {int(pos.sum())} poisoned (labels {true_targets}); voted target {target} (votes {votes.astype(int).tolist()})")
    print("per-class GVF (z-deep): " + " ".join(f"{g:.2f}" for g in gvf_by_class))
    print("class sides (class: side size / poisoned in it / poisoned in class, separation): " + " ".join(
        f"{t['class']}:{t['side']}/{t['poisoned_in_side']}/{t['poisoned_in_class']},{t['separation']:.2f}" for t in class_table))
    for l in per_layer:
        print(f"  layer {l['layer']:>24} {l['op']:>5} {l['spatial']:>3}px top {l['top']:>3} -> class {l['class']} "
              f"AUROC max {l['auroc_top_max']:.3f} mean {l['auroc_top_mean']:.3f}")
    print("| statistic | AUROC | flagged | precision | recall | GVF |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['statistic']} | {r['auroc']:.3f} | {r['flagged']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['gvf']:.2f} |")
    if args.json:
        json.dump(out, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
