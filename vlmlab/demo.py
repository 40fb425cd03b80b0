"""`vlmlab demo`: a gradio page to ask one or more trained models about an image, with the evidence beside.

Per model: the answer (streamed first), then the evidence from `vlmlab.evidence.explain` — the answer with the
image swapped for a blank and for another image (the shuffled control, computed live), the answer's probability
with and without the image, a heatmap of where in the image the answer came from (occlusion: how much its
log-probability drops when each cell is blanked), and the raw generated token ids when the answer is empty or odd
(so "EOS first" shows as ids, not as a blank box).

The request functions are plain functions (`respond`, `api_ask`, `api_caption`) testable without a server. Every
failure a request can meet (no image, a broken / huge / odd image, an empty or overlong question, bad decoding
settings) becomes one `gr.Error` line in the page; unexpected ones too, so no traceback reaches the page. All
events share one queue slot (`concurrency_id="model"`): requests wait, the models never run concurrently.
"""

from __future__ import annotations

import tempfile
import threading
import warnings
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from vlmlab.images import ImageError, bomb_pixels, load_image, too_many_pixels
from vlmlab.prompts import format_prompt

MAX_QUESTION_CHARS = 500  # far above any VQA question; a pasted essay is refused, not silently cut
MAX_IMAGE_BYTES = 20 * 2**20  # also gradio's upload limit (launch max_file_size)
MAX_IMAGE_PIXELS = 40_000_000  # a 40-megapixel photo is fine; a bomb is refused before it is decoded
MAX_NEW_TOKENS = 256
DECODING = ["model default", "greedy", "beam search"]


# -- inputs ----------------------------------------------------------------------------------------------------
def image_path(payload) -> str:
    """The file path of an image input: a gradio FileData dict / object (preprocess off), or a path."""
    if payload is None or payload == "":
        raise ValueError("no image: upload one or pick a sample")
    if isinstance(payload, dict):
        payload = payload.get("path")
    elif hasattr(payload, "path"):
        payload = payload.path
    if not isinstance(payload, (str, Path)) or not payload:
        raise ValueError("no image: upload one or pick a sample")
    return str(payload)


def open_image(payload) -> Image.Image:
    """An RGB image, or `ImageError` naming why not (missing, broken, too many bytes or pixels)."""
    path = Path(image_path(payload))
    if not path.is_file():
        raise ImageError(f"{path.name}: no such image file")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ImageError(f"{path.name}: refused, {path.stat().st_size / 2**20:.0f} MiB is over the "
                         f"{MAX_IMAGE_BYTES // 2**20} MiB limit")
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning would print to the server's log at each request
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as probe:  # reads the header only
                width, height = probe.size
    except Image.DecompressionBombError as err:  # over twice Pillow's limit: refused before even the header
        raise ImageError(too_many_pixels(path.name, bomb_pixels(err), MAX_IMAGE_PIXELS)) from None
    except Exception:  # noqa: BLE001 - load_image below names the reason
        width = height = 0
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(too_many_pixels(f"{path.name} ({width} x {height})", width * height, MAX_IMAGE_PIXELS))
    picture = load_image(path)
    return picture


def check_question(question) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty; ask something about the image")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"the question is {len(question)} characters long; at most {MAX_QUESTION_CHARS}")
    return question.strip()


