"""Data: real Geometry3K samples, malformed rows (skipped and counted), JSON lines, split
layouts, missing-path messages, shuffling, per-host sharding, iterator checkpoints, demo task."""

import io
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from uecjax.data import (
    GEOMETRY3K_FIELDS,
    DataNotFoundError,
    Fields,
    demo_records,
    demo_source,
    geometry3k_source,
    load_source,
    make_dataset,
    make_iterator,
    math_source,
)
from uecjax.rewards.grader import RewardGrader

GEO3K_DIR = Path(__file__).parent / "data" / "geometry3k"
GEO3K = GEO3K_DIR / "samples-00000-of-00001.parquet"


def png(size=(4, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def write_geo3k(path: Path, rows: list[dict]) -> Path:
    """A parquet file in the Geometry3K schema."""
    schema = pa.schema([
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("problem", pa.string()), ("answer", pa.string()), ("id", pa.int64()),
        ("choices", pa.list_(pa.string())), ("ground_truth", pa.string())])
    full = [{"images": [{"bytes": png(), "path": None}], "problem": "<image>Find x.",
             "answer": "3", "id": i, "choices": ["1", "2", "3", "4"], "ground_truth": "C",
             **row} for i, row in enumerate(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(full, schema=schema), path)
    return path


def ids(records) -> list[str]:
    return [r.id for r in records]


# ----------------------------------------------------------------------------- sources


def test_real_geometry3k_samples():
    source = geometry3k_source(GEO3K)
    assert len(source) == 10 and source.skipped.total == 0
    assert ids(source) == [str(i) for i in range(11, 21)]
    records = list(make_dataset(source, shuffle=False, num_epochs=1))
    for r in records:
        assert r.prompt.startswith("<image>") and r.source == "geometry3k"
        assert len(r.images) == 1 and isinstance(r.images[0], Image.Image)
        assert min(r.images[0].size) > 0 and r.images[0].mode == "RGB"
        assert len(r.choices) == 4
        assert r.choices["ABCD".index(r.meta["ground_truth"])] == r.answer
    assert records[4].answer == r"5 \sqrt { 3 }"


def test_malformed_rows_are_skipped_counted_and_named(tmp_path, caplog):
    path = write_geo3k(tmp_path / "bad.parquet", [
        {},  # row 0: good
        {"problem": None},  # row 1: missing prompt
        {"answer": "  "},  # row 2: empty answer
        {"images": [{"bytes": b"\x89PNG not really", "path": None}]},  # row 3: broken image
        {"images": [{"bytes": png()[:40], "path": None}]},  # row 4: truncated image
        {"problem": "<image><image>Two placeholders, one image"},  # row 5
        {"images": [{"bytes": None, "path": "missing.png"}]},  # row 6: path not there
        {"answer": "7"},  # row 7: good
    ])
    with caplog.at_level(logging.WARNING, logger="uecjax.data"):
        source = geometry3k_source(path)
    assert [r.answer for r in source] == ["3", "7"]
    assert source.skipped.as_dict() == {
        "skipped": 6, "skipped/bad_image": 3, "skipped/image_count": 1,
        "skipped/missing_answer": 1, "skipped/missing_prompt": 1}
    assert source.skipped.by_file[str(path)] == 6
    warnings = [m for m in caplog.messages if "skipping malformed row" in m]
    assert len(warnings) == 6
    assert str(path) in warnings[0] and "row 1" in warnings[0] and "missing_prompt" in warnings[0]
    assert any("row 3" in m and "does not decode" in m for m in warnings)


def test_missing_column_names_the_field_and_the_columns(tmp_path):
    path = tmp_path / "q.parquet"
    pq.write_table(pa.table({"question": ["1+1?"], "answer": ["2"]}), path)
    with pytest.raises(ValueError, match=r"column 'problem' \(fields.prompt='problem'\) not "
                                         r"found; the columns are \['question', 'answer'\]"):
        load_source(path)
    assert load_source(path, fields=Fields(prompt="question"))[0].answer == "2"


def test_math_schema_answer_from_boxed_solution(tmp_path):
    path = tmp_path / "data" / "test-00000-of-00001.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({
        "problem": ["What is $\\frac{1}{2}+\\frac{1}{2}$?", "Find y.", "No answer here."],
        "solution": ["Add: $\\boxed{1}$.", "So $y = \\boxed{\\frac{3}{4}}$.", "It is 5."],
        "level": ["Level 1", "Level 2", "Level 1"],
    }), path)
    source = math_source(tmp_path, split="test")
    assert [r.answer for r in source] == ["1", r"\frac{3}{4}"]
    assert source[0].meta == {"level": "Level 1"} and source[0].id.endswith(":row 0")
    assert source.skipped.as_dict() == {"skipped": 1, "skipped/missing_answer": 1}


