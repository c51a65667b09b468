#!/usr/bin/env python3
"""An independent implementation of edgetune's federated wire format (docs/protocol.md)
and the server's aggregation (runtime/src/fed/aggregate.rs's documented rules), written
from the docs. It builds sessions and uploads with its own encoder, aggregates them, and
writes tests/golden/fed/cases.json: per case the encoded session and uploads (hex), the
policy, and the expected per-seed coefficients and FedKSeed-Pro weights. The Rust test
(tests/tests/fed_golden.rs) decodes the same bytes and must reproduce every number.

    python3 tools/reference/fed_aggregate.py        # rewrites the golden file
"""

import json
import math
import pathlib
import random
import struct
import sys
import zlib

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from zo_replay import philox  # noqa: E402  (Philox4x32-10, numpy)

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "golden" / "fed" / "cases.json"
PURPOSE_SAMPLE = 2


def varint(x):
    out = bytearray()
    while x >= 0x80:
        out.append((x & 0x7F) | 0x80)
        x >>= 7
    out.append(x)
    return bytes(out)


def ascending(xs):
    out, nxt = varint(len(xs)), 0
    for x in xs:
        out += varint(x - nxt)
        nxt = x + 1
    return out


def frame(kind, body):
    msg = b"ETfd" + bytes([1, kind]) + body
    return msg + struct.pack("<I", zlib.crc32(msg))


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def f16(x):
    return struct.unpack("<e", struct.pack("<e", x))[0]


def session_bytes(s):
    body = bytes(s["model"]) + bytes(s["layout"]) + struct.pack("<Q", s["key"])
    body += bytes([1, 0, {"kseed": 0, "shared": 1}[s["mode"]], {"f32": 0, "f16": 1, "sign": 2}[s["enc"]]])
    body += varint(s["k"]) + varint(s["tau"]) + bytes([s["delta_exp"]])
    body += struct.pack("<fff", s["eps"], s["lr"], s["clip"])
    return frame(1, body)


def tag(s):
    return struct.unpack("<I", session_bytes(s)[-4:])[0]


def scalar(g, enc):
    return struct.pack("<e", g) if enc == "f16" else struct.pack("<f", g)


def upload_bytes(s, u):
    body = struct.pack("<I", tag(s)) + varint(u["round"]) + varint(u["client"]) + varint(u["samples"])
    body += struct.pack("<f", u["loss_sum"]) + varint(u["steps"])
    if s["mode"] == "kseed":
        body += varint(len(u["pairs"]))
        for j, g in u["pairs"]:
            body += varint(j) + scalar(g, s["enc"])
    elif s["enc"] == "sign":
        body += ascending(u["skipped"])
        bits = [g > 0 for g in u["values"]]
        for i in range(0, len(bits), 8):
            body += bytes([sum(1 << k for k, b in enumerate(bits[i:i + 8]) if b)])
    else:
        body += ascending(u["skipped"])
        for g in u["values"]:
            body += scalar(g, s["enc"])
    return frame(3, body)


def seed_for(s, rnd, step, client, weights):
    c = client if s["mode"] == "kseed" else 0
    key = s["key"]
    w = int(philox(step, rnd, c, PURPOSE_SAMPLE, key & 0xFFFFFFFF, key >> 32)[0])
    if weights is None:
        return (w * s["k"]) >> 32
    cum, total = [], 0
    for x in weights:
        total += x
        cum.append(total)
    target = (w * total) >> 32
    return next(i for i, c_ in enumerate(cum) if c_ > target)


def clipped(s, g):
    g = float(g)
    c = float(f32(s["clip"]))
    return max(-c, min(c, g)) if c > 0 else g


def trimmed_sum(xs, trim):
    total = 0.0
    for _, w in xs:
        total += w
    cut = math.floor(trim * len(xs))
    if cut == 0:
        acc = 0.0
        for v, w in xs:
            acc += v * w
        return acc
    xs = sorted(xs, key=lambda p: p[0])
    kept = xs[cut:len(xs) - cut]
    kw = 0.0
    for _, w in kept:
        kw += w
    if kw == 0.0:
        return 0.0
    acc = 0.0
    for v, w in kept:
        acc += v * w
    return acc * (total / kw)


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    if n == 0:
        return 0.0
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2.0


def decoded(s, g):
    """A scalar as the server reads it back from the wire."""
    return f16(g) if s["enc"] == "f16" else f32(g)


def step_values(s, u):
    """step -> value for a shared-seed upload (skipped steps absent)."""
    out, k = {}, 0
    for step in range(u["steps"]):
        if step in u["skipped"]:
            continue
        g = u["values"][k]
        k += 1
        out[step] = (1.0 if g > 0 else -1.0) if s["enc"] == "sign" else clipped(s, decoded(s, g))
    return out


