"""`inferos bench`: baseline vs inferos (and profiles, presets, peers) side by side, interleaved, with spread."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from inferos_cli.options import ConfigOpt, ModelOpt, ProfileOpt, StrictDevicesOpt, ThreadsOpt


class BenchFormat(str, Enum):
    """Output formats of `inferos bench`."""

    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"
    md = "md"


class BenchBackend(str, Enum):
    """What `--backend` adds to the comparison."""

    ort = "ort"
    lemonade = "lemonade"


CompareOpt = Annotated[str, typer.Option(
    "--compare",
    help="Comma list of configs: baseline (KV off, same devices), inferos (= --profile, default by model size), "
    "any profile or preset (int8, int4, conservative, balanced, aggressive...), profiles joined with + "
    "(7b+chat), and the peers ort-genai and lemonade.")]
BatchSizesOpt = Annotated[str, typer.Option("--batch-sizes", help="Comma list of batch sizes (sequences decoded together).")]
SeqLengthsOpt = Annotated[str, typer.Option("--seq-lengths", help="Comma list of prompt lengths in tokens (exact).")]
GenTokensOpt = Annotated[int, typer.Option("--gen-tokens", min=2, help="Tokens generated per sequence (EOS ignored).")]
RepeatsOpt = Annotated[int, typer.Option("--repeats", min=1, help="Measured runs per config and cell (interleaved).")]
WarmupOpt = Annotated[int, typer.Option("--warmup", min=0, help="Discarded runs per config and cell before measuring.")]
QualityOpt = Annotated[bool, typer.Option("--quality", help="Also measure ppl, delta_ppl, kl_mean, top1_agreement vs baseline.")]
QualityTokensOpt = Annotated[int, typer.Option("--quality-tokens", min=16, help="Tokens of --text scored by --quality.")]
TextOpt = Annotated[Optional[Path], typer.Option(
    "--text", help="Real text the prompts are cut from (default: the WikiText-2 raw test split that ships with "
    "inferos, unpacked once into the inferos cache).",
    show_default=False)]
BenchFormatOpt = Annotated[BenchFormat, typer.Option(
    "--format", "-f", case_sensitive=False, help="table for people; json, jsonl, csv or md (paste-ready) for files.")]
OutputOpt = Annotated[Optional[Path], typer.Option(
    "--output", "-o", help="Also write the result here (format from --format, or from the suffix with table).",
    show_default=False)]
PlotOpt = Annotated[Optional[Path], typer.Option(
    "--plot", help="Write decode tok/s, TTFT and memory vs prompt length to FILE.png, .svg or .html "
    "(needs the plot extra).", show_default=False)]
BackendOpt = Annotated[BenchBackend, typer.Option(
    "--backend", case_sensitive=False, help="lemonade: also measure a Lemonade / OpenAI-compatible server at --url.")]
UrlOpt = Annotated[Optional[str], typer.Option(
    "--url", help="Server base URL for the lemonade peer (default: LEMONADE_BASE_URL or http://localhost:13305/api/v1).",
    show_default=False)]
ServerModelOpt = Annotated[Optional[str], typer.Option(
    "--server-model", help="Model name on the server (default: the first one it lists).", show_default=False)]
DtypeOpt = Annotated[Optional[str], typer.Option(
    "--dtype", help="Weight type when --model must be converted first (e.g. int4).", show_default=False)]

SUFFIX_FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".md": "md"}


def bench(
    model: ModelOpt = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    compare: CompareOpt = "baseline,inferos",
    batch_sizes: BatchSizesOpt = "1,4,8",
    seq_lengths: SeqLengthsOpt = "128,512,1024",
    gen_tokens: GenTokensOpt = 64,
    repeats: RepeatsOpt = 3,
    warmup: WarmupOpt = 1,
    quality: QualityOpt = False,
    quality_tokens: QualityTokensOpt = 4096,
    text: TextOpt = None,
    fmt: BenchFormatOpt = BenchFormat.table,
    output: OutputOpt = None,
    plot: PlotOpt = None,
    backend: BackendOpt = BenchBackend.ort,
    url: UrlOpt = None,
    server_model: ServerModelOpt = None,
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    strict_devices: StrictDevicesOpt = False,
) -> None:
    """Measure configs side by side on a grid of batch sizes x prompt lengths: TTFT, prefill and decode
    tokens/s, end-to-end time, peak RSS, KV bytes, providers per phase; mean ± sd, every sample kept,
    repeats interleaved A B A B so machine drift cancels.

    Example: inferos bench --model smollm2-135m --compare baseline,inferos,ort-genai --plot bench.html
    """
    from inferos_cli.bench.configs import build_configs
    from inferos_cli.options import parse_compare, parse_int_list
    from inferos_cli.bench.grid import Grid, resolve_info
    from inferos_cli.bench.run import quality_compare, quality_for, run_bench
    from inferos_cli.quality.texts import default_text
    from inferos_cli.ui.bench_table import bench_table, quality_table, render_text, skip_lines
    from inferos_cli.ui.output import is_terminal

    names = parse_compare(compare)
    if (backend == BenchBackend.lemonade or url) and "lemonade" not in names:
        names.append("lemonade")
    grid = Grid(
        batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"),
        seq_lengths=parse_int_list(seq_lengths, "--seq-lengths"),
        gen_tokens=gen_tokens, repeats=repeats, warmup=warmup, threads=threads,
    )
    if plot is not None:
        from inferos_cli.ui.plot import check_plot_path

        check_plot_path(plot)
    text_path = text or default_text()
    info = resolve_info(model, dtype=dtype)
    # every config's settings are resolved here, once; the workers get them resolved
    configs = build_configs(names, info, profile=profile, config_path=config, url=url, server_model=server_model)
    for line in skip_lines({"skipped": [{"config": c.name, "reason": c.skip_reason} for c in configs if c.skip_reason]}):
        typer.echo(line, err=True)
    from inferos_cli import paths

    out_fmt = SUFFIX_FORMATS.get(output.suffix.lower(), fmt.value) if output is not None else fmt.value

    def save_partial(partial: Any) -> None:
        """Keep what was measured so far (``"complete": false``) in --output after every cell."""
        if output is not None:
            paths.atomic_write_text(output, render_text(partial.to_json(), out_fmt))

    with _progress() as on_progress:
        result = run_bench(info, grid, configs, text_path=text_path, config_path=config,
                           strict_devices=strict_devices, on_progress=on_progress, on_cell=save_partial)
    if quality:
        from inferos_cli.quality.eval import resolve_configs

        typer.echo(f"bench: scoring quality on {quality_tokens} tokens of {text_path.name}", err=True)
        scored = resolve_configs(quality_compare(info, configs), info)  # the eval's configs, baseline first
        result.quality = quality_for(info, configs, scored, text_path=text_path, max_tokens=quality_tokens,
                                     threads=threads)
    snapshot = result.to_json()
    if fmt == BenchFormat.table and is_terminal():
        from rich.console import Console

        console = Console()
        console.print(bench_table(snapshot, width=console.width))
        qt = quality_table(snapshot)
        if qt is not None:
            console.print(qt)
        for line in skip_lines(snapshot):
            console.print(line)
    else:
        typer.echo(render_text(snapshot, fmt.value), nl=False)
    if output is not None:
        paths.atomic_write_text(output, render_text(snapshot, out_fmt))
        typer.echo(f"wrote {output} ({out_fmt})", err=True)
    if plot is not None:
        from inferos_cli.ui.plot import write_plot

        write_plot(snapshot, plot)
        typer.echo(f"wrote {plot}", err=True)
    if not any(row["status"] == "ok" for row in snapshot["rows"]):
        from inferos_cli.errors import BackendError

        reasons = sorted({row["reason"] for row in snapshot["rows"] if row.get("reason")})
        raise BackendError("no cell could be measured: " + (reasons[0] if reasons else "nothing ran"),
                           "see the reasons above")


class _progress:
    """A rich progress bar over the grid on a terminal (stderr), else one plain line per finished cell."""

    def __enter__(self) -> Any:
        self._tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
        self._bar: Any = None
        self._task: Any = None
        if self._tty:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                TextColumn("left"), TimeRemainingColumn(), console=Console(stderr=True), transient=True,
            )
            self._bar.__enter__()
        return self.update

    def update(self, p: Any) -> None:
        """Advance the bar (weights = batch x tokens, so the time-left estimate follows real cost)."""
        if self._bar is not None:
            if self._task is None:
                self._task = self._bar.add_task("bench", total=p.total_weight)
            self._bar.update(self._task, completed=p.done_weight, description=p.message or "bench")
            return
        if p.cell_done is None:
            return
        eta = p.eta_s
        left = f", about {eta:.0f} s left" if eta is not None else ""
        typer.echo(f"bench: cell batch {p.cell_done[0]} seq {p.cell_done[1]} done, "
                   f"{100 * p.done_weight / p.total_weight:.0f}% after {p.elapsed_s:.0f} s{left}", err=True)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
