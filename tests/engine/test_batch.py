"""Static batching: several prompts decoded together equal the same prompts run alone (greedy), finished
rows retire while the others continue, and the plain cache's select/merge keep rows consistent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from _events import by_row
from inferos_cli.cli import app
from inferos_cli.kv.plain import PlainCache
from inferos_cli.engine.engine import Engine
from inferos_cli.engine.sampling import GenerationConfig



def alone(engine: Engine, prompts: list[list[int]], cfg: GenerationConfig) -> dict[int, list[int]]:
    return {i: [e.token_id for e in engine.generate(p, cfg) if e.kind == "token"] for i, p in enumerate(prompts)}


def test_batched_greedy_equals_individual_with_retiring_rows(stories: Engine) -> None:
    texts = ["Once upon a time", "The cat", "Lily and Tom went to the park to play with a big red ball"]
    prompts = [stories.encode_prompt(t) for t in texts]
    cfg = GenerationConfig(max_tokens=40, stop=["Lily"])  # some rows stop early, others run to 40
    events = list(stories.generate_batch(prompts, cfg))
    assert by_row(events) == alone(stories, prompts, cfg)
    done = [e for e in events if e.kind == "done"]
    assert sorted(e.seq for e in done) == [0, 1, 2]
    reasons = {e.seq: e.finish_reason for e in done}
    assert "stop" in reasons.values() and "length" in reasons.values()  # rows retired at different steps
    last = done[-1].extra["batch"]
    assert last["rows"] == 3 and last["generated_total"] == sum(e.generated for e in done)
    assert last["tokens_per_s"] > 0


def test_batched_greedy_equals_individual_gqa(oga: Engine) -> None:
    prompts = [oga.encode_prompt(t) for t in ("What is 2+2?", "Name three colors of the rainbow, please.")]
    cfg = GenerationConfig(max_tokens=10)
    assert by_row(list(oga.generate_batch(prompts, cfg))) == alone(oga, prompts, cfg)


def test_left_padded_prefill_keeps_true_positions(stories: Engine) -> None:
    short, long = stories.encode_prompt("The cat"), stories.encode_prompt("Once upon a time there was")
    cache = stories.new_cache(2)
    ids = np.zeros((2, len(long)), dtype=np.int64)
    mask = np.zeros_like(ids)
    ids[0, -len(short):], mask[0, -len(short):] = short, 1
    ids[1], mask[1] = long, 1
    logits = stories.forward(ids, cache, new_mask=mask)
    ref = stories.forward(np.asarray([short]), stories.new_cache(1))
    np.testing.assert_allclose(logits[0, -1], ref[0, -1], atol=1e-4)
    assert list(cache.seen_tokens) == [len(short), len(long)]


def test_plain_cache_select_and_merge(stories: Engine) -> None:
    a, b = stories.encode_prompt("Once upon a time"), stories.encode_prompt("The dog ran")
    ca, cb = stories.new_cache(1), stories.new_cache(1)
    stories.forward(np.asarray([a]), ca)
    stories.forward(np.asarray([b]), cb)
    ca.merge(cb)
    assert ca.batch == 2 and ca.past_len == max(len(a), len(b))
    assert list(ca.past_mask().sum(axis=1)) == [len(a), len(b)]
    step = stories.forward(np.asarray([[403], [403]]), ca, phase="decode")
    for row, prompt in enumerate((a, b)):
        ref = stories.forward(np.asarray([prompt + [403]]), stories.new_cache(1))
        np.testing.assert_allclose(step[row, -1], ref[0, -1], atol=1e-4)
    ca.select([1])
    assert ca.batch == 1 and int(ca.past_mask().sum()) == len(b) + 1
    assert isinstance(ca, PlainCache) and ca.stats().tokens["fp"] == len(b) + 1


def test_gqa_packed_merge_and_select(oga: Engine) -> None:
    a, b = oga.encode_prompt("Hi", chat=False), oga.encode_prompt("The sun is a star", chat=False)
    ca, cb = oga.new_cache(1, capacity=32), oga.new_cache(1, capacity=32)
    oga.forward(np.asarray([a]), ca)
    oga.forward(np.asarray([b]), cb)
    ca.merge(cb)
    assert list(ca.past_mask().sum(axis=1)) == [len(a), len(b)]
    ca.select([1])
    logits = oga.forward(np.asarray([[11]]), ca, phase="decode")
    ref = oga.forward(np.asarray([b + [11]]), oga.new_cache(1))
    assert logits[0, -1].argmax() == ref[0, -1].argmax()


def test_run_prompts_file_reports_aggregate(stories_onnx: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nThe cat sat\nTom had a ball\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["run", "--model", str(stories_onnx), "--prompts-file", str(prompts),
                                      "-n", "12", "--profile", "baseline"])
    assert result.exit_code == 0, result.output
    assert "[0] Once upon a time" in result.stdout and "[2] Tom had a ball" in result.stdout
    assert "aggregate" in result.stderr and "over 3 prompts" in result.stderr and "tok/s" in result.stderr
