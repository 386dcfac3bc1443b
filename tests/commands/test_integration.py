"""Cross-command integration: one model through pull -> models -> run -> eval -> bench via the model cache, the
KV accounting of every view checked against the model's own facts, settings layers observed in the KV cache,
`run --backend lemonade|gaia` against a real `inferos serve`, read-only model folders left untouched, and the
README's command examples checked against the real CLI options."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port, stop_process, wait_for_http
from typer.testing import CliRunner

from inferos_cli.cli import app
from inferos_cli.models.info import ModelInfo, inspect_folder

REPO = Path(__file__).resolve().parents[2]
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
                   "--temperature", "0", "--json", home=home).stdout
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


def test_settings_layers_reach_the_kv_cache(stories_onnx: Path, tmp_path: Path) -> None:
    """profile < config file < environment, observed where it matters: the tokens the cache keeps in full
    precision at the end of a run (sinks + recent window)."""
    cfg = tmp_path / "inferos.toml"
    cfg.write_text("[kv]\nrecent_window = 16\nsink_tokens = 2\n", encoding="utf-8")
    home = tmp_path / "home"
    args = ("run", "Once upon a time", "--model", str(stories_onnx), "--max-tokens", "40", "--json", "-p", "int8")

    def fp_tokens(*extra: str, env: dict[str, str] | None = None) -> dict[str, int]:
        full = {k: v for k, v in os.environ.items() if not k.startswith("INFEROS_")}
        full.update({"INFEROS_HOME": str(home), **(env or {})})
        proc = subprocess.run([sys.executable, "-m", "inferos_cli", *args, *extra], capture_output=True, text=True,
                              env=full, cwd=REPO, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-1500:]
        return json.loads(proc.stdout.splitlines()[-1])["kv"]["tokens"]

    assert fp_tokens()["fp"] == 4 + 32  # the int8 preset: 4 sinks + a window of 32
    assert fp_tokens("--config", str(cfg))["fp"] == 2 + 16  # the config file beats the profile
    from_env = fp_tokens("--config", str(cfg), env={"INFEROS_KV__RECENT_WINDOW": "24"})
    assert from_env["fp"] == 2 + 24 and from_env["int8"] > 0  # the environment beats the config file


GAIA_EXE = os.environ.get("INFEROS_GAIA_EXE") or shutil.which("gaia") or shutil.which("gaia-cli")  # before
# conftest's autouse fixture clears INFEROS_* from the environment


@pytest.fixture(scope="module")
def served(stories_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real `inferos serve --profile baseline` process on 127.0.0.1 and the environment for clients."""
    pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
    pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
    tmp = tmp_path_factory.mktemp("served")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFEROS_")}
    env.update({"INFEROS_HOME": str(tmp / "home"), "HOME": str(tmp), "GAIA_CTX_SIZE": "512"})
    env.pop("LEMONADE_BASE_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "inferos_cli", "serve", "--model", str(stories_onnx),
                               "--profile", "baseline", "--port", str(port)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/api/v1"
    try:
        model = json.loads(wait_for_http(url + "/health", server, need_ok=True))["model_loaded"]
        yield {"url": url, "model": model, "env": env}
    finally:
        stop_process(server)


def _run16(env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "inferos_cli", "run", "Once upon a time", "--max-tokens", "16",
                           "--temperature", "0", *extra], capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-1500:]
    return proc


def test_run_backend_lemonade_against_inferos_serve(served: dict[str, Any], stories_onnx: Path) -> None:
    """`inferos run --backend lemonade` through a real `inferos serve` process: the same greedy text as the
    in-process engine on the same model and profile, the counts from the server's usage chunk."""
    env, url, model = served["env"], served["url"], served["model"]
    local = _run16(env, "--model", str(stories_onnx), "--profile", "baseline", "--no-chat")
    remote = _run16(env, "--model", model, "--backend", "lemonade", "--url", url, "--no-chat")
    assert remote.stdout.strip() == local.stdout.strip() != ""
    summary = remote.stderr.strip().splitlines()[-1]
    assert re.match(r"16 tokens, prompt [1-9]\d* tokens", summary) and "lemonade (inferos-ort)" in summary, summary
    events = [json.loads(x) for x in _run16(env, "--model", model, "--backend", "lemonade", "--url", url,
                                            "--no-chat", "--json").stdout.splitlines()]
    assert events[-1]["kind"] == "done" and events[-1]["generated"] == 16 and events[-1]["prompt_tokens"] > 0
    assert "".join(e["text"] for e in events if e["kind"] == "token").strip() == local.stdout.strip()


