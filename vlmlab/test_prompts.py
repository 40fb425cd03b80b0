import pytest

from vlmlab.config import ConfigError, DataConfig
from vlmlab.prompts import describe_prompts, format_prompt


def test_named_templates():
    assert format_prompt(DataConfig(prompt="none"), " what color? ") == "what color?"
    assert format_prompt(DataConfig(prompt="qa"), "what color?") == "Question: what color? Answer:"
    assert format_prompt(DataConfig(prompt="instruct"), "what color?") == (
        "Based on the image, answer the question. Question: what color? Answer:")
    assert format_prompt(DataConfig(caption_prompt="none"), None) == ""
    assert format_prompt(DataConfig(caption_prompt="photo"), None) == "A photo of"


def test_own_templates_and_errors():
    data = DataConfig(prompt="Q: {question} A:", caption_prompt="Say what you see:")
    assert format_prompt(data, "why {so}?") == "Q: why {so}? A:"  # braces in a question are just text
    assert format_prompt(data, None) == "Say what you see:"
    with pytest.raises(ConfigError, match=r"data.prompt='Q: A:' is neither a template name \(none, qa, instruct"):
        format_prompt(DataConfig(prompt="Q: A:"), "why?")


def test_the_prompts_are_described_for_the_metrics():
    assert describe_prompts(DataConfig()) == {  # the defaults are the named qa and short templates
        "vqa": {"name": "qa", "template": "Question: {question} Answer:"},
        "caption": {"name": "short", "text": "A short caption:"},
    }
    described = describe_prompts(DataConfig(prompt="instruct", caption_prompt="Look:"))
    assert described["vqa"]["name"] == "instruct" and described["caption"] == {"name": "custom", "text": "Look:"}
