"""QA windows, labels across stride boundaries, and n-best postprocessing."""

import numpy as np
import pytest
from conftest import shared_data_or_skip

from fedtune.models import load_tokenizer
from fedtune.tasks.qa import QAExample, load_squad_json, postprocess, prepare_eval_features, prepare_train_features
from fedtune.tasks.squad_metric import squad_scores


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded")


def long_example(answer_word_index: int) -> QAExample:
    words = [f"w{i}" for i in range(120)]
    words[answer_word_index] = "zebra"
    words[answer_word_index + 1] = "crossing"
    context = " ".join(words)
    start = context.index("zebra crossing")
    return QAExample("q1", "t", "what crossing?", context, (("zebra crossing", start),))


def test_answer_across_stride_boundary_labels_every_window(tok):
    # Small windows force many overlapping windows; w<n> words are several tokens each.
    ex = long_example(60)
    feats = prepare_train_features(tok, [ex], max_length=64, stride=24)
    assert len(feats) > 3 and set(feats.example_index) == {0}
    labelled = [i for i in range(len(feats)) if feats.start_positions[i] != 0]
    assert labelled, "the answer must be inside at least one window"
    for i in labelled:
        span = tok.decode(feats.input_ids[i][feats.start_positions[i] : feats.end_positions[i] + 1])
        assert span == "zebra crossing"
    # A window that cuts the answer or misses it is labelled with [CLS] (position 0).
    assert any(feats.start_positions[i] == 0 for i in range(len(feats)))


def test_postprocess_recovers_answer_spanning_two_windows(tok):
    ex = long_example(60)
    feats = prepare_eval_features(tok, [ex], max_length=64, stride=24)
    start_c = ex.answers[0][1]
    end_c = start_c + len("zebra crossing")
    starts, ends = [], []
    for offs in feats.offsets:
        s = np.full(len(offs), -5.0)
        e = np.full(len(offs), -5.0)
        for j, o in enumerate(offs):
            if o is not None and o[0] == start_c:
                s[j] = 5.0
            if o is not None and o[1] == end_c:
                e[j] = 5.0
        starts.append(s), ends.append(e)
    windows_with_answer = sum(1 for s, e in zip(starts, ends, strict=True) if s.max() > 0 and e.max() > 0)
    assert windows_with_answer >= 2  # the overlap puts the answer in two windows
    preds = postprocess([ex], feats, starts, ends, n_best=5, max_answer_length=30)
    assert preds == {"q1": "zebra crossing"}
    assert squad_scores(preds, {"q1": ["zebra crossing"]}) == {"exact_match": 100.0, "f1": 100.0}


def test_postprocess_respects_max_answer_length_and_order(tok):
    ex = QAExample("q", "t", "q?", "alpha beta gamma delta", (("beta", 6),))
    feats = prepare_eval_features(tok, [ex], max_length=32, stride=8)
    offs = feats.offsets[0]
    ctx = [j for j, o in enumerate(offs) if o is not None]
    s = np.zeros(len(offs))
    e = np.zeros(len(offs))
    s[ctx[3]] = 9.0  # best start after best end: invalid
    e[ctx[0]] = 9.0
    s[ctx[1]] = 5.0
    e[ctx[1]] = 5.0
    assert postprocess([ex], feats, [s], [e], n_best=4, max_answer_length=1) == {"q": "beta"}


def test_local_squad_files_load_and_tokenize(tok):
    data = shared_data_or_skip()
    dev = load_squad_json(data / "squad" / "dev-v1.1.first_article.json")
    assert len(dev) == 810 and dev[0].title == "Super_Bowl_50"
    feats = prepare_train_features(tok, dev[:50], max_length=384, stride=128)
    assert len(feats) >= 50
    hits = [i for i in range(len(feats)) if feats.start_positions[i] != 0]
    assert len(hits) >= 45  # nearly every answer fits in a 384-token window
    ex = dev[feats.example_index[hits[0]]]
    span = tok.decode(feats.input_ids[hits[0]][feats.start_positions[hits[0]] : feats.end_positions[hits[0]] + 1])
    assert span.replace(" ", "") == ex.answers[0][0].lower().replace(" ", "")


def test_bad_squad_file_is_named(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"nodata": 1}')
    with pytest.raises(ValueError, match="x.json"):
        load_squad_json(p)
