"""Cross-command integration: one model through pull -> models -> run -> eval -> bench via the model cache, the
KV accounting of every view checked against the model's own facts, read-only model folders left untouched,
and the README's command examples checked against the real CLI options."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from inferos_cli.cli import app
from inferos_cli.runtime.modelinfo import ModelInfo, inspect_folder

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _inferos(*args: str, home: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """``python -m inferos_cli ARGS`` in a real subprocess with its own INFEROS_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFEROS_")}
    env["INFEROS_HOME"] = str(home)
    proc = subprocess.run([sys.executable, "-m", "inferos_cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout, check=False)
    assert proc.returncode == 0, f"inferos {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-1500:]}"
    return proc


def _kv_bytes_per_token_fp32(info: ModelInfo) -> int:
    """Bytes one token's keys + values take in float32 over all layers: 2 * layers * kv_heads * head_dim * 4."""
    return 2 * info.num_layers * info.num_kv_heads * info.head_dim * 4


def _run_events(home: Path, model: str, profile: str, tokens: int) -> list[dict[str, Any]]:
    out = _inferos("run", "Once upon a time", "--model", model, "--profile", profile, "--max-tokens", str(tokens),
                   "--json", home=home).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_one_model_through_pull_models_run_eval_bench(stories_src: Path, tinystories_text: Path,
                                                      tmp_path: Path) -> None:
    """The cached conversion is what every later command uses, and every view's KV bytes add up."""
    home = tmp_path / "home"
    pulled = json.loads(_inferos("pull", str(stories_src), "--format", "json", home=home).stdout)
    folder = Path(pulled["path"])
    assert folder.parent == home / "cache" / "models" and pulled["action"] in ("converted", "cached")
    info = inspect_folder(folder)
    assert pulled["param_count"] == info.param_count and pulled["layers"] == info.num_layers
    onnx_stamp = Path(info.onnx_path).stat().st_mtime_ns

    listed = json.loads(_inferos("models", "--format", "json", home=home).stdout)
    rows = [m for m in listed["models"] if m["name"] == pulled["name"]]
    assert len(rows) == 1 and rows[0]["status"] == "ok" and Path(rows[0]["path"]) == folder

    per_token = _kv_bytes_per_token_fp32(info)
    gen = 48
    runs = {p: _run_events(home, pulled["name"], p, gen) for p in ("baseline", "int8")}
    ids = {}
    for profile, events in runs.items():
        done = events[-1]
        assert done["kind"] == "done" and done["generated"] == gen
        kv = done["kv"]
        cached = done["prompt_tokens"] + gen - 1  # the last sampled token is never fed back
        assert sum(kv["tokens"].values()) == cached
        assert kv["total_bytes"] == sum(kv["bytes"].values())
        assert kv["bytes_fp16"] == cached * per_token // 2
        ids[profile] = [e["token_id"] for e in events if e["kind"] == "token"]
        assert len(ids[profile]) == gen
    base, int8 = runs["baseline"][-1]["kv"], runs["int8"][-1]["kv"]
    assert base["total_bytes"] == (runs["baseline"][-1]["prompt_tokens"] + gen - 1) * per_token  # plain fp32
    assert int8["tokens"]["int8"] > 0 and int8["total_bytes"] < base["total_bytes"]  # tokens left the window
    assert ids["int8"] == ids["baseline"]  # int8 KV is near-lossless: same greedy continuation here

    ctx = 64
    ev = json.loads(_inferos("eval", "--model", pulled["name"], "--text", str(tinystories_text), "--ctx", str(ctx),
                             "--prefix", "8", "--max-tokens", "128", "--compare", "baseline,int8", "--no-rss",
                             "--format", "json", home=home).stdout)
    by = {r["config"]: r for r in ev["results"]}
    assert by["baseline"]["delta_ppl"] == 0.0 and by["baseline"]["kv_bytes_peak"] == (ctx - 1) * per_token
    assert by["int8"]["kv_bytes_peak"] < by["baseline"]["kv_bytes_peak"]
    assert abs(by["int8"]["delta_ppl"]) < 0.05 and by["int8"]["top1_agreement"] > 0.95

    seq, bgen = 16, 4
    bench = json.loads(_inferos("bench", "--model", pulled["name"], "--text", str(tinystories_text),
                                "--compare", "baseline,int8", "--batch-sizes", "1,2", "--seq-lengths", str(seq),
                                "--gen-tokens", str(bgen), "--repeats", "1", "--warmup", "0", "--format", "json",
                                home=home).stdout)
    base_rows = [r for r in bench["rows"] if r["config"] == "baseline" and r["status"] == "ok"]
    assert {r["batch"] for r in base_rows} == {1, 2}
    for r in base_rows:  # plain cache, equal-length prompts: no padding, exact bytes
        assert r["metrics"]["kv_bytes"]["samples"] == [float(r["batch"] * (seq + bgen - 1) * per_token)]

    assert Path(info.onnx_path).stat().st_mtime_ns == onnx_stamp  # never re-converted


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX mode bits are what marks a folder read-only here")
@pytest.mark.parametrize("which", ["stories", "oga"])
def test_read_only_model_folder_is_never_written(which: str, request: pytest.FixtureRequest,
                                                 tmp_path: Path) -> None:
    """A model folder without write bits (a shared or system install) stays byte-for-byte untouched, even for
    root: the KV rewrite and the last-logits graph (the OGA graph gets one) go to the cache instead."""
    folder = request.getfixturevalue("stories_onnx") if which == "stories" else request.getfixturevalue("oga_dir").parent
    src = tmp_path / "ro-model"
    shutil.copytree(folder, src, ignore=shutil.ignore_patterns("*.inferos-*", ".*"))
    before = sorted(p.name for p in src.iterdir())
    src.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        for profile in ("baseline", "int8"):  # the original graph, then the KV-rewritten one
            events = _run_events(tmp_path / "home", str(src), profile, 40)
            assert events[-1]["kind"] == "done" and events[-1]["generated"] == 40
            assert sorted(p.name for p in src.iterdir()) == before, profile
        assert events[-1]["kv"]["tokens"]["int8"] > 0
    finally:
        src.chmod(stat.S_IRWXU)


def _readme_examples() -> list[list[str]]:
    """Every ``inferos ...`` line inside the README's fenced code blocks, split like a shell would."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            for part in line.split("&&"):
                words = shlex.split(part.strip())
                if words and words[0] == "inferos":
                    out.append(words[1:])
    return out


EXAMPLES = _readme_examples()


def test_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 9


@pytest.mark.parametrize("words", EXAMPLES, ids=[" ".join(w)[:60] for w in EXAMPLES])
def test_readme_example_uses_real_commands_and_options(words: list[str]) -> None:
    """A renamed command or option fails here instead of in a user's terminal."""
    groups = {g.name for g in app.registered_groups}
    commands = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    assert words and (words[0] in commands or words[0] in groups), f"README names no command: inferos {words}"
    path = words[:2] if words[0] in groups else words[:1]
    help_text = runner.invoke(app, [*path, "--help"], terminal_width=200).output
    for word in words[len(path):]:
        if word.startswith("--"):
            option = word.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_text), \
                f"README uses '{option}' but 'inferos {' '.join(path)} --help' has no such option"
