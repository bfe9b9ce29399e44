"""The tutorial's recipe, unchanged but for one import: prompt tuning a BLOOM
chatbot on Chinese Alpaca data with the HF ``Trainer``, where
``get_peft_model`` now comes from fastprompt instead of peft.

The tutorial trains Langboat/bloom-1b4-zh on alpaca_data_zh. The defaults here
run offline on the built-in tiny-bloom and the bundled demo data; the
environment switches to the real run, e.g.

    FASTPROMPT_MODEL=Langboat/bloom-1b4-zh FASTPROMPT_DATA=/alpaca_data_zh python examples/tutorial_trainer.py

FASTPROMPT_MAX_STEPS, FASTPROMPT_LR, FASTPROMPT_LOGGING_STEPS and
FASTPROMPT_SAVE_STEPS shorten it for a quick check. Around ``trainer.train()``
the script measures the loss on the training data, so a short run shows
whether it fell. FASTPROMPT_TUTORIAL_BACKEND=peft runs the very same script
with PEFT's ``get_peft_model``, to compare the two.
"""

import dataclasses
import os
import tempfile

from datasets import Dataset, load_from_disk
from peft import PromptTuningConfig, PromptTuningInit, TaskType
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from fastprompt import get_peft_model  # the tutorial: from peft import get_peft_model
from fastprompt.loading import demo_data_path, resolve_model_path

if os.environ.get("FASTPROMPT_TUTORIAL_BACKEND") == "peft":
    from peft import get_peft_model

MODEL = resolve_model_path(os.environ.get("FASTPROMPT_MODEL", "tiny-bloom"))
DATA = os.environ.get("FASTPROMPT_DATA", str(demo_data_path()))
OUTPUT = os.environ.get("FASTPROMPT_OUTPUT", os.path.join(tempfile.gettempdir(), "chatbot"))
QUICK = {
    name: kind(os.environ[variable])
    for name, variable, kind in [
        ("max_steps", "FASTPROMPT_MAX_STEPS", int),
        ("learning_rate", "FASTPROMPT_LR", float),
        ("logging_steps", "FASTPROMPT_LOGGING_STEPS", int),
        ("save_steps", "FASTPROMPT_SAVE_STEPS", int),
    ]
    if variable in os.environ
}

# --- data: the tutorial's template, labels only on the response
ds = load_from_disk(DATA) if os.path.isdir(DATA) else Dataset.from_json(DATA)
tokenizer = AutoTokenizer.from_pretrained(MODEL)


def process_func(example):
    MAX_LENGTH = 256
    instruction = tokenizer(
        "\n".join(["Human: " + example["instruction"], example["input"]]).strip() + "\n\nAssistant: "
    )
    response = tokenizer(example["output"] + tokenizer.eos_token)
    input_ids = instruction["input_ids"] + response["input_ids"]
    attention_mask = instruction["attention_mask"] + response["attention_mask"]
    labels = [-100] * len(instruction["input_ids"]) + response["input_ids"]
    return {
        "input_ids": input_ids[:MAX_LENGTH],
        "attention_mask": attention_mask[:MAX_LENGTH],
        "labels": labels[:MAX_LENGTH],
    }


tokenized_ds = ds.map(process_func, remove_columns=ds.column_names)

# --- model: a frozen BLOOM with a soft prompt initialised from text
model = AutoModelForCausalLM.from_pretrained(MODEL)
config = PromptTuningConfig(
    task_type=TaskType.CAUSAL_LM,
    prompt_tuning_init=PromptTuningInit.TEXT,
    prompt_tuning_init_text="下面是一段人与机器人的对话。",
    num_virtual_tokens=len(tokenizer("下面是一段人与机器人的对话。")["input_ids"]),
    tokenizer_name_or_path=MODEL,
)
model = get_peft_model(model, config)
model.print_trainable_parameters()

# --- training: batch 1 x accumulation 8, one epoch
args = TrainingArguments(
    output_dir=OUTPUT,
    per_device_train_batch_size=1,
    gradient_accumulation_steps=8,
    logging_steps=10,
    num_train_epochs=1,
)
args = dataclasses.replace(args, **QUICK)
trainer = Trainer(
    model=model,
    args=args,
    train_dataset=tokenized_ds,
    data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True),
)
before = trainer.evaluate(tokenized_ds)["eval_loss"]
trainer.train()
after = trainer.evaluate(tokenized_ds)["eval_loss"]
print(f"loss on the training data: {before:.4f} -> {after:.4f}")
assert after < before, "the loss did not fall"

# --- inference, as in the tutorial
ipt = tokenizer("Human: {}\n{}".format("考试有哪些技巧？", "").strip() + "\n\nAssistant: ", return_tensors="pt").to(
    model.device
)
print(tokenizer.decode(model.generate(**ipt, max_length=128, do_sample=True)[0], skip_special_tokens=True))
