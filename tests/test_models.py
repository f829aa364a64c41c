"""CIFAR models of the pipeline and feature capture by module path."""
import pytest
import torch
import torch.nn as nn

from mhgd_fast.training.distiller import feature_channels
from mhgd_fast.training.features import FeatureCapture, unwrap
from mhgd_fast.training.models import build_model, model_names

# name, width, channels at the sensing points, spatial sizes there
CASES = [
    ("resnet8", 0.5, [8, 16, 32], [32, 16, 8]),
    ("resnet14", 1.0, [16, 32, 64], [32, 16, 8]),
    ("resnet8x4", 1.0, [64, 128, 256], [32, 16, 8]),
    ("resnet20", 0.25, [4, 8, 16], [32, 16, 8]),
    ("wrn-10-2", 1.0, [32, 64, 128], [32, 16, 8]),
    ("vgg8", 0.125, [8, 16, 32, 64, 64], [32, 16, 8, 4, 2]),
    ("vgg13", 0.125, [8, 16, 32, 64, 64], [32, 16, 8, 4, 2]),
    ("mobilenet", 0.25, [16, 32, 64], [32, 16, 8]),
]


@pytest.mark.parametrize("name,width,channels,sizes", CASES)
def test_forward_and_sensing_points(name, width, channels, sizes):
    model = build_model(name, num_classes=7, width=width)
    x = torch.randn(3, 3, 32, 32)
    with FeatureCapture(model, model.sensing_points) as capture:
        logits = model(x)
        feats = capture.features
    assert logits.shape == (3, 7)
    assert [f.shape[1] for f in feats] == channels
    assert [f.shape[-1] for f in feats] == sizes
    assert feature_channels(model, model.sensing_points) == channels


def test_resnet_depths_and_block_counts():
    for depth in (8, 14, 20, 32, 56, 110):
        model = build_model(f"resnet{depth}", 10)
        convs = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())
        assert convs + 1 == depth  # 3×3 convs + the classifier = the depth (6n + 2)


def test_resnet32x4_matches_the_authors_widths():
    teacher, student = build_model("resnet32x4"), build_model("resnet8x4")
    assert feature_channels(teacher, teacher.sensing_points) == [64, 128, 256]
    assert feature_channels(student, student.sensing_points) == [64, 128, 256]


def test_mobilenet_is_depthwise_separable():
    model = build_model("mobilenet", 10)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)


@pytest.mark.parametrize("name", ["resnet7", "resnet20x", "wrn-12-2", "vgg10", "alexnet"])
def test_unknown_models_are_rejected(name):
    with pytest.raises(ValueError):
        build_model(name)


def test_every_listed_name_builds():
    for name in model_names():
        assert hasattr(build_model(name, 10), "sensing_points")


def test_capture_on_a_user_model_and_bad_path():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(5, 6, 3), nn.ReLU()))
    capture = FeatureCapture(model, ["1", "2.0"])
    out = model(torch.randn(2, 3, 9, 9))
    relu, inner = capture.features
    assert relu.shape == (2, 5, 7, 7) and inner.shape == (2, 6, 5, 5)
    assert torch.equal(torch.relu(inner), out)
    capture.remove()
    model(torch.randn(2, 3, 9, 9))
    with pytest.raises(RuntimeError, match="no output captured"):
        capture.features
    with pytest.raises(ValueError, match="no submodule 'layer9'"):
        FeatureCapture(model, ["layer9"])


def test_capture_through_a_wrapper_keeps_gradients():
    model = build_model("resnet8", 4, 0.25)
    wrapped = nn.DataParallel(model)  # on CPU it just calls the module; paths resolve inside it
    assert unwrap(wrapped) is model
    with FeatureCapture(wrapped, ["layer2"]) as capture:
        wrapped(torch.randn(2, 3, 32, 32))
        (feat,) = capture.features
        feat.sum().backward()
    assert model.layer1[0].conv1.weight.grad is not None
