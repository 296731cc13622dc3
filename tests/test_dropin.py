"""streamvz.visionzip(model, processor): the drop-in for plain transformers users.

It must give the same tokens as streamvz's adapter path, change only the instance it is given,
come off cleanly, and refuse classes it does not know."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from streamvz.dropin import SUPPORTED, remove_visionzip, visionzip
from streamvz.engine import Engine
from test_families import Q1, SYSTEM, conversation_ids, cpu_adapter, feed, frames
from tiny_families import checkpoint, load_processor

FAMILIES = ["llava_next_video", "llava_onevision", "qwen2_5_vl", "qwen3_vl", "smolvlm", "internvl"]
QWEN = ("qwen2_5_vl", "qwen3_vl")
BUDGET = 12  # streamvz.compress.split(12) == (10, 2)


def pixel_inputs(ad, family, imgs):
    if family in QWEN:
        pv, grid = ad.pixel_values(imgs)
        return dict(pixel_values=pv, image_grid_thw=grid)
    if family == "smolvlm":  # one sample, one unsplit image per frame
        return dict(pixel_values=ad.pixel_values(imgs)[None])
    if family == "internvl":  # one tile per frame
        return dict(pixel_values=ad.pixel_values(imgs))
    return dict(pixel_values_videos=ad.pixel_values(imgs)[:, None])  # each frame a one-frame video


@pytest.mark.parametrize("family", FAMILIES)
async def test_dropin_generate_equals_streamed_session(family):
    """generate() on the drop-in model answers exactly what a streamed session with the adapter
    answers: same compressed features, same positions (Qwen: the kept tokens' M-RoPE ids)."""
    path = checkpoint(family)
    ad = cpu_adapter(path, BUDGET)
    engine = Engine(ad)
    s = engine.session(system_prompt=SYSTEM)
    imgs = frames(2, seed=7)
    await feed(s, imgs)
    a = s.ask(Q1, max_new_tokens=6)
    await a.result()
    await engine.aclose()

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = load_processor(path)
    visionzip(model, processor, dominant=ad.vz.dominant, contextual=ad.vz.contextual)
    cfg = model.config
    placeholder = cfg.video_token_id if family.startswith("llava") else cfg.image_token_id
    ids = torch.tensor([conversation_ids(engine, len(imgs), [placeholder] * ad.tokens_per_frame, [(Q1, None)])])
    extra = pixel_inputs(ad, family, imgs)
    if family in QWEN:
        extra["mm_token_type_ids"] = (ids == placeholder).int()
        out = model.model.get_image_features(**extra)
        feats = out.pooler_output
        if family == "qwen3_vl":  # the adapter's rows are [main | DeepStack levels]
            feats = [torch.cat(per_image, dim=-1) for per_image in zip(feats, *out.deepstack_features)]
    elif family in ("smolvlm", "internvl"):
        feats = model.model.get_image_features(extra["pixel_values"]).pooler_output
    else:
        feats = model.model.get_video_features(extra["pixel_values_videos"]).pooler_output
    torch.testing.assert_close(torch.cat(list(feats)).reshape(2, ad.tokens_per_frame, -1), ad.encode_frames(imgs))

    out = model.generate(ids, **extra, max_new_tokens=6, do_sample=False)
    assert [t for t in out[0, ids.shape[1]:].tolist() if t not in ad.eos_token_ids] == a.token_ids


def test_llava_processor_and_generate(tiny_llava):
    """LLaVA-1.5 end to end: the usual generate(**processor(images, text)) with compressed tokens,
    equal to generating from the adapter's embeddings; removable; other instances untouched."""
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava).eval()
    other = LlavaForConditionalGeneration.from_pretrained(tiny_llava).eval()
    processor = AutoProcessor.from_pretrained(tiny_llava)
    img = frames(1, seed=8, h=84, w=84)[0]
    text = "USER: <image>\nWhat is in the video? ASSISTANT:"
    full = processor(images=[img], text=text, return_tensors="pt")
    n_full = int((full["input_ids"] == model.config.image_token_id).sum())
    base = model.generate(**full, max_new_tokens=5, do_sample=False)

    original = type(model.model).get_image_features
    visionzip(model, processor, dominant=14, contextual=2)
    inputs = processor(images=[img], text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16 < n_full
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)

    ad = cpu_adapter(tiny_llava, 16)  # the adapter path: 14 + 2
    emb = ad.embed(inputs["input_ids"])
    emb[inputs["input_ids"] == model.config.image_token_id] = ad.encode_frames(img[None])[0]
    ref = ad.model.generate(inputs_embeds=emb, attention_mask=inputs["attention_mask"], max_new_tokens=5,
                            do_sample=False)
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == ref[0].tolist()

    # per instance: the class and a second instance keep the original behaviour
    assert type(model.model).get_image_features is original and "get_image_features" in vars(model.model)
    assert other.generate(**full, max_new_tokens=5, do_sample=False).tolist() == base.tolist()
    # removable: back to the full token count and the original output
    remove_visionzip(model, processor)
    again = processor(images=[img], text=text, return_tensors="pt")
    assert int((again["input_ids"] == model.config.image_token_id).sum()) == n_full
    assert model.generate(**again, max_new_tokens=5, do_sample=False).tolist() == base.tolist()


