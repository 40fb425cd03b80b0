import itertools

import torch

from vlmlab.config import DataConfig
from vlmlab.data.batching import ExampleDataset, StepBatches, collate, image_groups
from vlmlab.data.example import Example
from vlmlab.data.synthetic import make_split


def test_batches_keep_each_image_whole_and_cover_an_epoch():
    examples = make_split("train", 30, questions_per_image=3)
    groups = image_groups(examples)
    assert len(groups) == 30 and all(len(g) == 4 for g in groups)
    owner = {i: g for g, members in enumerate(groups) for i in members}
    batches = list(itertools.islice(iter(StepBatches(groups, 8, seed=0)), 7))  # 30 images / 2 per batch = 15
    for batch in batches:
        assert len(batch) == 8 and len({owner[i] for i in batch}) == 2
    seen = [owner[i] for batch in batches for i in batch]
    assert len(set(seen)) == 14  # 7 batches of 2 distinct images, no repeat within the epoch


def test_resuming_at_a_step_yields_the_same_batches():
    groups = [[i] for i in range(10)]  # one example per image, e.g. a JSONL file
    full = list(itertools.islice(iter(StepBatches(groups, 3, seed=5)), 9))  # crosses epochs (3 per epoch)
    resumed = list(itertools.islice(iter(StepBatches(groups, 3, seed=5, start_step=4)), 5))
    assert resumed == full[4:]
    other_seed = list(itertools.islice(iter(StepBatches(groups, 3, seed=6)), 9))
    assert other_seed != full


def test_collate_stacks_each_image_once_and_drops_unusable_items(tmp_path):
    examples = make_split("val", 3, questions_per_image=2)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    examples.append(Example(str(broken), "what?", ["x"], "vqa", "broken", "b0"))
    dataset = ExampleDataset(examples, DataConfig(), image_size=32)
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["pixels"].shape == (3, 3, 32, 32) and batch["pixels"].dtype == torch.uint8
    assert batch["image_index"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert batch["prompts"][0] == DataConfig().caption_prompt
    assert batch["prompts"][1].startswith("Question: ") and batch["prompts"][1].endswith(" Answer:")
    assert dataset.failed == {"broken"}
    assert collate([dataset[len(dataset) - 1]]) is None
