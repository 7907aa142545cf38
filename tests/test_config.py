import dataclasses

import pytest

from anomaly_core.config import ModelConfig


def test_defaults_are_valid():
    assert (ModelConfig().grid_size, ModelConfig().input_size) == (28, 392)


@pytest.mark.parametrize("kw,msg", [
    ({"image_size": 100}, "multiple of 14"),
    ({"blocks": (12,)}, "0..11"),
    ({"backbone": "resnet50"}, "vit_small_patch14_dinov2"),
    ({"coreset_ratio": 0.0}, "coreset_ratio=0.0"),
    ({"reduction": "mean"}, "topk_mean"),
    ({"holdout_fraction": 1.0}, "holdout_fraction=1.0"),
])
def test_bad_values_name_the_value_and_the_fix(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ModelConfig(**kw)


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        ModelConfig("vit_small_patch14_dinov2")


def test_dict_round_trip_and_unknown_keys():
    cfg = ModelConfig(blocks=(5, 8), coreset_ratio=0.25)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="coreset_ration"):
        ModelConfig.from_dict({"coreset_ration": 0.1})


@pytest.mark.parametrize("kw,pixels", [
    ({"tiles": 1}, 4.0),                            # PatchCore's 4 px at 224 px
    ({"tiles": 2}, 7.0),                            # 392 px
    ({"tiles": 1, "image_size": 448}, 8.0),
    ({"tiles": 2, "smoothing_sigma": 0.0}, 0.0),    # off stays off
])
def test_map_smoothing_spans_the_same_fraction_of_the_image_at_every_size(kw, pixels):
    assert ModelConfig(**kw).map_sigma == pytest.approx(pixels)


def test_every_field_says_what_it_does_for_the_command_line():
    for f in dataclasses.fields(ModelConfig):
        assert f.metadata.get("help", "").strip(), f"ModelConfig.{f.name} needs option(default, 'help text')"


def test_a_name_outside_its_registry_lists_the_registry():
    with pytest.raises(ValueError,
                       match=r"index='annoy' is unknown; choose one of \['auto', 'flat', 'hnsw', 'ivf', 'ivfpq'\]"):
        ModelConfig(index="annoy")
