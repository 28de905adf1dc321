"""rlhf/prompts.py (loading prompt files, encoding with a limit) and reward_models/judges.py."""

from __future__ import annotations

import json

import pytest

from reward_models.judges import get_judge, keyword, length, vader
from rlhf.prompts import encode_prompts, load_prompts, load_rows, prompt_text, render_prompt, to_messages
from rlhf.tiny import build_tiny_tokenizer
from rlhf.utils import UserError

CHAT = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "tell me a story"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


# ---------------------------------------------------------------------------------------------
# load_prompts


def test_jsonl_strings_and_chat_messages(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "  write a review  "},
        {"prompt": CHAT},
        {"prompt": CHAT + [{"role": "assistant", "content": "once upon a time"}]},  # answer turn dropped
    ])
    assert load_prompts(path) == ["write a review", CHAT, CHAT]


def test_json_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]))
    assert load_prompts(str(path)) == ["a", "b"]


def test_csv_with_other_columns(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,question\n1,how are you\n2,what is this\n")
    assert load_prompts(str(path), column="question") == ["how are you", "what is this"]


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": ["one", "two", "three"], "n": [1, 2, 3]}).to_parquet(path)
    assert load_prompts(str(path)) == ["one", "two", "three"]


def test_txt_one_prompt_per_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first line\n\n   \nsecond line  \n")
    assert load_prompts(str(path)) == ["first line", "second line"]
    assert load_rows(str(path)) == [{"text": "first line"}, {"text": "second line"}]


def test_limit(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    assert load_prompts(path, limit=2) == ["p0", "p1"]
    assert len(load_prompts(path, limit=0)) == 5


def test_relative_to_cwd(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "here"}])
    monkeypatch.chdir(tmp_path)
    assert load_prompts("p.jsonl") == ["here"]


def test_seed_prompts_resolve_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative to the project when not under the working directory
    prompts = load_prompts("seeds/prompts/sentiment_test.jsonl")
    assert len(prompts) > 10 and all(isinstance(p, str) and p for p in prompts)


def test_missing_column_names_column(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "x", "id": 1}])
    with pytest.raises(UserError) as e:
        load_prompts(path)
    msg = str(e.value)
    assert "'prompt'" in msg and "question" in msg and "data.prompt_column" in msg