def test_run_backend_gaia_against_inferos_serve(served: dict[str, Any]) -> None:
    """`inferos run --backend gaia`: the real GAIA CLI as a subprocess against `inferos serve`."""
    if not GAIA_EXE:
        pytest.skip("GAIA CLI not installed: pip install amd-gaia (or set INFEROS_GAIA_EXE to its executable)")
    env = {**served["env"], "INFEROS_GAIA_EXE": GAIA_EXE}
    proc = _run16(env, "--model", served["model"], "--backend", "gaia", "--url", served["url"])
    assert proc.stdout.strip()  # GAIA applies the chat template, so this text differs from --no-chat
    assert "gaia -> lemonade" in proc.stderr.strip().splitlines()[-1]
    chat = subprocess.run([sys.executable, "-m", "inferos_cli", "run", "--backend", "gaia", "--url", served["url"],
                           "--interactive"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
                          check=False)
    assert chat.returncode == 2 and "runs one prompt" in chat.stderr and "Traceback" not in chat.stderr


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
    """Every ``inferos ...`` command in the READMEs' code (fenced blocks and 4-space indented lines; README.md
    and benchmarks/README.md), split like a shell would, with leading ``VAR=value`` assignments dropped."""
    text = "\n".join((REPO / name).read_text(encoding="utf-8") for name in ("README.md", "benchmarks/README.md"))
    text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    lines = [ln for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.DOTALL)
             for ln in block.splitlines()]
    lines += [ln for ln in re.sub(r"```.*?```", "", text, flags=re.DOTALL).splitlines() if ln.startswith("    ")]
    out = []
    for line in lines:
        line = line.split("  #", 1)[0].strip()
        for part in re.split(r"&&|\|", line):
            try:
                words = shlex.split(part.strip())
            except ValueError:  # a quote split by the `|` / `&&` cut (e.g. inside a JSON body): whitespace split
                words = part.split()
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                words = words[1:]
            if words and words[0] == "inferos":
                out.append(words[1:])
    return out


def test_readme_environment_variables_exist() -> None:
    """Every ``INFEROS_*`` the README names is a real policy key (``INFEROS_SECTION__KEY``) or read by the code."""
    from pydantic import BaseModel

    from inferos_cli.settings import Policy

    text = (REPO / "README.md").read_text(encoding="utf-8")
    names = set(re.findall(r"\bINFEROS_[A-Z0-9_]*[A-Z0-9]\b", text)) - {"INFEROS_SECTION__KEY"}
    assert names
    source = "\n".join(f.read_text(encoding="utf-8") for f in (REPO / "inferos_cli").rglob("*.py"))
    for name in sorted(names):
        key = name[len("INFEROS_"):]
        if "__" not in key:
            assert name in source, f"README names {name}, which no module reads"
            continue
        model: Any = Policy
        for part in key.split("__"):
            assert model is not None, f"README's {name} goes below a leaf setting"
            fields = {f.lower(): f for f in model.model_fields}
            assert part.lower() in fields, f"README's {name}: no setting {part.lower()!r} (have {sorted(fields)})"
            ann = model.model_fields[fields[part.lower()]].annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        assert model is None, f"README's {name} names a section, not a setting"


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


def test_gqa_batch_with_kv_profile_equals_single_rows(oga_exact: Path) -> None:
    """Greedy rows of a right-padded batch equal the same prompts run alone, on the OGA GroupQueryAttention graph
    with the int8 KV profile (segmented cache, masked padding columns mid-past, explicit positions).

    The graph is a copy with ``MatMulNBits.accuracy_level = 0``: at the shipped level 4 (int8 activations)
    float-rounding differences between padded and unpadded shapes (~5e-5) become logit differences of ~0.4,
    enough to flip near-ties (measured by INTEG: first decode step, batch vs alone, 0.36 at level 4 vs 4.8e-5
    at level 0), so exact greedy equality is only a fair test at level 0."""
    from _engines import load_engine
    from inferos_cli.engine.sampling import GenerationConfig

    engine = load_engine(oga_exact, "int8", threads=1)
    assert engine.info.uses_gqa_op
    cfg = GenerationConfig(max_tokens=8, ignore_eos=True)
    prompts = [engine.encode_prompt(p, chat=False) for p in ("Water boils at", "The capital of France is")]
    assert len(prompts[0]) < len(prompts[1])  # the first row is padded in the batch
    rows: dict[int, list[int]] = {}
    for ev in engine.generate_batch(prompts, cfg):
        if ev.kind == "token":
            rows.setdefault(ev.seq, []).append(int(ev.token_id))
    for i, ids in enumerate(prompts):
        alone = [int(ev.token_id) for ev in engine.generate(ids, cfg) if ev.kind == "token"]
        assert rows[i] == alone, f"row {i}"
