"""llama32_nb.adapter's training in miniature: the synthetic scenes (held-out pairs never in training, exactly one in
every test scene), the noisy captions, the questions and their encoding (loss on answers only), the scorers (a model
that reads the answer scores 1, the blind guesser), a short training run that leaves the text model bit-identical,
and `explain_answer` on a scene and on a photo of any size."""
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from llama32_nb.adapter import (CANDIDATES, COLOURS, HELD_OUT, SCENE_VISION, SHAPES, Mllama, Scene, Shape, accuracy,
                                answer_scores, blind_accuracy, caption, caption_set, draw_scene, encode_turns,
                                explain_answer, make_scene, qa_set, questions, reading_order, text_model_digest,
                                train_adapter)
from llama32_nb.pretraining import load_artifacts

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def shipped():
    return load_artifacts()


def test_training_scenes_never_hold_a_held_out_pair_and_test_scenes_hold_one_first():
    rng = random.Random(0)
    for _ in range(300):
        s = make_scene(rng)
        pairs = [(x.colour, x.shape) for x in s.shapes]
        assert not set(pairs) & set(HELD_OUT)
        assert len({x.colour for x in s.shapes}) == len(s.shapes) == len({x.shape for x in s.shapes})
        assert len({x.cell for x in s.shapes}) == len(s.shapes) and 1 <= len(s.shapes) <= 3
        t = make_scene(rng, held_out=True)
        tp = [(x.colour, x.shape) for x in t.shapes]
        assert tp[0] in HELD_OUT and sum(p in HELD_OUT for p in tp) == 1
    with pytest.raises(ValueError, match="n_shapes"): make_scene(rng, n_shapes=5)


