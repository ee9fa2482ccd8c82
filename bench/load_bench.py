"""Load and overload benchmark of the gateway, driven by locust (bench/locustfile.py) over loopback.

    python bench/load_bench.py            # the demo family, ~13 min on 2 cores; writes bench/results/load_bench.*
    python bench/load_bench.py --tiny     # a tiny random family: checks the script works

1. Starts ``python -m server.run`` with a deploy file written here (every non-dominated size as a
   tier on the in-process engine, ``--max-batch`` / ``--max-queue``).
2. Capacity: closed loop on the largest size alone (more users than batch slots, so the batch stays
   full); completed requests per second over the last 3/4 of the run.
3. Three rounds of open-loop arrivals at 1x, 2x and 4x that rate with the mixed workload (smallest,
   middle and largest size, half streamed): locust spawns ``rate x duration`` users at ``rate`` per
   second and each sends one request, so arrivals do not wait for answers. The server's resident
   memory is read after each round.
4. Overload: every request carries ``max_latency_ms`` (from the largest size's end-to-end latency at
   1x, so that it cannot meet it at 2x) and no size; 2x the rate for ``--overload-duration`` s. How
   many the router moved to a smaller size, how many it shed, and the p95 end-to-end latency against
   the budget. Run once per ``--quantiles`` value (``routing.latency_quantile``: the first on the
   server above, each other on a fresh server with the same budget), each after 2x unbudgeted
   arrivals that fill the router's correction window, so the settings compare in one run.

Nothing lost: every request locust sent has an outcome (``ok`` / ``shed`` 429 / ``failed``), the server
counted the same 200s and 429s, every 200 carries usage equal to the tokens streamed, every error
is OpenAI-shaped. Percentiles are exact, from the per-request records.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests: the test suite's launcher, tiny families

import httpx
import numpy as np
import psutil
import yaml

from tests.server.live import launch, stop, wait_ready

REPO = Path(__file__).resolve().parents[1]
ENDPOINT = "/v1/chat/completions"
MULTIPLIERS = (1, 2, 4)


# --- the server -----------------------------------------------------------------------------------


def family_section(tiny: bool, workdir: Path) -> tuple[dict[str, Any] | None, Path]:
    """The deploy file's ``family`` and the tokenizer directory (for the prompt-token check)."""
    if not tiny:
        from boomerang_core.demo import demo_dir, ensure_demo

        ensure_demo()
        return None, demo_dir() / "teacher"
    from boomerang_core.family import Family
    from boomerang_core.store import LayerStore
    from tests.tiny import write_pair

    teacher, student = write_pair(workdir / "tiny", "llama", layers=8)
    Family.from_store("tiny", LayerStore.load(teacher, student)).save(student)
    return {"name": "tiny", "teacher": str(teacher), "student": str(student)}, teacher


class Gateway:
    """``python -m server.run`` on a deploy file written here, with a fresh API key."""

    def __init__(self, config: dict[str, Any], workdir: Path, threads: int) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "deploy.yaml"
        path.write_text(yaml.safe_dump(config))
        self.key = secrets.token_hex(16)
        self.server = launch(path, workdir / "server.log", threads=threads, env={"BOOMERANG_API_KEY": self.key})
        self.url, self.proc = self.server.url, self.server.proc

    def wait_ready(self, timeout: float = 600) -> None:
        wait_ready(self.server, timeout)

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def requests_by_status(self) -> Counter[str]:
        """boomerang_requests_total of the chat endpoint, summed over sizes, by HTTP status."""
        return self.server.requests_by_status(ENDPOINT)

    def stop(self) -> None:
        stop(self.server, timeout=30)


# --- one locust run ---------------------------------------------------------------------------------


