#!/usr/bin/env python3
"""The firmware's decoded defmt log (defmt-print's text) -> an edgetune run directory that
`edgetune replay` (and tools/reference/zo_replay.py) reads: session.json from the `session`
line, w0.safetensors and the session's layout from the `param` lines, history.jsonl from
the `record` lines (every float passed as its f32 bits, so no digit is lost). Prints the
firmware's state hash. Usage: records.py LOG DIR"""
import json
import os
import re
import struct
import sys

PARAM = re.compile(r"param name=(\S+) rows=(\d+) cols=(\d+) w0_bits=\[([0-9, ]*)\]")


def f32(bits):
    return struct.unpack("<f", struct.pack("<I", int(bits)))[0]


def write_w0(path, params):
    """safetensors: an 8-byte little-endian header length, the JSON header (padded with
    spaces to 8 bytes), then the tensors' f32 bytes back to back."""
    header, data = {}, b""
    for name, rows, cols, bits in params:
        raw = struct.pack(f"<{len(bits)}I", *bits)
        header[name] = {"dtype": "F32", "shape": [rows, cols], "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def main():
    log, out = sys.argv[1], sys.argv[2]
    session, params, records, digest = None, [], [], None
    for line in open(log, encoding="utf-8", errors="replace"):
        m = PARAM.search(line)
        if m:
            bits = [int(b) for b in m.group(4).replace(",", " ").split()]
            params.append((m.group(1), int(m.group(2)), int(m.group(3)), bits))
        elif "session model=" in line:
            session = dict(kv.split("=", 1) for kv in line.split("session ", 1)[1].split())
        elif "record step=" in line:
            f = dict(kv.split("=", 1) for kv in line.split("record ", 1)[1].split())
            records.append({"step": int(f["step"]), "seed": int(f["seed"]), "g": f32(f["g_bits"])})
        elif "state-hash:" in line:
            digest = line.split("state-hash:", 1)[1].split()[0]
    if session is None or digest is None or not params:
        sys.exit(f"{log}: no session, start values or state hash (did the firmware finish?)")
    for name, rows, cols, bits in params:
        if len(bits) != rows * cols:
            sys.exit(f"{name}: {len(bits)} start values for [{rows}, {cols}]")
    if session["trainable"] != "ia3":
        sys.exit(f"trainable {session['trainable']} is not one this converter writes")
    os.makedirs(out, exist_ok=True)
    doc = {
        "format": "edgetune-zo-session",
        "version": 1,
        "model_sha256": session["model"],
        "layout_sha256": session["layout"],
        # PEFT's IA3 config on k, v and down's input, as edgetune writes it.
        "adapter": {
            "peft_type": "IA3",
            "task_type": "CAUSAL_LM",
            "target_modules": ["k_proj", "v_proj", "down_proj"],
            "feedforward_modules": ["down_proj"],
        },
        "init_seed": session["init_seed"],
        "session_key": session["session_key"],
        "z": session["z"],
        "mode": session["mode"],
        "k": int(session["k"]),
        "eps": f32(session["eps_bits"]),
        "lr": f32(session["lr_bits"]),
        "delta_exp": int(session["delta_exp"]),
        "lr_decay_steps": 0,
        "seed_weights": None,
        "run": {"source": "edgetune-firmware (thumbv7em-none-eabihf under QEMU)"},
        "layout": [{"name": n, "rows": r, "cols": c} for n, r, c, _ in params],
    }
    with open(os.path.join(out, "session.json"), "w") as f:
        json.dump(doc, f, indent=1)
    write_w0(os.path.join(out, "w0.safetensors"), params)
    with open(os.path.join(out, "history.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(f"firmware: {len(records)} records, state-hash: {digest}")


if __name__ == "__main__":
    main()
