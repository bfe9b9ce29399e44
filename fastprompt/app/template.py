"""The tutorial's text recipe: how an Alpaca record becomes prompt + response.

Kept free of torch so the command line can show its defaults (``fastprompt
train --help``) without importing the heavy libraries.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass

MAX_LENGTH = 256


@dataclass(frozen=True)
class Template:
    """How a record becomes text: ``prompt`` is a ``str.format`` string over the
    record's fields (stripped, as the tutorial does), followed by
    ``response_prefix``; the model learns to continue with ``response_field``."""

    prompt: str = "Human: {instruction}\n{input}"
    response_prefix: str = "\n\nAssistant: "
    response_field: str = "output"

    def __post_init__(self):
        if not self.response_field:
            raise ValueError("template response_field must name a record field")
        self.fields  # noqa: B018 (parses the prompt: a bad template fails here, not on record 1)

    @property
    def fields(self) -> tuple[str, ...]:
        """Every field a record must have, as a string."""
        try:
            parsed = list(string.Formatter().parse(self.prompt))
        except ValueError as err:
            raise ValueError(f"template prompt {self.prompt!r} is not a valid format string: {err}") from None
        names = [name for _, name, _, _ in parsed if name is not None]
        for name in names:
            if not name.isidentifier():
                raise ValueError(
                    f"template prompt {self.prompt!r}: fields must be plain names like {{instruction}}, got {{{name}}}"
                )
        return tuple(dict.fromkeys(names + [self.response_field]))

    def render_prompt(self, record: Mapping[str, str]) -> str:
        return self.prompt.format_map(record).strip() + self.response_prefix

    def problem_with(self, record) -> str | None:
        """Why ``record`` cannot be used, or None."""
        if not isinstance(record, Mapping):
            return f"is a {type(record).__name__}, expected an object with fields {', '.join(self.fields)}"
        for name in self.fields:
            if name not in record:
                return f"has no field {name!r}"
            if not isinstance(record[name], str):
                return f"field {name!r} is a {type(record[name]).__name__}, expected a string"
        if not record[self.response_field].strip():
            return f"has an empty {self.response_field!r}"
        return None


TUTORIAL_TEMPLATE = Template()
