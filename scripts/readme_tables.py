"""Markdown tables for the README and docs/benchmarks.md from the benchmarks' JSON outputs, so every number there comes
from a run.

python scripts/readme_tables.py out/          # reads out/{quality,speed,kernels,peer,peer-embedded,peer-uniform,reuse}/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def training(meta) -> str:
    acc = meta["held_out_accuracy"]
    tasks = sorted({k.split("@")[0] for k in acc}, key=["needle", "where", "lookup", "count", "describe"].index)
    lines = ["| task | 8 frames | 16 frames (longer than any in training) |", "|---|---|---|"]
    for t in tasks:
        a8, a16 = acc.get(f"{t}@8"), acc.get(f"{t}@16")
        lines.append(f"| {t} | {a8:.1%} | {'-' if a16 is None else f'{a16:.1%}'} |")
    return "\n".join(lines)


def quality(data, frames: int) -> str:
    budgets = data["budgets"]
    out = []
    for row in data["accuracy"]:
        if row["frames"] != frames:
            continue
        head = f"**{row['task']}** ({frames} frames): full cache {row['full']:.2f}, floor {row['floor']:.2f}, ceiling {row['ceiling']:.2f}, chance {row['chance']:.2f}"
        lines = [
            head,
            "",
            "| vision kept | " + " | ".join(f"{100 * b:g}%" for b in budgets) + " |",
            "|---" * (len(budgets) + 1) + "|",
        ]
        for name, accs in row["policies"].items():
            lines.append(f"| {name} | " + " | ".join(f"{a:.2f}" for a in accs) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def fidelity(data) -> str:
    budgets = data["budgets"]
    lines = [
        "| vision kept | " + " | ".join(f"{100 * b:g}%" for b in budgets) + " |",
        "|---" * (len(budgets) + 1) + "|",
    ]
    for name, cells in data["fidelity"].items():
        lines.append(f"| {name} | " + " | ".join(f"{c['agreement']:.2f} / {c['kl']:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def speed(data) -> str:
    rows = data["rows"]
    sizes = sorted({r["n"] for r in rows})
    out = []
    for n in (sizes[-1], sizes[len(sizes) // 2]):
        lines = [
            f"prompt of {n} tokens:",
            "",
            "| policy | prefill s | x full | decode ms/token | x full | KV MiB | x full | peak MiB | x full | tokens as full |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r["n"] != n:
                continue

            def ratio(key, r=r):
                return f"{r[key]:.2f}" if r.get(key) is not None else "-"

            kv = f"{r['kv_bytes'] / 2**20:.1f}" if r["kv_bytes"] else "-"
            agree = f"{r['agreement']:.2f}" if "agreement" in r else "-"
            lines.append(
                f"| {r['policy']} | {r['prefill_s']:.2f} | {ratio('prefill_ratio')} | {r['decode_ms']:.1f} | {ratio('decode_ratio')} | "
                f"{kv} | {ratio('kv_ratio')} | {r['peak_bytes'] / 2**20:.1f} | {ratio('peak_ratio')} | {agree} |"
            )
        out.append("\n".join(lines))
    return "\n\n".join(out)


def decode_vs_length(data) -> str:
    rows = data["rows"]
    sizes = sorted({r["n"] for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    lines = ["| decode ms/token | " + " | ".join(str(n) for n in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for p in policies:
        cells = {r["n"]: r["decode_ms"] for r in rows if r["policy"] == p}
        lines.append(f"| {p} | " + " | ".join(f"{cells[n]:.1f}" for n in sizes) + " |")
    return "\n".join(lines)


def kernels(data) -> str:
    lines = [
        "| op | n | reference ms | Triton ms | speedup | Triton GB/s | of copy bandwidth | Triton TFLOP/s | peak MiB ref / Triton |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["op"], r["n"], r["impl"]): r for r in data["rows"]}
    for op in dict.fromkeys(r["op"] for r in data["rows"]):
        for n in sorted({r["n"] for r in data["rows"] if r["op"] == op}):
            ref, tri = by.get((op, n, "reference")), by.get((op, n, "triton"))
            if tri is None:  # CPU: the references alone
                lines.append(f"| {op} | {n} | {ref['ms']:.3f} | - | - | - | - | - | - |")
                continue
            ref_ms = f"{ref['ms']:.3f}" if ref else "(skipped)"
            speedup = f"{ref['ms'] / tri['ms']:.2f}x" if ref else "-"
            peak = f"{ref['peak_mib']:.1f} / {tri['peak_mib']:.1f}" if ref else f"- / {tri['peak_mib']:.1f}"
            lines.append(
                f"| {op} | {n} | {ref_ms} | {tri['ms']:.3f} | {speedup} | {tri['gbps']:.0f} | {100 * tri['frac']:.1f}% | "
                f"{tri['tflops']:.1f} | {peak} |"
            )
    return (
        f"{data['setup']['device']}, measured copy bandwidth {data['setup']['copy_bandwidth_gbps']:.0f} GB/s\n\n"
        + "\n".join(lines)
    )


def bandwidth(data) -> str:
    rows = [r for r in data["rows"] if r.get("decode_bandwidth_fraction") is not None]
    if not rows:
        return ""
    sizes = sorted({r["n"] for r in rows})
    lines = [
        "| decode: bytes read per token / time, of copy bandwidth | " + " | ".join(str(n) for n in sizes) + " |",
        "|---" * (len(sizes) + 1) + "|",
    ]
    for p in dict.fromkeys(r["policy"] for r in rows):
        cells = {r["n"]: r["decode_bandwidth_fraction"] for r in rows if r["policy"] == p}
        lines.append(f"| {p} | " + " | ".join(f"{100 * cells[n]:.0f}%" if n in cells else "-" for n in sizes) + " |")
    return "\n".join(lines)


def peer(data) -> str:
    """The peer benchmark's summary: one row per method, vlcache's policy against the kvpress press."""
    e = data["entropy_last_rows_vs_uniform"]
    full = data["full"]
    lines = [
        f"Attention entropy of the last {e['rows']} prompt rows / uniform: {e['mean']:.3f}. Full caches: same tokens "
        f"{full['tokens_vlcache_vs_kvpress']:.2f}, KV {full['vlcache']['kv_bytes'] / 2**20:.1f} MiB.",
        "",
        "| vlcache | kvpress | same positions, heads | overlap | after decoding | kvpress cache in position order "
        "| tokens = own full (vlcache / kvpress) | tokens vlcache = kvpress | prefill x full (vlcache / kvpress) "
        "| decode x full (vlcache / kvpress) | KV MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        heads = sum(len(layer) for layer in r["overlap_per_layer_head_prefill"])
        same = round(r["same_heads_prefill"] * heads)
        after = (
            f"{round(r['same_heads_end'] * heads)}/{heads}, overlap {r['overlap_end']:.2f}" if r["decoding"] else "-"
        )
        t, x, d = r["tokens_vs_own_full"], r["prefill_x_full"], r["decode_x_full"]
        lines.append(
            f"| {r['method']} | {r['press']} | {same}/{heads} | {r['overlap_prefill']:.2f} | {after} "
            f"| {r['cache_ascending']['kvpress']:.2f} | {t['vlcache']:.2f} / {t['kvpress']:.2f} "
            f"| {r['tokens_vlcache_vs_kvpress']:.2f} | {x['vlcache']:.2f} / {x['kvpress']:.2f} "
            f"| {d['vlcache']:.2f} / {d['kvpress']:.2f} | {r['kv_bytes']['vlcache'] / 2**20:.2f} |"
        )
    return "\n".join(lines)


def peer_layers(data) -> str:
    """Per layer and KV head, the overlap of kept prompt positions ('=' identical), and differing layer budgets."""
    layers = len(data["entropy_last_rows_vs_uniform"]["per_layer_head"])
    lines = ["| method | " + " | ".join(f"L{i}" for i in range(layers)) + " |", "|---" * (layers + 1) + "|"]
    for r in data["rows"]:
        for key, label in (("prefill", r["method"]), ("end", r["method"] + ", after decoding")):
            if key == "end" and not r["decoding"]:
                continue
            cells = [
                " ".join("=" if o == 1.0 else f"{o:.3f}" for o in layer) for layer in r[f"overlap_per_layer_head_{key}"]
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| method | vlcache layer budgets | kvpress layer budgets |", "|---|---|---|"]
    for r in data["rows"]:
        b = r["layer_budgets"]
        if b["vlcache"] != b["kvpress"]:
            lines.append(f"| {r['method']} | {' '.join(map(str, b['vlcache']))} | {' '.join(map(str, b['kvpress']))} |")
    return "\n".join(lines)


def reuse(data) -> str:
    ks = data["ks"]
    lines = [
        "| images | tokens | cold TTFT ms | " + " | ".join(f"k={k}: ms (x), agreement" for k in ks) + " |",
        "|---" * (len(ks) + 3) + "|",
    ]
    for r in data["rows"]:
        cells = [
            f"{1000 * r['reuse'][k]['ttft_s']:.0f} ({r['reuse'][k]['speedup']:.1f}x), {r['reuse'][k]['agreement']:.2f}"
            for k in ks
        ]
        lines.append(f"| {r['images']} | {r['tokens']} | {1000 * r['cold_s']:.0f} | " + " | ".join(cells) + " |")
    trained = data.get("trained")
    if trained:
        lines += [
            "",
            f"Embedded model, {trained['frames']}-frame videos stored then asked with frames rotated, accuracy over {trained['videos_per_task']} videos per task:",
            "",
        ]
        lines += ["| task | cold | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 2) + "|"]
        for task, acc in trained["tasks"].items():
            lines.append(f"| {task} | {acc['cold']:.2f} | " + " | ".join(f"{acc[k]:.2f}" for k in ks) + " |")
    return "\n".join(lines)


def main(folder: str = "out") -> int:
    out = Path(folder)
    meta = load(ROOT / "vlcache" / "embedded" / "training.json")
    if meta:
        print(
            "## training\n\n"
            + training(meta)
            + f"\n\ntrained in {meta.get('train_seconds_total', meta['train_seconds']) / 60:.0f} min in all\n"
        )
    q = load(out / "quality" / "quality.json")
    if q:
        print(
            "## quality, 8 frames\n\n"
            + quality(q, 8)
            + "\n\n## quality, 16 frames\n\n"
            + quality(q, 16)
            + "\n\n## fidelity\n\n"
            + fidelity(q)
            + "\n"
        )
    s = load(out / "speed" / "speed.json")
    if s:
        print(
            f"## speed ({s['setup']['device']}, {s['setup']['parameters'] / 1e6:.1f}M parameters, budget {s['setup']['budget']})\n\n"
            + speed(s)
            + "\n\n"
            + decode_vs_length(s)
            + "\n\n"
            + bandwidth(s)
            + "\n"
        )
    k = load(out / "kernels" / "kernels.json")
    if k:
        print("## kernels\n\n" + kernels(k) + "\n")
    for name in ("peer", "peer-embedded", "peer-uniform"):
        p = load(out / name / "peer.json")
        if p:
            print(f"## {name}\n\n" + peer(p) + "\n\n" + peer_layers(p) + "\n")
    r = load(out / "reuse" / "reuse.json")
    if r:
        print("## reuse\n\n" + reuse(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