def test_jsonl_row_with_invalid_utf8_is_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"problem": "1+1?", "answer": "2"}\n'
                     b'{"problem": "caf\xff\xfe?", "answer": "3"}\n'  # not UTF-8
                     b'{not json\n'
                     b'{"problem": "2+2?", "answer": "4"}\n')
    with caplog.at_level(logging.WARNING, logger="uecjax.data"):
        source = load_source(path)
    assert [(r.prompt, r.answer) for r in source] == [("1+1?", "2"), ("2+2?", "4")]
    assert source.skipped.as_dict() == {"skipped": 2, "skipped/bad_json": 2}
    warnings = [m for m in caplog.messages if "skipping malformed row" in m]
    assert len(warnings) == 2 and "line 2" in warnings[0] and "invalid UTF-8" in warnings[0]
    assert "line 3" in warnings[1] and "invalid JSON" in warnings[1]


def test_jsonl_with_configured_fields(tmp_path):
    path = tmp_path / "dapo.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": "What is 2+3?"}],
         "reward_model": {"ground_truth": "5"}, "extra_info": {"index": 7}},
        {"prompt": [{"role": "user", "content": "What is 6*7?"}],
         "reward_model": {"ground_truth": 42}, "extra_info": {"index": 8}},
        {"prompt": "plain string prompt", "reward_model": {}},  # no answer
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "{not json")
    path.write_text("\n".join(lines) + "\n\n")
    fields = Fields(prompt="prompt", answer="reward_model.ground_truth", id="extra_info.index")
    source = load_source(path, fields=fields, name="dapo")
    assert [(r.prompt, r.answer, r.id, r.source) for r in source] == [
        ("What is 2+3?", "5", "7", "dapo"), ("What is 6*7?", "42", "8", "dapo")]
    assert source.skipped.as_dict() == {"skipped": 2, "skipped/bad_json": 1,
                                        "skipped/missing_answer": 1}


def test_no_usable_rows_is_an_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n')
    with pytest.raises(ValueError, match="no usable rows.*missing_prompt"):
        load_source(path)


def test_hub_directory_layout_with_splits(tmp_path):
    for split, n in [("train", 3), ("test", 2)]:
        write_geo3k(tmp_path / "data" / f"{split}-00000-of-00001.parquet", [{}] * n)
    assert len(geometry3k_source(tmp_path, split="train")) == 3
    assert len(geometry3k_source(tmp_path, split="test")) == 2
    assert len(geometry3k_source(tmp_path / "data" / "{split}-*.parquet", split="test")) == 2
    with pytest.raises(DataNotFoundError) as e:
        geometry3k_source(tmp_path, split="validation")
    message = str(e.value)
    assert "no files for split 'validation'" in message and "data/validation-*.parquet" in message
    assert "Splits found there: test, train" in message
    assert f"hf download hiyouga/geometry3k --repo-type dataset --local-dir {tmp_path}" in message