def test_every_layout_is_drawn_at_its_size_and_shapes_are_in_their_cells():
    rng, seen = random.Random(1), set()
    for _ in range(60):
        s = make_scene(rng, n_shapes=1)
        im = np.asarray(draw_scene(s)).astype(int)
        (r, c), cell = s.layout, s.tile // s.cells
        assert im.shape == (r * s.tile, c * s.tile, 3)
        y, x = s.shapes[0].cell
        centre = im[y * cell + cell // 2, x * cell + cell // 2]
        assert np.abs(centre - np.array(COLOURS[s.shapes[0].colour])).max() == 0     # every shape covers its centre
        seen.add(s.layout)
    assert seen == {(1, 1), (1, 2), (2, 1)}
    assert np.array_equal(np.asarray(draw_scene(s)), np.asarray(draw_scene(s)))      # reproducible from the scene


def test_caption_noise_rate_and_kinds():
    rng = random.Random(2)
    scenes = [make_scene(rng, n_shapes=3) for _ in range(2000)]
    clean = [caption(s, random.Random(0)) for s in scenes]
    assert all(c == "a " + ", a ".join(f"{x.colour} {x.shape}" for x in reading_order(s)[:2]) + " and a " +
               f"{reading_order(s)[2].colour} {reading_order(s)[2].shape}" for c, s in zip(clean, scenes))
    r = random.Random(3)
    noisy = [caption(s, r, noise=0.3) for s in scenes]
    rate = sum(a != b for a, b in zip(noisy, clean)) / len(scenes)
    assert 0.25 < rate < 0.35, rate                  # a "wrong" attribute always differs, so no corruption is a no-op
    assert caption(make_scene(random.Random(4), n_shapes=1), random.Random(0)).count(" a ") == 0


def test_questions_never_name_the_answer_partner_and_targets_cover_answers_only(shipped):
    _, tok = shipped
    one = Scene((1, 1), (Shape("red", "circle", (0, 1)),))
    qs = questions(one)
    assert [k for *_, k in qs] == ["colour", "shape", "count"] and [a for _, a, _ in qs] == ["red", "circle", "one"]
    for q, a, _ in qs: assert not any(w in q for w in list(COLOURS) + list(SHAPES))
    three = make_scene(random.Random(5), n_shapes=3)
    assert [k for *_, k in questions(three)] == ["count"]
    ids, tg = encode_turns(tok, [("Question: x Answer:", " red"), ("Question: y Answer:", " two")])
    learned = [t for t in tg if t != -100]
    eot = tok.special_tokens["<|eot_id|>"]
    assert learned == tok.encode(" red") + [eot] + tok.encode(" two") + [eot]
    assert ids[1] == tok.n_words and len(ids) == len(tg)                         # <|image|> right after BOS


def test_qa_sets_and_blind_guesser(shipped):
    _, tok = shipped
    tr = qa_set(tok, SCENE_VISION, 40, seed=0)
    te = qa_set(tok, SCENE_VISION, 40, seed=1, held_out=True)
    for d in (tr, te):                 # one count question per scene; colour and shape for each one-shape scene
        n = Counter(d.kinds)
        assert n["count"] == 40 and n["colour"] == n["shape"] >= 20 and len(d) == len(d.answers) == sum(n.values())
    assert all(a in CANDIDATES[k] for a, k in zip(te.answers, te.kinds))
    # a held-out test scene's colour and shape questions are about its never-seen pair
    held = {c for c, _ in HELD_OUT}, {s for _, s in HELD_OUT}
    assert all(a in held[k == "shape"] for a, k in zip(te.answers, te.kinds) if k != "count")
    assert tr.pixel_values.shape[:3] == (len(tr), 1, SCENE_VISION.max_tiles)
    dense = qa_set(tok, SCENE_VISION, 40, seed=0, dense=True)
    assert len(dense) == 40 and dense.kinds is None
    b = blind_accuracy(tr, te)
    assert set(b) == {"all", "colour", "shape", "count"} and all(0 <= v <= 1 for v in b.values())
    # the blind guess is the most common training answer: count guesses are right as often as that answer is
    common = Counter(a for a, k in zip(tr.answers, tr.kinds) if k == "count").most_common(1)[0][0]
    assert b["count"] == sum(a == common for a, k in zip(te.answers, te.kinds) if k == "count") / 40


def test_scores_text_only_model_is_image_blind_and_training_keeps_text_model(shipped):
    llama, tok = shipped
    digest = text_model_digest(llama)
    torch.manual_seed(0)
    model = Mllama.from_text_model(llama, SCENE_VISION)
    te = qa_set(tok, SCENE_VISION, 8, seed=1, held_out=True)
    s = answer_scores(model, tok, te)
    assert all(set(x) == set(CANDIDATES[k]) for x, k in zip(s, te.kinds))
    # gates at 0: the image cannot matter, so the same question gets the same scores for every scene
    by_q = {}
    for x, p in zip(s, te.prompts): by_q.setdefault(p, []).append(x)
    for xs in by_q.values():
        for x in xs[1:]: assert x == pytest.approx(xs[0], abs=1e-5)
    acc = accuracy(model, tok, te)
    assert set(acc) == {"all", "colour", "shape", "count"}
    hist = train_adapter(model, caption_set(tok, SCENE_VISION, 16, seed=0, noise=0.3), 3, batch_size=4, warmup=1)
    assert len(hist["loss"]) == 3 and all(np.isfinite(hist["loss"]))
    assert any(g != 0 for g in hist["gate_attn"][-1] + hist["gate_ffn"][-1])    # training opened a gate
    assert text_model_digest(model.text_model) == digest and model.text_model is llama


def test_explain_answer_on_a_scene_and_on_a_photo(shipped):
    llama, tok = shipped
    torch.manual_seed(0)
    model = Mllama.from_text_model(llama, SCENE_VISION)
    sc = make_scene(random.Random(6), held_out=True, tile=SCENE_VISION.image_size, n_shapes=1)
    ex = explain_answer(model, tok, sc, "Which shape is it?", "shape")
    assert ex["answer"] in SHAPES and max(ex["scores"], key=ex["scores"].get) == ex["answer"]
    g = SCENE_VISION.image_size // SCENE_VISION.patch_size
    assert ex["heatmaps"][0][1].shape == (sc.layout[0] * g, sc.layout[1] * g)
    # the heatmap of the scene equals that of the same picture passed as an image
    ex2 = explain_answer(model, tok, draw_scene(sc), "Which shape is it?", "shape")
    assert ex2["scores"] == ex["scores"] and torch.equal(ex2["heatmaps"][0][1], ex["heatmaps"][0][1])
    for size, grid in (((45, 100), (g, 2 * g)), ((300, 120), (2 * g, g)), ((64, 64), (g, g))):
        photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8))
        e = explain_answer(model, tok, photo.convert("L"), "How many shapes are there?", "count")  # grey works too
        assert e["heatmaps"][0][1].shape == grid and e["answer"] in CANDIDATES["count"]
        for _, hm in e["heatmaps"]: assert 0 < hm.sum() <= 1 + 1e-5     # probabilities, the class tokens left out
    with pytest.raises(TypeError, match="Scene or a PIL image"): explain_answer(model, tok, "a cat", "Which?", "shape")
    with pytest.raises(ValueError, match="kind must be one of"): explain_answer(model, tok, sc, "Which?", "size")
