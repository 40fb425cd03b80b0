"""Image splitting through a whole model, and starting a run from a saved model (caption model -> VQA)."""

import json

import torch
import yaml

from vlmlab import VLM
from vlmlab.config import DataConfig, apply_overrides
from vlmlab.data.batching import ExampleDataset, collate
from vlmlab.data.synthetic import make_split
from vlmlab.model import build_vlm, start_from
from vlmlab.presets import get_preset
from vlmlab.test_model import SMALL
from vlmlab.prompts import training_texts
from vlmlab.train import train


def test_image_splitting_feeds_five_views_per_image():
    examples = make_split("train", 3, questions_per_image=1)
    cfg = apply_overrides(get_preset("tiny-qformer"), [*SMALL, "data.image_split=true", "vision.image_size=32"])
    model = build_vlm(cfg, training_texts(examples, cfg.data))
    features_per_view = model.vision.feature_layout()[0]
    assert model.connector.positions.shape[0] == 5 * features_per_view  # the views' features concatenated along N
    batch = collate([ExampleDataset(examples, cfg.data, 32)[i] for i in range(len(examples))])
    assert batch["pixels"].shape == (3, 5, 3, 32, 32)
    assert model.vision(batch["pixels"]).shape[1] == 5 * features_per_view
    loss = model(batch["pixels"], batch["prompts"], batch["targets"], batch["image_index"])
    assert torch.isfinite(loss)
    assert model.pixels_of([examples[0].image]).shape == (1, 5, 3, 32, 32)
    assert isinstance(model.eval().caption(examples[0].image), str)


FAST = ["data.train_images=4", "data.eval_images=2", "train.batch_size=4", "train.max_steps=1", "train.eval_every=0",
        "train.warmup_steps=1", "eval.caption_metrics=false", "eval.shuffled_control=false"]


def test_images_left_whole_train_nothing_that_only_crops_reach(tmp_path, monkeypatch):
    # The Q-Former's learned positions start at zero: a crop's rows get a gradient only from split images.
    split = [*SMALL, *FAST, "data.image_split=true", "vision.image_size=32", "train.max_steps=2",
             "train.alarm_every=0"]
    crop_rows = 4 * build_vlm(apply_overrides(get_preset("tiny-qformer"), split),
                              ["a b"]).vision.feature_layout()[0]  # positions [5 x N per view, D], crops first
    seen_views = []
    real_generate = VLM.generate

    def generate(self, pixels, prompts, max_new_tokens, image_index=None, views=None, **options):
        seen_views.append(views)
        return real_generate(self, pixels, prompts, max_new_tokens, image_index, views, **options)

    monkeypatch.setattr(VLM, "generate", generate)
    for fraction in ("0.0", "1.0"):
        train(apply_overrides(get_preset("tiny-qformer"), [*split, f"data.image_split_fraction={fraction}",
                                                           f"eval.image_split={fraction == '1.0'}"]),
              tmp_path / fraction)
    whole_only, every_view = (VLM.load(tmp_path / f, device="cpu").connector.positions for f in ("0.0", "1.0"))
    assert torch.count_nonzero(whole_only[:crop_rows]) == 0 and torch.count_nonzero(whole_only[crop_rows:]) > 0
    assert torch.count_nonzero(every_view[:crop_rows]) > 0
    # evaluation follows eval.image_split: the run at fraction 0 was evaluated on whole views, the other split
    assert seen_views and not seen_views[0][:, :4].any() and seen_views[0][:, 4].all() and seen_views[-1] is None
    assert [json.loads((tmp_path / f / "metrics.json").read_text())["image_split"] for f in ("0.0", "1.0")] == [
        False, True]


def test_a_caption_model_starts_a_vqa_run(tmp_path):
    caption_data = DataConfig(questions_per_image=0, train_images=6)
    torch.manual_seed(0)
    captioner = build_vlm(apply_overrides(get_preset("tiny-qformer"), [*SMALL, "connector.num_queries=6"]),
                          training_texts(make_split("train", 6, questions_per_image=0), caption_data))
    captioner.save(tmp_path / "captioner")

    # The VQA run asks for another connector size and a frozen tower: the saved architecture wins, the freezing holds.
    vqa = apply_overrides(get_preset("tiny-qformer"), [*SMALL, "connector.num_queries=16", "vision.train=frozen",
                                                  f"train.init_from={tmp_path / 'captioner'}", "data.captions=false"])
    model = start_from(tmp_path / "captioner", vqa)
    assert model.config.connector.num_queries == 6 and model.config.data.captions is False
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.connector.parameters())
    for name, value in captioner.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name

    metrics = train(apply_overrides(vqa, FAST), tmp_path / "run")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["connector"]["num_queries"] == 6 and saved["train"]["init_from"] == str(tmp_path / "captioner")
    assert saved["vision"]["model"] == str((tmp_path / "captioner" / "vision").resolve())  # where its weights began
    assert metrics["num_caption_examples"] == 0 and metrics["failed_train_images"] == 0
    trained = VLM.load(tmp_path / "run")
    assert torch.equal(trained.vision.state_dict()["model.embeddings.patch_embedding.weight"],
                       captioner.vision.state_dict()["model.embeddings.patch_embedding.weight"])  # frozen
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["prompt"]["vqa"]["name"] == "qa"


def test_a_lora_model_is_merged_then_started_from(tmp_path):
    examples = make_split("train", 4, questions_per_image=1)
    texts = training_texts(examples, DataConfig())
    torch.manual_seed(0)
    build_vlm(apply_overrides(get_preset("tiny-qformer"), SMALL), texts).language.save(tmp_path / "lm")  # "pretrained"
    adapted = build_vlm(apply_overrides(get_preset("tiny-qformer"), [
        *SMALL, f"language.model={tmp_path / 'lm'}", "language.train=lora", "language.lora_rank=2"]))
    with torch.no_grad():  # an adapter that changes the outputs, as a trained one does
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)
    adapted.save(tmp_path / "adapted")
    pixels = adapted.pixels_of([e.image for e in examples[:2]])
    prompts, targets = ["a short caption:"] * 2, [e.target for e in examples[:2]]
    with torch.no_grad():
        expected = adapted.eval()(pixels, prompts, targets)

    model = start_from(tmp_path / "adapted",
                       apply_overrides(get_preset("tiny-qformer"), [*SMALL, "language.train=frozen"]))
    assert model.config.language.model == "" and model.config.language.train == "frozen"
    assert not any(p.requires_grad for p in model.language.parameters())
    model.save(tmp_path / "again")  # saved in full: base and adapter merged exist in no other folder
    with torch.no_grad():
        assert torch.allclose(model.eval()(pixels, prompts, targets), expected, atol=1e-5)
        assert torch.allclose(VLM.load(tmp_path / "again", device="cpu")(pixels, prompts, targets), expected, atol=1e-5)