def decoding_options(model, caption: bool, mode: str | None = None, max_new_tokens=None, min_new_tokens=None,
                     num_beams=4) -> dict:
    """generate() options: the model's own (as `VLM.ask` / `VLM.caption` use) with the page's settings over them."""
    options = dict(model._generation_options(caption))
    if max_new_tokens not in (None, ""):
        options["max_new_tokens"] = int(max_new_tokens)
    if min_new_tokens not in (None, ""):
        options["min_new_tokens"] = int(min_new_tokens)
    if mode == "greedy":
        options["num_beams"] = 1
    elif mode == "beam search":
        options["num_beams"] = int(num_beams or 4)
    if not 1 <= options["max_new_tokens"] <= MAX_NEW_TOKENS:
        raise ValueError(f"max new tokens must be 1 to {MAX_NEW_TOKENS}, not {options['max_new_tokens']}")
    if not 0 <= options["min_new_tokens"] <= options["max_new_tokens"]:
        raise ValueError(f"min new tokens must be 0 to max new tokens ({options['max_new_tokens']}), "
                         f"not {options['min_new_tokens']}")
    if not 1 <= options["num_beams"] <= 16:
        raise ValueError(f"beams must be 1 to 16, not {options['num_beams']}")
    return options


# -- the model side --------------------------------------------------------------------------------------------
def prompt_of(model, question: str | None) -> str:
    """The prompt `VLM.ask` / `VLM.caption` build (a too-long question cut to fit, as they do)."""
    data = model.config.data
    if question is None:
        return format_prompt(data, None)
    return format_prompt(data, model.language.fit_question(question, lambda text: format_prompt(data, text)))


def answer_of(model, picture: Image.Image, question: str | None, options: dict) -> str:
    with torch.no_grad():
        return model.generate(model.pixels_of([picture]), [prompt_of(model, question)], **options)[0]


def stream_answer(model, picture: Image.Image, question: str | None, options: dict):
    """Generator of the growing answer text as it is generated, the last one exactly `answer_of`'s (so `VLM.ask`'s).

    transformers' `TextIteratorStreamer`, generation in a thread as transformers documents it. Beam search cannot
    stream (transformers refuses a streamer with num_beams > 1: a beam's text is only known at the end), so then
    the whole answer comes at once.
    """
    if options.get("num_beams", 1) > 1:
        yield answer_of(model, picture, question, options)
        return
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(model.language.tokenizer, skip_prompt=True, skip_special_tokens=True)
    pixels, prompts = model.pixels_of([picture]), [prompt_of(model, question)]
    done: dict = {}

    def run():  # VLM.generate is no_grad itself (no_grad is per thread)
        try:
            done["answer"] = model.generate(pixels, prompts, streamer=streamer, **options)[0]
        except BaseException as err:  # noqa: BLE001 - re-raised in the request's thread below
            done["error"] = err
            streamer.end()  # unblocks the loop below

    thread = threading.Thread(target=run, name="vlmlab-demo-generate", daemon=True)
    thread.start()
    text, shown = "", ""
    for piece in streamer:
        text += piece
        if text.strip() and text.strip() != shown:
            shown = text.strip()  # stripped as generate strips: each a prefix of the next
            yield shown
    thread.join()
    if "error" in done:
        raise done["error"]
    if done["answer"] != shown or not shown:
        yield done["answer"]


def _odd(text: str) -> bool:
    return not text.strip() or not any(ch.isalnum() for ch in text)


def evidence_of(model, picture: Image.Image, question: str | None, other: Image.Image, options: dict) -> dict:
    """The evidence for one model's answer, as the page shows it: text lines and a heatmap overlay."""
    from vlmlab.evidence import explain, overlay

    ev = explain(model, picture, question, other=other, **options)
    lines = [
        f"**image blank**: {ev.answer_blank or '(empty)'!s}",
        f"**image swapped for another**: {ev.answer_other or '(empty)'!s}" if ev.answer_other is not None else "",
        f"**p(answer | image)** = {ev.probability:.3f} · **p(answer | blank)** = {ev.probability_blank:.3f}",
    ]
    ids = f"raw token ids: {ev.token_ids}" + (" (EOS first: an empty answer)" if not ev.answer.strip() else "")
    return {"text": "  \n".join(line for line in lines if line), "ids": ids if _odd(ev.answer) else "",
            "heatmap": _shown(overlay(ev.seen if ev.seen is not None else picture, ev.heatmap)), "grid": ev.grid, "answer": ev.answer}


