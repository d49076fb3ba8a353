"""Output of a benchmark run: progress lines on stderr, the markdown tables on stdout (header, floor per
context, tg / pp / GDN tables, skipped and failed rows). The same result as JSON (--json) is written by
bench_args.write_json, after the table, to a path checked before the run (bench_args.check_output).
Columns: bench/README.md, "What is measured"."""
from __future__ import annotations

import math
import sys

GiB = 1 << 30


def log(msg: str):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def gdn_share(rows: list, c):
    """The ahn_rt GDN-only row's share of a decode token: of the first ahn_rt ahn row (compiled ops) at
    ctx >= S + W, its replay time where it has one."""
    gdn = next((x for x in rows if x["kind"] == "gdn" and x["impl"].startswith("ahn_rt")), None)
    deep = [x for x in rows if x["kind"] == "tg" and x["impl"].startswith("ahn_rt ahn")
            and "reference" not in x["impl"] and x.get("batch", 1) == 1 and c is not None and x["ctx"] >= c.sinks + c.window]
    if gdn and deep:
        t = deep[0].get("replay_ms", deep[0]["ms"])
        gdn["share"] = gdn["us"] / 1e3 / t
        gdn["share_of"] = f"tg @ d{deep[0]['ctx']} ({'replay' if 'replay_ms' in deep[0] else 'ms/token'} {t:.3f} ms)"


def _f(x, fmt="{:.2f}", none="—"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def markdown(res: dict) -> str:
    h = res["header"]
    out = ["## decode_latency", ""]
    if h.get("gpu"):
        out.append(f"- GPU: {h['gpu']} ({h['gpu_memory_gib']} GiB, {h['sms']} SMs), driver {h['driver']}, "
                   f"CUDA {h['cuda']}")
    else:
        out.append(f"- device: {h['device']} ({h['cpu']} CPUs)")
    out.append(f"- torch {h['torch']}, transformers {h['transformers'] or 'not installed'}, commit {h['commit']}, "
               f"ahn_rt backend {h['ahn_rt_backend']}, {h['date']}")
    out.append(f"- measured: copy {h['copy_GBps']:.0f} GB/s ({h['copy_bytes'] / GiB:g} GiB device-to-device, "
               f"read + write, median); matmul {h['matmul']} {h['matmul_TFLOPs']:.1f} TFLOP/s (median)")
    if h.get("kernels"):
        out.append(f"- ahn_rt compiled kernels on {h['device']}: {h['kernels']}")
    out.append(f"- command: `{h['command']}`")
    if h.get("switches"):
        out.append("- switches: " + ", ".join(f"`{k}={v}`" for k, v in h["switches"].items()))
    if "model" in h:
        m = h["model"]
        out.append(f"- model: {m['source']}, {m['family']} {m['layers']} layers, hidden {m['hidden']}, "
                   f"{m['heads']}/{m['kv_heads']} heads × {m['head_dim']}, vocab {m['vocab']}, "
                   f"{m['params'] / 1e9:.3f} B params, {m['dtype']}, W={m['window']} S={m['sinks']}")
        bw = h["copy_GBps"] * 1e9
        out += ["", "Floor per token (bytes that must cross memory once / measured copy bandwidth):", "",
                "| context | ahn bytes | ahn floor ms | full-attention bytes | full floor ms |",
                "|---|---:|---:|---:|---:|"]
        for ctx, f in h["floor"].items():
            a, fu = f["ahn"]["total"], f["full"]["total"]
            out.append(f"| {ctx} | {a / 1e9:.3f} GB | {a / bw * 1e3:.3f} | {fu / 1e9:.3f} GB | {fu / bw * 1e3:.3f} |")

    tg = [x for x in res["rows"] if x["kind"] == "tg"]
    if tg:
        out += ["", "| test | implementation | ms/step | replay ms | tok/s | GB/s | % of floor | floor ms | "
                "peak GiB | note |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for x in tg:
            b = f" b{x['batch']}" if x.get("batch", 1) > 1 else ""
            out.append(f"| tg @ d{x['ctx']}{b} | {x['impl']} | {x['ms']:.3f} ± {x['spread_ms']:.3f} | "
                       f"{_f(x.get('replay_ms'), '{:.3f}')} | {x['tok_s']:.1f} | {x['GBps']:.0f} | "
                       f"{x['pct_floor']:.1f} | {x['floor_ms']:.3f} | {_f(x['peak_gib'])} | {x['note']} |")
    pp = [x for x in res["rows"] if x["kind"] == "pp"]
    if pp:
        out += ["", "| test | implementation | s | tok/s | TFLOP/s | % of matmul | peak GiB |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for x in pp:
            out.append(f"| pp{x['n']} | {x['impl']} | {x['s']:.3f} | {x['tok_s']:.0f} | {x['TFLOPs']:.2f} | "
                       f"{x['pct_matmul']:.1f} | {_f(x['peak_gib'])} |")
    gd = [x for x in res["rows"] if x["kind"] == "gdn"]
    if gd:
        out += ["", "| GDN step | shape | µs per token (all layers) | share of token | note |",
                "|---|---|---:|---:|---|"]
        for x in gd:
            share = f"{100 * x['share']:.1f}% of {x['share_of']}" if "share" in x else "—"
            out.append(f"| {x['impl']} | {x['layers']} × {x['shape']} | {x['us']:.1f} | {share} | {x['note']} |")
    if res["skipped"] or res["failed"]:
        out += ["", "Skipped / failed:", ""]
        out += [f"- skipped {s['what']}: {s['why']}" for s in res["skipped"]]
        out += [f"- FAILED {s['what']}: {s['error']}" for s in res["failed"]]
    out += ["", f"elapsed {res['elapsed_s']:.0f} s (budget {res['budget_s']:.0f} s)"]
    return "\n".join(out)
