#!/usr/bin/env python3
"""The engine, llama.cpp and transformers on one model and one load, in interleaved rounds.

Run through compare.sh (which checks the environments setup.sh made). Every round runs, one
process after the other:
  1. `moectl bench` in process, batch 1: --concurrency 1 --requests 3, 128-token prompts,
     32 new tokens;
  2. `moectl bench` in process, batch 8: --concurrency 8 --requests 8, same lengths;
  3. transformers (hf_bench.py: f32 weights, sdpa, batch 8 then batch 1, same lengths);
  4. per GGUF type: `llama-bench -p 128 -n 32 -t T` (batch-1 prefill and decode);
  5. per GGUF type: `llama-batched-bench -npp 128 -ntg 32 -npl 1,8,32,128 -t T`.
Figures are medians over the rounds; each process's peak RSS comes from wait4. Then one
exactness pass (not timed) compares logits with transformers' (see exactness.py).
Writes results.json and results.md in --out and prints the markdown.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import exactness  # noqa: E402
import layout  # noqa: E402


def run(cmd, log, merge=False, env=None):
    """Run cmd (with `env` added to the environment); return (stdout, peak RSS in GiB,
    seconds). stderr goes to the log (with merge=True it is read with stdout, then logged too).
    Fails loudly on a non-zero exit."""
    t0 = time.perf_counter()
    with open(log, "ab") as err:
        err.write(f"\n$ {shlex.join(map(str, cmd))}\n".encode())
        err.flush()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT if merge else err,
                                env={**os.environ, **(env or {})})
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        if merge:
            err.write(out)
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed with exit status {proc.returncode}; see {log}")
    return out.decode(errors="replace"), usage.ru_maxrss * 1024 / 2**30, time.perf_counter() - t0


def engine_bench(args, concurrency, requests, log):
    cmd = [args.moectl, "bench", "--model", args.model, "--concurrency", concurrency, "--requests", requests,
           "--prompt-len", args.prompt_len, "--gen-len", args.gen_len, "--no-machine"]
    out, rss, secs = run(cmd, log, env=engine_env(args))
    j = json.loads(out)
    if j["failed"]:
        sys.exit(f"moectl bench: {j['failed']} requests failed; see {log}")
    return {
        "prefill_tokens_per_s": j["prefill_tokens_per_s"],
        "prefill_busy_s": j["phases"]["prefill"]["busy_s"],
        "decode_tokens_per_s": j["decode_tokens_per_s"],
        "decode_step_ms": concurrency * 1e3 / j["decode_tokens_per_s"],
        "ttft_p50_ms": j["ttft_ms"]["p50"],
        "itl_p50_ms": j["itl_ms"]["p50"],
        "itl_p99_ms": j["itl_ms"]["p99"],
        "alone_prefill_ms": j["alone"]["prefill_ms"],
        "alone_decode_step_ms": j["alone"]["decode_step_ms"],
        "peak_rss_gib": rss,
        "process_s": secs,
    }


def engine_env(args):
    """The engine's thread pool sized like the baselines' (`--threads`)."""
    return {"RAYON_NUM_THREADS": str(args.threads)}


def engine_sweep(args, log):
    """Pure decode steps at each batch size of --npl: `moectl bench --batch-sizes`, whose step
    time counts only steps in which every request decodes (the load runs above share steps with
    prefill, so their decode rate is a lower bound)."""
    cmd = [args.moectl, "bench", "--model", args.model, "--batch-sizes", args.npl,
           "--prompt-len", args.prompt_len, "--gen-len", args.gen_len, "--no-machine"]
    out, rss, secs = run(cmd, log, env=engine_env(args))
    by_batch = {}
    for e in json.loads(out)["sweep"]:
        if e["failed"] or e["decode_tokens_per_s"] is None:
            sys.exit(f"moectl bench sweep: batch {e['batch_size']} has no clean decode steps; see {log}")
        by_batch[str(e["batch_size"])] = {"decode_tokens_per_s": e["decode_tokens_per_s"],
                                          "decode_step_ms": e["step_ms"]["p50"]}
    return {"by_batch": by_batch, "peak_rss_gib": rss, "process_s": secs}


def hf_bench(args, log):
    cmd = [args.python, HERE / "hf_bench.py", args.model, "--prompt-len", args.prompt_len, "--gen-len",
           args.gen_len, "--batch", 8, "--threads", args.threads]
    out, rss, secs = run(cmd, log)
    j = json.loads(out)
    j["peak_rss_gib_wait4"] = rss
    j["process_s"] = secs
    return j


def llama_bench(args, gguf, log):
    cmd = [args.llama_bin / "llama-bench", "-m", gguf, "-p", args.prompt_len, "-n", args.gen_len,
           "-t", args.threads, "-o", "json"]
    out, rss, secs = run(cmd, log)
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] == args.prompt_len and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == args.gen_len and r["n_prompt"] == 0)
    return {
        "prefill_tokens_per_s": pp["avg_ts"],
        "decode_step_ms": 1e3 / tg["avg_ts"],
        "peak_rss_gib": rss,
        "process_s": secs,
        "build": {k: pp.get(k) for k in ("build_commit", "build_number", "cpu_info", "n_threads", "type_k",
                                         "n_batch", "n_ubatch", "flash_attn")},
    }


def batched_bench(args, gguf, log):
    npl = [int(x) for x in args.npl.split(",")]
    ctx = max(npl) * (args.prompt_len + args.gen_len)
    cmd = [args.llama_bin / "llama-batched-bench", "-m", gguf, "-c", ctx, "-npp", args.prompt_len,
           "-ntg", args.gen_len, "-npl", args.npl, "-t", args.threads, "--output-format", "jsonl"]
    # Its JSON lines go through llama.cpp's logger: read stdout and stderr alike.
    out, rss, secs = run(cmd, log, merge=True)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{") and "speed_tg" in line]
    by_pl = {r["pl"]: r for r in rows}
    missing = [n for n in npl if n not in by_pl]
    if missing:
        sys.exit(f"llama-batched-bench printed no row for batch sizes {missing}; see {log}")
    return {
        "by_batch": {str(n): {"prompt_tokens_per_s": by_pl[n]["speed_pp"], "decode_tokens_per_s": by_pl[n]["speed_tg"],
                              "decode_step_ms": 1e3 * by_pl[n]["t_tg"] / args.gen_len} for n in npl},
        "peak_rss_gib": rss,
        "n_ctx": ctx,
        "process_s": secs,
    }


def median_tree(samples):
    """Median of every numeric leaf over a list of same-shaped dicts."""
    first = samples[0]
    if isinstance(first, dict):
        return {k: median_tree([s[k] for s in samples]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(samples)
    return first


def rows(res, llama_types, eng_dtype):
    """The issue's rows: (label, unit, better, engine, transformers, {type: llama.cpp})."""
    e1, e8, hf, lb, bb = res["engine_b1"], res["engine_b8"], res.get("transformers"), res.get("llama_bench", {}), res.get("batched_bench", {})
    es8 = res["engine_sweep"]["by_batch"]["8"]
    out = [
        ("batch-1 prefill, 128 tokens", "tok/s", "higher", e1["prefill_tokens_per_s"],
         hf and hf["one_prefill_tokens_per_s"], {t: lb[t]["prefill_tokens_per_s"] for t in lb}),
        ("batch-1 decode step", "ms", "lower", e1["decode_step_ms"],
         hf and hf["one_decode_step_ms"], {t: lb[t]["decode_step_ms"] for t in lb}),
        ("batch-8 prompt processing (8 x 128)", "tok/s", "higher", e8["prefill_tokens_per_s"],
         hf and hf["batch_prefill_tokens_per_s"], {t: bb[t]["by_batch"]["8"]["prompt_tokens_per_s"] for t in bb}),
        ("batch-8 decode (engine: steps where all 8 decode)", "tok/s", "higher", es8["decode_tokens_per_s"],
         hf and hf["batch_decode_tokens_per_s"], {t: bb[t]["by_batch"]["8"]["decode_tokens_per_s"] for t in bb}),
        ("batch-8 decode step (engine: p50 of those steps)", "ms", "lower", es8["decode_step_ms"],
         hf and hf["batch_decode_step_ms"], {t: bb[t]["by_batch"]["8"]["decode_step_ms"] for t in bb}),
        ("peak resident memory (batch-1 run; transformers: its one process)", "GiB", "lower", e1["peak_rss_gib"],
         hf and hf["peak_rss_gib_wait4"], {t: lb[t]["peak_rss_gib"] for t in lb}),
        ("peak resident memory (batch-8 run; llama.cpp: batched-bench)", "GiB", "lower", e8["peak_rss_gib"],
         hf and hf["peak_rss_gib_wait4"], {t: bb[t]["peak_rss_gib"] for t in bb}),
    ]
    return out


