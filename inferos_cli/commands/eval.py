"""`inferos eval`: perplexity, KL and KV bytes of KV configurations, teacher-forced through the real cache."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Iterator, Optional

import typer

from inferos_cli.options import FormatOpt, KVBudgetOpt, ModelOpt, TableFormat, ThreadsOpt

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.quality.eval import Progress


def evaluate(
    text: Annotated[Optional[Path], typer.Option(
        "--text", help="UTF-8 text to score (default: the WikiText-2 raw test split that ships with inferos, "
        "unpacked once into the inferos cache).", exists=True, dir_okay=False, show_default=False)] = None,
    model: ModelOpt = None,
    ctx: Annotated[int, typer.Option("--ctx", min=2, help="Window length in tokens.")] = 512,
    prefix: Annotated[int, typer.Option("--prefix", min=1, help="Tokens prefilled per window before "
                                        "one-token-at-a-time scoring.")] = 64,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="Most tokens to score "
                                                      "(default: the whole text).", show_default=False)] = None,
    compare: Annotated[str, typer.Option("--compare", help="Comma list of configurations, each a profile or "
                                         "KV preset (baseline, fp16, int8, int4, int4-small, int4-k8v4, int8-fused, chat, ...); join profiles "
                                         "with '+' (chat+int4). baseline is always included as the reference.")]
    = "baseline,int8,int4",
    rss: Annotated[bool, typer.Option("--rss/--no-rss", help="Measure peak RSS per configuration in a fresh "
                                      "subprocess (one window).")] = True,
    exact: Annotated[Optional[bool], typer.Option("--exact/--as-shipped", help="--exact (the default) scores an exact-compute "
                                        "twin of the graph (float activations in every matmul, same weights), so the "
                                        "KV cache's error is not buried under the int8-activation rounding noise of "
                                        "int4 graphs; --as-shipped scores the graph as it is (faster, noisier).",
                                        show_default=False)] = None,
    kv_budget: KVBudgetOpt = None,
    fmt: FormatOpt = TableFormat.table,
    threads: ThreadsOpt = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Also write the JSON result here (written to a temp file, then renamed).",
        metavar="<path>")] = None,
) -> None:
    """Teacher-forced evaluation of KV configurations on the same windows: perplexity, ΔPPL and mean KL vs
    the baseline, top-1 agreement, mean/peak KV bytes and their ratio to fp16, peak RSS.

    Without --text it scores the WikiText-2 raw test split that ships with inferos. Progress goes to stderr: a
    bar in a terminal, else a plain line every few seconds.

    Example: inferos eval --model smollm2-135m --ctx 512 --max-tokens 2000 --compare baseline,int8,int4 -o eval.json
    """
    from inferos_cli.options import parse_compare
    from inferos_cli.errors import UsageError
    from inferos_cli.models.resolve import resolve_model
    from inferos_cli.quality.eval import BASELINE, EXACT_DEFAULT, resolve_configs, run_eval
    from inferos_cli.settings import parse_bytes

    flags = None
    if kv_budget is not None:
        try:
            flags = {"kv": {"budget_bytes": parse_bytes(kv_budget)}}
        except ValueError as exc:
            raise UsageError(f"--kv-budget: {exc}", "e.g. --kv-budget 64MiB") from None
    names = parse_compare(compare, reference=BASELINE, example="baseline,int8,int4")
    info = resolve_model(model, progress=True)
    configs = resolve_configs(names, info, flags)  # the settings of every configuration, resolved once here
    from inferos_cli.quality.texts import default_text
    from inferos_cli.ui.eval_table import eval_lines, eval_table
    from inferos_cli.ui.output import print_json, print_table

    text = text if text is not None else default_text()
    with _progress() as progress:
        report = run_eval(info, configs, text, ctx=ctx, prefix=prefix, max_tokens=max_tokens,
                          exact=EXACT_DEFAULT if exact is None else exact, threads=threads, measure_rss=rss, progress=progress)
    snapshot = report.to_json()
    if output is not None:
        import json

        from inferos_cli import paths

        paths.atomic_write_text(output, json.dumps(snapshot, indent=2) + "\n")
    if fmt == TableFormat.json:
        print_json(snapshot)
    else:
        print_table(eval_table(snapshot), eval_lines(snapshot))


@contextmanager
def _progress() -> Iterator["Progress"]:
    """Progress on stderr: a rich bar when stderr is a terminal, else plain lines every few seconds
    (:class:`inferos_cli.ui.eval_table.ProgressLines`), so a run in a pipe or a log is never silent."""
    if not sys.stderr.isatty():
        from inferos_cli.ui.eval_table import ProgressLines

        yield ProgressLines(lambda line: typer.echo(line, err=True))
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

    with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
             console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("scoring tokens", total=None)

        def tick(stage: str, done: int, total: int) -> None:
            if stage == "rss":
                bar.update(task, description="peak RSS probes", completed=done, total=total)
            else:
                bar.update(task, completed=done, total=total)

        yield tick