@pytest.mark.parametrize("family", QWEN)
def test_qwen_processor_and_generate(family):
    """Qwen2.5-VL / Qwen3-VL: generate(**processor(images, text)) runs on compressed images with
    positions from the kept tokens; removal restores the model's own output."""
    path = checkpoint(family)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = load_processor(path)
    imgs = frames(2, seed=9, h=112, w=168)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": Q1}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    full = processor(images=imgs, text=text, return_tensors="pt")
    base = model.generate(**full, max_new_tokens=5, do_sample=False)

    visionzip(model, processor, dominant=7, contextual=1)
    inputs = processor(images=imgs, text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * 8
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        image_grid_thw=inputs["image_grid_thw"],
                                        pixel_values=inputs["pixel_values"])
    image_pos = pos[:, 0, inputs["input_ids"][0] == model.config.image_token_id]
    assert image_pos.shape == (3, 16) and bool((image_pos[1:] >= image_pos[0]).all())

    remove_visionzip(model, processor)
    assert "get_rope_index" not in vars(model.model)
    again = processor(images=imgs, text=text, return_tensors="pt")
    assert model.generate(**again, max_new_tokens=5, do_sample=False).tolist() == base.tolist()


@pytest.mark.parametrize("family,newline", [("llava_next_video", 0), ("llava_onevision", 1)])
def test_video_placeholders_match_features(family, newline):
    """The processor's video expansion equals the number of compressed rows the model returns."""
    path = checkpoint(family)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = load_processor(path)
    visionzip(model, processor, dominant=10, contextual=2)
    video = np.zeros((3, 3, 112, 112), np.float32)
    expanded = processor.replace_video_token({"pixel_values_videos": [video]}, 0)
    assert expanded == processor.video_token * (3 * 12 + newline)
    feats = model.model.get_video_features(torch.zeros(1, 3, 3, 112, 112)).pooler_output
    assert feats.shape[:2] == (1, 3 * 12 + newline)


def test_unsupported_class_is_refused(tiny_llava):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14))
    with pytest.raises(ValueError, match="does not support CLIPVisionModel; supported classes"):
        visionzip(tower, None)
    assert "LlavaForConditionalGeneration" in SUPPORTED
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava)
    with pytest.raises(ValueError, match="exceeds"):  # a budget over the tower's 37 tokens, at setup
        visionzip(model, None, dominant=40, contextual=2)
    assert "get_image_features" not in vars(model.model)  # nothing left half set up


