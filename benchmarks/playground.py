#!/usr/bin/env python
"""The playground's two answers come from one batch: their combined decode rate against a single stream's.

`lorakit serve` (default flags, the embedded model) with two adapters, alpha and beta (r=8, every linear
layer). For --rounds rounds, alternating:

    single    one streaming completion on alpha with the official openai client: tokens / wall time
    pair      alpha and beta streamed at once (two client threads, as the page sends them): both answers'
              tokens / the wall time until the later one ends
    page      the playground in headless Chromium (Playwright; skipped without them): alpha against beta,
              typed once and run with the keyboard; 2 x max tokens / the time from the keystroke until
              both answers are in and the vote buttons enable, by the page's clock

Every request asks for --max-tokens tokens with ignore_eos, temperature 0 and one seed, so the answers are
equally long; medians are reported, with the ratios pair ÷ single and page ÷ single (one batch: near 2;
one after the other: 1). With --cpu, also the CPU seconds each process spent in each path (median over the
rounds): the engine process, the server's own, this script's clients and Chromium's processes, which all
share the machine's cores.

    python benchmarks/playground.py [--max-tokens 256] [--rounds 5] [--cpu] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import openai
import psutil
import torch

import lorakit
from lorakit.models import load_model

PROMPT = "To be, or not to be, that is the question:"


def save_adapter(folder: Path, seed: int) -> Path:
    model = load_model(None)
    torch.manual_seed(seed)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    lorakit.save_adapter(model, folder)
    return folder


def start_server(folder: Path, flags: list[str]) -> tuple[subprocess.Popen, str]:
    alpha, beta = save_adapter(folder / "alpha", 0), save_adapter(folder / "beta", 1)
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "serve", "--port", "0", "--adapter",
                             f"alpha={alpha}", "--adapter", f"beta={beta}", "--feedback-db",
                             str(folder / "feedback.sqlite"), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            line = proc.stdout.readline()
            if "http://" in line:
                return proc, line.split(" at ")[1].strip().removesuffix("/v1")
    proc.kill()
    raise SystemExit("lorakit serve did not start")


def stream(client: openai.OpenAI, model: str, max_tokens: int) -> int:
    tokens = 0
    for chunk in client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0, seed=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens


def single(client: openai.OpenAI, max_tokens: int) -> float:
    start = time.perf_counter()
    tokens = stream(client, "alpha", max_tokens)
    return tokens / (time.perf_counter() - start)


def pair(client: openai.OpenAI, max_tokens: int) -> float:
    counts = {}
    threads = [threading.Thread(target=lambda m=m: counts.__setitem__(m, stream(client, m, max_tokens)))
               for m in ("alpha", "beta")]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts.values()) / (time.perf_counter() - start)


# In the page: the time of the next keystroke, and of the moment the vote buttons enable after it.
WATCH_RUN = """() => {
  window.runStarted = window.runEnded = null;
  document.addEventListener("keydown", () => { window.runStarted = performance.now(); }, {capture: true, once: true});
  const vote = document.querySelector("[data-testid=vote-a]");
  new MutationObserver((changes, observer) => {
    if (window.runStarted !== null && !vote.disabled) { window.runEnded = performance.now(); observer.disconnect(); }
  }).observe(vote, {attributes: true, attributeFilter: ["disabled"]});
}"""


def cpu_seconds(server: int) -> dict[str, float]:
    """CPU seconds so far of the server, its engine process, this script, and Chromium's processes by type."""
    seconds: dict[str, float] = {}

    def add(name: str, process: psutil.Process) -> None:
        try:
            times = process.cpu_times()
        except psutil.Error:  # gone meanwhile
            return
        seconds[name] = seconds.get(name, 0.0) + times.user + times.system

    def arguments(process: psutil.Process) -> list[str]:
        try:
            return process.cmdline()
        except psutil.Error:
            return []

    root = psutil.Process(server)
    add("server", root)
    for child in root.children(recursive=True):
        add("engine" if "multiprocessing" in " ".join(arguments(child)) else "server", child)
    me = psutil.Process()
    add("clients", me)
    for child in me.children(recursive=True):
        command = arguments(child)
        if command and "chrom" in command[0]:
            kind = next((a.split("=", 1)[1] for a in command if a.startswith("--type=")), "browser")
            add(f"chromium {kind}", child)
    return seconds


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


