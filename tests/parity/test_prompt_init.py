"""Initial prompts equal PEFT's bit for bit, and leave the RNG where PEFT does."""

import pytest
import torch
from models import pair, peft_prompt, prompt_config, random_bloom
from peft import PromptTuningInit

import fastprompt


@pytest.mark.parametrize("init", [PromptTuningInit.RANDOM, PromptTuningInit.SAMPLE_VOCAB, PromptTuningInit.TEXT])
@pytest.mark.parametrize("virtual", [1, 5, 30])
def test_initial_prompt_bitwise_equal_to_peft(tiny_bloom_dir, init, virtual):
    config = prompt_config(virtual, init=init, tokenizer=tiny_bloom_dir)

    def make_base():
        return fastprompt.load_model(tiny_bloom_dir)

    ours, ref = pair(make_base, config, seed=7)
    assert peft_prompt(ours).dtype == torch.float32
    assert torch.equal(peft_prompt(ours).detach(), peft_prompt(ref).detach())


def test_rng_state_after_init_matches_peft(tiny_bloom_dir):
    from peft import get_peft_model

    config = prompt_config(6, init=PromptTuningInit.SAMPLE_VOCAB)
    base = random_bloom(vocab=512, seed=1)
    torch.manual_seed(3)
    fastprompt.get_peft_model(base, config)
    ours_next = torch.rand(4)
    base = random_bloom(vocab=512, seed=1)
    torch.manual_seed(3)
    get_peft_model(base, config)
    assert torch.equal(ours_next, torch.rand(4))


def test_text_init_repeats_and_truncates_like_peft(tiny_bloom_dir):
    base = fastprompt.load_model(tiny_bloom_dir)
    ids = base.tokenizer("下面是一段人与机器人的对话。")["input_ids"]
    count = 2 * len(ids) + 1
    model = fastprompt.get_peft_model(base, prompt_config(count, init=PromptTuningInit.TEXT, tokenizer=tiny_bloom_dir))
    table = base.get_input_embeddings().weight
    expected = table[torch.tensor((ids * 3)[:count])]
    assert torch.equal(peft_prompt(model).detach(), expected)


def test_builtin_name_is_accepted_as_tokenizer():
    base = fastprompt.load_model("tiny-bloom")
    model = fastprompt.get_peft_model(base, prompt_config(4, init=PromptTuningInit.TEXT, tokenizer="tiny-bloom"))
    assert peft_prompt(model).shape == (4, 256)