def aggregate(s, rnd, ups, weights, policy):
    ups = sorted(ups, key=lambda u: u["client"])
    def n(u):
        return float(min(max(u["samples"], 1), max(policy["max_samples"], 1)))

    total_n = 0.0
    for u in ups:
        total_n += n(u)
    per_seed = {}
    if s["mode"] == "kseed":
        for u in ups:
            mine = {}
            for j, g in u["pairs"]:
                mine[j] = mine.get(j, 0.0) + clipped(s, decoded(s, g))
            w = n(u) / total_n
            for j in sorted(mine):
                per_seed.setdefault(j, []).append((mine[j], w))
    else:
        vals = [step_values(s, u) for u in ups]
        for step in range(s["tau"]):
            xs = [(v[step], n(u) / total_n) for u, v in zip(ups, vals) if step in v]
            if not xs:
                continue
            if s["enc"] == "sign":
                vote = 0.0
                for v, w in xs:
                    vote += v * w
                g = 1.0 if vote > 0 else (-1.0 if vote < 0 else 0.0)
            elif policy["rule"] == "median":
                g = median([x[0] for x in xs])
            else:
                w = 0.0
                for _, ww in xs:
                    w += ww
                g = trimmed_sum(xs, policy["trim"]) / w
            per_seed.setdefault(seed_for(s, rnd, step, 0, weights), []).append((g, 1.0))
    out = []
    for j in sorted(per_seed):
        xs = per_seed[j]
        if s["mode"] == "kseed":
            g = trimmed_sum(xs, policy["trim"])
        else:
            g = 0.0
            for v, _ in xs:
                g += v
        if g != 0.0:
            out.append((j, g))
    return out


def coefficient(s, g):
    q = -float(f32(s["lr"])) * g * 2.0 ** s["delta_exp"]
    b = float(1 << 30)
    return int(round(max(-b, min(b, q))))


class Pro:
    def __init__(self, k):
        self.sum = [0.0] * k
        self.count = [0] * k

    def record(self, s, rnd, ups, weights):
        for u in sorted(ups, key=lambda u: u["client"]):
            if s["mode"] == "kseed":
                for j, g in u["pairs"]:
                    self.add(j, decoded(s, g))
            else:
                for step, v in sorted(step_values(s, u).items()):
                    self.add(seed_for(s, rnd, step, 0, weights), v)

    def add(self, j, g):
        self.sum[j] += min(abs(float(f32(g))), 1000.0)
        self.count[j] += 1

    def weights(self, t):
        a = [s / (n + 1) for s, n in zip(self.sum, self.count)]
        lo, hi = min(a), max(a)
        span = hi - lo
        z = [((x - lo) / span if span > 0 else 0.0) / t for x in a]
        top = max(z)
        return [int(max(1.0, min(16.0, round(16.0 * math.exp(x - top))))) for x in z]


def make_uploads(s, rnd, rng, weights, byzantine=False):
    # A Byzantine client sends scalars far beyond the clip (f16 tops out at 65504).
    huge = 6e4 if s["enc"] == "f16" else 1e6
    ups = []
    for client in (3, 1, 4, 2, 5):
        u = {"round": rnd, "client": client, "samples": rng.randint(1, 40), "loss_sum": 12.5, "steps": s["tau"]}
        if byzantine and client == 5:
            u["samples"] = 4_000_000  # claimed, cut to the policy's max_samples
        if s["mode"] == "kseed":
            pairs = []
            for step in range(s["tau"]):
                if rng.random() < 0.1:
                    continue  # a skipped step has no pair
                g = rng.uniform(-12, 12)
                if byzantine and client == 5:
                    g = huge if step % 2 else -huge
                pairs.append((seed_for(s, rnd, step, client, weights), f32(g)))
            u["pairs"] = pairs
        else:
            skipped = [st for st in range(s["tau"]) if rng.random() < 0.1]
            vals = [f32(rng.uniform(-12, 12)) for _ in range(s["tau"] - len(skipped))]
            if byzantine and client == 5:
                vals = [f32(-huge * (1 if v > 0 else -1)) for v in vals]
            u["skipped"], u["values"] = skipped, vals
        ups.append(u)
    return ups


def case(name, s, policy, rounds, rng, byzantine=False):
    pro = Pro(s["k"])
    weights = None
    out = {"name": name, "session": session_bytes(s).hex(), "policy": policy, "rounds": []}
    for rnd in range(1, rounds + 1):
        ups = make_uploads(s, rnd, rng, weights, byzantine)
        agg = aggregate(s, rnd, ups, weights, policy)
        updates = [(j, coefficient(s, g)) for j, g in agg]
        updates = [(j, q) for j, q in updates if q != 0]
        pro.record(s, rnd, ups, weights)
        next_w = pro.weights(policy["temperature"]) if policy["temperature"] else None
        out["rounds"].append({
            "uploads": [upload_bytes(s, u).hex() for u in ups],
            "updates": updates,
            "weights": next_w,
        })
        weights = next_w
    return out


def main():
    rng = random.Random(20261130)
    base = {"model": [7] * 32, "layout": [9] * 32, "key": 0x1234_5678_9ABC_DEF0, "k": 64, "tau": 12,
            "delta_exp": 16, "eps": 1e-2, "lr": 5e-4, "clip": 10.0}
    cases = [
        case("kseed_f32", dict(base, mode="kseed", enc="f32"), {"trim": 0.0, "rule": "median", "temperature": None, "max_samples": 1000}, 3, rng),
        case("kseed_f16_trim_pro", dict(base, mode="kseed", enc="f16", k=8),
             {"trim": 0.2, "rule": "median", "temperature": 0.5, "max_samples": 1000}, 3, rng, byzantine=True),
        case("shared_median", dict(base, mode="shared", enc="f32"), {"trim": 0.0, "rule": "median", "temperature": None, "max_samples": 1000}, 2, rng, byzantine=True),
        case("shared_mean_trim_pro", dict(base, mode="shared", enc="f16"), {"trim": 0.2, "rule": "mean", "temperature": 1.0, "max_samples": 1000}, 3, rng),
        case("shared_sign", dict(base, mode="shared", enc="sign"), {"trim": 0.0, "rule": "median", "temperature": None, "max_samples": 1000}, 2, rng),
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"generator": "tools/reference/fed_aggregate.py", "cases": cases}, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(cases)} cases")


if __name__ == "__main__":
    main()