class Page:
    """The playground in headless Chromium, alpha against beta."""

    def __init__(self, url: str, max_tokens: int):
        from playwright.sync_api import expect, sync_playwright

        self.expect, self.max_tokens = expect, max_tokens
        self.playwright = sync_playwright().start()
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        self.browser = self.playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        self.page = self.browser.new_page()
        self.page.goto(f"{url}/playground")
        self.page.wait_for_selector('[data-testid=model-a] option[value="beta"]', state="attached")
        self.page.get_by_test_id("model-a").select_option("alpha")
        self.page.get_by_test_id("model-b").select_option("beta")
        self.page.get_by_test_id("max-tokens").fill(str(max_tokens))
        self.page.get_by_test_id("prompt").fill(PROMPT)

    def rate(self) -> float:
        """Both answers' tokens over the time from the keystroke until the vote buttons enable, both read by the
        page's own clock (Playwright's checks poll, at up to a second apart: too coarse for a 2-second run)."""
        self.page.evaluate(WATCH_RUN)
        self.page.get_by_test_id("prompt").press("Control+Enter")
        self.expect(self.page.get_by_test_id("vote-a")).to_be_enabled(timeout=300_000)
        milliseconds = self.page.evaluate("window.runEnded - window.runStarted")
        return 2 * self.max_tokens / (milliseconds / 1000)

    def close(self) -> None:
        self.browser.close()
        self.playwright.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--serve-flags", default="", help="more flags for lorakit serve, e.g. '--switching off'")
    parser.add_argument("--cpu", action="store_true", help="also report each process's CPU seconds per path")
    args = parser.parse_args()
    command = "python benchmarks/playground.py " + " ".join(sys.argv[1:])
    print(f"command: {command}")
    with tempfile.TemporaryDirectory() as folder:
        proc, url = start_server(Path(folder), args.serve_flags.split())
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
            stream(client, "alpha", 8)  # warm: both adapters resident
            stream(client, "beta", 8)
            try:
                page = Page(url, args.max_tokens)
            except Exception as exc:  # noqa: BLE001 - no Playwright or no Chromium: the HTTP figures stand alone
                print(f"page: skipped ({type(exc).__name__}: {exc})")
                page = None
            paths = {"single": lambda: single(client, args.max_tokens), "pair": lambda: pair(client, args.max_tokens),
                     **({"page": page.rate} if page else {})}
            rates = {name: [] for name in paths}
            cpu = {name: [] for name in paths}
            for _ in range(args.rounds):
                for name, run in paths.items():
                    before = cpu_seconds(proc.pid) if args.cpu else {}
                    rates[name].append(run())
                    if args.cpu:
                        cpu[name].append(spent(before, cpu_seconds(proc.pid)))
            if page:
                page.close()
        finally:
            proc.terminate()
            proc.wait(30)
    medians = {name: round(statistics.median(values), 1) for name, values in rates.items()}
    report = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M+00:00"),
              "machine": {"cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
                          "load_average_at_end": os.getloadavg()},
              "max_tokens": args.max_tokens, "rounds": args.rounds, "tokens_per_second": medians,
              "pair_vs_single": round(medians["pair"] / medians["single"], 2)}
    if "page" in medians:
        report["page_vs_single"] = round(medians["page"] / medians["single"], 2)
    if args.cpu:  # per path, each process's median CPU seconds over the rounds
        report["cpu_seconds"] = {path: {name: round(statistics.median(r.get(name, 0.0) for r in rounds), 2)
                                        for name in sorted({n for r in rounds for n in r})}
                                 for path, rounds in cpu.items()}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
