"""Alpaca loading, the tutorial's template and masking, bad records, padding and batching."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fastprompt.app.data import (
    TUTORIAL_TEMPLATE,
    PadCollator,
    Template,
    TokenizedData,
    length_grouped_steps,
    load_alpaca,
    read_records,
    split_holdout,
    token_budget_batches,
    tokenize_record,
)
from fastprompt.loading import demo_data_path

RECORDS = [
    {"instruction": "把下面的句子翻译成英文。", "input": "今天天气很好。", "output": "The weather is nice today."},
    {"instruction": "中国的首都是哪里？", "input": "", "output": "中国的首都是北京。"},
    {"instruction": "Name three primary colors.", "input": "", "output": "Red, yellow and blue."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_bloom_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bloom_dir)


def write_json(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def test_template_is_the_tutorials():
    with_input, without_input = RECORDS[0], RECORDS[1]
    assert TUTORIAL_TEMPLATE.render_prompt(with_input) == (
        "\n".join(["Human: " + with_input["instruction"], with_input["input"]]).strip() + "\n\nAssistant: "
    )
    # The empty input leaves no trailing newline before the response prefix.
    assert TUTORIAL_TEMPLATE.render_prompt(without_input) == "Human: 中国的首都是哪里？\n\nAssistant: "


def test_tokenized_example_masks_the_prompt_and_ends_with_eos(tokenizer):
    record = RECORDS[0]
    example = tokenize_record(record, tokenizer)
    prompt = tokenizer(TUTORIAL_TEMPLATE.render_prompt(record))["input_ids"]
    response = tokenizer(record["output"])["input_ids"]
    assert example["input_ids"] == prompt + response + [tokenizer.eos_token_id]
    assert example["labels"] == [-100] * len(prompt) + response + [tokenizer.eos_token_id]
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_truncation_to_max_length(tokenizer):
    record = {"instruction": "写", "input": "", "output": "很长的回答。" * 100}
    example = tokenize_record(record, tokenizer, max_length=256)
    assert len(example["input_ids"]) == len(example["labels"]) == 256
    assert example["labels"][-1] != -100


def test_json_jsonl_and_saved_dataset_give_the_same_examples(tmp_path, tokenizer):
    import datasets

    as_list = write_json(tmp_path / "data.json", RECORDS)
    as_lines = tmp_path / "data.jsonl"
    as_lines.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\n", encoding="utf-8")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    split = tmp_path / "split"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(split))

    loaded = [load_alpaca(path, tokenizer).examples for path in (as_list, as_lines, tmp_path / "saved", split)]
    assert loaded[0] == [tokenize_record(r, tokenizer) for r in RECORDS]
    assert all(examples == loaded[0] for examples in loaded[1:])


def test_bad_records_are_reported_by_position_and_skipped(tmp_path, tokenizer, caplog):
    records = [
        RECORDS[0],
        {"instruction": "no output field", "input": ""},
        {"instruction": "wrong type", "input": 3, "output": "x"},
        {"instruction": "empty output", "input": "", "output": "   "},
        ["not", "an", "object"],
        RECORDS[1],
    ]
    path = write_json(tmp_path / "data.json", records)
    with caplog.at_level(logging.WARNING, logger="fastprompt"):
        data = load_alpaca(path, tokenizer)
    assert len(data) == 2
    assert data.report.total == 6 and data.report.kept == 2
    assert [where for where, _ in data.report.skipped] == ["record 1", "record 2", "record 3", "record 4"]
    reasons = " | ".join(why for _, why in data.report.skipped)
    assert "no field 'output'" in reasons and "'input' is a int" in reasons and "empty 'output'" in reasons
    assert "record 2" in caplog.text and "skipped 4" in caplog.text


def test_jsonl_reports_line_numbers_including_broken_json(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps(RECORDS[0]) + "\n\n" + "{not json\n" + json.dumps({"instruction": "x", "input": ""}) + "\n",
        encoding="utf-8",
    )
    data = load_alpaca(path, tokenizer)
    assert len(data) == 1
    assert [where for where, _ in data.report.skipped] == ["line 3", "line 4"]
    assert "not valid JSON" in data.report.skipped[0][1]


def test_strict_makes_the_first_bad_record_fatal(tmp_path, tokenizer):
    path = write_json(tmp_path / "data.json", [RECORDS[0], {"instruction": "x", "input": "", "output": ""}])
    with pytest.raises(ValueError, match=r"record 1 has an empty 'output'"):
        load_alpaca(path, tokenizer, strict=True)


def test_empty_and_all_bad_datasets_are_clear_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="no usable records"):
        load_alpaca(write_json(tmp_path / "empty.json", []), tokenizer)
    with pytest.raises(ValueError, match=r"no usable records \(of 2\)"):
        load_alpaca(write_json(tmp_path / "bad.json", [{"a": 1}, {"b": 2}]), tokenizer)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_alpaca(tmp_path / "missing.json", tokenizer)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "x",', encoding="utf-8")
    with pytest.raises(ValueError, match=r"not valid JSON \(line 1"):
        load_alpaca(broken, tokenizer)


def test_record_whose_prompt_fills_max_length_is_skipped(tmp_path, tokenizer):
    long_prompt = {"instruction": "很长的问题" * 200, "input": "", "output": "好"}
    fits_record_0 = len(tokenize_record(RECORDS[0], tokenizer)["input_ids"])
    data = load_alpaca(
        write_json(tmp_path / "data.json", [long_prompt, RECORDS[0]]), tokenizer, max_length=fits_record_0
    )
    assert len(data) == 1
    assert data.report.skipped[0][0] == "record 0" and "no room for the response" in data.report.skipped[0][1]


def test_custom_template_and_fields(tmp_path, tokenizer):
    template = Template(prompt="Q: {question}", response_prefix="\nA: ", response_field="answer")
    assert template.fields == ("question", "answer")
    records, report = read_records(
        write_json(tmp_path / "qa.json", [{"question": "2+2?", "answer": "4"}, {"question": "x"}]), template
    )
    assert [r for _, r in records] == [{"question": "2+2?", "answer": "4"}] and report.skipped[0][0] == "record 1"
    example = tokenize_record(records[0][1], tokenizer, template)
    assert tokenizer.decode(example["input_ids"], skip_special_tokens=True) == "Q: 2+2?\nA: 4"


@pytest.mark.parametrize("prompt", ["Human: {instruction", "{record[0]}", "{0}"])
def test_bad_templates_fail_at_construction(prompt):
    with pytest.raises(ValueError, match="template prompt"):
        Template(prompt=prompt)


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_pads_ids_mask_and_labels(side):
    examples = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    batch = PadCollator(pad_token_id=3, padding_side=side)(examples)
    pad = [3, 3], [0, 0], [-100, -100]
    short = [[8], [1], [8]]
    for (name, tensor), fill, row in zip(batch.items(), pad, short):
        assert tensor.dtype == torch.long
        assert tensor[0].tolist() == examples[0][name]
        assert tensor[1].tolist() == (fill + row if side == "left" else row + fill)
    with pytest.raises(ValueError, match="padding_side"):
        PadCollator(3, padding_side="middle")


def test_length_grouped_steps_cover_the_epoch_with_little_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 256, (1000,), generator=gen).tolist()
    steps = length_grouped_steps(lengths, batch_size=8, seed=1)
    assert sorted(i for step in steps for i in step) == list(range(1000))
    assert all(len(step) == 8 for step in steps)
    assert steps == length_grouped_steps(lengths, batch_size=8, seed=1)
    assert steps != length_grouped_steps(lengths, batch_size=8, seed=2)

    def padding(plan):
        return sum(len(step) * max(lengths[i] for i in step) - sum(lengths[i] for i in step) for step in plan)

    unsorted = [list(range(i, i + 8)) for i in range(0, 1000, 8)]
    assert padding(steps) < 0.2 * padding(unsorted)


def test_token_budget_batches_respect_the_budget():
    lengths = [10, 50, 20, 200, 30, 40, 5]
    batches = token_budget_batches(range(7), lengths, max_tokens=100)
    assert sorted(i for batch in batches for i in batch) == list(range(7))
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 100 or len(batch) == 1
    assert [3] in batches  # longer than the budget: alone
    assert token_budget_batches(range(7), lengths, max_tokens=10_000) == [[3, 1, 5, 4, 2, 0, 6]]


def test_holdout_split_is_seeded_and_disjoint(tokenizer):
    data = load_alpaca(demo_data_path(), tokenizer)
    train, held = split_holdout(data, 0.2, seed=7)
    assert len(held) == 8 and len(train) == 32
    assert {json.dumps(e) for e in train.examples}.isdisjoint(json.dumps(e) for e in held.examples)
    assert split_holdout(data, 0.2, seed=7)[1].examples == held.examples
    assert split_holdout(data, 0.0, seed=7) == (data, None)
    with pytest.raises(ValueError):
        split_holdout(TokenizedData(data.examples[:1]), 0.5, seed=0)


def test_demo_data_and_real_alpaca_load(tokenizer, shared_dir):
    assert len(load_alpaca(demo_data_path(), tokenizer)) == 40
    data = load_alpaca(shared_dir / "data" / "alpaca_zh_demo.json", tokenizer)
    assert data.report.total == 1000 and len(data) >= 990
    assert max(data.lengths) == 256
    for example in data.examples[:50]:
        assert example["labels"][-1] in (tokenizer.eos_token_id, example["input_ids"][-1])


CONVERSATIONS = [
    [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "1+1=?"},
        {"role": "assistant", "content": "2"},
    ],
    [{"role": "user", "content": "中国的首都是哪里？"}, {"role": "assistant", "content": "北京。"}],
]


@pytest.fixture
def chat_tokenizer(tiny_bloom_dir):
    from processes import ROOT
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bloom_dir)
    tokenizer.chat_template = (ROOT / "examples" / "tutorial_chat_template.jinja").read_text(encoding="utf-8")
    return tokenizer


def test_chat_records_learn_the_assistant_turns_as_trl_does(tmp_path, chat_tokenizer):
    """Input ids and labels are those of TRL's SFTTrainer with assistant_only_loss (which needs generation
    markers in the template), and stay the same when the template has no markers; Alpaca records in the same
    file keep the tutorial's recipe."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    import fastprompt

    records = [{"messages": CONVERSATIONS[0]}, RECORDS[1], {"messages": CONVERSATIONS[1]}]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    loaded = load_alpaca(path, chat_tokenizer).examples
    assert loaded[1] == tokenize_record(RECORDS[1], chat_tokenizer)

    settings = SFTConfig(tmp_path / "trl", assistant_only_loss=True, max_length=256, report_to="none", use_cpu=True)
    trl = SFTTrainer(
        model=fastprompt.load_model("tiny-bloom"),
        args=settings,
        train_dataset=datasets.Dataset.from_list([{"messages": messages} for messages in CONVERSATIONS]),
        processing_class=chat_tokenizer,
    ).train_dataset
    for example, theirs in zip([loaded[0], loaded[2]], trl):
        assert (example["input_ids"], example["labels"]) == (theirs["input_ids"], theirs["labels"])
        assert 0 < sum(label != -100 for label in example["labels"]) < len(example["labels"])

    unmarked = chat_tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    chat_tokenizer.chat_template = unmarked
    assert load_alpaca(path, chat_tokenizer).examples == loaded
    # Cut to max_length like Alpaca examples; a conversation whose assistant turns are all cut off is skipped.
    first_answer = loaded[0]["labels"].index(next(label for label in loaded[0]["labels"] if label != -100))
    cut = load_alpaca(path, chat_tokenizer, max_length=first_answer + 1)
    assert len(cut) == 3 and cut.examples[0]["labels"] == loaded[0]["labels"][: first_answer + 1]
    cut = load_alpaca(path, chat_tokenizer, max_length=first_answer)
    assert cut.report.skipped[0] == ("line 1", f"leaves no room for the response within max_length {first_answer}")


