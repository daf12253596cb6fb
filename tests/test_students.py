"""Student construction: copy init puts exactly the teacher's parameters in place; widths and projections."""

from __future__ import annotations

import pytest
import torch

from tunekd.errors import ConfigError
from tunekd.models import family_for
from tunekd.students import build_projections, build_student
from tunekd.study import StudentConfig
from tunekd.tasks import get_task

SPEC = get_task("sst2")


@pytest.fixture(scope="module")
def teacher(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)


def test_copy_init_copies_exactly_the_chosen_layers(teacher):
    family = family_for(teacher.config)
    st = build_student(teacher, family, SPEC, StudentConfig(layers=2, init="copy", copy_layers=[1, 3]), seed=0)
    assert st.copied_layers == [1, 3]
    s_layers = st.model.bert.encoder.layer
    t_layers = teacher.bert.encoder.layer
    assert len(s_layers) == 2
    for i, t_idx in enumerate([1, 3]):
        s_params = dict(s_layers[i].named_parameters())
        t_params = dict(t_layers[t_idx].named_parameters())
        assert s_params.keys() == t_params.keys()
        for name in s_params:
            assert torch.equal(s_params[name], t_params[name]), (i, name)
    # embeddings and pooler are the teacher's
    for name, p in st.model.bert.embeddings.named_parameters():
        assert torch.equal(p, dict(teacher.bert.embeddings.named_parameters())[name])
    assert torch.equal(st.model.bert.pooler.dense.weight, teacher.bert.pooler.dense.weight)
    # the classification head is not
    assert not torch.equal(st.model.classifier.weight, teacher.classifier.weight)
    assert st.model.config.tunekd_copied_layers == [1, 3]


def test_copy_forward_default_uses_forward_targets(teacher):
    family = family_for(teacher.config)
    st = build_student(teacher, family, SPEC, StudentConfig(layers=2, init="copy"), seed=0)
    assert st.copied_layers == [1, 3]  # fwd(i) - 1 for T=4, S=2
    w = st.model.bert.encoder.layer[1].attention.self.query.weight
    assert torch.equal(w, teacher.bert.encoder.layer[3].attention.self.query.weight)


def test_copied_params_are_not_shared_with_the_teacher(teacher):
    family = family_for(teacher.config)
    st = build_student(teacher, family, SPEC, StudentConfig(layers=2, init="copy"), seed=0)
    before = teacher.bert.encoder.layer[3].output.dense.weight.clone()
    with torch.no_grad():
        st.model.bert.encoder.layer[1].output.dense.weight.add_(1.0)
    assert torch.equal(teacher.bert.encoder.layer[3].output.dense.weight, before)


def test_random_init_differs_from_teacher_and_is_seeded(teacher):
    family = family_for(teacher.config)
    a = build_student(teacher, family, SPEC, StudentConfig(layers=3, init="random"), seed=1)
    b = build_student(teacher, family, SPEC, StudentConfig(layers=3, init="random"), seed=1)
    assert a.copied_layers is None
    wa = a.model.bert.encoder.layer[0].attention.self.query.weight
    assert torch.equal(wa, b.model.bert.encoder.layer[0].attention.self.query.weight)
    assert not torch.equal(wa, teacher.bert.encoder.layer[0].attention.self.query.weight)


def test_narrow_random_student_and_projections(teacher):
    family = family_for(teacher.config)
    st = build_student(teacher, family, SPEC, StudentConfig(layers=2, init="random", hidden_size=16,
                                                            num_attention_heads=2, intermediate_size=32), seed=0)
    assert st.model.config.hidden_size == 16
    proj = build_projections([(0, 0), (1, 2), (2, 4)], 16, 32, seed=0)
    assert sorted(proj.keys()) == ["0", "1", "2"]
    assert proj["1"].weight.shape == (32, 16)
    assert len(build_projections([(1, 2)], 32, 32, seed=0)) == 0


def test_copy_with_width_mismatch_is_a_clear_error(teacher):
    family = family_for(teacher.config)
    with pytest.raises(ConfigError, match="copy.*width"):
        build_student(teacher, family, SPEC, StudentConfig(layers=2, init="copy", hidden_size=16), seed=0)


def test_student_deeper_than_teacher_is_an_error(teacher):
    family = family_for(teacher.config)
    with pytest.raises(ConfigError, match="depth"):
        build_student(teacher, family, SPEC, StudentConfig(layers=5, init="random"), seed=0)