def test_missing_path_says_what_and_how_to_get_it(tmp_path):
    missing = tmp_path / "geometry3k"
    with pytest.raises(DataNotFoundError) as e:
        geometry3k_source(missing)
    message = str(e.value)
    assert f"{missing} does not exist" in message
    assert f"hf download hiyouga/geometry3k --repo-type dataset --local-dir {missing}" in message
    with pytest.raises(DataNotFoundError, match="no data files match"):
        load_source(tmp_path / "*.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):  # generic help
        load_source(missing / "x.jsonl")


def test_tests_use_their_own_copy_of_the_samples():
    assert GEO3K.is_file() and "InterGPS" in (GEO3K_DIR / "README.md").read_text()
    assert GEOMETRY3K_FIELDS.images == "images"


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def demo():
    return demo_source("train", 23, seed=0)


def test_shuffle_is_deterministic_per_seed_and_reshuffles_epochs(demo):
    def order(seed, epochs=1):
        return ids(make_dataset(demo, seed=seed, num_epochs=epochs, decode=False))

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == sorted(ids(demo))
    two = order(1, epochs=2)
    assert two[:23] == order(1) and sorted(two[23:]) == sorted(ids(demo))
    assert two[23:] != two[:23]  # each epoch is shuffled anew
    assert ids(make_dataset(demo, shuffle=False, num_epochs=1)) == ids(demo)


@pytest.mark.parametrize("count", [1, 3, 4])
def test_per_host_shards_are_disjoint_and_complete(demo, count):
    shards = [ids(make_dataset(demo, seed=5, num_epochs=1, shard_index=i, shard_count=count))
              for i in range(count)]
    flat = [x for s in shards for x in s]
    assert len(flat) == len(set(flat)) == len(demo)
    assert set(flat) == set(ids(demo))
    equal = [len(make_dataset(demo, num_epochs=1, shard_index=i, shard_count=count,
                              drop_remainder=True)) for i in range(count)]
    assert len(set(equal)) == 1 and equal[0] == len(demo) // count
    with pytest.raises(ValueError, match="shard_index=3, shard_count=3"):
        make_dataset(demo, shard_index=3, shard_count=3)


def test_iterator_state_restores_exactly(demo):
    def fresh():
        return make_iterator(make_dataset(demo, seed=3, shard_index=1, shard_count=2))

    it = fresh()
    for _ in range(17):  # past the end of the first epoch of this 11-record shard
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as saved in a checkpoint
    expected = [next(it).id for _ in range(30)]
    restored = fresh()
    restored.set_state(state)
    assert [next(restored).id for _ in range(30)] == expected


def test_iterator_decodes_images_of_real_samples():
    it = make_iterator(make_dataset(geometry3k_source(GEO3K), seed=0))
    first = [next(it) for _ in range(12)]
    assert all(isinstance(r.images[0], Image.Image) for r in first)
    assert {r.id for r in first[:10]} == {str(i) for i in range(11, 21)}


# ----------------------------------------------------------------------------- demo task


def evaluate(expression: str) -> int:
    """Left to right, `*` first (the demo's expressions: `a [* b] (+|- x)*`); no eval()."""
    tokens = expression.split()
    value = int(tokens[0])
    i = 1
    if len(tokens) > 2 and tokens[1] == "*":
        value, i = value * int(tokens[2]), 3
    for op, x in zip(tokens[i::2], tokens[i + 1::2]):
        value = value + int(x) if op == "+" else value - int(x)
    return value


def test_demo_is_deterministic_and_well_formed():
    a = demo_records("train", 300, seed=7)
    assert a == demo_records("train", 300, seed=7)
    assert ids(a) != ids(demo_records("train", 300, seed=8))
    assert len({r.prompt for r in a}) == 300
    assert {r.meta["level"] for r in a} == {1, 2, 3, 4}
    for r in a:
        assert int(r.answer) == evaluate(r.meta["expression"]) >= 0
        assert r.prompt.endswith("now?") and len(r.prompt) < 100
        assert r.source == "demo" and r.images == () and r.choices == ()
    expr = demo_records("test", 5, seed=0, style="expression")
    assert all(r.prompt == f"{r.meta['expression']} = ?" for r in expr)


def test_demo_splits_never_share_an_expression():
    train = {r.meta["expression"] for r in demo_records("train", 2000, seed=0)}
    test = {r.meta["expression"] for s in (0, 1) for r in demo_records("test", 300, seed=s)}
    assert train and test and not train & test


def test_demo_errors():
    with pytest.raises(ValueError, match="only .* distinct"):
        demo_records("test", 500, levels=(1,), style="expression")
    with pytest.raises(ValueError, match="levels"):
        demo_records("train", 5, levels=(9,))
    with pytest.raises(ValueError, match="split='val'"):
        demo_records("val", 5)


def test_demo_answers_are_verified_by_the_reward():
    records = demo_records("test", 6, seed=0)
    right = [f"<think>{r.meta['expression']}</think> \\boxed{{{r.answer}}}" for r in records]
    wrong = [f"<think>guess</think> \\boxed{{{int(r.answer) + 1}}}" for r in records]
    also = [f"<think>x</think> \\boxed{{{r.answer}.0}}" for r in records]
    with RewardGrader(num_workers=1, timeout_s=5.0) as grader:
        rewards = grader.grade(right + wrong + also, [r.answer for r in records] * 3)
    assert [r.reward for r in rewards] == [1.0] * 6 + [0.1] * 6 + [1.0] * 6
