"""Chat records, ``{"messages": [{"role": ..., "content": ...}, ...]}``: examples with the loss on assistant turns only.

The conversation is rendered by the tokenizer's chat template, the format the model will be prompted in, and
tokenised in one piece, as TRL's ``SFTTrainer`` does. The labels are those of TRL's ``assistant_only_loss``
(transformers' ``return_assistant_tokens_mask``): -100 on every token but those of the assistant turns. That needs
``{% generation %}`` markers in the template, which few templates have; here an assistant turn is instead what the
template adds between the conversation up to it (with the generation prompt) and the conversation including it (the
turn's text and its end-of-turn marker), so any template that renders the start of a conversation as the start of
its text serves. A token that straddles a turn's edge counts as the turn's, as transformers counts it.

No template is invented for a tokenizer without one: a made-up format would be learnt, and every other tool that
prompts the model (its own chat template, ``fastprompt generate``) would then prompt it differently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jinja2 import TemplateError

from ..loss import IGNORE_INDEX

MESSAGES_FIELD = "messages"
ASSISTANT = "assistant"


class UnusableConversation(ValueError):
    """The chat template refuses this conversation, or renders it so that its assistant turns cannot be found:
    the record is reported and skipped like any bad record."""


def is_chat(record) -> bool:
    return isinstance(record, Mapping) and MESSAGES_FIELD in record


def problem_with(record: Mapping) -> str | None:
    """Why the chat record ``record`` cannot be used, or None."""
    messages = record[MESSAGES_FIELD]
    if not isinstance(messages, list) or not messages:
        return f"field {MESSAGES_FIELD!r} is not a non-empty list of {{role, content}} objects"
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            return f"{MESSAGES_FIELD}[{index}] is a {type(message).__name__}, expected an object with role and content"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                return f"{MESSAGES_FIELD}[{index}] has no string {key!r}"
    if not any(message["role"] == ASSISTANT and message["content"].strip() for message in messages):
        return f"has no non-empty {ASSISTANT!r} message"
    return None


def check_template(tokenizer, source: str) -> None:
    """A clear error, before any record is tokenised, when chat records meet a tokenizer without a template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{source} holds {MESSAGES_FIELD!r} records, but the model's tokenizer has no chat template; "
            "pass --chat-template FILE (a Jinja template, as tokenizer_config.json's chat_template) "
            "or use instruction/input/output records"
        )


def assistant_spans(messages: Sequence[Mapping], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]

    def render(turns, generation_prompt=False) -> str:
        try:
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        except TemplateError as err:  # the template's raise_exception: roles out of order, say
            raise UnusableConversation(f"is refused by the chat template: {err}") from None

    text = render(messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        before, through = render(messages[:index], generation_prompt=True), render(messages[: index + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise UnusableConversation(
                f"cannot be learnt: the chat template does not render its start (up to message {index}) as the "
                "start of its text, so the assistant turns cannot be found"
            )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_conversation(messages: Sequence[Mapping], tokenizer, max_length: int) -> dict[str, list[int]]:
    """The conversation through the chat template, labels -100 outside the assistant turns, cut to ``max_length``."""
    text, spans = assistant_spans(messages, tokenizer)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoded["input_ids"][:max_length]
    labels = [
        token if any(start < end_char and end > start_char for start_char, end_char in spans) else IGNORE_INDEX
        for token, (start, end) in zip(input_ids, encoded["offset_mapping"])
    ]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
