"""Models are valid for Opacus, small, and compose with the features into one scriptable artifact."""

import pytest
import torch
from opacus.validators import ModuleValidator

from fl_ser.features import FeatureNormalizer, Functionals, LogMel
from fl_ser.models import CNN, MLP, EmotionPipeline, count_parameters
from fl_ser.models.classifiers import build_classifier
from fl_ser.models.export import frozen, write_torchscript


@pytest.mark.parametrize("model", [MLP([74], 7, hidden=[16]), MLP([74], 7, hidden=[64, 32]), CNN([1, 64, 300], 7),
                                   CNN([3, 20, 300], 7)])
def test_opacus_validator_accepts_models(model):
    assert ModuleValidator.validate(model, strict=True) == []


def test_models_are_phone_sized():
    assert count_parameters(MLP([74], 7, hidden=[16])) < 5_000
    assert count_parameters(CNN([1, 64, 300], 7)) < 50_000


def test_model_feature_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="model=cnn"):
        build_classifier({"_target_": "fl_ser.models.MLP"}, (1, 64, 300), "sequence", 7)
    with pytest.raises(ValueError, match="model=mlp"):
        build_classifier({"_target_": "fl_ser.models.CNN"}, (74,), "vector", 7)


@pytest.mark.parametrize("extractor", [Functionals(), LogMel()])
def test_pipeline_scripts_to_one_audio_to_emotion_artifact(tmp_path, extractor):
    shape = tuple(extractor.output_shape)
    clf = MLP(shape, 4) if extractor.kind == "vector" else CNN(shape, 4)
    pipe = EmotionPipeline(extractor, FeatureNormalizer(shape, extractor.kind), clf, ["a", "b", "c", "d"]).eval()
    path = tmp_path / "m.pt"
    write_torchscript(frozen(pipe), path)
    loaded = torch.jit.load(str(path))
    wave = torch.randn(1, 16000 * 2) * 0.1
    probs = loaded(wave)
    assert probs.shape == (1, 4)
    assert torch.allclose(probs.sum(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(probs, pipe(wave), atol=1e-5)
    assert loaded.labels == ["a", "b", "c", "d"]