def _shown(picture: Image.Image, side: int = 256) -> Image.Image:
    """A tiny (64 x 64) overlay enlarged with sharp cells, so the page shows the token grid, not a blur."""
    if max(picture.size) >= side:
        return picture
    scale = side // max(picture.size)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if isinstance(err, (ImageError, ValueError)) else f"{type(err).__name__}: {text}"


def _fail(err: Exception) -> gr.Error:
    return gr.Error(_one_line(err), print_exception=False)


# -- the request functions -------------------------------------------------------------------------------------
def respond(models: list, other: Image.Image, task: str, image, question, mode=None, max_new_tokens=None,
            min_new_tokens=None, num_beams=4):
    """Generator of page updates: per model [answer, token ids, evidence text, heatmap], answers first."""
    try:
        picture = open_image(image)
        caption = task == "caption"
        asked = None if caption else check_question(question)
        options = [decoding_options(m, caption, mode, max_new_tokens, min_new_tokens, num_beams) for m in models]
        state = [["", "", "", None] for _ in models]
        for i, model in enumerate(models):  # each answer streamed as it is generated
            for text in stream_answer(model, picture, asked, options[i]):
                state[i][0] = text
                yield [value for row in state for value in row]
            state[i][2] = "*working out the evidence ...*"
            yield [value for row in state for value in row]
        for i, model in enumerate(models):
            ev = evidence_of(model, picture, asked, other, options[i])
            state[i][1:] = [ev["ids"], ev["text"], ev["heatmap"]]
            yield [value for row in state for value in row]
    except gr.Error:
        raise
    except Exception as err:  # noqa: BLE001 - one line in the page, never a traceback, and the app goes on
        raise _fail(err) from None


def _pick(models: dict, name: str | None):
    if not name:
        return next(iter(models.values()))
    if name not in models:
        raise ValueError(f"no model named {name!r}; the demo serves {', '.join(models)}")
    return models[name]


def api_ask(models: dict, image, question, model: str | None = None) -> str:
    """/ask: the answer of model `model` (default: the first), as `VLM.ask` gives it."""
    try:
        chosen = _pick(models, model)
        picture, asked = open_image(image), check_question(question)
        return answer_of(chosen, picture, asked, decoding_options(chosen, False))
    except Exception as err:  # noqa: BLE001
        raise _fail(err) from None


def api_caption(models: dict, image, model: str | None = None) -> str:
    """/caption: the caption of model `model` (default: the first), as `VLM.caption` gives it."""
    try:
        chosen = _pick(models, model)
        return answer_of(chosen, open_image(image), None, decoding_options(chosen, True))
    except Exception as err:  # noqa: BLE001
        raise _fail(err) from None


# -- samples ---------------------------------------------------------------------------------------------------
def sample_images(folder: Path) -> list[str]:
    """Built-in samples written to `folder`: three world scenes and three skimage photos (bundled, no download)."""
    from vlmlab.data.synthetic import make_split

    paths = []
    scenes = list({id(e.image): e.image for e in make_split("test", 3, questions_per_image=1)}.values())
    for i, scene in enumerate(scenes[:3]):  # one example per question: the same scene more than once
        paths.append(folder / f"world-{i}.png")
        scene.resize((256, 256), Image.NEAREST).save(paths[-1])
    try:
        import skimage.data

        for name in ("astronaut", "coffee", "chelsea"):
            paths.append(folder / f"skimage-{name}.png")
            Image.fromarray(getattr(skimage.data, name)()).save(paths[-1])
    except Exception:  # noqa: BLE001 - scikit-image missing or its data unavailable: world scenes only
        pass
    return [str(p) for p in paths]


def control_image():
    """The "other image" of the shuffled control: a world scene from a split no sample comes from."""
    from vlmlab.data.synthetic import make_split

    return make_split("val", 1, questions_per_image=1)[0].image


