"""`inferos run`: generate text with the in-process engine, with a live table of what the machine does."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from inferos_cli.errors import UsageError
from inferos_cli.options import (ConfigOpt, ModelOpt, ProfileOpt, RepetitionPenaltyOpt, StopOpt, StrictDevicesOpt,
                                 TemperatureOpt, ThreadsOpt, TopKOpt, TopPOpt)


NO_PROMPT_HINT = 'pass a prompt, e.g. inferos run "Tell me a story", or use --interactive'


class RunBackend(str, Enum):
    """Where `inferos run` generates: in process, or through a server / the GAIA CLI."""

    ort = "ort"
    lemonade = "lemonade"
    gaia = "gaia"


def run(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt (read from stdin when omitted and piped).",
                                                    show_default=False)] = None,
    model: ModelOpt = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=0, help="Most tokens to generate.")] = 256,
    interactive: Annotated[bool, typer.Option("--interactive", "-i",
                                              help="Keep a chat going; the KV cache is reused across turns "
                                              "(/reset starts over, /exit or an empty line ends).")] = False,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per event per line.")] = False,
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat",
                                                 help="Apply the model's chat template (default: when it has one).",
                                                 show_default=False)] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System message for chat models.",
                                                  show_default=False)] = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed for sampling.", show_default=False)] = None,
    stop: StopOpt = None,
    prefill_chunk: Annotated[Optional[int], typer.Option("--prefill-chunk", min=1,
                                                         help="Prefill the prompt in chunks of this many tokens.",
                                                         show_default=False)] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past end-of-sequence.")] = False,
    prompts_file: Annotated[Optional[Path], typer.Option("--prompts-file",
                                                         help="Decode every non-empty line of FILE as one batch; "
                                                         "reports aggregate tokens/s.", show_default=False)] = None,
    threads: ThreadsOpt = None,
    strict_devices: StrictDevicesOpt = False,
    backend: Annotated[RunBackend, typer.Option("--backend", case_sensitive=False,
                                         help="ort: the in-process engine; lemonade: a Lemonade / OpenAI-compatible "
                                         "server (or `inferos serve`) at --url; gaia: the GAIA CLI (pip install "
                                         "amd-gaia) against --url. lemonade and gaia take one prompt.")] = RunBackend.ort,
    url: Annotated[Optional[str], typer.Option("--url", help="Server for --backend lemonade|gaia (default: "
                                               "LEMONADE_BASE_URL, then http://localhost:13305/api/v1, then :8000).",
                                               show_default=False)] = None,
    auto_tune: Annotated[bool, typer.Option("--auto-tune", help="Before generating, measure the KV policy "
                                            "against the baseline on a calibration text and adjust it "
                                            "(quality budget, memory pressure); the decisions are shown.")] = False,
    target_tps: Annotated[Optional[float], typer.Option("--target-tps", min=0.1, help="Auto-tuner throughput "
                                                        "target in tokens/s (implies --auto-tune).",
                                                        show_default=False)] = None,
) -> None:
    """Generate text and show decode/prefill tokens/s, first-token latency, KV bytes, RSS, CPU/GPU/NPU use
    and the provider of each phase, live (at most 10 refreshes/s). In a pipe: the text, then one summary
    line on stderr. Ctrl-C stops cleanly and prints the summary.

    A prompt longer than the model's context is an error (nothing is truncated); generation stops at
    the context end (finish reason ``length``).

    Example: inferos run "Tell me a story" --max-tokens 128

    Example: inferos run "Tell me a story" --profile int4 --auto-tune
    """
    from inferos_cli.engine.sampling import GenerationConfig
    from inferos_cli.profiles import resolve_settings
    from inferos_cli.ui.run_session import RunRequest, run_request

    if sum(bool(x) for x in (prompt is not None, interactive, prompts_file is not None)) > 1:
        raise UsageError("give one of PROMPT, --interactive or --prompts-file", "see `inferos run --help`")
    if prompt is not None and not prompt.strip():
        raise UsageError("the prompt is empty", NO_PROMPT_HINT)  # as an empty stdin below
    if prompt is None and not interactive and prompts_file is None:
        if sys.stdin is not None and not sys.stdin.isatty():
            prompt = sys.stdin.read().strip()
        if not prompt:
            raise UsageError("no prompt given", NO_PROMPT_HINT)
    req = RunRequest(
        prompt=prompt, model=model, profile=profile, interactive=interactive,
        json_lines=json_lines, chat=chat, system=system,
        generation=GenerationConfig.chat(
            max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed, stop=list(stop or []), prefill_chunk=prefill_chunk,
            ignore_eos=ignore_eos,
        ),
        prompts_file=prompts_file, threads=threads, strict_devices=strict_devices,
        backend=backend.value, url=url, auto_tune=auto_tune or target_tps is not None, target_tps=target_tps,
    )
    req.check()
    # the model and the settings, resolved once, here (a server backend resolves its own model)
    info = None
    if req.local:
        from inferos_cli.models.resolve import resolve_model

        info = resolve_model(model, progress=req.progress)
    resolved = resolve_settings(profile, param_count=info.param_count if info else None, config_path=config)
    code = run_request(req, resolved, info)
    if code:
        raise typer.Exit(code)
