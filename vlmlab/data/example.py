"""One training or evaluation example: the unit every dataset yields and every batch is built from."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass
class Example:
    """An image with either a question (VQA) or none (captioning).

    `answers` holds the reference answers of a VQA example (VQAv2 has 10 per question, repeats included) or the
    reference captions of a captioning example. The first answer is the training target.
    """

    image: Image.Image | str  # a PIL image, a path to one, or a lazy source with `open()` (a hub dataset row)
    question: str | None  # None: a captioning example
    answers: list[str]
    question_type: str = "caption"  # breaks results down by type ("color", "count", ..., "caption")
    image_id: str = ""  # examples of the same image share it (the shuffled-image control swaps by it)
    example_id: str = ""
    extra: dict = field(default_factory=dict)
    # The evaluation family the question belongs to, as in the Idefics2 study: general (VQAv2) | text (TextVQA) |
    # knowledge (OK-VQA) | captions (COCO); "" where a dataset names none. Results are averaged per family.
    family: str = ""
    answer_type: str = ""  # VQAv2's "yes/no" | "number" | "other": subsets are stratified and results broken down by it

    @property
    def is_caption(self) -> bool:
        return self.question is None

    @property
    def target(self) -> str:
        return self.answers[0]