def locust(
    gateway: Gateway, workdir: Path, label: str, *, users: int, spawn_rate: float, seconds: float, env: dict[str, str]
) -> list[dict[str, Any]]:
    """Run locust headless with the workload; return its records (``sent`` and ``done`` lines)."""
    records = workdir / f"{label}.jsonl"
    records.unlink(missing_ok=True)
    before = gateway.requests_by_status()
    command = [
        sys.executable, "-m", "locust", "-f", str(REPO / "bench" / "locustfile.py"), "--headless",
        "--host", gateway.url, "-u", str(users), "-r", f"{spawn_rate:.4f}", "-t", f"{max(1, round(seconds))}s",
        "--stop-timeout", "180", "--only-summary", "--exit-code-on-error", "0",
        "--csv", str(workdir / label), "--loglevel", "WARNING",
    ]  # fmt: skip
    run_env = {**os.environ, **env, "LOAD_RECORDS": str(records), "LOAD_API_KEY": gateway.key, "LOAD_LABEL": label}
    done = subprocess.run(command, env=run_env, capture_output=True, text=True, timeout=seconds + 400)
    if done.returncode != 0:
        raise RuntimeError(f"locust failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    after = gateway.requests_by_status()
    server = {k: after[k] - before[k] for k in set(after) | set(before) if after[k] != before[k]}
    for row in rows:
        row.setdefault("label", label)
    rows.append({"kind": "server", "label": label, "by_status": server})
    return rows


def wait_idle(gateway: Gateway, timeout: float = 120) -> None:
    """Until the engine has nothing running or waiting (what locust left behind is finished)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.server.live_requests() == 0:
            return
        time.sleep(0.5)


# --- statistics -------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def done_of(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["kind"] == "done"]


def size_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["outcome"] == "ok"]
    ttft = [r["ttft_s"] * 1e3 for r in ok if r.get("ttft_s") is not None]
    itl = [g * 1e3 for r in ok for g in r.get("itl_s", [])]
    e2e = [r["e2e_s"] * 1e3 for r in ok]
    out: dict[str, Any] = {
        "sent": len(rows),
        "completed": len(ok),
        "failed": sum(r["outcome"] in ("failed", "killed") for r in rows),
        "shed_429": sum(r["outcome"] == "shed" for r in rows),
    }
    for name, values in (("ttft_ms", ttft), ("itl_ms", itl), ("e2e_ms", e2e)):
        out[name] = {f"p{q}": pct(values, q) for q in (50, 95, 99)}
    return out


def run_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    done = done_of(rows)
    starts = sorted(r["start"] for r in done)
    span = starts[-1] - starts[0] if len(starts) > 1 else 0.0
    by_size: dict[str, list[dict[str, Any]]] = {}
    for r in done:
        by_size.setdefault(r["size"], []).append(r)
    return {
        "offered_per_s": (len(starts) - 1) / span if span else None,
        "sizes": {size: size_stats(rs) for size, rs in by_size.items()},
        "all": size_stats(done),
        "served": dict(Counter(r.get("served") for r in done if r["outcome"] == "ok")),
        "checks": lost_checks(rows),
    }


def together(mult: int, rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs at one multiplier as one; the offered rate is their mean (their spans do not join)."""
    offered = [r["offered_per_s"] for r in runs if r["multiplier"] == mult and r["offered_per_s"]]
    return {**run_stats(rows), "label": f"{mult}x", "multiplier": mult, "offered_per_s": np.mean(offered)}


def lost_checks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Nothing lost: every sent request has an outcome; the server saw the same; usage is right."""
    sent = {r["id"] for r in rows if r["kind"] == "sent"}
    done = done_of(rows)
    ok = [r for r in done if r["outcome"] == "ok"]
    errors = [r for r in done if r["outcome"] in ("shed", "failed") and "status" in r]
    server: Counter[str] = Counter()
    for r in rows:
        if r["kind"] == "server":
            server.update(r["by_status"])
    return {
        "sent": len(sent),
        "without_outcome": len(sent - {r["id"] for r in done}),
        "killed": sum(r["outcome"] == "killed" for r in done),
        "accepted": sum(r.get("status") == 200 for r in done),
        "completed": len(ok),
        "errored_after_accept": sum(r.get("status") == 200 and r["outcome"] != "ok" for r in done),
        "server_200": server.get("200", 0),
        "server_429": server.get("429", 0),
        "client_429": sum(r.get("status") == 429 for r in done),
        "server_other": {k: v for k, v in server.items() if k not in ("200", "429")},
        "usage_mismatches": sum(not r.get("usage_ok") for r in ok),
        "prompt_token_mismatches": sum(r.get("prompt_ok") is False for r in ok),
        "streams_without_done": sum(r["stream"] and not r.get("done") for r in ok),
        "errors_not_openai_shaped": sum(not r.get("error_shaped") for r in errors),
        "429_without_retry_after": sum(
            r["outcome"] == "shed" and not str(r.get("retry_after")).isdigit() for r in done
        ),
    }


def checks_pass(c: dict[str, Any]) -> bool:
    return (
        c["without_outcome"] == c["killed"] == c["errored_after_accept"] == 0
        and c["accepted"] == c["completed"] == c["server_200"]
        and c["client_429"] == c["server_429"]
        and not c["server_other"]
        and c["usage_mismatches"] == c["prompt_token_mismatches"] == c["streams_without_done"] == 0
        and c["errors_not_openai_shaped"] == c["429_without_retry_after"] == 0
    )


# --- the benchmark --------------------------------------------------------------------------------


def capacity(gateway: Gateway, workdir: Path, largest: str, args: argparse.Namespace) -> tuple[float, list[Any]]:
    """Requests/s the largest size completes with its batch kept full (closed loop)."""
    users = args.max_batch + args.max_batch // 2
    env = {**base_env(args), "LOAD_SIZES": largest}
    rows = locust(gateway, workdir, "capacity", users=users, spawn_rate=users, seconds=args.duration, env=env)
    t0 = min(r["t"] for r in rows if r["kind"] == "sent")
    warm = args.duration / 4
    ends = [r["end"] for r in done_of(rows) if r["outcome"] == "ok" and t0 + warm <= r["end"] <= t0 + args.duration]
    return len(ends) / (args.duration - warm), rows


def base_env(args: argparse.Namespace) -> dict[str, str]:
    return {"LOAD_MAX_TOKENS": str(args.max_tokens), "LOAD_PROMPT_TOKENS": args.prompt_tokens, "LOAD_PACE_S": "0"}


def open_loop(
    gateway: Gateway,
    workdir: Path,
    label: str,
    rate: float,
    args: argparse.Namespace,
    env: dict[str, str],
    duration: float | None = None,
) -> list[dict[str, Any]]:
    """``rate`` arrivals per second for ``duration`` s (default ``args.duration``): one request per
    user, users spawned at ``rate``."""
    duration = duration or args.duration
    users = max(1, round(rate * duration))
    env = {**base_env(args), **env, "LOAD_PACE_S": str(duration * 10)}
    return locust(gateway, workdir, label, users=users, spawn_rate=rate, seconds=duration, env=env)


def pick_sizes(gateway: Gateway) -> list[str]:
    cards = httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {gateway.key}"}).json()["data"]
    served = sorted((c for c in cards if c["size"] and c["loaded"] and not c["dominated"]), key=lambda c: c["params"])
    return list(dict.fromkeys(c["size"] for c in (served[0], served[len(served) // 2], served[-1])))


def deploy_config(family: dict[str, Any] | None, args: argparse.Namespace, quantile: float) -> dict[str, Any]:
    return {
        "family": family,
        "engines": {"local": {"max_batch_size": args.max_batch, "max_queue": args.max_queue}},
        # the router takes default_max_tokens as the length of the requests it queues behind
        "limits": {"max_tokens": 1024, "default_max_tokens": args.max_tokens},
        # requests that name a size never degrade; this only decides what the overload run's budgeted
        # requests get when no size is predicted to meet their budget: 429 (false) or the smallest, late
        "routing": {"allow_degrade": args.degrade, "latency_quantile": quantile},
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    family, tokenizer = family_section(args.tiny, workdir)
    locustfile = [sys.executable, str(REPO / "bench" / "locustfile.py"), str(tokenizer)]
    args.prompt_tokens = subprocess.run(locustfile, check=True, capture_output=True, text=True).stdout.strip()
    gateway = Gateway(deploy_config(family, args, args.quantiles[0]), workdir, args.threads)
    all_rows: list[dict[str, Any]] = []
    try:
        gateway.wait_ready()
        sizes = pick_sizes(gateway)
        largest = sizes[-1]
        print(f"sizes {sizes}; server pid {gateway.proc.pid}, {args.threads} threads", flush=True)
        rss = {"before": gateway.rss_bytes()}
        cap, rows = capacity(gateway, workdir, largest, args)
        all_rows += rows
        print(f"capacity of {largest}: {cap:.2f} requests/s ({args.max_tokens} new tokens each)", flush=True)
        runs: list[dict[str, Any]] = []
        by_mult: dict[int, list[dict[str, Any]]] = {m: [] for m in MULTIPLIERS}
        for round_ in range(1, args.rounds + 1):
            for mult in MULTIPLIERS:
                label = f"round{round_}-{mult}x"
                wait_idle(gateway)
                rows = open_loop(gateway, workdir, label, mult * cap, args, {"LOAD_SIZES": ",".join(sizes)})
                all_rows += rows
                by_mult[mult] += rows
                stats = {"label": label, "round": round_, "multiplier": mult, "target_per_s": mult * cap,
                         **run_stats(rows)}  # fmt: skip
                runs.append(stats)
                print_run(stats, sizes)
            wait_idle(gateway)
            rss[f"round{round_}"] = gateway.rss_bytes()
            print(f"RSS after round {round_}: {rss[f'round{round_}'] / 2**20:.1f} MiB", flush=True)
        at_1x = [r for rr in runs if rr["multiplier"] == 1 for r in [rr["sizes"][largest]]]
        e2e_1x = float(np.median([r["e2e_ms"]["p50"] for r in at_1x if r["e2e_ms"]["p50"] is not None]))
        budget = args.budget_factor * e2e_1x
        overloads = []
        for i, quantile in enumerate(args.quantiles):
            if i:  # a fresh server for each other setting
                gateway.stop()
                gateway = Gateway(deploy_config(family, args, quantile), workdir / f"q{i}", args.threads)
                gateway.wait_ready()
            rows, overload = overload_run(gateway, workdir, cap, budget, args, sizes)
            all_rows += rows
            overload.update(latency_quantile=quantile, largest_e2e_p50_ms_at_1x=e2e_1x,
                            largest_e2e_p50_ms_at_2x_unbudgeted=[rr["sizes"][largest]["e2e_ms"]["p50"]
                                                                 for rr in runs if rr["multiplier"] == 2])  # fmt: skip
            overloads.append(overload)
            print_overload(overload)
    finally:
        gateway.stop()
    return {
        "family": "tiny" if args.tiny else "demo (smollm2-135m)",
        "sizes": sizes,
        "largest": largest,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "capacity_per_s": cap,
        "runs": runs,
        "rounds_together": [together(m, rows, runs) for m, rows in by_mult.items()],
        "rss_bytes": rss,
        "rss_round_last_over_first": rss[f"round{args.rounds}"] / rss["round1"],
        "overload": overloads[0],
        "overloads": overloads,
        "checks": lost_checks(all_rows),
        "checks_pass": checks_pass(lost_checks(all_rows)),
    }


def overload_run(
    gateway: Gateway, workdir: Path, cap: float, budget: float, args: argparse.Namespace, sizes: list[str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """2x unbudgeted arrivals (they fill the router's correction window), then 2x budgeted ones."""
    wait_idle(gateway)
    rows = open_loop(gateway, workdir, "warmup-2x", 2 * cap, args, {"LOAD_SIZES": ",".join(sizes)})
    wait_idle(gateway)
    env = {"LOAD_SIZES": "auto", "LOAD_BUDGET_MS": f"{budget:.0f}"}
    budgeted = open_loop(gateway, workdir, "overload-2x", 2 * cap, args, env, args.overload_duration)
    return rows + budgeted, overload_stats(budgeted, budget, sizes[-1])


def overload_stats(rows: list[dict[str, Any]], budget: float, largest: str) -> dict[str, Any]:
    done = done_of(rows)
    ok = [r for r in done if r["outcome"] == "ok"]
    e2e = [r["e2e_s"] * 1e3 for r in ok]
    ratios = [r["e2e_s"] * 1e3 / r["predicted_ms"] for r in ok if r.get("predicted_ms")]
    return {
        "budget_ms": budget,
        "requests": len(done),
        "p95_e2e_ms_served": pct(e2e, 95),
        "p50_e2e_ms_served": pct(e2e, 50),
        "within_budget": sum(v <= budget for v in e2e) / len(e2e) if e2e else None,
        "predicted_ms_p50": pct([r["predicted_ms"] for r in ok if r.get("predicted_ms") is not None], 50),
        "actual_over_predicted_p50": pct(ratios, 50),
        "actual_over_predicted_p95": pct(ratios, 95),
        "moved": sum(r.get("served") != largest for r in ok) / len(done),
        "at_largest": sum(r.get("served") == largest for r in ok) / len(done),
        "shed": sum(r["outcome"] == "shed" for r in done) / len(done),
        "failed": sum(r["outcome"] in ("failed", "killed") for r in done) / len(done),
        "served": dict(Counter(r.get("served") for r in ok)),
        "reasons": dict(Counter(r.get("reason") for r in ok)),
        "shed_codes": dict(Counter(error_code(r) for r in done if r["outcome"] == "shed")),
        # per request, by arrival: seconds since the first, outcome, size served, predicted and actual ms
        "requests_log": [request_entry(r, done[0]["start"]) for r in sorted(done, key=lambda r: r["start"])],
        "stats": run_stats(rows),
    }


def request_entry(r: dict[str, Any], t0: float) -> list[Any]:
    e2e_ms = round(r["e2e_s"] * 1e3) if r["outcome"] == "ok" and r.get("e2e_s") is not None else None
    return [round(r["start"] - t0, 3), r["outcome"], r.get("served"), r.get("predicted_ms"), e2e_ms]


def error_code(record: dict[str, Any]) -> str | None:
    error = record.get("error")
    return error["error"].get("code") if isinstance(error, dict) and isinstance(error.get("error"), dict) else None


# --- printing ---------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def run_table(runs: list[dict[str, Any]], sizes: list[str]) -> list[str]:
    head = ("| run | offered/s | size | completed | failed | shed 429 | TTFT p50/p95/p99 ms | ITL p50/p95/p99 ms "
            "| e2e p50/p95 ms |")  # fmt: skip
    lines = [head, "|" + "---|" * 9]
    for r in runs:
        for size in sizes:
            s = r["sizes"].get(size)
            if s is None:
                continue
            t, i, e = s["ttft_ms"], s["itl_ms"], s["e2e_ms"]
            lines.append(
                f"| {r['label']} | {r['offered_per_s'] or 0:.2f} | {size} | {s['completed']} | {s['failed']} | "
                f"{s['shed_429']} | {_ms(t['p50'])}/{_ms(t['p95'])}/{_ms(t['p99'])} | "
                f"{_ms(i['p50'])}/{_ms(i['p95'])}/{_ms(i['p99'])} | {_ms(e['p50'])}/{_ms(e['p95'])} |"
            )
    return lines


def print_run(stats: dict[str, Any], sizes: list[str]) -> None:
    print("\n".join(run_table([stats], sizes)[2:]), flush=True)
    c = stats["checks"]
    print(f"  checks: {'pass' if checks_pass(c) else 'FAIL'} {json.dumps(c)}", flush=True)


def print_overload(o: dict[str, Any]) -> None:
    print(
        f"overload 2x, latency_quantile {o['latency_quantile']:g}, max_latency_ms={o['budget_ms']:.0f}: "
        f"p95 e2e {_ms(o['p95_e2e_ms_served'])} ms, actual/predicted p95 {o['actual_over_predicted_p95'] or 0:.2f}, "
        f"moved {o['moved']:.1%}, at largest {o['at_largest']:.1%}, shed {o['shed']:.1%}, failed {o['failed']:.1%}; "
        f"served {o['served']}",
        flush=True,
    )


def markdown(result: dict[str, Any], command: str) -> str:
    rss = result["rss_bytes"]
    o = result["overload"]
    c = result["checks"]
    s = result["settings"]
    met = (o["p95_e2e_ms_served"] or 0) <= o["budget_ms"]
    lines = [
        f"# Load and overload benchmark, {result['family']}, {time.strftime('%Y-%m-%d')}",
        "",
        f"`{command}`: locust {s['locust_version']} drives the gateway over loopback (`bench/locustfile.py`).",
        f"Machine: {result['machine']['cpus']} CPU cores, shared; load average at the end "
        f"{result['machine']['load_average'][0]:.1f}; server torch threads {s['threads']}. Engine: "
        f"max_batch_size {s['max_batch']}, max_queue {s['max_queue']}. Each request: a short chat prompt, "
        f"{s['max_tokens']} new tokens (ignore_eos), logprobs on; half streamed with include_usage. "
        f"`limits.default_max_tokens` is {s['max_tokens']} too: the router takes it as the length of the "
        "requests a new one queues behind.",
        "",
        f"Capacity of the largest size ({result['largest']}), closed loop with {s['max_batch'] * 3 // 2} users: "
        f"**{result['capacity_per_s']:.2f} requests/s**. Open-loop runs of {s['duration']:.0f} s at 1x, 2x, 4x that "
        f"rate, mixing sizes {', '.join(result['sizes'])} evenly. Latencies in ms, exact percentiles over the "
        "requests of each run; TTFT and ITL from the streamed requests.",
        "",
        *run_table(result["runs"], result["sizes"]),
        "",
        f"The {s['rounds']} rounds together (offered/s: the mean of the rounds):",
        "",
        *run_table(result["rounds_together"], result["sizes"]),
        "",
        "## Nothing lost (all runs together)",
        "",
        f"- sent {c['sent']}; without an outcome {c['without_outcome']}; killed by the generator {c['killed']}",
        f"- accepted (200) {c['accepted']} = completed {c['completed']} + errored after acceptance "
        f"{c['errored_after_accept']}; the server counted {c['server_200']} 200s",
        f"- other statuses counted by the server: {c['server_other'] or 'none'}",
        f"- shed with 429: {c['client_429']} (server counted {c['server_429']}); without Retry-After "
        f"{c['429_without_retry_after']}; errors not OpenAI-shaped {c['errors_not_openai_shaped']}",
        f"- usage.completion_tokens != tokens streamed: {c['usage_mismatches']}; prompt_tokens != the chat "
        f"template's count: {c['prompt_token_mismatches']}; streams without [DONE]: {c['streams_without_done']}",
        f"- **{'pass' if result['checks_pass'] else 'FAIL'}**",
        "",
        "## Resident memory of the server",
        "",
        "| after | RSS MiB |",
        "|---|---|",
        *(f"| {k} | {v / 2**20:.1f} |" for k, v in rss.items()),
        "",
        f"Round {s['rounds']} / round 1: **{result['rss_round_last_over_first']:.4f}**.",
        "",
        "## Overload: latency budgets at 2x",
        "",
        f"Every request sends `max_latency_ms: {o['budget_ms']:.0f}` ({s['budget_factor']} x the largest size's "
        f"median end-to-end latency at 1x, {o['largest_e2e_p50_ms_at_1x']:.0f} ms; at 2x without budgets its "
        f"median was {', '.join(_ms(v) for v in o['largest_e2e_p50_ms_at_2x_unbudgeted'])} ms) and no size, at "
        f"2x capacity for {s['overload_duration']:.0f} s. "
        + (
            "`routing.allow_degrade: true`: a request that no size is predicted to meet is served by the smallest."
            if s["degrade"]
            else "`routing.allow_degrade: false`: a request that no size is predicted to meet gets 429 "
            "`budget_unmeetable` at once, so that the ones served keep their budget."
        ),
        "Each row is one `routing.latency_quantile`: the router scales its predictions by that quantile of "
        "actual / predicted latency over the engine's last 100 requests. The first row is the served default; "
        "the others ran on a fresh server with the same budget, each after 2x unbudgeted arrivals.",
        "",
        "| latency_quantile | offered/s | requests | served p50 / p95 ms | within budget | moved | at largest "
        "| shed 429 | failed | actual/predicted p50 / p95 |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {v['latency_quantile']:g} | {v['stats']['offered_per_s'] or 0:.2f} | {v['requests']} | "
            f"{_ms(v['p50_e2e_ms_served'])} / **{_ms(v['p95_e2e_ms_served'])}** | {v['within_budget'] or 0:.1%} | "
            f"**{v['moved']:.1%}** | {v['at_largest']:.1%} | **{v['shed']:.1%}** | {v['failed']:.1%} | "
            f"{v.get('actual_over_predicted_p50') or 0:.2f} / {v.get('actual_over_predicted_p95') or 0:.2f} |"
            for v in result["overloads"]
        ),
        "",
        f"- p95 end-to-end of the served requests (default setting): **{_ms(o['p95_e2e_ms_served'])} ms** against "
        f"the budget {o['budget_ms']:.0f} ms: {'met' if met else 'NOT met'}",
        f"- served by size: {o['served']}; route reasons: {o['reasons']}; 429 codes: {o['shed_codes'] or 'none'}",
        "- predicted latency: header `x-boomerang-predicted-ms` of each served request",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny random family: checks the script, fast")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads (2 stall on a busy 2-core box)")
    ap.add_argument("--budget-factor", type=float, default=1.25, help="budget = this x largest e2e p50 at 1x")
    ap.add_argument("--overload-duration", type=float, default=60.0, help="seconds of budgeted arrivals per setting")
    ap.add_argument(
        "--quantiles",
        type=lambda text: [float(q) for q in text.split(",")],
        default=[0.98, 0.95, 0.5],
        help="routing.latency_quantile of each overload run, comma-separated; the first is the reported one",
    )
    ap.add_argument(
        "--degrade",
        action="store_true",
        help="routing.allow_degrade: true (serve budgeted requests no size meets by the smallest, late) "
        "instead of refusing them with 429",
    )
    ap.add_argument("--out", type=Path, help="write OUT.md and OUT.json (default for the demo family: "
                    "bench/results/load_bench)")  # fmt: skip
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the server and locust
    import locust as locust_package

    args.locust_version = locust_package.__version__
    out = args.out or (None if args.tiny else REPO / "bench" / "results" / "load_bench")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="load-bench-") as tmp:
        result = run(args, Path(tmp))
    result["minutes"] = (time.monotonic() - started) / 60
    print(f"checks {'pass' if result['checks_pass'] else 'FAIL'}: {json.dumps(result['checks'])}")
    print(f"RSS round {args.rounds} / round 1: {result['rss_round_last_over_first']:.4f}; {result['minutes']:.1f} min")
    if out is not None:
        flags = [f for f in sys.argv[1:] if not f.startswith("--out")]
        if "--out" in sys.argv:  # the output path is this machine's business
            flags.remove(sys.argv[sys.argv.index("--out") + 1])
        command = " ".join(["python bench/load_bench.py", *flags])
        out.with_suffix(".md").write_text(markdown(result, command))
        out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {out.with_suffix('.md')} and .json")
    if not result["checks_pass"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