def test_bad_row_names_row(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": "   "}])
    with pytest.raises(UserError, match="row 2 "):  # counted from 1, as lines are
        load_prompts(path)


def test_empty_txt_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n")
    with pytest.raises(UserError, match="empty.txt is empty"):
        load_prompts(str(path))


def test_empty_jsonl_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(UserError, match="empty.jsonl is empty"):
        load_prompts(str(path))


def test_csv_with_header_only(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("prompt\n")
    with pytest.raises(UserError, match="empty.csv"):
        load_prompts(str(path))


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n{"prompt": "c"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:3: not valid JSON"):
        load_prompts(str(path))


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n["b"]\n')
    with pytest.raises(UserError, match="line 2 is a list"):
        load_prompts(str(path))


def test_json_list_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"prompt": "a"},\n{"prompt" "b"}\n]')
    with pytest.raises(UserError, match=r"bad.json:3: not valid JSON"):
        load_prompts(str(path))


def test_json_file_holding_json_lines(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert load_prompts(str(path)) == ["a", "b"]


def test_non_utf8_file_names_file_and_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin.jsonl:2: not UTF-8"):
        load_prompts(str(path))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "p.xml"
    path.write_text("<a/>")
    with pytest.raises(UserError, match="unsupported file type"):
        load_prompts(str(path))


@pytest.mark.parametrize("name", ["missing.jsonl", "./missing", "/no/such/file.csv"])
def test_missing_file(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="not found"):
        load_prompts(name)


def test_hub_dataset_name_loads_the_split_with_a_column_mapping(monkeypatch):
    """A name that is not a local file goes to `datasets.load_dataset(name, split=...)` (offline here:
    the hub call is replaced by a local dataset, and a failure becomes one clear line)."""
    import datasets

    calls = []

    def fake_load_dataset(name, split=None, **kwargs):
        calls.append((name, split, kwargs))
        if name != "org/prompts":
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub\nmore detail")
        return datasets.Dataset.from_dict({"question": ["tell me a story", "describe the sea"], "id": [1, 2]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_prompts("org/prompts", column="question", split="validation") == ["tell me a story",
                                                                                 "describe the sea"]
    assert calls == [("org/prompts", "validation", {})]
    with pytest.raises(UserError, match=r"cannot load dataset 'org/missing' split 'train': .*doesn't exist") as e:
        load_rows("org/missing")
    assert "more detail" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# rendering and encoding


def test_prompt_text_and_messages():
    assert prompt_text("hi") == "hi"
    assert prompt_text(CHAT) == "tell me a story"
    assert to_messages("hi", None) == [{"role": "user", "content": "hi"}]
    assert to_messages("hi", "sys")[0] == {"role": "system", "content": "sys"}
    assert to_messages(CHAT, "other") == CHAT  # an existing system message wins


def test_render_with_and_without_template(tok):
    assert render_prompt("the day", tok) == "<bos> user : the day <eos> <bos> assistant : "
    assert render_prompt("the day", tok, use_chat_template=False) == "the day"
    assert render_prompt(CHAT, tok, use_chat_template=False).endswith("user: tell me a story\nassistant:")


def test_encode_with_chat_template(tok):
    enc = encode_prompts(["the good day"], tok, max_tokens=64)
    assert tok.convert_ids_to_tokens(enc.input_ids[0]) == [
        "<bos>", "user", ":", "the", "good", "day", "<eos>", "<bos>", "assistant", ":"]
    assert (enc.truncated, enc.dropped) == (0, 0)


def test_encode_truncate_left(tok):
    prompts = ["the good day", "the very good day and night", "a"]
    enc = encode_prompts(prompts, tok, max_tokens=3, long_prompts="truncate_left", use_chat_template=False)
    assert enc.prompts == prompts
    assert (enc.truncated, enc.dropped) == (1, 0)
    assert [len(x) for x in enc.input_ids] == [3, 3, 1]
    assert tok.convert_ids_to_tokens(enc.input_ids[1]) == ["day", "and", "night"]  # the end is kept


def test_encode_drop(tok):
    prompts = ["the good day", "the very good day and night", "a", "i love my dog so much"]
    enc = encode_prompts(prompts, tok, max_tokens=3, long_prompts="drop", use_chat_template=False)
    assert enc.prompts == ["the good day", "a"]
    assert (enc.truncated, enc.dropped) == (0, 2)
    assert len(enc.input_ids) == 2


def test_encode_all_dropped(tok):
    with pytest.raises(UserError, match="data.max_prompt_tokens=2"):
        encode_prompts(["the good day", "a very good day"], tok, max_tokens=2, long_prompts="drop",
                       use_chat_template=False)


def test_encode_system_prompt(tok):
    enc = encode_prompts(["the day"], tok, max_tokens=64, system_prompt="be nice")
    tokens = tok.convert_ids_to_tokens(enc.input_ids[0])
    assert tokens[:3] == ["<bos>", "system", ":"]


# ---------------------------------------------------------------------------------------------
# judges


def test_vader_positive_beats_negative():
    pos, neg, neutral = vader(["What a lovely, wonderful day! I love it.", "This is awful, I hate it.", "the car"])
    assert pos > 0.5 and neg < -0.5 and pos > neutral > neg
    texts = ["What a lovely day", "awful"]
    assert get_judge("vader")(texts) == vader(texts)


def test_length_counts_words():
    assert length(["one two  three", "", "x"]) == [3.0, 0.0, 1.0]
    assert get_judge("length")(["a b"]) == [2.0]


def test_keyword_whole_words_case_insensitive():
    judge = get_judge("keyword:good")
    assert judge(["Good good GOOD", "goodness goods", "not bad", "so good."]) == [3.0, 0.0, 0.0, 1.0]
    assert keyword("a.b")(["a.b axb"]) == [1.0]  # the word is matched literally, not as a regex


def test_keyword_with_punctuation_edges():
    assert keyword("c++")(["i like c++ and C++"]) == [2.0]


def test_module_function_judge():
    judge = get_judge("builtins:len")
    assert judge(["abc", ""]) == [3.0, 0.0]
    assert all(isinstance(v, float) for v in judge(["x"]))


@pytest.mark.parametrize("name", ["sentiment", "keyword:", "", "no_such_module_rlhf:fn", "builtins:no_such_fn"])
def test_unknown_judge(name):
    with pytest.raises(UserError) as e:
        get_judge(name)
    assert repr(name) in str(e.value)


@pytest.fixture
def judge_module(tmp_path, monkeypatch):
    """A folder on sys.path where a test writes judge modules (removed from sys.modules afterwards)."""
    import sys

    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        return name

    yield write
    for name in set(sys.modules) - before:
        if name.startswith("rlhf_test_judge"):
            del sys.modules[name]


def test_module_judge_returning_nan_is_a_training_fault(judge_module):
    from rlhf.utils import TrainingFault

    judge_module("rlhf_test_judge_nan", "def score(text):\n    return float('nan') if 'x' in text else 1.0\n")
    judge = get_judge("rlhf_test_judge_nan:score")
    assert judge(["a", "b"]) == [1.0, 1.0]
    with pytest.raises(TrainingFault, match=r"'rlhf_test_judge_nan:score' returned nan for 2 of 3 responses"):
        judge(["a", "x", "xx"])


def test_builtin_judges_are_checked_too(monkeypatch):
    from reward_models import judges
    from rlhf.utils import TrainingFault

    monkeypatch.setitem(judges.JUDGES, "length", lambda texts: [float("inf")] * len(texts))
    with pytest.raises(TrainingFault, match="inf"):
        get_judge("length")(["a"])


@pytest.mark.parametrize("source, attr, message", [
    ("def score(:\n    pass\n", "score", "SyntaxError"),
    ("raise RuntimeError('needs a GPU')\n", "score", "RuntimeError: needs a GPU"),
    ("SCORE = 3\n", "SCORE", "not a function of the text"),
])
def test_module_judge_that_does_not_import_is_a_user_error(judge_module, source, attr, message):
    name = judge_module(f"rlhf_test_judge_{attr.lower()}_{abs(hash(source)) % 1000}", source)
    with pytest.raises(UserError, match=message):
        get_judge(f"{name}:{attr}")


@pytest.mark.parametrize("body, message", [("return 'high'", "must return a number"),
                                           ("raise KeyError('k')", "raised KeyError")])
def test_module_judge_failing_on_a_text_is_a_user_error(judge_module, body, message):
    name = judge_module(f"rlhf_test_judge_body_{abs(hash(body)) % 1000}", f"def score(text):\n    {body}\n")
    with pytest.raises(UserError, match=message):
        get_judge(f"{name}:score")(["some text"])