def test_qwen_rope_index_leaves_videos_and_text_as_the_model_has_them():
    """Videos are not compressed by the drop-in: their 3-D positions (and the text around them)
    are exactly the model's own."""
    model = AutoModelForImageTextToText.from_pretrained(checkpoint("qwen2_5_vl")).eval()
    cfg = model.config
    n = 2 * 4 * 4  # a (2, 8, 8) patch grid -> 2 x 4 x 4 merged tokens
    ids = torch.tensor([[5, 6, cfg.vision_start_token_id] + [cfg.video_token_id] * n + [cfg.vision_end_token_id, 7]])
    types = (ids == cfg.video_token_id).int() * 2
    grid = torch.tensor([[2, 8, 8]])
    ref = model.model.get_rope_index(ids, types, video_grid_thw=grid, second_per_grid_ts=torch.tensor([1.0]))
    visionzip(model, None, dominant=7, contextual=1)
    got = model.model.get_rope_index(ids, types, video_grid_thw=grid, second_per_grid_ts=torch.tensor([1.0]))
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision"])
def test_anyres_images_compress_every_crop(family):
    """LLaVA-NeXT-style images: processor and model agree on crops x budget + 1 newline rows; the
    rows are VisionZip of each crop; generate runs; removal restores the original output."""
    from streamvz.compress import VisionZip

    path = checkpoint(family)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = load_processor(path)
    img = frames(1, seed=11, h=100, w=200)[0]  # wide: the base view + 2 crops (224x112 grid)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q1}]}], add_generation_prompt=True)
    full = processor(images=[img], text=text, return_tensors="pt")
    base = model.generate(**full, max_new_tokens=4, do_sample=False)

    visionzip(model, processor, dominant=10, contextual=2)
    inputs = processor(images=[img], text=text, return_tensors="pt")
    n_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_tokens == 3 * 12 + 1
    feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    assert [f.shape[0] for f in feats] == [n_tokens]
    z = VisionZip(10, 2).compress(model.model.vision_tower, inputs["pixel_values"][0, :3],
                                  model.config.vision_feature_layer)
    torch.testing.assert_close(feats[0][:-1], model.model.multi_modal_projector(z.tokens.clone()).flatten(0, 1))
    torch.testing.assert_close(feats[0][-1], model.model.image_newline)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]

    remove_visionzip(model, processor)
    again = processor(images=[img], text=text, return_tensors="pt")
    assert model.generate(**again, max_new_tokens=4, do_sample=False).tolist() == base.tolist()


def test_onevision_multi_image_prompt_uses_one_view_per_image():
    path = checkpoint("llava_onevision")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = load_processor(path)
    visionzip(model, processor, dominant=10, contextual=2)
    imgs = frames(2, seed=12, h=100, w=200)
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": Q1}]}], add_generation_prompt=True)
    inputs = processor(images=[imgs], text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * (12 + 1)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("family,image_token", [("smolvlm", "<image>"), ("internvl", "<IMG_CONTEXT>")])
def test_shuffle_family_processor_and_generate(family, image_token):
    """SmolVLM2 / InternVL3: the processor writes the budget per tower input (crop, tile, thumbnail)
    in its own layout,
    generate runs on the compressed tokens; removal restores the token count and the output."""
    path = checkpoint(family)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = load_processor(path)
    imgs = frames(2, seed=10, h=100, w=150)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": Q1}]}]
    # the tokenizer's template: SmolVLMProcessor's own needs the video processor (torchvision)
    text = processor.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    token_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    full = processor(images=imgs, text=text, return_tensors="pt")
    n_full = int((full["input_ids"] == token_id).sum())
    base = model.generate(**full, max_new_tokens=5, do_sample=False)

    visionzip(model, processor, dominant=8, contextual=2)
    inputs = processor(images=imgs, text=text, return_tensors="pt")
    inputs_per_image = n_full // 16 // 2  # tower inputs per image: 1 (SmolVLM, unsplit) or InternVL's tiles
    assert n_full == 2 * inputs_per_image * 16
    assert int((inputs["input_ids"] == token_id).sum()) == 2 * inputs_per_image * 10
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]

    remove_visionzip(model, processor)
    again = processor(images=imgs, text=text, return_tensors="pt")
    assert int((again["input_ids"] == token_id).sum()) == n_full
    assert model.generate(**again, max_new_tokens=5, do_sample=False).tolist() == base.tolist()