def test_chat_records_without_a_template_or_malformed_are_clear_errors(tmp_path, tokenizer, chat_tokenizer):
    path = write_json(tmp_path / "chats.json", [{"messages": CONVERSATIONS[1]}])
    with pytest.raises(ValueError, match="'messages' records, but the model's tokenizer has no chat template"):
        load_alpaca(path, tokenizer)  # tiny-bloom's own tokenizer has none
    bad = [
        {"messages": []},
        {"messages": "hi"},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": CONVERSATIONS[1]},
    ]
    data = load_alpaca(write_json(tmp_path / "bad.json", bad), chat_tokenizer)
    assert len(data) == 1
    assert [why for _, why in data.report.skipped] == [
        "field 'messages' is not a non-empty list of {role, content} objects",
        "field 'messages' is not a non-empty list of {role, content} objects",
        "messages[0] has no string 'content'",
        "has no non-empty 'assistant' message",
    ]
    strict_roles = "{%- if messages[0]['role'] == 'assistant' %}{{ raise_exception('user first') }}{% endif -%}"
    chat_tokenizer.chat_template = strict_roles + chat_tokenizer.chat_template
    records = [{"messages": CONVERSATIONS[1][::-1]}, {"messages": CONVERSATIONS[1]}]
    data = load_alpaca(write_json(tmp_path / "roles.json", records), chat_tokenizer)
    assert len(data) == 1 and data.report.skipped == [("record 0", "is refused by the chat template: user first")]
    # A template that renders the last turn differently (as templates that drop earlier turns' reasoning do).
    chat_tokenizer.chat_template = "{% for m in messages %}{% if loop.last %}>{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match=r"record 0 cannot be learnt: .* \(up to message 1\)"):
        load_alpaca(write_json(tmp_path / "last.json", records[1:]), chat_tokenizer, strict=True)
