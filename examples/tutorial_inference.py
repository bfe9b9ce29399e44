"""The tutorial's inference step (alpaca-zh chatbot), unchanged, on tiny-bloom.

    python examples/tutorial_inference.py [ADAPTER_DIR]

With an adapter directory (written by ``save_pretrained`` or by PEFT) the
trained prompt is loaded; without one the prompt is the tutorial's TEXT
initialisation, so the script runs anywhere. tiny-bloom is a 1.7M-parameter
chatbot pre-trained on 40 bundled records: it answers those in their words and
anything else with fluent-looking nonsense.
"""

import sys

import torch
from peft import PromptTuningConfig, PromptTuningInit, TaskType

import fastprompt
from fastprompt.loading import tiny_bloom_path

INIT_TEXT = "下面是一段人与机器人的对话。"


def load(adapter_dir=None):
    model = fastprompt.load_model("tiny-bloom")
    tokenizer = model.tokenizer
    if adapter_dir:
        return fastprompt.FastPromptModel.from_pretrained(model, adapter_dir), tokenizer
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=INIT_TEXT,
        num_virtual_tokens=len(tokenizer(INIT_TEXT)["input_ids"]),
        tokenizer_name_or_path=str(tiny_bloom_path()),
    )
    return fastprompt.get_peft_model(model, config), tokenizer


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    peft_model, tokenizer = load(argv[0] if argv else None)
    torch.manual_seed(0)

    # --- the tutorial's snippet, as written there ---
    ipt = tokenizer("Human: {}\n{}".format("考试有哪些技巧？", "").strip() + "\n\nAssistant: ", return_tensors="pt").to(
        peft_model.device
    )
    answer = tokenizer.decode(peft_model.generate(**ipt, max_length=128, do_sample=True)[0], skip_special_tokens=True)
    # ---
    print(answer)
    return answer


if __name__ == "__main__":
    main()
