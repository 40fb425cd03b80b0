"""Turning an example into the text the language model reads: named instruction templates.

`data.prompt` is a VQA template name below or a template of one's own containing `{question}`; `data.caption_prompt`
is a caption prompt name below or a text of one's own. Both are recorded in the metrics of every evaluation, since
the instruction format alone moves VQA scores by points.
"""

from __future__ import annotations

from vlmlab.config import ConfigError, DataConfig

QUESTION = "{question}"
VQA_PROMPTS = {
    "none": QUESTION,  # the bare question, no instruction
    "qa": "Question: {question} Answer:",
    "instruct": "Based on the image, answer the question. Question: {question} Answer:",
    "short": "{question} Answer the question using a single word or phrase.",
}
CAPTION_PROMPTS = {
    "none": "",  # no text at all: the visual tokens alone
    "short": "A short caption:",
    "describe": "A short image description:",
    "photo": "A photo of",
}


def vqa_template(value: str) -> str:
    """The template a `data.prompt` value stands for (a name, or a template containing {question})."""
    if value in VQA_PROMPTS:
        return VQA_PROMPTS[value]
    if QUESTION not in value:
        raise ConfigError(
            f"data.prompt={value!r} is neither a template name ({', '.join(VQA_PROMPTS)}) nor a template "
            f"containing {QUESTION}"
        )
    return value


def caption_text(value: str) -> str:
    """The text a `data.caption_prompt` value stands for (a name, or the text itself)."""
    return CAPTION_PROMPTS.get(value, value)


def format_prompt(data: DataConfig, question: str | None) -> str:
    """The VQA instruction around a question, or the caption prompt when there is no question."""
    if question is None:
        return caption_text(data.caption_prompt)
    return vqa_template(data.prompt).replace(QUESTION, question.strip())


def _name_of(value: str, text: str, names: dict) -> str:
    return value if value in names else next((name for name, known in names.items() if known == text), "custom")


def describe_prompts(data: DataConfig) -> dict:
    """What the metrics record: each prompt's name ("custom" for one's own) and its text."""
    template, caption = vqa_template(data.prompt), caption_text(data.caption_prompt)
    return {
        "vqa": {"name": _name_of(data.prompt, template, VQA_PROMPTS), "template": template},
        "caption": {"name": _name_of(data.caption_prompt, caption, CAPTION_PROMPTS), "text": caption},
    }


def training_texts(examples, data: DataConfig) -> list[str]:
    """What a tokenizer trained from scratch must cover: every prompt as the LM reads it, every reference."""
    texts = [format_prompt(data, e.question) for e in examples]
    texts += [answer for e in examples for answer in e.answers]
    return texts