def fmt(x):
    if x is None:
        return "—"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def markdown(res, args, llama_types, eng_dtype):
    lines = [f"Model `{args.model}` (engine weights {eng_dtype}; transformers always f32), "
             f"{args.rounds} interleaved rounds, medians; {args.threads} threads. "
             f"Ratio = engine / baseline: above 1 is the engine ahead for rates, behind for times and memory.", ""]
    head = ["row", "unit", f"engine {eng_dtype}", "transformers f32"] + [f"llama.cpp {t}" for t in llama_types]
    head += ["engine / transformers"] + [f"engine / llama.cpp {t}" for t in llama_types]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, unit, better, e, hf, ll in rows(res, llama_types, eng_dtype):
        cells = [label, f"{unit} ({better} is better)", fmt(e), fmt(hf)] + [fmt(ll.get(t)) for t in llama_types]
        cells += [f"{e / hf:.2f}" if hf else "—"] + [f"{e / ll[t]:.2f}" if t in ll else "—" for t in llama_types]
        lines.append("| " + " | ".join(cells) + " |")
    es = res["engine_sweep"]["by_batch"]
    lines += ["", "Engine decode by batch size (moectl bench --batch-sizes: p50 step while all decode):", "",
              "| batch | engine |", "| --- | --- |"]
    lines += [f"| {n} | {es[n]['decode_tokens_per_s']:,.0f} tok/s; {es[n]['decode_step_ms']:.1f} ms |" for n in es]
    bb = res.get("batched_bench", {})
    if bb:
        lines += ["", "llama.cpp decode by batch size (llama-batched-bench, tok/s; step ms):", "",
                  "| batch | " + " | ".join(f"llama.cpp {t}" for t in bb) + " |", "| --- |" + " --- |" * len(bb)]
        for n in args.npl.split(","):
            lines.append(f"| {n} | " + " | ".join(
                f"{bb[t]['by_batch'][n]['decode_tokens_per_s']:,.0f} tok/s; {bb[t]['by_batch'][n]['decode_step_ms']:.1f} ms"
                for t in bb) + " |")
    ex = res.get("exactness")
    if ex:
        lines += ["", "Exactness against transformers (f32 compute on the same weights):", ""]
        for k, v in ex.items():
            lines.append(f"- {k}: {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="model directory written by `moectl gen-model` (with its tokenizer)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--moectl", type=Path, required=True)
    ap.add_argument("--baseline-dir", type=Path, default=layout.baseline_dir())
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--llama-types", default=None, help="GGUF types, comma-separated (default: the model's dtype,q8_0)")
    ap.add_argument("--npl", default="1,8,32,128", help="llama-batched-bench batch sizes (must include 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--no-exactness", action="store_true")
    args = ap.parse_args()
    if args.rounds < 1:
        sys.exit("--rounds must be at least 1")
    if "8" not in args.npl.split(","):
        sys.exit("--npl must include 8 (the batch-8 rows)")
    paths = layout.Paths(args.baseline_dir)
    args.python, args.llama_bin = paths.python, paths.llama_bin
    eng_dtype = layout.model_dtype(args.model)
    llama_types = [] if args.no_llama else (args.llama_types or f"{eng_dtype},q8_0").split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "commands.log"

    ggufs = {t: layout.ensure_gguf(paths, args.model, t, log) for t in llama_types}
    load_before = layout.uptime()
    samples = []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        res = {"engine_b1": engine_bench(args, 1, 3, log), "engine_b8": engine_bench(args, 8, 8, log),
               "engine_sweep": engine_sweep(args, log)}
        if not args.no_transformers:
            res["transformers"] = hf_bench(args, log)
        if llama_types:
            res["llama_bench"] = {t: llama_bench(args, g, log) for t, g in ggufs.items()}
            res["batched_bench"] = {t: batched_bench(args, g, log) for t, g in ggufs.items()}
        samples.append(res)
        print(f"round {r + 1}/{args.rounds}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    load_after = layout.uptime()
    result = median_tree(samples)
    if not args.no_exactness:
        result["exactness"] = exactness.measure(paths, args.model, args.moectl, ggufs, args.out / "exactness", log)
    result["rounds"] = samples
    result["setup"] = {"model": str(args.model), "engine_dtype": eng_dtype, "llama_types": llama_types,
                       "ggufs": {t: str(g) for t, g in ggufs.items()}, "threads": args.threads,
                       "prompt_len": args.prompt_len, "gen_len": args.gen_len, "npl": args.npl,
                       "uptime_before": load_before,
                       "uptime_after_rounds": load_after, "moectl": str(args.moectl)}
    md = markdown(result, args, llama_types, eng_dtype)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    (args.out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
