"""Turning an example into the text the language model reads."""

from __future__ import annotations

from vlmlab.config import DataConfig


def format_prompt(data: DataConfig, question: str | None) -> str:
    """The VQA instruction around a question, or the caption prompt when there is no question."""
    if question is None:
        return data.caption_prompt
    return data.prompt.format(question=question.strip())