# -- the page --------------------------------------------------------------------------------------------------
def build_app(models: list, names: list[str] | None = None) -> gr.Blocks:
    names = list(names or [f"model {i + 1}" for i in range(len(models))])
    if len(names) != len(models) or len(set(names)) != len(names):
        raise ValueError(f"need one distinct name per model, got {names}")
    by_name = dict(zip(names, models))
    other = control_image()
    samples = sample_images(Path(tempfile.mkdtemp(prefix="vlmlab-demo-")))
    shared = {"concurrency_id": "model", "concurrency_limit": 1}

    # delete_cache: gradio writes every upload and every returned heatmap into its file cache (disk, not memory);
    # files a day old are pruned hourly, so a long-running demo's cache does not grow without end.
    with gr.Blocks(title="vlmlab demo", delete_cache=(3600, 86400)) as app:
        gr.Markdown("## vlmlab demo\nAsk a question about an image or ask for a caption. Beside each answer: the "
                    "answer with the image blanked and swapped for another image, its probability with and "
                    "without the image, and where in the image it came from.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="image", height=256, elem_id="image")
                gr.Examples(samples, inputs=image, label="samples: world scenes, skimage photos")
                question = gr.Textbox(label="question", placeholder="what color is the circle?",
                                      elem_id="question", max_lines=2)
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    caption = gr.Button("Caption", elem_id="caption")
                with gr.Accordion("decoding", open=False):
                    mode = gr.Radio(DECODING, value=DECODING[0], label="decoding")
                    beams = gr.Slider(2, 8, value=4, step=1, label="beams (beam search)")
                    max_new = gr.Number(None, label="max new tokens (empty: the model's)", precision=0)
                    min_new = gr.Number(None, label="min new tokens (empty: the model's)", precision=0)
            outputs = []
            for i, name in enumerate(names):
                with gr.Column(scale=1):
                    gr.Markdown(f"### {name}")
                    outputs += [gr.Textbox(label="answer", elem_id=f"answer-{i}", interactive=False),
                                gr.Markdown(elem_id=f"ids-{i}"),
                                gr.Markdown(elem_id=f"evidence-{i}"),
                                gr.Image(label="where the answer came from", height=256, interactive=False,
                                         elem_id=f"heatmap-{i}")]
        inputs = [image, question, mode, max_new, min_new, beams]

        def on_ask(image, question, mode, max_new, min_new, beams):
            yield from respond(models, other, "ask", image, question, mode, max_new, min_new, beams)

        def on_caption(image, question, mode, max_new, min_new, beams):
            yield from respond(models, other, "caption", image, question, mode, max_new, min_new, beams)

        # preprocess=False: the image arrives as its uploaded file, so a broken one reaches load_image's message
        # instead of failing in gradio's own decoding first.
        for trigger in (ask.click, question.submit):
            trigger(on_ask, inputs, outputs, preprocess=False, api_visibility="private", **shared)
        caption.click(on_caption, inputs, outputs, preprocess=False, api_visibility="private", **shared)

        with gr.Column(visible=False):  # the API endpoints' own inputs: files, so gradio decodes nothing
            api_image, api_question = gr.File(), gr.Textbox()
            api_model = gr.Dropdown(names, value=names[0])
            api_answer = gr.Textbox()
            gr.Button().click(lambda img, q, m: api_ask(by_name, img, q, m), [api_image, api_question, api_model],
                              api_answer, api_name="ask", **shared)
            gr.Button().click(lambda img, m: api_caption(by_name, img, m), [api_image, api_model], api_answer,
                              api_name="caption", **shared)
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
    """Queue (one request at a time on the models, the rest wait) and serve."""
    app.queue(default_concurrency_limit=1, max_size=256)
    return app.launch(server_name=host, server_port=port, max_file_size=MAX_IMAGE_BYTES, prevent_thread_lock=not block,
                      show_error=True, quiet=not block)
